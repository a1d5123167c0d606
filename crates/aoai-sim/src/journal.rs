//! The journal: a bounded per-instance record of every request the instance
//! received, so tests can assert exactly what each backend saw and how often.
//!
//! An entry is written when the request arrives (outcome `InFlight`) and updated
//! in place when the response ends, so a request that is still hanging already
//! counts. The ring drops its oldest entries beyond its capacity; because entries
//! are appended in `seq` order, finding one to update is index arithmetic.
//!
//! On the hot path a request is stored compactly (one string for all headers,
//! one for path and query, the raw digest) and only expanded into a
//! [`JournalEntry`] when someone reads the journal. Values are copied, never
//! borrowed from the connection's read buffer, so a held entry does not pin that
//! buffer in memory.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The response is still being produced (or the request is hanging).
    InFlight,
    /// The whole response was handed to the connection.
    Completed,
    /// The client went away before the response ended.
    ClientAborted,
    /// A fault decided the response: a failure status, a reset or a cut stream.
    Faulted,
    /// The connection was upgraded (realtime WebSocket).
    Upgraded,
    /// The instance was stopped before the response ended.
    Stopped,
}

/// One request as the instance received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JournalEntry {
    /// Position since the instance started (not reset by clearing).
    pub seq: u64,
    /// Milliseconds since the Unix epoch when the request arrived.
    pub received_at_ms: u64,
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Request headers with lower-case names; `api-key` and `authorization` values
    /// are masked.
    pub headers: Vec<(String, String)>,
    /// Request body length in bytes.
    pub body_len: usize,
    /// Hex SHA-256 of the request body.
    pub body_sha256: String,
    /// Deployment the request addressed (path or body `model`), when known.
    pub deployment: Option<String>,
    /// Status sent (0 while in flight or when no response was sent).
    pub status: u16,
    /// How the request ended.
    pub outcome: Outcome,
    /// Kind of the fault that hit this request, if any.
    pub fault: Option<String>,
}

impl JournalEntry {
    /// Value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Masks a credential so the journal proves a key was sent without holding it:
/// the scheme (for `authorization`) survives, the secret does not.
pub(crate) fn mask_credential(name: &str, value: &str) -> String {
    if let Some((scheme, _)) = value.split_once(' ').filter(|_| name == "authorization") {
        return format!("{scheme} ***");
    }
    "***".to_owned()
}

/// A request as stored on the hot path; expanded by [`Record::entry`].
pub(crate) struct Record {
    pub(crate) seq: u64,
    pub(crate) received_at_ms: u64,
    pub(crate) method: http::Method,
    /// Path, then `?` and the (masked) query when there is one.
    pub(crate) path_and_query: String,
    pub(crate) path_len: usize,
    /// `name\0value\0` pairs, credentials already masked.
    pub(crate) headers: String,
    pub(crate) body_len: usize,
    pub(crate) body_sha256: [u8; 32],
    pub(crate) deployment: Option<String>,
    pub(crate) status: u16,
    pub(crate) outcome: Outcome,
    pub(crate) fault: Option<&'static str>,
}

impl Record {
    fn entry(&self) -> JournalEntry {
        let mut it = self.headers.split('\0');
        let mut headers = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            headers.push((k.to_owned(), v.to_owned()));
        }
        let (path, query) = self.path_and_query.split_at(self.path_len);
        JournalEntry {
            seq: self.seq,
            received_at_ms: self.received_at_ms,
            method: self.method.as_str().to_owned(),
            path: path.to_owned(),
            query: query.strip_prefix('?').map(str::to_owned),
            headers,
            body_len: self.body_len,
            body_sha256: hex::encode(self.body_sha256),
            deployment: self.deployment.clone(),
            status: self.status,
            outcome: self.outcome,
            fault: self.fault.map(str::to_owned),
        }
    }
}

struct Ring {
    entries: VecDeque<Record>,
    recorded: usize,
}

/// Bounded ring of entries plus a count of requests recorded since the last clear.
pub(crate) struct Journal {
    capacity: usize,
    ring: Mutex<Ring>,
    next_seq: std::sync::atomic::AtomicU64,
}

impl Journal {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ring: Mutex::new(Ring {
                entries: VecDeque::with_capacity(capacity.min(1024)),
                recorded: 0,
            }),
            next_seq: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Append a new in-flight entry; its `seq` is assigned here and returned.
    pub(crate) fn push(&self, mut entry: Record) -> u64 {
        let mut ring = self.lock();
        let seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        entry.seq = seq;
        ring.recorded += 1;
        if self.capacity == 0 {
            return seq;
        }
        if ring.entries.len() >= self.capacity {
            ring.entries.pop_front();
        }
        ring.entries.push_back(entry);
        seq
    }

    /// Update the entry `seq` (if still held) with how it ended.
    pub(crate) fn finish(
        &self,
        seq: u64,
        status: u16,
        outcome: Outcome,
        deployment: Option<&str>,
        fault: Option<&'static str>,
    ) {
        let mut ring = self.lock();
        let Some(front) = ring.entries.front().map(|e| e.seq) else {
            return;
        };
        let Some(idx) = seq.checked_sub(front) else {
            return;
        };
        let Some(e) = usize::try_from(idx)
            .ok()
            .and_then(|i| ring.entries.get_mut(i))
        else {
            return;
        };
        if e.seq != seq {
            return;
        }
        e.status = status;
        e.outcome = outcome;
        if e.deployment.is_none() {
            e.deployment = deployment.map(str::to_owned);
        }
        if fault.is_some() {
            e.fault = fault;
        }
    }

    pub(crate) fn entries(&self) -> Vec<JournalEntry> {
        self.lock().entries.iter().map(Record::entry).collect()
    }

    pub(crate) fn clear(&self) {
        let mut ring = self.lock();
        ring.entries.clear();
        ring.recorded = 0;
    }

    pub(crate) fn recorded(&self) -> usize {
        self.lock().recorded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Record {
        Record {
            seq: 0,
            received_at_ms: 0,
            method: http::Method::POST,
            path_and_query: "/p?a=1".into(),
            path_len: 2,
            headers: "x-a\0one\0x-b\0two words\0".into(),
            body_len: 0,
            body_sha256: [0; 32],
            deployment: None,
            status: 0,
            outcome: Outcome::InFlight,
            fault: None,
        }
    }

    #[test]
    fn records_expand_into_entries() {
        let j = Journal::new(4);
        j.push(entry());
        let e = &j.entries()[0];
        assert_eq!(e.path, "/p");
        assert_eq!(e.query.as_deref(), Some("a=1"));
        assert_eq!(e.header("X-B"), Some("two words"));
        assert_eq!(e.headers.len(), 2);
        assert_eq!(e.body_sha256.len(), 64);
    }

    #[test]
    fn ring_keeps_the_newest_entries_and_counts_all() {
        let j = Journal::new(2);
        for _ in 0..5 {
            j.push(entry());
        }
        let e = j.entries();
        assert_eq!(e.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(j.recorded(), 5);
        j.finish(4, 200, Outcome::Completed, Some("d"), None);
        j.finish(1, 500, Outcome::Completed, None, None); // evicted: ignored
        let e = j.entries();
        assert_eq!(e[1].status, 200);
        assert_eq!(e[1].deployment.as_deref(), Some("d"));
        j.clear();
        assert_eq!(j.recorded(), 0);
        assert!(j.entries().is_empty());
    }

    #[test]
    fn credentials_are_masked_but_the_scheme_survives() {
        assert_eq!(mask_credential("api-key", "secret"), "***");
        assert_eq!(
            mask_credential("authorization", "Bearer secret"),
            "Bearer ***"
        );
    }
}
