//! Clients calling with Microsoft Entra ID tokens: the `entra` block
//! validates them against the simulated tenant's key set, answers every
//! refusal with a 401 naming the reason (never echoing the token), follows a
//! key rotation, and never forwards a client token upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use aoai_lb::config::Config;
use aoai_lb::credential::AzureEnv;
use aoai_lb::secret::Secret;
use aoai_lb::server::ServeOptions;
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
    let config = Arc::new(Config::from_json(&doc).unwrap());
    let mut opts = ServeOptions::local(Some(Secret::new(CLIENT_KEY)));
    opts.azure_env = AzureEnv::from_pairs([("AZURE_AUTHORITY_HOST", id.url())]);
    let handle = aoai_lb::server::spawn(config.clone(), opts).await.unwrap();
    (id, sims, TestGateway { handle, config })
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
