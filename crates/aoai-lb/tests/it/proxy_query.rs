//! The query string on its way upstream: a client's `api-key` parameter is
//! removed, every other byte is kept, checked against the instance's
//! journal.
// Helpers outside #[test] functions fail the test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::*;
use http::{Method, StatusCode};

/// Sends a chat request with `client_query` and returns the status and the
/// query string the instance received.
async fn upstream_query(client_query: &str) -> (StatusCode, Option<String>) {
    let sims = sims(1).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let (s, _, _) = send(
        Method::POST,
        &format!(
            "{}/openai/deployments/gpt-4o/chat/completions?{client_query}",
            gw.url()
        ),
        &auth(),
        chat_body(false),
    )
    .await;
    let e = sims[0].journal().pop().unwrap();
    assert!(
        e.headers.iter().all(|(_, v)| !v.contains(CLIENT_KEY)),
        "client key in upstream headers"
    );
    (s, e.query)
}

#[tokio::test]
async fn strips_a_client_api_key_query_parameter() {
    let (s, q) = upstream_query(&format!(
        "api-version=2025-01-01-preview&api-key={CLIENT_KEY}&x=a%2Fb&&empty="
    ))
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        q.as_deref(),
        Some("api-version=2025-01-01-preview&x=a%2Fb&&empty=")
    );
}

#[tokio::test]
async fn strips_encoded_and_differently_cased_key_parameters() {
    let (s, q) = upstream_query(&format!(
        "API-KEY={CLIENT_KEY}&api-version=2025-01-01-preview&api%2dkey={CLIENT_KEY}&api-keys=kept"
    ))
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        q.as_deref(),
        Some("api-version=2025-01-01-preview&api-keys=kept")
    );
}

#[tokio::test]
async fn a_query_of_only_a_key_goes_upstream_without_a_query() {
    // Without `api-version` the instance refuses the request, but its
    // journal shows what arrived.
    let (_, q) = upstream_query(&format!("api-key={CLIENT_KEY}")).await;
    assert!(q.as_deref().is_none_or(str::is_empty), "{q:?}");
}
