//! Client credentials stop at the gateway: whatever header (or query
//! parameter) a client, or a platform in front of the gateway, uses to carry
//! a credential, the instance sees none of it, only the gateway's own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::*;
use http::{Method, StatusCode};

/// Every credential header a client might send, with a value that must not
/// appear anywhere in what the instance received.
const CLIENT_CREDENTIALS: &[(&str, &str)] = &[
    ("proxy-authorization", "Basic cHJveHktdXNlcjpwcm94eS1wdw=="),
    ("cookie", "session=cookie-secret-7d1; ARRAffinity=x"),
    ("ocp-apim-subscription-key", "apim-secret-91f"),
    ("x-api-key", "xapikey-secret-c40"),
    ("x-ms-token-aad-access-token", "easyauth-access-token-e2a"),
    ("x-ms-token-aad-id-token", "easyauth-id-token-3b8"),
    ("x-ms-client-principal", "easyauth-principal-b64"),
    ("x-ms-client-principal-id", "easyauth-principal-id"),
];

fn leaked(entry: &aoai_sim::JournalEntry) -> Vec<String> {
    let mut out = Vec::new();
    for (name, value) in CLIENT_CREDENTIALS {
        if entry.header(name).is_some() {
            out.push(format!("header {name}"));
        }
        let secret = value.split(['=', ' ']).nth(1).unwrap_or(value);
        for (k, v) in &entry.headers {
            if v.contains(secret) {
                out.push(format!("value of {name} in {k}"));
            }
        }
        if entry.query.as_deref().is_some_and(|q| q.contains(secret)) {
            out.push(format!("value of {name} in the query"));
        }
    }
    out
}

#[tokio::test]
async fn proxy_authorization_and_other_client_credentials_never_reach_the_instance() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let mut headers = auth();
    headers.extend(
        CLIENT_CREDENTIALS
            .iter()
            .map(|(k, v)| (*k, (*v).to_owned())),
    );
    let (s, _, _) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &headers,
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let e = sims[0].journal().pop().unwrap();
    assert_eq!(leaked(&e), Vec::<String>::new());
    assert_eq!(e.header("authorization"), None);
    // The instance's own key went up (masked in the journal).
    assert_eq!(e.header("api-key"), Some("***"));
    assert!(e.headers.iter().all(|(_, v)| !v.contains(CLIENT_KEY)));
}

#[tokio::test]
async fn client_credentials_are_removed_in_unauthenticated_mode_and_on_streams() {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), None).await;
    let mut headers = vec![("content-type", "application/json".to_owned())];
    headers.extend(
        CLIENT_CREDENTIALS
            .iter()
            .map(|(k, v)| (*k, (*v).to_owned())),
    );
    headers.push(("authorization", "Bearer client-bearer-0af".to_owned()));
    headers.push(("api-key", "client-key-e51".to_owned()));
    let (s, _, _) = send(
        Method::POST,
        &format!("{}{}&api-key=query-key-77c", gw.url(), chat_path("gpt-4o")),
        &headers,
        chat_body(true),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let e = sims[0].journal().pop().unwrap();
    assert_eq!(leaked(&e), Vec::<String>::new());
    assert_eq!(e.header("authorization"), None);
    for secret in ["client-bearer-0af", "client-key-e51", "query-key-77c"] {
        assert!(
            e.headers.iter().all(|(_, v)| !v.contains(secret)),
            "{secret}"
        );
        assert!(
            !e.query.as_deref().unwrap_or("").contains(secret),
            "{secret}"
        );
    }
}
