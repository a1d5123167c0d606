//! The simulated Entra ID side: managed-identity, IMDS and client-credential
//! token routes with Azure's wire formats and failures, the JWKS, minted
//! client tokens, and instances with local authentication disabled.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use aoai_sim::identity::{
    COGNITIVE_SERVICES_RESOURCE, DEFAULT_IDENTITY_HEADER, JWT_BEARER, SIM_TENANT_ID,
    SYSTEM_IDENTITY_CLIENT_ID,
};
use aoai_sim::{ClientToken, IdentityConfig, InstanceConfig, SigningKey};
use common::*;
use http::{Method, StatusCode};

const RESOURCE_Q: &str = "resource=https%3A%2F%2Fcognitiveservices.azure.com";

async fn chat_with(base: &str, headers: &[(&str, &str)]) -> Resp {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    send(
        Method::POST,
        &chat_url(base, "gpt-4o"),
        &h,
        chat_body("hi").to_string(),
    )
    .await
}

fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

#[tokio::test]
async fn container_apps_endpoint_checks_the_identity_header_and_answers_expires_on_as_a_string() {
    let id = aoai_sim::start_identity(IdentityConfig::default())
        .await
        .unwrap();
    let url = format!(
        "{}?api-version=2019-08-01&{RESOURCE_Q}",
        id.identity_endpoint()
    );
    let r = send(Method::GET, &url, &[], "").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body.is_empty());
    let r = send(Method::GET, &url, &[("x-identity-header", "stale")], "").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    let r = send(
        Method::GET,
        &url,
        &[("x-identity-header", DEFAULT_IDENTITY_HEADER)],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let j = r.json();
    assert_eq!(j["token_type"], "Bearer");
    assert_eq!(j["resource"], COGNITIVE_SERVICES_RESOURCE);
    assert_eq!(j["client_id"], SYSTEM_IDENTITY_CLIENT_ID);
    let expires_on: u64 = j["expires_on"].as_str().expect("a string").parse().unwrap();
    assert!(expires_on > aoai_sim_now());
    assert!(j.get("expires_in").is_none());

    // An identity that is not assigned: Azure's 400 with its own body shape.
    let r = send(
        Method::GET,
        &format!("{url}&client_id=not-assigned"),
        &[("x-identity-header", DEFAULT_IDENTITY_HEADER)],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json()["message"],
        "Unable to load the proper Managed Identity."
    );
    id.add_user_assigned_identity("uai-1");
    let r = send(
        Method::GET,
        &format!("{url}&client_id=uai-1"),
        &[("x-identity-header", DEFAULT_IDENTITY_HEADER)],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["client_id"], "uai-1");
    assert_eq!(id.counts().msi, 5);
    assert_eq!(id.counts().issued, 2);
}

fn aoai_sim_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn imds_requires_the_metadata_header_and_answers_lifetimes_as_strings() {
    let id = aoai_sim::start_identity(IdentityConfig::default())
        .await
        .unwrap();
    let url = format!(
        "{}/metadata/identity/oauth2/token?api-version=2018-02-01&{RESOURCE_Q}",
        id.url()
    );
    let r = send(Method::GET, &url, &[], "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "invalid_request");
    let r = send(Method::GET, &url, &[("metadata", "True")], "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "only lower-case true");
    id.set_token_lifetime(Duration::from_secs(7));
    let r = send(Method::GET, &url, &[("metadata", "true")], "").await;
    assert_eq!(r.status, StatusCode::OK);
    let j = r.json();
    assert_eq!(j["expires_in"], "7");
    assert!(j["expires_on"].is_string());
}

#[tokio::test]
async fn token_endpoint_takes_a_secret_or_the_current_federated_assertion() {
    let id = aoai_sim::start_identity(IdentityConfig::default())
        .await
        .unwrap();
    id.add_client_secret("app-1", "s3cret");
    id.set_federated_assertion("wi-app", "projected-token-1");
    let url = format!("{}/{SIM_TENANT_ID}/oauth2/v2.0/token", id.url());
    let scope = "https://cognitiveservices.azure.com/.default";
    let post = |body: String| {
        let url = url.clone();
        async move {
            send(
                Method::POST,
                &url,
                &[("content-type", "application/x-www-form-urlencoded")],
                body,
            )
            .await
        }
    };
    let ok = post(form(&[
        ("grant_type", "client_credentials"),
        ("client_id", "app-1"),
        ("client_secret", "s3cret"),
        ("scope", scope),
    ]))
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(ok.json()["expires_in"], 3599, "a number here");
    assert!(
        ok.json()["access_token"]
            .as_str()
            .unwrap()
            .starts_with("eyJ")
    );

    let bad = post(form(&[
        ("grant_type", "client_credentials"),
        ("client_id", "app-1"),
        ("client_secret", "wrong"),
        ("scope", scope),
    ]))
    .await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert_eq!(bad.json()["error"], "invalid_client");
    assert_eq!(bad.json()["error_codes"][0], 7000215);

    let federated = |assertion: &'static str| {
        form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "wi-app"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
            ("scope", scope),
        ])
    };
    assert_eq!(
        post(federated("projected-token-1")).await.status,
        StatusCode::OK
    );
    id.set_federated_assertion("wi-app", "projected-token-2");
    let stale = post(federated("projected-token-1")).await;
    assert_eq!(stale.status, StatusCode::UNAUTHORIZED);
    assert_eq!(stale.json()["error_codes"][0], 700024);

    let no_default = post(form(&[
        ("grant_type", "client_credentials"),
        ("client_id", "app-1"),
        ("client_secret", "s3cret"),
        ("scope", "https://cognitiveservices.azure.com"),
    ]))
    .await;
    assert_eq!(no_default.json()["error"], "invalid_scope");

    let other_tenant = send(
        Method::POST,
        &format!("{}/other-tenant/oauth2/v2.0/token", id.url()),
        &[],
        "",
    )
    .await;
    assert_eq!(other_tenant.status, StatusCode::BAD_REQUEST);

    id.fail(503, Some(1));
    let down = post(federated("projected-token-2")).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        post(federated("projected-token-2")).await.status,
        StatusCode::OK
    );
    assert_eq!(id.counts().aad, 8);
}

#[tokio::test]
async fn jwks_publishes_the_signing_key_and_follows_a_rotation() {
    let id = aoai_sim::start_identity(IdentityConfig::default())
        .await
        .unwrap();
    let kids = |r: Resp| -> Vec<String> {
        r.json()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        kids(send(Method::GET, &id.jwks_url(), &[], "").await),
        ["sim-key-1"]
    );
    id.rotate_keys();
    assert_eq!(
        kids(send(Method::GET, &id.jwks_url(), &[], "").await),
        ["sim-key-2"]
    );
    let t = id.mint(&ClientToken::default());
    let header = t.split('.').next().unwrap();
    assert!(header.len() > 10);
    assert_eq!(id.counts().jwks, 2);
}

#[tokio::test]
async fn local_auth_disabled_refuses_keys_and_checks_tokens_like_azure() {
    let sims = aoai_sim::start(vec![InstanceConfig::new("a").local_auth_disabled(true)])
        .await
        .unwrap();
    let base = sims[0].url();
    let id = aoai_sim::start_identity(IdentityConfig::default())
        .await
        .unwrap();

    let r = chat_with(&base, &[("api-key", KEY)]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.text(), aoai_sim::bodies::AUTHENTICATION_TYPE_DISABLED);

    let r = chat_with(&base, &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["statusCode"], 401);

    let good = id.mint(&ClientToken::default());
    let r = chat_with(&base, &[("authorization", &format!("Bearer {good}"))]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    for (what, t) in [
        (
            "expired",
            ClientToken {
                expires_in_secs: -5,
                ..ClientToken::default()
            },
        ),
        (
            "not yet valid",
            ClientToken {
                not_before_in_secs: 120,
                ..ClientToken::default()
            },
        ),
        (
            "other audience",
            ClientToken {
                audience: "https://management.azure.com".into(),
                ..ClientToken::default()
            },
        ),
        (
            "other tenant",
            ClientToken {
                tenant_id: "11111111-2222-3333-4444-555555555555".into(),
                ..ClientToken::default()
            },
        ),
        (
            "foreign key",
            ClientToken {
                key: Some(SigningKey::Foreign),
                ..ClientToken::default()
            },
        ),
    ] {
        let token = id.mint(&t);
        let r = chat_with(&base, &[("authorization", &format!("Bearer {token}"))]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(r.text(), aoai_sim::bodies::TOKEN_UNAUTHORIZED, "{what}");
    }
    let r = chat_with(&base, &[("authorization", &format!("Bearer {KEY}"))]).await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "a key as bearer is no token"
    );
}

#[tokio::test]
async fn a_valid_token_without_the_role_gets_permission_denied() {
    let holder = ClientToken::default();
    let sims = aoai_sim::start(vec![
        InstanceConfig::new("a").entra_principals(&[holder.object_id.as_str()]),
    ])
    .await
    .unwrap();
    let id = aoai_sim::start_identity(IdentityConfig::default())
        .await
        .unwrap();
    let ok = id.mint(&holder);
    let r = chat_with(
        &sims[0].url(),
        &[("authorization", &format!("Bearer {ok}"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let other = id.mint(&ClientToken {
        object_id: "someone-else".into(),
        app_id: "some-app".into(),
        ..ClientToken::default()
    });
    let r = chat_with(
        &sims[0].url(),
        &[("authorization", &format!("Bearer {other}"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"]["code"], "PermissionDenied");
    // Local auth stays on here: the key still works.
    assert_eq!(
        chat_with(&sims[0].url(), &[("api-key", KEY)]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn mint_route_serves_tests_in_other_languages() {
    let id = aoai_sim::start_identity(IdentityConfig::default())
        .await
        .unwrap();
    let r = send(
        Method::POST,
        &format!("{}/_sim/mint", id.url()),
        &[("content-type", "application/json")],
        r#"{"app_id":"python-app","expires_in_secs":60}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let token = r.json()["token"].as_str().unwrap().to_owned();
    let sims = aoai_sim::start(vec![InstanceConfig::new("a").local_auth_disabled(true)])
        .await
        .unwrap();
    let r = chat_with(
        &sims[0].url(),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}
