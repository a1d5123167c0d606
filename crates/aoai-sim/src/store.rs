//! In-memory per-instance state: files, batches and stored responses, plus the
//! models list. Each collection is bounded (oldest evicted first) so memory stays
//! flat however long the simulator runs. Ids are per instance, like Azure's
//! per-resource ids, which is what makes affinity matter to a gateway.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use http::StatusCode;
use http::header::HeaderValue;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::azure;
use crate::multipart;
use crate::openai::reply_text;
use crate::service::{Ctx, Reply, Route};

/// Most files kept per instance.
pub const MAX_FILES: usize = 1_000;
/// Most file bytes kept per instance.
pub const MAX_FILE_BYTES: usize = 256 * 1024 * 1024;
/// Most batches kept per instance.
pub const MAX_BATCHES: usize = 1_000;
/// Most stored responses kept per instance.
pub const MAX_RESPONSES: usize = 10_000;

/// A bounded insertion-ordered map: the oldest entries go first when full.
struct Bounded<T> {
    order: VecDeque<String>,
    items: HashMap<String, T>,
    cap: usize,
}

impl<T> Bounded<T> {
    fn new(cap: usize) -> Self {
        Self {
            order: VecDeque::new(),
            items: HashMap::new(),
            cap,
        }
    }

    fn insert(&mut self, id: String, v: T) -> Vec<T> {
        let mut evicted = Vec::new();
        while self.items.len() >= self.cap {
            match self.order.pop_front() {
                Some(old) => evicted.extend(self.items.remove(&old)),
                None => break,
            }
        }
        self.order.push_back(id.clone());
        self.items.insert(id, v);
        evicted
    }

    fn pop_oldest(&mut self) -> Option<T> {
        while let Some(old) = self.order.pop_front() {
            if let Some(v) = self.items.remove(&old) {
                return Some(v);
            }
        }
        None
    }

    fn remove(&mut self, id: &str) -> Option<T> {
        let v = self.items.remove(id)?;
        self.order.retain(|k| k != id);
        Some(v)
    }

    fn get(&self, id: &str) -> Option<&T> {
        self.items.get(id)
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut T> {
        self.items.get_mut(id)
    }

    fn values(&self) -> impl Iterator<Item = &T> {
        self.order.iter().filter_map(|k| self.items.get(k))
    }
}

struct File {
    meta: Value,
    data: Bytes,
}

struct Files {
    map: Bounded<File>,
    bytes: usize,
}

/// Per-instance stored objects.
pub(crate) struct Store {
    files: Mutex<Files>,
    batches: Mutex<Bounded<Value>>,
    responses: Mutex<Bounded<Value>>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            files: Mutex::new(Files {
                map: Bounded::new(MAX_FILES),
                bytes: 0,
            }),
            batches: Mutex::new(Bounded::new(MAX_BATCHES)),
            responses: Mutex::new(Bounded::new(MAX_RESPONSES)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Store {
    fn add_file(&self, filename: &str, purpose: &str, data: Bytes) -> Value {
        let id = format!("file-{}", azure::uuid().replace('-', ""));
        let meta = json!({
            "object": "file",
            "id": id,
            "purpose": purpose,
            "filename": filename,
            "bytes": data.len(),
            "created_at": azure::unix_now(),
            "status": "processed",
            "status_details": null,
        });
        let mut files = lock(&self.files);
        while files.bytes + data.len() > MAX_FILE_BYTES {
            match files.map.pop_oldest() {
                Some(old) => files.bytes -= old.data.len(),
                None => break,
            }
        }
        files.bytes += data.len();
        let evicted = files.map.insert(
            id,
            File {
                meta: meta.clone(),
                data,
            },
        );
        for e in evicted {
            files.bytes -= e.data.len();
        }
        meta
    }

    /// Keep a response object so retrieve and `previous_response_id` find it.
    pub(crate) fn put_response(&self, id: String, v: Value) {
        lock(&self.responses).insert(id, v);
    }

    pub(crate) fn response(&self, id: &str) -> Option<Value> {
        lock(&self.responses).get(id).cloned()
    }
}

fn not_found(kind: &str, id: &str) -> Reply {
    Reply::json(
        StatusCode::NOT_FOUND,
        json!({"error": {"code": "NotFound", "message": format!("{kind} with id '{id}' not found.")}})
            .to_string(),
    )
}

fn list(data: Vec<Value>) -> Reply {
    let first = data
        .first()
        .and_then(|v| v.get("id"))
        .cloned()
        .unwrap_or(Value::Null);
    let last = data
        .last()
        .and_then(|v| v.get("id"))
        .cloned()
        .unwrap_or(Value::Null);
    Reply::ok_json(
        json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": false})
            .to_string(),
    )
}

/// Serve the stateful and listing routes.
pub(crate) fn handle(ctx: &Ctx, route: Route<'_>) -> Reply {
    let store = &ctx.inst.store;
    let post = ctx.parts.method == http::Method::POST;
    match route {
        Route::Models => list(models(ctx)),
        Route::Model(id) => models(ctx)
            .into_iter()
            .find(|m| m["id"] == id)
            .map_or_else(|| not_found("Model", id), |m| Reply::ok_json(m.to_string())),
        Route::Files if post => upload(ctx),
        Route::Files => {
            let purpose = crate::service::query_param(ctx.parts.uri.query(), "purpose");
            let data = lock(&store.files)
                .map
                .values()
                .filter(|f| purpose.is_none_or(|p| f.meta["purpose"] == p))
                .map(|f| f.meta.clone())
                .collect();
            list(data)
        }
        Route::File(id) if ctx.parts.method == http::Method::DELETE => {
            let mut files = lock(&store.files);
            match files.map.remove(id) {
                Some(f) => {
                    files.bytes -= f.data.len();
                    Reply::ok_json(json!({"object": "file", "deleted": true, "id": id}).to_string())
                }
                None => not_found("File", id),
            }
        }
        Route::File(id) => lock(&store.files).map.get(id).map_or_else(
            || not_found("File", id),
            |f| Reply::ok_json(f.meta.to_string()),
        ),
        Route::FileContent(id) => lock(&store.files).map.get(id).map_or_else(
            || not_found("File", id),
            |f| {
                Reply::new(
                    StatusCode::OK,
                    HeaderValue::from_static("application/octet-stream"),
                    f.data.clone(),
                )
            },
        ),
        Route::Batches if post => create_batch(ctx),
        Route::Batches => {
            let data = lock(&store.batches).values().cloned().collect();
            list(data)
        }
        Route::Batch(id) => {
            // A batch is "validating" when created and has finished by the time it
            // is next looked at; the output file is written then.
            let done = {
                let mut batches = lock(&store.batches);
                let Some(b) = batches.get_mut(id) else {
                    return not_found("Batch", id);
                };
                if b["status"] == "validating" {
                    Some(b["input_file_id"].as_str().unwrap_or("").to_owned())
                } else {
                    None
                }
            };
            if let Some(input) = done {
                complete_batch(ctx, id, &input);
            }
            lock(&store.batches)
                .get(id)
                .map_or_else(|| not_found("Batch", id), |b| Reply::ok_json(b.to_string()))
        }
        Route::BatchCancel(id) => {
            let mut batches = lock(&store.batches);
            let Some(b) = batches.get_mut(id) else {
                return not_found("Batch", id);
            };
            if b["status"] == "validating" || b["status"] == "in_progress" {
                b["status"] = json!("cancelled");
                b["cancelling_at"] = json!(azure::unix_now());
                b["cancelled_at"] = json!(azure::unix_now());
            }
            Reply::ok_json(b.to_string())
        }
        Route::Response(id) if ctx.parts.method == http::Method::DELETE => {
            match lock(&store.responses).remove(id) {
                Some(_) => Reply::ok_json(
                    json!({"id": id, "object": "response", "deleted": true}).to_string(),
                ),
                None => response_not_found(id),
            }
        }
        Route::Response(id) => store
            .response(id)
            .map_or_else(|| response_not_found(id), |v| Reply::ok_json(v.to_string())),
        _ => Reply::not_found(),
    }
}

pub(crate) fn response_not_found(id: &str) -> Reply {
    Reply::json(
        StatusCode::NOT_FOUND,
        azure::invalid_request(&format!("Response with id '{id}' not found."), None, None),
    )
}

fn models(ctx: &Ctx) -> Vec<Value> {
    let names: Vec<String> = match &ctx.inst.cfg.deployments {
        Some(d) => d.clone(),
        None => [
            "gpt-4o",
            "gpt-4o-mini",
            "text-embedding-3-small",
            "whisper",
            "dall-e-3",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
    };
    names
        .into_iter()
        .map(|id| {
            let embeddings = id.contains("embedding");
            json!({
                "id": id,
                "object": "model",
                "created": 1_715_558_400u64,
                "created_at": 1_715_558_400u64,
                "owned_by": "system",
                "status": "succeeded",
                "lifecycle_status": "generally-available",
                "capabilities": {
                    "fine_tune": false,
                    "inference": true,
                    "completion": false,
                    "chat_completion": !embeddings,
                    "embeddings": embeddings,
                },
            })
        })
        .collect()
}

fn upload(ctx: &Ctx) -> Reply {
    let ct = ctx
        .parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parts = match multipart::parse(ct, &ctx.body) {
        Ok(p) => p,
        Err(e) => return Reply::bad_request(&format!("Invalid form: {e}."), None, None),
    };
    let Some(file) = multipart::field(&parts, "file") else {
        return Reply::bad_request("'file' is a required property", Some("file"), None);
    };
    let Some(purpose) = multipart::text(&parts, "purpose") else {
        return Reply::bad_request("'purpose' is a required property", Some("purpose"), None);
    };
    let name = file.filename.as_deref().unwrap_or("file");
    let data = ctx.body.slice_ref(file.data);
    Reply::ok_json(ctx.inst.store.add_file(name, purpose, data).to_string())
}

#[derive(Deserialize)]
struct BatchRequest {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    #[serde(default)]
    completion_window: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
}

fn create_batch(ctx: &Ctx) -> Reply {
    let req: BatchRequest = match ctx.json() {
        Ok(r) => r,
        Err(e) => return e,
    };
    let Some(input) = req.input_file_id else {
        return Reply::bad_request(
            "'input_file_id' is a required property",
            Some("input_file_id"),
            None,
        );
    };
    let Some(endpoint) = req.endpoint else {
        return Reply::bad_request("'endpoint' is a required property", Some("endpoint"), None);
    };
    if lock(&ctx.inst.store.files).map.get(&input).is_none() {
        return Reply::bad_request(
            &format!("The input file '{input}' was not found."),
            Some("input_file_id"),
            Some("invalid_input_file"),
        );
    }
    let now = azure::unix_now();
    let id = format!("batch_{}", azure::uuid());
    let batch = json!({
        "id": id,
        "object": "batch",
        "endpoint": endpoint,
        "errors": null,
        "input_file_id": input,
        "completion_window": req.completion_window.unwrap_or_else(|| "24h".to_owned()),
        "status": "validating",
        "output_file_id": null,
        "error_file_id": null,
        "created_at": now,
        "in_progress_at": null,
        "expires_at": now + 86_400,
        "finalizing_at": null,
        "completed_at": null,
        "failed_at": null,
        "expired_at": null,
        "cancelling_at": null,
        "cancelled_at": null,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": req.metadata,
    });
    lock(&ctx.inst.store.batches).insert(id, batch.clone());
    Reply::ok_json(batch.to_string())
}

/// Answer every line of the input file with a simulated chat completion.
fn complete_batch(ctx: &Ctx, id: &str, input_file: &str) {
    let input = lock(&ctx.inst.store.files)
        .map
        .get(input_file)
        .map(|f| f.data.clone())
        .unwrap_or_default();
    let tokens = ctx.inst.cfg.reply_tokens;
    let mut out = String::new();
    let mut total = 0u64;
    for line in input.split(|b| *b == b'\n') {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        total += 1;
        let model = v["body"]["model"].as_str().unwrap_or("").to_owned();
        let entry = json!({
            "id": format!("batch_req_{}", azure::uuid().replace('-', "")),
            "custom_id": v["custom_id"],
            "response": {
                "status_code": 200,
                "request_id": azure::uuid(),
                "body": {
                    "id": azure::object_id("chatcmpl-"),
                    "object": "chat.completion",
                    "created": azure::unix_now(),
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": reply_text(tokens)},
                        "finish_reason": "stop",
                        "logprobs": null,
                    }],
                    "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": 1 + tokens},
                },
            },
            "error": null,
        });
        out.push_str(&entry.to_string());
        out.push('\n');
    }
    let meta = ctx.inst.store.add_file(
        &format!("{id}_output.jsonl"),
        "batch_output",
        Bytes::from(out),
    );
    let now = azure::unix_now();
    if let Some(b) = lock(&ctx.inst.store.batches).get_mut(id) {
        b["status"] = json!("completed");
        b["output_file_id"] = meta["id"].clone();
        b["in_progress_at"] = json!(now);
        b["finalizing_at"] = json!(now);
        b["completed_at"] = json!(now);
        b["request_counts"] = json!({"total": total, "completed": total, "failed": 0});
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_map_evicts_oldest_first() {
        let mut b = Bounded::new(2);
        b.insert("a".into(), 1);
        b.insert("b".into(), 2);
        let ev = b.insert("c".into(), 3);
        assert_eq!(ev, vec![1]);
        assert!(b.get("a").is_none());
        assert_eq!(b.values().copied().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(b.remove("b"), Some(2));
        assert_eq!(b.pop_oldest(), Some(3));
    }
}
