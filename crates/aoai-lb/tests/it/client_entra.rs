//! Clients calling with Microsoft Entra ID tokens: the `entra` block
//! validates them against the simulated tenant's key set, answers every
//! refusal with a 401 naming the reason (never echoing the token), follows a
//! key rotation, never forwards a client token upstream, and serves a
//! principal listed by a named client with that client's permissions,
//! limits and accounting.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use aoai_lb::backend::Clock;
use aoai_lb::credential::AzureEnv;
use aoai_sim::identity::SIM_TENANT_ID;
use aoai_sim::{ClientToken, IdentityConfig, IdentityHandle, SigningKey};
use common::*;
use http::{Method, StatusCode};

async fn setup(allow_any: bool) -> (IdentityHandle, Vec<aoai_sim::SimHandle>, TestGateway) {
    let id = aoai_sim::start_identity(IdentityConfig::default())
        .await
        .unwrap();
    let sims = sims(1).await;
    let doc = config_with(
        &sims,
        serde_json::json!({"entra": {"tenant_id": SIM_TENANT_ID, "allow_any_principal": allow_any}}),
    );
    let gw = start_gateway_with(&doc, Some(CLIENT_KEY), |o| {
        o.azure_env = AzureEnv::from_pairs([("AZURE_AUTHORITY_HOST", id.url())]);
    })
    .await;
    (id, sims, gw)
}

async fn with_token(gw: &TestGateway, token: &str) -> (StatusCode, http::HeaderMap, String) {
    let (s, h, b) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &[
            ("authorization", format!("Bearer {token}")),
            ("content-type", "application/json".to_owned()),
        ],
        chat_body(false),
    )
    .await;
    (s, h, String::from_utf8_lossy(&b).into_owned())
}

#[tokio::test]
async fn a_valid_token_is_accepted_and_never_forwarded() {
    let (id, sims, gw) = setup(true).await;
    let token = id.mint(&ClientToken::default());
    let (s, _, body) = with_token(&gw, &token).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let e = sims[0].journal().pop().unwrap();
    assert_eq!(
        e.header("authorization"),
        None,
        "the client token stays at the gateway"
    );
    assert_eq!(
        e.header("api-key"),
        Some("***"),
        "the gateway's own credential goes up"
    );
    // v2 tokens (azp, v2 issuer) too.
    let v2 = id.mint(&ClientToken {
        version: 2,
        ..ClientToken::default()
    });
    assert_eq!(with_token(&gw, &v2).await.0, StatusCode::OK);
    // The key still works next to Entra tokens.
    let (s, _, _) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test]
async fn every_refusal_is_a_401_naming_the_reason_without_the_token() {
    let (id, sims, gw) = setup(true).await;
    let other_tenant = "11111111-2222-4333-8444-555555555555";
    let cases = [
        (
            "token expired",
            ClientToken {
                expires_in_secs: -120,
                ..ClientToken::default()
            },
        ),
        (
            "token not yet valid",
            ClientToken {
                not_before_in_secs: 600,
                ..ClientToken::default()
            },
        ),
        (
            "token signature is invalid",
            ClientToken {
                key: Some(SigningKey::Foreign),
                ..ClientToken::default()
            },
        ),
        (
            "tenant not accepted",
            ClientToken {
                tenant_id: other_tenant.into(),
                ..ClientToken::default()
            },
        ),
        (
            "audience not accepted",
            ClientToken {
                audience: "https://management.azure.com".into(),
                ..ClientToken::default()
            },
        ),
        (
            "issuer not accepted",
            ClientToken {
                issuer: Some("https://sts.example.com/".into()),
                ..ClientToken::default()
            },
        ),
    ];
    for (reason, claims) in cases {
        let token = id.mint(&claims);
        let (s, h, body) = with_token(&gw, &token).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{reason}: {body}");
        let j: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(j["error"]["code"], "invalid_token", "{body}");
        assert_eq!(
            j["error"]["message"],
            format!("Access denied: {reason}."),
            "{body}"
        );
        assert!(!body.contains(&token) && !body.contains("eyJ"), "{body}");
        assert!(
            h.get("www-authenticate")
                .is_some_and(|v| v.to_str().unwrap().contains("invalid_token"))
        );
    }
    assert_eq!(
        sims[0].request_count(),
        0,
        "no refused request reached an instance"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_valid_token_of_an_unknown_principal_is_refused_without_allow_any_principal() {
    let (id, sims, gw) = setup(false).await;
    let (s, _, body) = with_token(&gw, &id.mint(&ClientToken::default())).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        body.contains("no client is configured for this principal"),
        "{body}"
    );
    assert_eq!(sims[0].request_count(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_key_rotation_is_followed_with_one_fetch_and_unknown_keys_are_rate_limited() {
    let (id, _sims, gw) = setup(true).await;
    assert_eq!(
        with_token(&gw, &id.mint(&ClientToken::default())).await.0,
        StatusCode::OK
    );
    let fetched = id.counts().jwks;
    assert!(fetched >= 1);
    // Entra rotates its signing key: tokens signed with the new key are
    // accepted after one fetch of the key set.
    id.rotate_keys();
    let rotated = id.mint(&ClientToken::default());
    assert_eq!(with_token(&gw, &rotated).await.0, StatusCode::OK);
    assert_eq!(id.counts().jwks, fetched + 1);
    for _ in 0..20 {
        assert_eq!(with_token(&gw, &rotated).await.0, StatusCode::OK);
    }
    // A token naming a key the tenant no longer publishes: refused, and it
    // does not make the gateway fetch the key set again within 5 minutes.
    let stale = id.mint(&ClientToken {
        key: Some(SigningKey::Primary),
        ..ClientToken::default()
    });
    for _ in 0..5 {
        let (s, _, body) = with_token(&gw, &stale).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(body.contains("token signing key is unknown"), "{body}");
    }
    assert_eq!(id.counts().jwks, fetched + 1, "at most one fetch per 5 min");
    gw.shutdown().await;
}

/// A gateway on `clock` with the `entra` block and the `clients` array
/// given, and `API_KEY` = `key`.
async fn start_clients(
    id: &IdentityHandle,
    sims: &[aoai_sim::SimHandle],
    allow_any: bool,
    clients: serde_json::Value,
    key: Option<&str>,
    clock: &Clock,
) -> TestGateway {
    let doc = config_with(
        sims,
        serde_json::json!({
            "entra": {"tenant_id": SIM_TENANT_ID, "allow_any_principal": allow_any},
            "clients": clients,
        }),
    );
    start_gateway_with(&doc, key, |o| {
        o.azure_env = AzureEnv::from_pairs([("AZURE_AUTHORITY_HOST", id.url())]);
        o.clock = clock.clone();
    })
    .await
}

async fn chat_as(gw: &TestGateway, token: &str, deployment: &str) -> (StatusCode, String) {
    let (s, _, b) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path(deployment)),
        &[
            ("authorization", format!("Bearer {token}")),
            ("content-type", "application/json".to_owned()),
        ],
        chat_body(false),
    )
    .await;
    (s, String::from_utf8_lossy(&b).into_owned())
}

const TEAM_OID: &str = "7e3a0000-0000-4000-8000-0000000000a1";
const BATCH_APP: &str = "ba7c0000-0000-4000-8000-0000000000b2";

fn token_for(id: &IdentityHandle, oid: &str, app: &str, version: u8) -> String {
    id.mint(&ClientToken {
        object_id: oid.to_owned(),
        app_id: app.to_owned(),
        version,
        ..ClientToken::default()
    })
}

#[tokio::test]
async fn an_entra_principal_gets_its_named_clients_permissions_rate_and_accounting() {
    let id = aoai_sim::start_identity(IdentityConfig::default())
        .await
        .unwrap();
    let sims = sims(1).await;
    let clients = serde_json::json!([
        // Upper case in the configuration still matches the token's
        // lower-case GUID.
        {"name": "mapped-team", "entra_object_ids": [TEAM_OID.to_uppercase()],
         "deployments": ["gpt-4o"], "rpm": 2},
        {"name": "mapped-batch", "entra_app_ids": BATCH_APP, "key": "batch-key"}
    ]);
    let clock = Clock::manual(1_800_000_000_000);
    let gw = start_clients(&id, &sims, false, clients, None, &clock).await;
    let unlisted_app = "0a990000-0000-4000-8000-0000000000c3";
    let team = token_for(&id, TEAM_OID, unlisted_app, 1);

    // The deployment list of mapped-team applies: 403 without reaching an
    // instance.
    let (s, body) = chat_as(&gw, &team, "gpt-4o-mini").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("mapped-team"), "{body}");
    assert_eq!(sims[0].request_count(), 0);
    // Its rate: two requests a minute, the third is 429.
    for _ in 0..2 {
        let (s, body) = chat_as(&gw, &team, "gpt-4o").await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    let (s, body) = chat_as(&gw, &team, "gpt-4o").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body.contains("mapped-team"), "{body}");
    assert_eq!(sims[0].request_count(), 2);

    // The app's client, by `appid` (v1) and by `azp` (v2), for any object.
    let other_oid = "0b990000-0000-4000-8000-0000000000d4";
    for v in [1, 2] {
        let (s, body) = chat_as(&gw, &token_for(&id, other_oid, BATCH_APP, v), "gpt-4o").await;
        assert_eq!(s, StatusCode::OK, "v{v}: {body}");
    }
    // A token matching mapped-team by `oid` and mapped-batch by app is mapped-team's: the
    // object names one caller, the app possibly many (and mapped-team is out of
    // requests).
    let (s, _) = chat_as(&gw, &token_for(&id, TEAM_OID, BATCH_APP, 1), "gpt-4o").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    // A valid token listed by nobody is refused.
    let (s, body) = chat_as(&gw, &token_for(&id, other_oid, unlisted_app, 1), "gpt-4o").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body.contains("no client is configured for this principal"),
        "{body}"
    );
    assert_eq!(sims[0].request_count(), 4);
    // ... unless a known key comes with it, which then names the client.
    let (s, _, _) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &[
            (
                "authorization",
                format!("Bearer {}", token_for(&id, other_oid, unlisted_app, 1)),
            ),
            ("api-key", "batch-key".to_owned()),
            ("content-type", "application/json".to_owned()),
        ],
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    // Accounting under the client's name, the same as for a key caller.
    let metrics = gw.metrics().await;
    for want in [
        r#"code="2xx",client="mapped-team"} 2"#,
        r#"code="2xx",client="mapped-batch"} 3"#,
        r#"aoai_lb_client_rejections_total{client="mapped-team",reason="deployment"} 1"#,
    ] {
        assert!(metrics.contains(want), "{want} not in {metrics}");
    }
    let view: serde_json::Value =
        serde_json::from_str(&gw.admin_get("/admin/clients").await).unwrap();
    let team_view = view["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "mapped-team")
        .unwrap();
    assert_eq!(team_view["rpm"]["used"], 2, "{team_view}");
    // After the minute, mapped-team is admitted again.
    clock.advance(60_001);
    assert_eq!(chat_as(&gw, &team, "gpt-4o").await.0, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test]
async fn an_entra_principal_is_held_to_its_clients_token_quota() {
    let id = aoai_sim::start_identity(IdentityConfig::default())
        .await
        .unwrap();
    let sims = sims(1).await;
    let clients = serde_json::json!([
        {"name": "quota-app", "entra_app_ids": [BATCH_APP],
         "token_quota": {"tokens": 1, "period": "day"}}
    ]);
    let gw = start_clients(&id, &sims, false, clients, None, &Clock::new()).await;
    let token = token_for(&id, TEAM_OID, BATCH_APP, 2);
    assert_eq!(chat_as(&gw, &token, "gpt-4o").await.0, StatusCode::OK);
    let (s, body) = chat_as(&gw, &token, "gpt-4o").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("QuotaExceeded") && body.contains("quota-app"),
        "{body}"
    );
    assert_eq!(sims[0].request_count(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn allow_any_principal_serves_an_unlisted_principal_as_default_without_api_key() {
    let id = aoai_sim::start_identity(IdentityConfig::default())
        .await
        .unwrap();
    let sims = sims(1).await;
    let clients = serde_json::json!([
        {"name": "team-a", "entra_object_ids": [TEAM_OID], "deployments": ["gpt-4o-mini"]}
    ]);
    let gw = start_clients(&id, &sims, true, clients, None, &Clock::new()).await;
    // Listed: team-a's deployment list still applies.
    let (s, _) = chat_as(&gw, &token_for(&id, TEAM_OID, BATCH_APP, 1), "gpt-4o").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Unlisted: client `default`, which exists although API_KEY is unset.
    let (s, body) = chat_as(&gw, &id.mint(&ClientToken::default()), "gpt-4o").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // No key works: there is none.
    let (s, _, _) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    gw.shutdown().await;
}
