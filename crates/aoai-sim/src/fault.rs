//! Faults: the ways a simulated instance misbehaves on purpose, and the run-time
//! set that decides which fault, if any, hits the next request.
//!
//! Faults are checked in the order they were added. The first one whose count is
//! not exhausted (and, for `fail_fraction`, whose dice roll fires) applies to the
//! request and uses up one of its count. `content_filter` is a standing policy:
//! it has no count and is checked by the handlers that see a prompt.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// One way to misbehave. Deserialises from JSON tagged by `kind`, e.g.
/// `{"kind":"fail","count":3,"status":503}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "snake_case",
    deny_unknown_fields,
    try_from = "serde_json::Value"
)]
pub enum Fault {
    /// Fail the next `count` requests (None = every request) with `status`; body None =
    /// Azure's canonical body for that status. A 429 carries `retry-after` (s, rounded
    /// up), `retry-after-ms`, `x-ratelimit-reset-requests`/`-tokens` and Azure's 429
    /// body; `retry_after_ms` defaults to 1000 for a 429 and is sent on any status
    /// when set.
    Fail {
        #[serde(default)]
        count: Option<u32>,
        status: u16,
        #[serde(default)]
        body: Option<String>,
        #[serde(default)]
        retry_after_ms: Option<u64>,
    },
    /// Fail each request with probability `fraction` (0.0..=1.0), drawn from a
    /// generator seeded with `seed`, with `status` and Azure's canonical body.
    FailFraction {
        fraction: f64,
        status: u16,
        #[serde(default)]
        seed: u64,
    },
    /// Hold the request before sending headers for `ms` (then answer normally), or,
    /// with `ms` None, until the client goes away.
    Hang {
        #[serde(default)]
        count: Option<u32>,
        #[serde(default)]
        ms: Option<u64>,
    },
    /// Send `after_chunks` body chunks, then close the connection without ending the
    /// body; a stream with fewer chunks is cut before its last one. On a non-streamed reply the headers and the first half of the body are
    /// sent (whatever `after_chunks` is), then the connection closes.
    CloseMidStream {
        #[serde(default)]
        count: Option<u32>,
        after_chunks: u32,
    },
    /// Reset the connection (RST via SO_LINGER 0) before any response byte.
    ResetBeforeResponse {
        #[serde(default)]
        count: Option<u32>,
    },
    /// Send the response body `bytes` bytes at a time, `interval_ms` apart. Replaces
    /// the latency model's spacing of stream chunks.
    Drip {
        #[serde(default)]
        count: Option<u32>,
        bytes: usize,
        interval_ms: u64,
    },
    /// Any prompt containing `trigger` gets Azure's 400 `content_filter` body.
    ContentFilter { trigger: String },
}

/// The same shape, externally tagged: serde reads internally tagged enums through
/// a buffer that loses field paths, so a fault is re-read in this form to name
/// the offending field in errors (`count: invalid type ...`).
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields, remote = "Fault")]
enum Tagged {
    Fail {
        #[serde(default)]
        count: Option<u32>,
        status: u16,
        #[serde(default)]
        body: Option<String>,
        #[serde(default)]
        retry_after_ms: Option<u64>,
    },
    FailFraction {
        fraction: f64,
        status: u16,
        #[serde(default)]
        seed: u64,
    },
    Hang {
        #[serde(default)]
        count: Option<u32>,
        #[serde(default)]
        ms: Option<u64>,
    },
    CloseMidStream {
        #[serde(default)]
        count: Option<u32>,
        after_chunks: u32,
    },
    ResetBeforeResponse {
        #[serde(default)]
        count: Option<u32>,
    },
    Drip {
        #[serde(default)]
        count: Option<u32>,
        bytes: usize,
        interval_ms: u64,
    },
    ContentFilter {
        trigger: String,
    },
}

impl TryFrom<serde_json::Value> for Fault {
    type Error = String;

    fn try_from(v: serde_json::Value) -> Result<Self, String> {
        let serde_json::Value::Object(mut obj) = v else {
            return Err("a fault must be a JSON object with a `kind`".to_owned());
        };
        let kind = match obj.remove("kind") {
            Some(serde_json::Value::String(k)) => k,
            Some(_) => return Err("kind: expected a string".to_owned()),
            None => return Err("missing field `kind`".to_owned()),
        };
        let mut outer = serde_json::Map::new();
        outer.insert(kind, serde_json::Value::Object(obj));
        let mut track = serde_path_to_error::Track::new();
        let de =
            serde_path_to_error::Deserializer::new(serde_json::Value::Object(outer), &mut track);
        Tagged::deserialize(de).map_err(|e| {
            let path = track.path().to_string();
            // Drop the variant name the wrapper added; keep the field path.
            match path.split_once('.') {
                Some((_, field)) => format!("{field}: {e}"),
                None => e.to_string(),
            }
        })
    }
}

impl Fault {
    /// Short stable name, as used in the JSON `kind` and in the journal.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Fail { .. } => "fail",
            Fault::FailFraction { .. } => "fail_fraction",
            Fault::Hang { .. } => "hang",
            Fault::CloseMidStream { .. } => "close_mid_stream",
            Fault::ResetBeforeResponse { .. } => "reset_before_response",
            Fault::Drip { .. } => "drip",
            Fault::ContentFilter { .. } => "content_filter",
        }
    }

    fn count(&self) -> Option<u32> {
        match self {
            Fault::Fail { count, .. }
            | Fault::Hang { count, .. }
            | Fault::CloseMidStream { count, .. }
            | Fault::ResetBeforeResponse { count }
            | Fault::Drip { count, .. } => *count,
            Fault::FailFraction { .. } | Fault::ContentFilter { .. } => None,
        }
    }
}

/// What a request must suffer, decided once when it arrives.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Applied {
    Fail {
        status: u16,
        body: Option<String>,
        retry_after_ms: Option<u64>,
    },
    Hang(Option<u64>),
    CloseMidStream(u32),
    Reset,
    Drip {
        bytes: usize,
        interval_ms: u64,
    },
}

impl Applied {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Applied::Fail { .. } => "fail",
            Applied::Hang(_) => "hang",
            Applied::CloseMidStream(_) => "close_mid_stream",
            Applied::Reset => "reset_before_response",
            Applied::Drip { .. } => "drip",
        }
    }
}

struct Active {
    fault: Fault,
    remaining: Option<u32>,
    rng: Option<fastrand::Rng>,
}

/// The faults of one instance. Cheap to consult when empty (one atomic load).
pub(crate) struct FaultSet {
    any: AtomicBool,
    list: Mutex<Vec<Active>>,
}

impl FaultSet {
    pub(crate) fn new(initial: &[Fault]) -> Self {
        let set = Self {
            any: AtomicBool::new(false),
            list: Mutex::new(Vec::new()),
        };
        for f in initial {
            set.add(f.clone());
        }
        set
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Active>> {
        // A poisoned lock only means a panic elsewhere; the list itself stays valid.
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn add(&self, fault: Fault) {
        let rng = match &fault {
            Fault::FailFraction { seed, .. } => Some(fastrand::Rng::with_seed(*seed)),
            _ => None,
        };
        let remaining = fault.count();
        if remaining == Some(0) {
            return;
        }
        let mut list = self.lock();
        list.push(Active {
            fault,
            remaining,
            rng,
        });
        self.any.store(true, Ordering::Release);
    }

    pub(crate) fn clear(&self) {
        let mut list = self.lock();
        list.clear();
        self.any.store(false, Ordering::Release);
    }

    /// Faults still active, with counts showing what is left.
    pub(crate) fn snapshot(&self) -> Vec<Fault> {
        self.lock()
            .iter()
            .map(|a| {
                let mut f = a.fault.clone();
                match &mut f {
                    Fault::Fail { count, .. }
                    | Fault::Hang { count, .. }
                    | Fault::CloseMidStream { count, .. }
                    | Fault::ResetBeforeResponse { count }
                    | Fault::Drip { count, .. } => *count = a.remaining,
                    Fault::FailFraction { .. } | Fault::ContentFilter { .. } => {}
                }
                f
            })
            .collect()
    }

    /// Pick the fault for the next request and use up one of its count.
    pub(crate) fn take(&self) -> Option<Applied> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let mut list = self.lock();
        let mut hit = None;
        for (i, a) in list.iter_mut().enumerate() {
            let applied = match &a.fault {
                Fault::ContentFilter { .. } => continue,
                Fault::FailFraction {
                    fraction, status, ..
                } => {
                    let roll = a.rng.as_mut().map_or(1.0, fastrand::Rng::f64);
                    if roll >= *fraction {
                        continue;
                    }
                    Applied::Fail {
                        status: *status,
                        body: None,
                        retry_after_ms: None,
                    }
                }
                Fault::Fail {
                    status,
                    body,
                    retry_after_ms,
                    ..
                } => Applied::Fail {
                    status: *status,
                    body: body.clone(),
                    retry_after_ms: *retry_after_ms,
                },
                Fault::Hang { ms, .. } => Applied::Hang(*ms),
                Fault::CloseMidStream { after_chunks, .. } => {
                    Applied::CloseMidStream(*after_chunks)
                }
                Fault::ResetBeforeResponse { .. } => Applied::Reset,
                Fault::Drip {
                    bytes, interval_ms, ..
                } => Applied::Drip {
                    bytes: (*bytes).max(1),
                    interval_ms: *interval_ms,
                },
            };
            hit = Some((i, applied));
            break;
        }
        let (i, applied) = hit?;
        if let Some(n) = list[i].remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                list.remove(i);
            }
        }
        if list.is_empty() {
            self.any.store(false, Ordering::Release);
        }
        Some(applied)
    }

    /// The first content-filter trigger contained in `prompt`, if any.
    pub(crate) fn content_filtered(&self, prompt: &str) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        self.lock().iter().any(|a| match &a.fault {
            Fault::ContentFilter { trigger } => !trigger.is_empty() && prompt.contains(trigger),
            _ => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_json_uses_kind_tag() {
        let f: Fault = serde_json::from_str(r#"{"kind":"fail","count":3,"status":503}"#).unwrap();
        assert_eq!(
            f,
            Fault::Fail {
                count: Some(3),
                status: 503,
                body: None,
                retry_after_ms: None
            }
        );
        let f: Fault =
            serde_json::from_str(r#"{"kind":"close_mid_stream","after_chunks":2}"#).unwrap();
        assert_eq!(f.kind(), "close_mid_stream");
        assert!(serde_json::from_str::<Fault>(r#"{"kind":"fail","status":1,"x":1}"#).is_err());
    }

    #[test]
    fn fault_errors_name_the_field() {
        let e = serde_json::from_str::<Fault>(r#"{"kind":"hang","count":"x"}"#).unwrap_err();
        assert!(e.to_string().starts_with("count: invalid type"), "{e}");
        let e = serde_json::from_str::<Fault>(r#"{"kind":"explode"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `explode`"), "{e}");
        let e = serde_json::from_str::<Fault>(r#"{"status":500}"#).unwrap_err();
        assert!(e.to_string().contains("kind"), "{e}");
    }

    #[test]
    fn counted_fault_is_used_up_then_removed() {
        let set = FaultSet::new(&[Fault::Fail {
            count: Some(2),
            status: 500,
            body: None,
            retry_after_ms: None,
        }]);
        assert!(set.take().is_some());
        assert!(set.take().is_some());
        assert!(set.take().is_none());
        assert!(set.snapshot().is_empty());
    }

    #[test]
    fn fail_fraction_is_reproducible_for_a_seed() {
        let run = || {
            let set = FaultSet::new(&[Fault::FailFraction {
                fraction: 0.5,
                status: 503,
                seed: 7,
            }]);
            (0..64).map(|_| set.take().is_some()).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        let hits = a.iter().filter(|h| **h).count();
        assert!(hits > 10 && hits < 54, "{hits}");
    }

    #[test]
    fn content_filter_does_not_consume_requests() {
        let set = FaultSet::new(&[Fault::ContentFilter {
            trigger: "forbidden".into(),
        }]);
        assert!(set.take().is_none());
        assert!(set.content_filtered("a forbidden word"));
        assert!(!set.content_filtered("fine"));
    }
}
