//! Run-time admin routes under `/_sim/` on the instance's own port: read and clear
//! the journal, add and clear faults. They need no key, so they answer only when
//! the instance was started with `admin` enabled; they are never journaled.

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
