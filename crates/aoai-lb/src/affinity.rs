//! Stateful-object affinity: which instance holds a file, batch, stored
//! response, assistant, thread, vector store or fine-tuning job.
//!
//! Such objects exist only on the Azure resource that created them, so a
//! request that names one must reach that resource. This module owns:
//!
//! - [`AffinityTable`]: a bounded, expiring map from object id to instance,
//!   filled from creation responses and from successful look-ups;
//! - [`find_object_id`]: the id in a creation response (JSON or SSE);
//! - [`body_reference`]: an id named in a request body (`input_file_id`,
//!   `file_id`, `training_file`, `previous_response_id`, ...);
//! - [`is_creation`] and [`is_mergeable_list`]: which requests create
//!   objects and which list them;
//! - [`merge_lists`]: one list document from every instance's list.
//!
//! The failover loop ([`crate::send`]) uses them: a known id goes to its
//! instance only; an unknown id is looked up across the instances (a 404
//! from one of them is not final), and the instance that answers is
//! remembered.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use http::Method;
use serde::Deserialize;

/// Prefixes of the ids Azure gives to per-resource objects.
pub const OBJECT_ID_PREFIXES: &[&str] = &[
    "file-",
    "batch_",
    "resp_",
    "thread_",
    "asst_",
    "assistant-",
    "vs_",
    "ftjob-",
    "run_",
    "msg_",
    "upload_",
];

/// True when `s` looks like the id of a per-resource object.
pub fn is_object_id(s: &str) -> bool {
    OBJECT_ID_PREFIXES
        .iter()
        .any(|p| s.len() > p.len() && s.starts_with(p))
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Default number of remembered ids. At ~100 bytes an entry, 100,000 ids
/// cost about 10 MB.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Default time an id is remembered: 30 days, Azure's longest retention
/// for batch output files.
pub const DEFAULT_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

/// Object id → instance index, bounded and expiring.
///
/// When full, the oldest entry goes. An entry that expires or is evicted
/// is not lost for good: the next request that names the id looks it up
/// across the instances again.
pub struct AffinityTable {
    inner: Mutex<Lru>,
    capacity: usize,
    ttl_ms: u64,
}

struct Lru {
    map: HashMap<Box<str>, Entry>,
    order: VecDeque<(Box<str>, u64)>,
    seq: u64,
}

#[derive(Clone, Copy)]
struct Entry {
    instance: usize,
    expires_ms: u64,
    seq: u64,
}

impl AffinityTable {
    /// A table holding at most `capacity` ids, each for `ttl_ms`.
    pub fn new(capacity: usize, ttl_ms: u64) -> Self {
        Self {
            inner: Mutex::new(Lru {
                map: HashMap::new(),
                order: VecDeque::new(),
                seq: 0,
            }),
            capacity: capacity.max(1),
            ttl_ms,
        }
    }

    /// The instance that holds `id`, if known and not expired.
    pub fn get(&self, id: &str, now_ms: u64) -> Option<usize> {
        let mut lru = self.inner.lock().ok()?;
        match lru.map.get(id).copied() {
            Some(e) if e.expires_ms > now_ms => Some(e.instance),
            Some(_) => {
                lru.map.remove(id);
                None
            }
            None => None,
        }
    }

    /// Remembers that `instance` holds `id`.
    pub fn remember(&self, id: &str, instance: usize, now_ms: u64) {
        let Ok(mut lru) = self.inner.lock() else {
            return;
        };
        lru.seq += 1;
        let seq = lru.seq;
        let key: Box<str> = id.into();
        lru.map.insert(
            key.clone(),
            Entry {
                instance,
                expires_ms: now_ms.saturating_add(self.ttl_ms),
                seq,
            },
        );
        lru.order.push_back((key, seq));
        // The queue may hold stale (re-inserted or removed) keys; they are
        // skipped here and cost one slot each until they reach the front.
        while lru.map.len() > self.capacity || lru.order.len() > 2 * self.capacity {
            let Some((old, old_seq)) = lru.order.pop_front() else {
                break;
            };
            if lru.map.get(&old).is_some_and(|e| e.seq == old_seq) {
                lru.map.remove(&old);
            }
        }
    }

    /// Forgets `id` (the object was deleted).
    pub fn forget(&self, id: &str) {
        if let Ok(mut lru) = self.inner.lock() {
            lru.map.remove(id);
        }
    }

    /// A copy for a reloaded configuration: each entry's instance index
    /// goes through `map`, and entries whose instance is gone (`None`) are
    /// dropped. Expiry and eviction order are kept.
    pub fn remapped(&self, map: impl Fn(usize) -> Option<usize>) -> AffinityTable {
        let table = AffinityTable::new(self.capacity, self.ttl_ms);
        if let (Ok(old), Ok(mut new)) = (self.inner.lock(), table.inner.lock()) {
            new.seq = old.seq;
            for (key, seq) in &old.order {
                if let Some(e) = old.map.get(key).filter(|e| e.seq == *seq)
                    && let Some(instance) = map(e.instance)
                {
                    new.map.insert(key.clone(), Entry { instance, ..*e });
                    new.order.push_back((key.clone(), *seq));
                }
            }
        }
        table
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |l| l.map.len())
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for AffinityTable {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY, DEFAULT_TTL_MS)
    }
}

/// The path after `/openai` and an optional `/v1`, without a trailing `/`.
fn resource_path(path: &str) -> &str {
    let p = path.strip_prefix("/openai").unwrap_or(path);
    let p = p
        .strip_prefix("/v1")
        .filter(|r| r.starts_with('/'))
        .unwrap_or(p);
    p.trim_end_matches('/')
}

/// Collections whose `POST` creates a per-resource object.
const CREATING: &[&str] = &[
    "/files",
    "/uploads",
    "/batches",
    "/responses",
    "/assistants",
    "/threads",
    "/threads/runs",
    "/vector_stores",
    "/fine_tuning/jobs",
];

/// True for a request that creates a per-resource object, whose response
/// names the new id.
pub fn is_creation(method: &Method, path: &str) -> bool {
    *method == Method::POST && CREATING.contains(&resource_path(path))
}

/// Collections listed by `GET`, merged across instances.
const LISTS: &[&str] = &[
    "/files",
    "/batches",
    "/assistants",
    "/vector_stores",
    "/fine_tuning/jobs",
];

/// True for a list of per-resource objects: each instance holds only its
/// own, so the gateway asks every instance and merges the answers.
pub fn is_mergeable_list(method: &Method, path: &str) -> bool {
    *method == Method::GET && LISTS.contains(&resource_path(path))
}

/// True for a `DELETE` of a named object: on success its id is forgotten.
pub fn is_deletion(method: &Method) -> bool {
    *method == Method::DELETE
}

/// Body fields that name an existing object, in order of preference.
#[derive(Deserialize, Default)]
struct References {
    previous_response_id: Option<String>,
    input_file_id: Option<String>,
    file_id: Option<String>,
    training_file: Option<String>,
    assistant_id: Option<String>,
    thread_id: Option<String>,
    vector_store_id: Option<String>,
}

/// The first per-resource object id a JSON request body names at its top
/// level, e.g. a batch's `input_file_id`. `None` for anything that is not
/// a JSON object or names no such id.
pub fn body_reference(body: &[u8]) -> Option<String> {
    let trimmed = body.trim_ascii_start();
    if trimmed.first() != Some(&b'{') {
        return None;
    }
    let r: References = serde_json::from_slice(body).ok()?;
    [
        r.previous_response_id,
        r.input_file_id,
        r.file_id,
        r.training_file,
        r.assistant_id,
        r.thread_id,
        r.vector_store_id,
    ]
    .into_iter()
    .flatten()
    .find(|id| is_object_id(id))
}

/// How much of a creation response is scanned for the new id.
pub const SNIFF_LIMIT: usize = 64 * 1024;

/// The first `"id": "<object id>"` in `buf`: the id of the object a
/// creation response describes. Works on a JSON body and on an SSE stream
/// (the Responses API's `response.created` event), without parsing either.
pub fn find_object_id(buf: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"id\"";
    let mut from = 0;
    while let Some(pos) = find(&buf[from..], KEY) {
        let mut i = from + pos + KEY.len();
        from = i;
        while buf.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if buf.get(i) != Some(&b':') {
            continue;
        }
        i += 1;
        while buf.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if buf.get(i) != Some(&b'"') {
            continue;
        }
        let start = i + 1;
        let len = buf[start..].iter().position(|&b| b == b'"')?;
        if let Ok(s) = std::str::from_utf8(&buf[start..start + len])
            && is_object_id(s)
        {
            return Some(s);
        }
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Deserialize)]
struct ListDoc {
    #[serde(default)]
    data: Vec<serde_json::Value>,
    #[serde(default)]
    has_more: bool,
}

/// Merges list documents (`{"object":"list","data":[...],"has_more":...}`)
/// from several instances into one.
///
/// Items are de-duplicated by `id` and sorted newest first by `created_at`
/// (or `created`), as each instance sorts its own. `has_more` is true when
/// any instance has more; `first_id`/`last_id` describe the merged page.
/// Returns `None` when no input is a list document.
pub fn merge_lists(bodies: &[Bytes]) -> Option<Bytes> {
    let mut data: Vec<serde_json::Value> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut has_more = false;
    let mut any = false;
    for b in bodies {
        let Ok(doc) = serde_json::from_slice::<ListDoc>(b) else {
            continue;
        };
        any = true;
        has_more |= doc.has_more;
        for item in doc.data {
            let id = item.get("id").and_then(|v| v.as_str()).map(str::to_owned);
            if let Some(id) = id
                && !seen.insert(id)
            {
                continue;
            }
            data.push(item);
        }
    }
    if !any {
        return None;
    }
    let created = |v: &serde_json::Value| {
        v.get("created_at")
            .or_else(|| v.get("created"))
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0)
    };
    // Stable: items with equal times keep their instance order.
    data.sort_by_key(|v| std::cmp::Reverse(created(v)));
    let id_of = |v: Option<&serde_json::Value>| {
        v.and_then(|v| v.get("id"))
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    };
    let doc = serde_json::json!({
        "object": "list",
        "first_id": id_of(data.first()),
        "last_id": id_of(data.last()),
        "has_more": has_more,
        "data": data,
    });
    serde_json::to_vec(&doc).ok().map(Bytes::from)
}

/// A response body passed through unchanged while its first
/// [`SNIFF_LIMIT`] bytes are searched for the id of the object it creates;
/// the id is then remembered with the instance that answered.
pub struct Sniff<B> {
    inner: B,
    learn: Option<Learn>,
}

struct Learn {
    /// Also tells the other replicas (`redis` block), by instance name.
    shared: Option<(std::sync::Arc<crate::shared::Shared>, String)>,
    table: std::sync::Arc<AffinityTable>,
    instance: usize,
    now_ms: u64,
    seen: Vec<u8>,
}

impl<B> Sniff<B> {
    /// Wraps the body of `instance`'s answer to a creation request.
    pub fn new(
        inner: B,
        table: std::sync::Arc<AffinityTable>,
        instance: usize,
        now_ms: u64,
    ) -> Self {
        Self {
            inner,
            learn: Some(Learn {
                shared: None,
                table,
                instance,
                now_ms,
                seen: Vec::new(),
            }),
        }
    }

    /// Also records the id in Redis, under `instance`'s name, when
    /// `shared` is set.
    #[must_use]
    pub fn shared(
        mut self,
        shared: Option<std::sync::Arc<crate::shared::Shared>>,
        instance: &str,
    ) -> Self {
        if let Some(l) = &mut self.learn {
            l.shared = shared.map(|s| (s, instance.to_owned()));
        }
        self
    }
}

impl<B> http_body::Body for Sniff<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Some(learn) = &mut this.learn
        {
            let room = SNIFF_LIMIT.saturating_sub(learn.seen.len());
            learn.seen.extend_from_slice(&data[..data.len().min(room)]);
            if let Some(id) = find_object_id(&learn.seen) {
                learn.table.remember(id, learn.instance, learn.now_ms);
                if let Some((shared, name)) = &learn.shared {
                    shared.remember(id, name);
                }
                this.learn = None;
            } else if room <= data.len() {
                this.learn = None;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sniffing_a_creation_response_remembers_its_id_and_passes_bytes_through() {
        use http_body_util::BodyExt;
        let table = std::sync::Arc::new(AffinityTable::default());
        let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(
                b"{\"object\":\"file\",\"i",
            ))),
            Ok(http_body::Frame::data(Bytes::from_static(
                b"d\":\"file-xyz\"}",
            ))),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
        let sniff = Sniff::new(body, std::sync::Arc::clone(&table), 2, 0);
        let bytes = sniff.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], br#"{"object":"file","id":"file-xyz"}"#);
        assert_eq!(table.get("file-xyz", 1), Some(2));
    }

    #[test]
    fn a_reload_moves_ids_to_the_new_index_and_drops_removed_instances() {
        let t = AffinityTable::new(2, 1_000);
        t.remember("file-a", 0, 0);
        t.remember("file-b", 1, 10);
        // Instance 0 was removed; instance 1 is now at index 0.
        let r = t.remapped(|i| (i == 1).then_some(0));
        assert_eq!(r.get("file-a", 1), None);
        assert_eq!(r.get("file-b", 1), Some(0));
        assert_eq!(r.get("file-b", 1_010), None, "expiry kept");
        // Capacity and order kept: one more id evicts the oldest.
        r.remember("file-c", 0, 20);
        r.remember("file-d", 0, 30);
        assert_eq!(r.get("file-b", 40), None);
        assert_eq!(r.len(), 2);
        // The old table is left as it was, for requests still using it.
        assert_eq!(t.get("file-a", 1), Some(0));
    }

    #[test]
    fn remembers_and_expires_ids() {
        let t = AffinityTable::new(10, 1_000);
        t.remember("file-abc", 2, 0);
        assert_eq!(t.get("file-abc", 999), Some(2));
        assert_eq!(t.get("file-abc", 1_000), None);
        assert_eq!(t.get("file-other", 0), None);
    }

    #[test]
    fn evicts_the_oldest_id_when_full() {
        let t = AffinityTable::new(3, u64::MAX / 2);
        for (i, id) in ["file-1", "file-2", "file-3", "file-4"].iter().enumerate() {
            t.remember(id, i, 0);
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.get("file-1", 0), None);
        assert_eq!(t.get("file-4", 0), Some(3));
    }

    #[test]
    fn stays_bounded_when_the_same_ids_are_remembered_again_and_again() {
        let t = AffinityTable::new(2, u64::MAX / 2);
        for n in 0..10_000 {
            t.remember(if n % 2 == 0 { "file-a" } else { "file-b" }, n % 3, 0);
        }
        assert_eq!(t.len(), 2);
        let order_len = t.inner.lock().unwrap().order.len();
        assert!(order_len <= 4, "{order_len}");
        assert!(t.get("file-a", 0).is_some());
    }

    #[test]
    fn forgets_deleted_ids() {
        let t = AffinityTable::default();
        t.remember("batch_1", 1, 0);
        t.forget("batch_1");
        assert_eq!(t.get("batch_1", 0), None);
    }

    #[test]
    fn finds_the_new_id_in_json_and_sse_creation_responses() {
        let json = br#"{"object":"file","id":"file-9f8e","bytes":10}"#;
        assert_eq!(find_object_id(json), Some("file-9f8e"));
        let spaced = b"{\n  \"id\" : \"batch_77\",\n  \"object\": \"batch\"}";
        assert_eq!(find_object_id(spaced), Some("batch_77"));
        let sse = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_123\",\"object\":\"response\"}}\n\n";
        assert_eq!(find_object_id(sse), Some("resp_123"));
        // A message id that is not an object id is skipped.
        let other = br#"{"id":"chatcmpl-1","x":{"id":"file-2"}}"#;
        assert_eq!(find_object_id(other), Some("file-2"));
        assert_eq!(find_object_id(br#"{"id":"#), None);
        assert_eq!(find_object_id(b""), None);
    }

    #[test]
    fn reads_object_references_from_request_bodies() {
        let b = br#"{"input_file_id":"file-1","endpoint":"/chat/completions"}"#;
        assert_eq!(body_reference(b).as_deref(), Some("file-1"));
        let r = br#"{"model":"m","previous_response_id":"resp_5","input":"hi"}"#;
        assert_eq!(body_reference(r).as_deref(), Some("resp_5"));
        assert_eq!(body_reference(br#"{"model":"m"}"#), None);
        assert_eq!(body_reference(b"not json"), None);
        assert_eq!(body_reference(br#"{"file_id":"../etc"}"#), None);
    }

    #[test]
    fn knows_which_requests_create_and_list_objects() {
        assert!(is_creation(&Method::POST, "/openai/files"));
        assert!(is_creation(&Method::POST, "/openai/v1/files"));
        assert!(is_creation(&Method::POST, "/openai/responses"));
        assert!(is_creation(&Method::POST, "/openai/batches/"));
        assert!(!is_creation(&Method::GET, "/openai/files"));
        assert!(!is_creation(
            &Method::POST,
            "/openai/deployments/d/chat/completions"
        ));
        assert!(is_mergeable_list(&Method::GET, "/openai/files"));
        assert!(is_mergeable_list(&Method::GET, "/openai/v1/batches"));
        assert!(!is_mergeable_list(&Method::GET, "/openai/files/file-1"));
        assert!(!is_mergeable_list(&Method::GET, "/openai/models"));
    }

    #[test]
    fn merges_lists_newest_first_without_duplicates() {
        let a = Bytes::from_static(
            br#"{"object":"list","data":[{"id":"file-a","created_at":10},{"id":"file-c","created_at":30}],"has_more":false}"#,
        );
        let b = Bytes::from_static(
            br#"{"object":"list","data":[{"id":"file-b","created_at":20},{"id":"file-a","created_at":10}],"has_more":true}"#,
        );
        let merged = merge_lists(&[a, b, Bytes::from_static(b"<html>")]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&merged).unwrap();
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["file-c", "file-b", "file-a"]);
        assert_eq!(v["has_more"], true);
        assert_eq!(v["object"], "list");
        assert_eq!(v["first_id"], "file-c");
        assert_eq!(v["last_id"], "file-a");
        assert!(merge_lists(&[Bytes::from_static(b"nope")]).is_none());
    }
}
