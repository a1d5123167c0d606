//! Realtime WebSocket requests pass through the gateway: the upgrade
//! headers survive hop-by-hop stripping, the deployment comes from the
//! query, and frames flow both ways.
// Helpers outside #[test] functions fail the test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn text(m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> serde_json::Value {
    match m.unwrap().unwrap() {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn tunnels_a_realtime_websocket_to_the_instance_serving_the_deployment() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("other").deployments(&["gpt-4o"]),
        aoai_sim::InstanceConfig::new("rt").deployments(&["gpt-rt-backend"]),
    ])
    .await;
    let doc = config_with(
        &sims,
        serde_json::json!({"instances":[
            {"deployments":["gpt-4o"]},
            {"deployments":{"gpt-rt":"gpt-rt-backend"}}
        ]}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let url = format!(
        "ws://{}/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-rt",
        gw.addr()
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("api-key", CLIENT_KEY.parse().unwrap());
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(resp.headers().get("x-aoai-lb-request-id").is_some());
    let hello = text(ws.next().await);
    assert_eq!(hello["type"], "session.created");
    assert_eq!(hello["session"]["model"], "gpt-rt-backend");
    ws.send(Message::text(
        r#"{"type":"session.update","session":{"voice":"verse"}}"#,
    ))
    .await
    .unwrap();
    let updated = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert_eq!(text(updated)["type"], "session.updated");
    ws.close(None).await.unwrap();

    assert_eq!(sims[0].request_count(), 0);
    let e = sims[1].journal().pop().unwrap();
    assert_eq!(
        e.query.as_deref(),
        Some("api-version=2025-04-01-preview&deployment=gpt-rt-backend")
    );
    assert_eq!(e.header("api-key"), Some("***"));
}
