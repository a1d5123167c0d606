//! Log output: the tracing subscriber and the per-request access line.
//!
//! Every line, start-up and access alike, goes through one in-process
//! buffer that a dedicated writer thread drains to stdout. A request thread
//! only appends bytes under a short, uncontended lock; it never makes a
//! syscall for its log line. The writer thread wakes every few milliseconds
//! (or at once when the buffer grows large) and writes everything pending
//! in one go. [`LogGuard`] drains the buffer on drop, so a graceful exit
//! loses nothing.
//!
//! Formats: JSON by default (one flat object per line: `timestamp`,
//! `level`, `target`, `message` and the event's fields), or a human line
//! with `LOG_FORMAT=text`. Filtering honours `RUST_LOG`, else `LOG_LEVEL`,
//! else `info`. Keys never reach this module: [`crate::secret::Secret`] has
//! no `Display` or `Serialize`.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// How log lines are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line (default; what log pipelines ingest).
    #[default]
    Json,
    /// A human-readable line, for terminals.
    Text,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(Self::Json),
            "text" | "pretty" | "human" => Ok(Self::Text),
            other => Err(format!("must be json or text, got {other:?}")),
        }
    }
}

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogInitError {
    /// `RUST_LOG` or `LOG_LEVEL` is not a valid filter.
    #[error("{var}: invalid log filter ({reason})")]
    Filter { var: &'static str, reason: String },
    /// A global subscriber was already installed.
    #[error("logging already initialised")]
    AlreadySet,
    /// The writer thread could not start.
    #[error("cannot start the log writer thread: {0}")]
    Thread(std::io::Error),
}

/// Above this many pending bytes the writer thread is woken at once rather
/// than at its next tick.
const WAKE_AT_BYTES: usize = 64 * 1024;
/// Pending bytes beyond which new lines are dropped (and counted) instead of
/// growing memory without bound while stdout is blocked.
const MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;
/// How long a line may wait in the buffer under light load.
const TICK: Duration = Duration::from_millis(20);

struct Sink {
    pending: Mutex<Vec<u8>>,
    wake: Condvar,
    stop: AtomicBool,
    dropped: AtomicU64,
    format: LogFormat,
}

impl Sink {
    fn append(&self, bytes: &[u8]) {
        let Ok(mut buf) = self.pending.lock() else {
            return;
        };
        if buf.len() + bytes.len() > MAX_PENDING_BYTES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_small = buf.len() < WAKE_AT_BYTES;
        buf.extend_from_slice(bytes);
        let now_big = buf.len() >= WAKE_AT_BYTES;
        drop(buf);
        if was_small && now_big {
            self.wake.notify_one();
        }
    }

    /// The writer thread: swap the pending buffer for an empty one, write it
    /// out without holding the lock, repeat until told to stop and drained.
    fn run(&self) {
        let mut out = std::io::stdout();
        let mut spare: Vec<u8> = Vec::with_capacity(WAKE_AT_BYTES * 2);
        let mut reported_dropped = 0;
        loop {
            let stopping;
            {
                let Ok(mut buf) = self.pending.lock() else {
                    return;
                };
                if buf.is_empty() && !self.stop.load(Ordering::Acquire) {
                    buf = match self.wake.wait_timeout(buf, TICK) {
                        Ok((b, _)) => b,
                        Err(_) => return,
                    };
                }
                stopping = self.stop.load(Ordering::Acquire);
                std::mem::swap(&mut *buf, &mut spare);
            }
            if !spare.is_empty() {
                // Nothing sensible can be done if stdout is gone; keep
                // draining so request threads never block on us.
                let _ = out.write_all(&spare);
                let _ = out.flush();
                spare.clear();
                if spare.capacity() > WAKE_AT_BYTES * 16 {
                    spare.shrink_to(WAKE_AT_BYTES * 2);
                }
            }
            let dropped = self.dropped.load(Ordering::Relaxed);
            if dropped != reported_dropped {
                let line = format!(
                    "{{\"level\":\"WARN\",\"target\":\"aoai_lb::logging\",\"message\":\"log lines dropped while stdout was blocked\",\"dropped_total\":{dropped}}}\n"
                );
                let _ = out.write_all(line.as_bytes());
                let _ = out.flush();
                reported_dropped = dropped;
            }
            if stopping {
                let empty = self.pending.lock().map(|b| b.is_empty()).unwrap_or(true);
                if empty {
                    return;
                }
            }
        }
    }
}

static SINK: OnceLock<Arc<Sink>> = OnceLock::new();

/// Keeps the writer thread alive; dropping it drains every pending line to
/// stdout and stops the thread. Drop it before the process exits.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    sink: Arc<Sink>,
    thread: Option<JoinHandle<()>>,
}

impl LogGuard {
    /// Writes out everything logged so far and stops the writer thread.
    /// Later lines are dropped. Same as dropping the guard.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.sink.stop.store(true, Ordering::Release);
        self.sink.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `io::Write` handed to tracing: appends the formatted event to the
/// shared buffer. tracing-subscriber writes each event with one call.
#[derive(Clone, Copy)]
struct BufferedStdout;

impl std::io::Write for BufferedStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(sink) = SINK.get() {
            sink.append(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferedStdout {
    type Writer = BufferedStdout;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Builds the level filter: `RUST_LOG` if set and non-empty, else
/// `LOG_LEVEL`, else `info`.
///
/// # Errors
/// [`LogInitError::Filter`] naming the variable whose value is invalid.
pub fn filter(rust_log: Option<&str>, log_level: Option<&str>) -> Result<EnvFilter, LogInitError> {
    let (var, spec) = match (
        rust_log.filter(|s| !s.trim().is_empty()),
        log_level.filter(|s| !s.trim().is_empty()),
    ) {
        (Some(r), _) => ("RUST_LOG", r.to_owned()),
        (None, Some(l)) => ("LOG_LEVEL", l.trim().to_ascii_lowercase()),
        (None, None) => ("LOG_LEVEL", "info".to_owned()),
    };
    EnvFilter::builder()
        .parse(&spec)
        .map_err(|e| LogInitError::Filter {
            var,
            reason: e.to_string(),
        })
}

/// Installs the global subscriber and starts the writer thread.
///
/// # Errors
/// [`LogInitError`] if a subscriber is already installed or the thread
/// cannot start.
pub fn init(format: LogFormat, filter: EnvFilter) -> Result<LogGuard, LogInitError> {
    let sink = Arc::new(Sink {
        pending: Mutex::new(Vec::with_capacity(WAKE_AT_BYTES * 2)),
        wake: Condvar::new(),
        stop: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
        format,
    });
    if SINK.set(sink.clone()).is_err() {
        return Err(LogInitError::AlreadySet);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(BufferedStdout);
    let installed = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stdout().is_terminal())
                .try_init()
        }
    };
    if installed.is_err() {
        return Err(LogInitError::AlreadySet);
    }
    let worker = sink.clone();
    let thread = std::thread::Builder::new()
        .name("aoai-lb-log".into())
        .spawn(move || worker.run())
        .map_err(LogInitError::Thread)?;
    Ok(LogGuard {
        sink,
        thread: Some(thread),
    })
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// Writes one access record as one line: the record's JSON, or in text
/// mode a human rendering of it.
///
/// Cheap on the request path: the record is serialised into a reused
/// thread-local buffer and appended to the shared log buffer; no syscall.
/// Dropped when logging is not initialised (library and test use) or when
/// the `aoai_lb::access` target is filtered out below `info`.
pub fn access<R: serde::Serialize + ?Sized>(record: &R) {
    let Some(sink) = SINK.get() else {
        return;
    };
    if !tracing::enabled!(target: "aoai_lb::access", tracing::Level::INFO) {
        return;
    }
    SCRATCH.with(|cell| {
        let Ok(mut buf) = cell.try_borrow_mut() else {
            return;
        };
        buf.clear();
        let ok = match sink.format {
            LogFormat::Json => serde_json::to_writer(&mut *buf, record).is_ok(),
            LogFormat::Text => match serde_json::to_value(record) {
                Ok(v) => {
                    buf.extend_from_slice(render_text(&v).as_bytes());
                    true
                }
                Err(_) => false,
            },
        };
        if ok {
            buf.push(b'\n');
            sink.append(&buf);
        }
        if buf.capacity() > 64 * 1024 {
            buf.shrink_to(1024);
        }
    });
}

/// `timestamp LEVEL target: message key=value ...`, close to what the
/// tracing text formatter prints for ordinary events.
fn render_text(v: &serde_json::Value) -> String {
    let mut line = String::with_capacity(256);
    let Some(obj) = v.as_object() else {
        return v.to_string();
    };
    let s = |k: &str| obj.get(k).and_then(|x| x.as_str()).unwrap_or("");
    let _ = write!(
        line,
        "{} {:>5} {}: {}",
        s("timestamp"),
        s("level"),
        s("target"),
        s("message")
    );
    for (k, val) in obj {
        if matches!(k.as_str(), "timestamp" | "level" | "target" | "message") || val.is_null() {
            continue;
        }
        match val {
            serde_json::Value::String(x) => {
                let _ = write!(line, " {k}={x}");
            }
            serde_json::Value::Array(items) if k == "attempts" => {
                let _ = write!(line, " {k}=[");
                for (i, a) in items.iter().enumerate() {
                    if i > 0 {
                        line.push(',');
                    }
                    let f = |n: &str| match a.get(n) {
                        Some(serde_json::Value::String(x)) => x.clone(),
                        Some(serde_json::Value::Number(x)) if n == "ms" => {
                            format!("{:.1}", x.as_f64().unwrap_or(0.0))
                        }
                        Some(serde_json::Value::Null) | None => "-".to_owned(),
                        Some(other) => other.to_string(),
                    };
                    let _ = write!(
                        line,
                        "{}:{}:{}:{}ms",
                        f("instance"),
                        f("outcome"),
                        f("status"),
                        f("ms")
                    );
                }
                line.push(']');
            }
            serde_json::Value::Number(n) if k.ends_with("_ms") => match n.as_f64() {
                Some(ms) => {
                    let _ = write!(line, " {k}={ms:.1}");
                }
                None => {
                    let _ = write!(line, " {k}={n}");
                }
            },
            other => {
                let _ = write!(line, " {k}={other}");
            }
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_log_formats() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!(" TEXT ".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn prefers_rust_log_over_log_level() {
        assert!(filter(Some("debug"), Some("nonsense=!!")).is_ok());
        let e = filter(None, Some("=@@bad")).unwrap_err().to_string();
        assert!(e.starts_with("LOG_LEVEL: "), "{e}");
        let e = filter(Some("=@@bad"), None).unwrap_err().to_string();
        assert!(e.starts_with("RUST_LOG: "), "{e}");
        assert!(filter(None, Some("WARN")).is_ok());
        assert!(filter(None, None).is_ok());
    }

    #[test]
    fn renders_an_access_record_as_one_human_line() {
        let v = serde_json::json!({
            "timestamp": "2026-01-01T00:00:00.000Z", "level": "INFO",
            "target": "aoai_lb::access", "message": "request",
            "method": "POST", "path": "/openai/x", "status": 200,
            "total_ms": 12.3456,
            "attempts": [{"instance": "a", "outcome": "throttled", "status": 429, "ms": 1.5},
                         {"instance": "b", "outcome": "ok", "status": 200, "ms": 3.0}],
            "error": null, "streamed": true
        });
        let line = render_text(&v);
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with("2026-01-01T00:00:00.000Z  INFO aoai_lb::access: request"),
            "{line}"
        );
        assert!(line.contains("method=POST"), "{line}");
        assert!(
            line.contains("attempts=[a:throttled:429:1.5ms,b:ok:200:3.0ms]"),
            "{line}"
        );
        assert!(!line.contains("error="), "{line}");
        assert!(
            line.contains("total_ms=12.3") && !line.contains("12.34"),
            "{line}"
        );
    }

    #[test]
    fn drops_lines_beyond_the_pending_cap_instead_of_growing() {
        let sink = Sink {
            pending: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            format: LogFormat::Json,
        };
        let line = vec![b'x'; 1024 * 1024];
        for _ in 0..20 {
            sink.append(&line);
        }
        assert!(sink.pending.lock().unwrap().len() <= MAX_PENDING_BYTES);
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 4);
    }
}
