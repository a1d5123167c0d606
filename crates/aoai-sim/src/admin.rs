//! Run-time admin routes under `/_sim/` on the instance's own port: read and clear
//! the journal and the usage ledger, add and clear faults, read and advance the
//! admission clock. They need no key, so they answer only when the instance was
//! started with `admin` enabled; they are never journaled.

use http::{Method, StatusCode};

use crate::body::SimBody;
use crate::fault::Fault;
use crate::server::Instance;
use crate::service::JSON;

fn respond(status: StatusCode, body: String) -> http::Response<SimBody> {
    let mut r = http::Response::new(SimBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, JSON);
    r
}

fn clock_json(inst: &Instance) -> String {
    serde_json::json!({
        "elapsed_ms": u64::try_from(inst.clock.elapsed().as_millis()).unwrap_or(u64::MAX),
        "frozen": inst.clock.is_frozen(),
    })
    .to_string()
}

/// Serve one admin request.
pub(crate) fn handle(
    inst: &Instance,
    parts: &http::request::Parts,
    body: &[u8],
) -> http::Response<SimBody> {
    let m = &parts.method;
    match parts.uri.path() {
        "/_sim/journal" if m == Method::GET => {
            let entries = inst.journal.entries();
            let body = serde_json::json!({
                "instance": inst.cfg.name,
                "request_count": inst.journal.recorded(),
                "entries": entries,
            });
            respond(StatusCode::OK, body.to_string())
        }
        "/_sim/journal" if m == Method::DELETE => {
            inst.journal.clear();
            respond(StatusCode::OK, r#"{"cleared":true}"#.to_owned())
        }
        "/_sim/usage" if m == Method::GET => respond(
            StatusCode::OK,
            serde_json::to_string(&inst.ledger.report(&inst.cfg.name))
                .unwrap_or_else(|_| "{}".to_owned()),
        ),
        "/_sim/usage" if m == Method::DELETE => {
            inst.ledger.clear();
            respond(StatusCode::OK, r#"{"cleared":true}"#.to_owned())
        }
        "/_sim/clock" if m == Method::GET => respond(StatusCode::OK, clock_json(inst)),
        "/_sim/clock" if m == Method::POST => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Advance {
                advance_ms: u64,
            }
            let de = &mut serde_json::Deserializer::from_slice(body);
            match serde_path_to_error::deserialize::<_, Advance>(de) {
                Ok(a) => {
                    inst.clock.advance(std::time::Duration::from_millis(a.advance_ms));
                    respond(StatusCode::OK, clock_json(inst))
                }
                Err(e) => respond(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": format!("invalid clock request at {}: {}", e.path(), e.inner()) })
                        .to_string(),
                ),
            }
        }
        "/_sim/faults" if m == Method::GET => respond(
            StatusCode::OK,
            serde_json::to_string(&inst.faults.snapshot()).unwrap_or_else(|_| "[]".to_owned()),
        ),
        "/_sim/faults" if m == Method::POST => {
            let de = &mut serde_json::Deserializer::from_slice(body);
            match serde_path_to_error::deserialize::<_, Fault>(de) {
                Ok(f) => {
                    let kind = f.kind();
                    inst.faults.add(f);
                    respond(
                        StatusCode::CREATED,
                        serde_json::json!({ "added": kind }).to_string(),
                    )
                }
                Err(e) => respond(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": format!("invalid fault at {}: {}", e.path(), e.inner()) })
                        .to_string(),
                ),
            }
        }
        "/_sim/faults" if m == Method::DELETE => {
            inst.faults.clear();
            respond(StatusCode::OK, r#"{"cleared":true}"#.to_owned())
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            r#"{"error":{"code":"404","message":"Unknown admin route"}}"#.to_owned(),
        ),
    }
}
