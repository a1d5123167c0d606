//! The journal: a bounded per-instance record of every request the instance
//! received, so tests can assert exactly what each backend saw and how often.
//!
//! An entry is written when the request arrives (outcome `InFlight`) and updated
//! in place when the response ends, so a request that is still hanging already
//! counts. The ring drops its oldest entries beyond its capacity; because entries
//! are appended in `seq` order, finding one to update is index arithmetic.

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

struct Ring {
    entries: VecDeque<JournalEntry>,
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
    pub(crate) fn push(&self, mut entry: JournalEntry) -> u64 {
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
        if let Some(f) = fault {
            e.fault = Some(f.to_owned());
        }
    }

    pub(crate) fn entries(&self) -> Vec<JournalEntry> {
        self.lock().entries.iter().cloned().collect()
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

    fn entry() -> JournalEntry {
        JournalEntry {
            seq: 0,
            received_at_ms: 0,
            method: "POST".into(),
            path: "/p".into(),
            query: None,
            headers: vec![],
            body_len: 0,
            body_sha256: String::new(),
            deployment: None,
            status: 0,
            outcome: Outcome::InFlight,
            fault: None,
        }
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
