//! Log output: the tracing subscriber and the per-request access line.
//!
//! Every line, start-up and access alike, goes into a buffer of the thread
//! that logs it, which a dedicated writer thread drains to stdout in
//! batches. A request thread appends under its own buffer's lock, which
//! only the writer takes otherwise (once per batch), and never makes a
//! syscall for its log line; the access line is written straight into that
//! buffer ([`crate::log::AccessRecord::write_json`]), with no intermediate
//! copy or serde tree. The writer wakes every few milliseconds (or at once
//! when a buffer grows large), collects every thread's pending lines, puts
//! them back in the order they were written (each line takes a number
//! from one atomic counter), and writes them in one go: a line logged
//! after another, on any thread, is never written before it. Buffers are reused from batch to
//! batch and a finished thread's buffer is dropped after its last lines
//! are written. [`LogGuard`] drains every buffer on drop, so a graceful
//! exit loses nothing.
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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
/// Pending bytes of one thread beyond which its new lines are dropped (and
/// counted) instead of growing memory without bound while stdout is
/// blocked.
const MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;
/// A thread's buffer keeps up to this much capacity between batches (what
/// a busy thread writes in one tick); a larger one is shrunk after a burst.
const KEEP_CAPACITY: usize = 256 * 1024;
/// How long a line may wait in the buffer under light load.
const TICK: Duration = Duration::from_millis(20);

/// One thread's pending lines.
#[derive(Default)]
struct Shard {
    pending: Mutex<Pending>,
}

/// Lines not yet written: their bytes, and where each line ends with the
/// sequence number it got when it was written.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    ends: Vec<(u64, usize)>,
}

struct Sink {
    /// Tells this sink's thread buffers from another's (unit tests make
    /// sinks of their own next to the global one).
    id: usize,
    /// Every logging thread's buffer, in the order the threads first
    /// logged. The thread holds the other reference; once it is gone the
    /// writer drops the buffer after writing what it held.
    shards: Mutex<Vec<Arc<Shard>>>,
    /// Set (under its lock) to wake the writer before its tick.
    woken: Mutex<bool>,
    wake: Condvar,
    stop: AtomicBool,
    dropped: AtomicU64,
    /// Numbers every line in the order lines are written, across threads:
    /// the writer puts each batch in this order, so a line logged after
    /// another (on any thread) is never written before it.
    seq: AtomicU64,
    format: LogFormat,
}

thread_local! {
    /// This thread's buffer, and the id of the sink it belongs to.
    static SHARD: RefCell<Option<(usize, Arc<Shard>)>> = const { RefCell::new(None) };
}

impl Sink {
    fn new(format: LogFormat) -> Self {
        static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            shards: Mutex::new(Vec::new()),
            woken: Mutex::new(false),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            format,
        }
    }

    fn append(&self, bytes: &[u8]) {
        self.write_line(|buf| buf.extend_from_slice(bytes));
    }

    /// Lets `write` append one line to this thread's buffer (registering
    /// the buffer on the thread's first line). A line that would take the
    /// buffer over [`MAX_PENDING_BYTES`] is taken back and counted.
    fn write_line(&self, write: impl FnOnce(&mut Vec<u8>)) {
        let id = self.id;
        let mut write = Some(write);
        let _ = SHARD.try_with(|cell| {
            let Ok(mut slot) = cell.try_borrow_mut() else {
                return;
            };
            let shard = match &*slot {
                Some((owner, shard)) if *owner == id => shard.clone(),
                _ => {
                    let shard = Arc::new(Shard::default());
                    if let Ok(mut all) = self.shards.lock() {
                        all.push(shard.clone());
                    }
                    *slot = Some((id, shard.clone()));
                    shard
                }
            };
            drop(slot);
            if let Some(w) = write.take() {
                self.write_into(&shard, w);
            }
        });
        // No thread-local buffer (the thread is exiting, or logging from
        // inside a line): a buffer of its own for this one line.
        if let Some(w) = write {
            let shard = Arc::new(Shard::default());
            self.write_into(&shard, w);
            if let Ok(mut all) = self.shards.lock() {
                all.push(shard);
            }
        }
    }

    fn write_into(&self, shard: &Shard, write: impl FnOnce(&mut Vec<u8>)) {
        let Ok(mut pending) = shard.pending.lock() else {
            return;
        };
        let before = pending.bytes.len();
        write(&mut pending.bytes);
        let after = pending.bytes.len();
        if after > MAX_PENDING_BYTES {
            pending.bytes.truncate(before);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if after == before {
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        pending.ends.push((seq, after));
        let wake = before < WAKE_AT_BYTES && after >= WAKE_AT_BYTES;
        drop(pending);
        if wake {
            if let Ok(mut woken) = self.woken.lock() {
                *woken = true;
            }
            self.wake.notify_one();
        }
    }

    /// Moves every thread's pending lines into `batch`, in the order they
    /// were written, and forgets the buffers of threads that have ended
    /// once they are drained.
    fn collect(&self, batch: &mut Vec<u8>) {
        // Each buffer is copied out under its lock, so a request thread
        // waits for a copy at most; the ordering happens afterwards.
        let mut staged: Vec<u8> = Vec::new();
        let mut lines: Vec<(u64, usize, usize)> = Vec::new();
        if let Ok(mut all) = self.shards.lock() {
            all.retain(|shard| {
                // Read before draining: a thread that is gone now cannot
                // add lines after the drain below.
                let alive = Arc::strong_count(shard) > 1;
                if let Ok(mut pending) = shard.pending.lock() {
                    let base = staged.len();
                    staged.extend_from_slice(&pending.bytes);
                    let mut start = base;
                    for &(seq, end) in &pending.ends {
                        lines.push((seq, start, base + end));
                        start = base + end;
                    }
                    pending.bytes.clear();
                    pending.ends.clear();
                    if pending.bytes.capacity() > KEEP_CAPACITY {
                        pending.bytes.shrink_to(KEEP_CAPACITY / 16);
                        pending.ends.shrink_to(64);
                    }
                }
                alive
            });
        }
        lines.sort_unstable_by_key(|&(seq, _, _)| seq);
        batch.reserve(staged.len());
        for (_, start, end) in lines {
            batch.extend_from_slice(&staged[start..end]);
        }
    }

    /// The writer thread: collect every thread's lines, write them out,
    /// repeat until told to stop and drained.
    fn run(&self) {
        let mut out = std::io::stdout();
        let mut batch: Vec<u8> = Vec::with_capacity(WAKE_AT_BYTES * 2);
        let mut reported_dropped = 0;
        loop {
            {
                let Ok(mut woken) = self.woken.lock() else {
                    return;
                };
                if !*woken && !self.stop.load(Ordering::Acquire) {
                    woken = match self.wake.wait_timeout(woken, TICK) {
                        Ok((w, _)) => w,
                        Err(_) => return,
                    };
                }
                *woken = false;
            }
            let stopping = self.stop.load(Ordering::Acquire);
            self.collect(&mut batch);
            let wrote = !batch.is_empty();
            if wrote {
                // Nothing sensible can be done if stdout is gone; keep
                // draining so request threads never block on us.
                let _ = out.write_all(&batch);
                let _ = out.flush();
                batch.clear();
                if batch.capacity() > WAKE_AT_BYTES * 16 {
                    batch.shrink_to(WAKE_AT_BYTES * 2);
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
            if stopping && !wrote {
                return;
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
        if let Ok(mut woken) = self.sink.woken.lock() {
            *woken = true;
        }
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
    let sink = Arc::new(Sink::new(format));
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

/// Writes one access record as one line: the record's JSON, or in text
/// mode a human rendering of it.
///
/// Cheap on the request path: the JSON is written straight into this
/// thread's log buffer, which the writer thread drains in batches; no
/// syscall and no intermediate allocation. Dropped when logging is not
/// initialised (library and test use) or when the `aoai_lb::access` target
/// is filtered out below `info`.
pub fn access(record: &crate::log::AccessRecord) {
    let Some(sink) = SINK.get() else {
        return;
    };
    if !tracing::enabled!(target: "aoai_lb::access", tracing::Level::INFO) {
        return;
    }
    match sink.format {
        LogFormat::Json => sink.write_line(|buf| {
            record.write_json(buf);
            buf.push(b'\n');
        }),
        // For terminals; not the path to make fast.
        LogFormat::Text => {
            if let Ok(v) = serde_json::to_value(record) {
                let mut line = render_text(&v);
                line.push('\n');
                sink.append(line.as_bytes());
            }
        }
    }
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
        let sink = Sink::new(LogFormat::Json);
        let line = vec![b'x'; 1024 * 1024];
        for _ in 0..20 {
            sink.append(&line);
        }
        let mut batch = Vec::new();
        sink.collect(&mut batch);
        assert_eq!(batch.len(), MAX_PENDING_BYTES);
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn keeps_each_threads_lines_in_order_and_forgets_ended_threads_after_draining() {
        let sink = Arc::new(Sink::new(LogFormat::Json));
        // This thread's buffer comes first in the sink's list, yet its
        // second line, written after the others', must come out last.
        sink.append(b"first\n");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        sink.append(format!("{t}:{i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        sink.append(b"main\n");
        let mut batch = Vec::new();
        sink.collect(&mut batch);
        let text = String::from_utf8(batch).unwrap();
        assert_eq!(text.lines().count(), 4002);
        assert_eq!(text.lines().next(), Some("first"));
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{t}:")))
                .map(|i| i.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..1000).collect::<Vec<_>>(), "thread {t}");
        }
        // Lines from different threads come out in the order written.
        let last_line = text.lines().last().unwrap();
        assert_eq!(last_line, "main");
        // The four ended threads' buffers are gone; this thread's stays.
        assert_eq!(sink.shards.lock().unwrap().len(), 1);
        let mut again = Vec::new();
        sink.collect(&mut again);
        assert!(again.is_empty());
    }
}
