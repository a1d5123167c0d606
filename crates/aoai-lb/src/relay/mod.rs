//! The lean client-facing HTTP/1 server ("relay"), the default for
//! HTTP/1 clients; `server.http1: "hyper"` serves them with hyper instead.
//!
//! One task per connection parses each request head with `httparse`
//! ([`h1`]), hands the request to the gateway and writes the response
//! itself. What it saves against hyper's server:
//! - no fixed 8 KiB read and 8 KiB write buffer per connection: the head
//!   buffer (4 KiB, grown only for a larger head up to the header cap) is
//!   allocated when bytes arrive and dropped as soon as it is empty, so an
//!   idle keep-alive connection, or one streaming a response, holds none;
//! - no body channel between a connection task and a request task: a body
//!   that arrived with its head (the usual case) is handed over as bytes,
//!   and a longer one is read on demand when the pipeline asks for it
//!   ([`ClientBody::Relay`]), so `Expect: 100-continue` is answered only
//!   then, as hyper does;
//! - the response head and small bodies go out in one write.
//!
//! What it does not serve goes to hyper with the bytes already read
//! replayed first ([`Rewind`]): HTTP/2 with prior knowledge and any request
//! with an `Upgrade` header (WebSocket handshakes for the Realtime API).
//!
//! Connection rules, the same as the hyper server's: the first request head
//! must be complete within `server.header_read_timeout`, later ones (idle
//! time included) within the longer of that and
//! `server.keep_alive_timeout`; a head over 64 KiB or with more than
//! `server.max_headers` lines is answered 431. The request-smuggling rules
//! of RFC 9112 are in [`h1`]; a refused head is answered with an
//! OpenAI-shaped error and the connection is closed. Pipelined requests
//! are served one after the other, in order. A client that closes its
//! side while its request is being served cancels it (as with hyper,
//! which does not support half-closed connections by default).

pub mod client;
pub mod h1;

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body::Body;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use h1::{ChunkDecoder, Framing, Head, HeadError, Step};

/// First allocation for a request head: most heads, and the small JSON
/// body that usually follows in the same segment, fit.
const HEAD_BUF: usize = 4096;
/// Read size while a body is read on demand.
const BODY_READ: usize = 16 * 1024;
/// Response bytes gathered before a write when the body has more ready.
const WRITE_BATCH: usize = 64 * 1024;
/// Pipelined bytes read ahead while a request is served; past this the
/// connection is no longer watched for a close until the response is out.
const READ_AHEAD: usize = 64 * 1024;
/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which server speaks HTTP/1 to clients (`server.http1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Http1Server {
    /// This module. The default.
    #[default]
    Relay,
    /// hyper's HTTP/1 server, as before the relay existed.
    Hyper,
}

impl Http1Server {
    /// The configuration spelling: `relay` or `hyper`.
    pub fn as_str(self) -> &'static str {
        match self {
            Http1Server::Relay => "relay",
            Http1Server::Hyper => "hyper",
        }
    }

    /// Parses the configuration spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "relay" => Some(Http1Server::Relay),
            "hyper" => Some(Http1Server::Hyper),
            _ => None,
        }
    }
}

/// A client request's body as the pipeline receives it.
pub enum ClientBody {
    /// Served by hyper (HTTP/2, or `server.http1: "hyper"`).
    Hyper(Incoming),
    /// Complete already (it arrived with the head), or empty.
    Ready(Bytes),
    /// To be read from the relay's connection when asked for.
    Relay(RelayBody),
}

impl From<Incoming> for ClientBody {
    fn from(b: Incoming) -> Self {
        ClientBody::Hyper(b)
    }
}

/// A body the relay reads when [`RelayBody::read`] is called. Dropping it
/// unread leaves the body unread; the connection is then closed after the
/// response.
pub struct RelayBody {
    want: oneshot::Sender<Want>,
}

struct Want {
    limit: usize,
    reply: oneshot::Sender<Result<Bytes, BodyFailure>>,
}

/// Why a body read on demand did not produce the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFailure {
    /// Over the limit the pipeline gave.
    TooLarge,
    /// Invalid chunked framing, or the client closed or failed mid-body.
    Failed,
}

impl RelayBody {
    /// Reads the whole body, at most `limit` bytes.
    ///
    /// # Errors
    /// [`BodyFailure::TooLarge`] past `limit`, [`BodyFailure::Failed`] for
    /// invalid framing or a connection that ended first.
    pub async fn read(self, limit: usize) -> Result<Bytes, BodyFailure> {
        let (reply, rx) = oneshot::channel();
        self.want
            .send(Want { limit, reply })
            .map_err(|_| BodyFailure::Failed)?;
        rx.await.unwrap_or(Err(BodyFailure::Failed))
    }
}

/// How a relay connection ended.
pub enum Outcome {
    /// Closed (or to be closed by dropping the stream).
    Closed,
    /// Not the relay's: serve the stream with hyper, replaying `read` first.
    /// `deadline` is when the first request head must be complete.
    Handoff {
        stream: TcpStream,
        read: Bytes,
        deadline: Instant,
    },
}

/// The connection limits the relay applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deadline for the first request head.
    pub header_read_timeout: Duration,
    /// Idle time plus head time for later requests.
    pub keep_alive_timeout: Duration,
    /// Header lines per request.
    pub max_headers: usize,
    /// Bytes per request head.
    pub max_head_bytes: usize,
}

/// What the body of the request being served still owes the connection.
enum Owed {
    /// Nothing: the next request starts at the next byte.
    Nothing,
    /// Bytes of a `Content-Length` body not read yet.
    Length(u64),
    /// A chunked body not read (or not completely).
    Chunked,
}

/// Serves HTTP/1 requests on `stream` with `service` until the client
/// closes, a deadline passes, `closing` resolves between requests or a
/// request cannot be served on this connection any more.
pub async fn serve<F, Fut, B>(
    stream: TcpStream,
    limits: Limits,
    mut service: F,
    closing: &CancellationToken,
) -> Outcome
where
    F: FnMut(Request<ClientBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Body<Data = Bytes>,
{
    let mut buf = BytesMut::new();
    let mut first = true;
    loop {
        let deadline = Instant::now()
            + if first {
                limits.header_read_timeout
            } else {
                limits.keep_alive_timeout.max(limits.header_read_timeout)
            };
        let head = tokio::select! {
            biased;
            () = closing.cancelled(), if buf.is_empty() => return Outcome::Closed,
            r = tokio::time::timeout_at(deadline, read_head(&stream, &mut buf, &limits, first)) => match r {
                Err(_) => return Outcome::Closed,
                Ok(r) => r,
            },
        };
        first = false;
        let head = match head {
            Ok(HeadRead::Head(h)) => h,
            Ok(HeadRead::Eof) => return Outcome::Closed,
            Ok(HeadRead::Handoff) => {
                return Outcome::Handoff {
                    stream,
                    read: buf.freeze(),
                    deadline,
                };
            }
            Err(ReadFail::Io) => return Outcome::Closed,
            Err(ReadFail::Head(e)) => {
                let _ = write_all(&stream, &refusal(&e)).await;
                return Outcome::Closed;
            }
        };
        let Head {
            method,
            uri,
            version,
            headers,
            framing,
            keep_alive,
            expect_continue,
            upgrade: _,
        } = head;
        let is_head = method == http::Method::HEAD;
        // A body that is all here already goes as bytes; otherwise it is
        // read when the pipeline asks (or never).
        let mut owed = match framing {
            Framing::Empty => Owed::Nothing,
            Framing::Length(n) => Owed::Length(n),
            Framing::Chunked => Owed::Chunked,
        };
        let mut want_rx = None;
        let body = match framing {
            Framing::Empty => ClientBody::Ready(Bytes::new()),
            Framing::Length(n) if (buf.len() as u64) >= n => {
                owed = Owed::Nothing;
                ClientBody::Ready(take_body(&mut buf, n as usize))
            }
            Framing::Chunked if !buf.is_empty() => match h1::decode_chunked(&buf) {
                Ok(Some((body, used))) => {
                    buf.advance(used);
                    owed = Owed::Nothing;
                    ClientBody::Ready(Bytes::from(body))
                }
                _ => lazy(&mut want_rx),
            },
            _ => lazy(&mut want_rx),
        };
        release_if_empty(&mut buf);
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;

        // Serve it: the body read on demand and a close of the client's
        // side are watched while the gateway works.
        let mut watching = true;
        let response = {
            // Boxed: the gateway's future is large and lives only until
            // the response head; inline, the connection's task would keep
            // its size for as long as the connection is open.
            let mut fut = Box::pin(service(req));
            loop {
                tokio::select! {
                    biased;
                    r = fut.as_mut() => break r,
                    w = async { match want_rx.as_mut() { Some(rx) => rx.await, None => std::future::pending().await } }, if want_rx.is_some() => {
                        want_rx = None;
                        if let Ok(w) = w {
                            let r = read_body(&stream, &mut buf, &mut owed, w.limit, expect_continue).await;
                            release_if_empty(&mut buf);
                            let _ = w.reply.send(r);
                        }
                    }
                    gone = watch(&stream, &mut buf), if watching && matches!(owed, Owed::Nothing) => match gone {
                        Watch::Closed => return Outcome::Closed,
                        Watch::Full => watching = false,
                        Watch::Data => {}
                    },
                }
            }
        };
        drop(want_rx);
        // The connection can carry another request only if this one's body
        // was consumed; a rest already buffered is skipped, anything else
        // closes the connection.
        if let Owed::Length(n) = owed
            && (buf.len() as u64) >= n
        {
            buf.advance(n as usize);
            owed = Owed::Nothing;
        }
        // An unread body closes the connection, which is also what an
        // unanswered `Expect: 100-continue` needs.
        let reuse = keep_alive && matches!(owed, Owed::Nothing) && !closing.is_cancelled();
        match write_response(
            &stream,
            &mut buf,
            response,
            version,
            is_head,
            reuse,
            watching && matches!(owed, Owed::Nothing),
        )
        .await
        {
            Ok(true) => {}
            Ok(false) | Err(_) => return Outcome::Closed,
        }
        release_if_empty(&mut buf);
    }
}

fn lazy(slot: &mut Option<oneshot::Receiver<Want>>) -> ClientBody {
    let (want, rx) = oneshot::channel();
    *slot = Some(rx);
    ClientBody::Relay(RelayBody { want })
}

/// Takes `n` body bytes off the front of `buf`. A small body is copied, so
/// it does not keep the head buffer alive for as long as the request
/// lives; a large one is split off without a copy.
fn take_body(buf: &mut BytesMut, n: usize) -> Bytes {
    if n <= 16 * 1024 {
        let b = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        b
    } else {
        buf.split_to(n).freeze()
    }
}

/// Drops the buffer's allocation once it holds nothing: an idle connection
/// keeps no buffer.
fn release_if_empty(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}

// One per request, moved once: boxing the head would cost an allocation
// per request to save a copy of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
enum HeadRead {
    Head(Head),
    Eof,
    Handoff,
}

enum ReadFail {
    Io,
    Head(HeadError),
}

async fn read_head(
    stream: &TcpStream,
    buf: &mut BytesMut,
    limits: &Limits,
    first: bool,
) -> Result<HeadRead, ReadFail> {
    loop {
        if !buf.is_empty() {
            let k = buf.len().min(H2_PREFACE.len());
            if first && buf[..k] == H2_PREFACE[..k] {
                // HTTP/2 with prior knowledge (or the start of its
                // preface, until it is complete).
                if k == H2_PREFACE.len() {
                    return Ok(HeadRead::Handoff);
                }
            } else {
                match h1::parse_head(buf, limits.max_headers) {
                    Ok(Some(h)) if h.upgrade => {
                        // The head was split off; put it back for hyper.
                        restore(buf, &h);
                        return Ok(HeadRead::Handoff);
                    }
                    Ok(Some(h)) => return Ok(HeadRead::Head(h)),
                    Ok(None) => {}
                    Err(e) => return Err(ReadFail::Head(e)),
                }
            }
            if buf.len() >= limits.max_head_bytes {
                return Err(ReadFail::Head(HeadError::TooLarge));
            }
        }
        // No buffer until there is something to read.
        stream.readable().await.map_err(|_| ReadFail::Io)?;
        let got = if buf.is_empty() {
            read_fresh(stream, buf)
        } else {
            if buf.capacity() == buf.len() {
                let room = limits.max_head_bytes.saturating_sub(buf.len());
                buf.reserve(buf.len().min(room).max(1024));
            }
            stream.try_read_buf(buf)
        };
        match got {
            Ok(0) => {
                return if buf.is_empty() {
                    Ok(HeadRead::Eof)
                } else {
                    Err(ReadFail::Io)
                };
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(ReadFail::Io),
        }
    }
}

thread_local! {
    /// [`read_fresh`]'s landing buffer, zeroed once per thread: a fresh
    /// zeroed 4 KiB array on the stack for each read cost more than
    /// parsing the request head.
    static FIRST_READ: std::cell::RefCell<Box<[u8; HEAD_BUF]>> =
        std::cell::RefCell::new(Box::new([0; HEAD_BUF]));
}

/// Reads into an empty `buf` through a per-thread buffer, so a wake-up
/// without data allocates nothing.
fn read_fresh(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    FIRST_READ.with_borrow_mut(|first| {
        let n = stream.try_read(&mut first[..])?;
        if n > 0 {
            buf.reserve(HEAD_BUF);
            buf.extend_from_slice(&first[..n]);
        }
        Ok(n)
    })
}

/// Rebuilds the bytes of an `Upgrade` request's head in front of `buf`.
/// The parsed head is serialised again: hyper re-parses it, and the
/// values are the client's own bytes.
fn restore(buf: &mut BytesMut, h: &Head) {
    let mut raw = BytesMut::with_capacity(256 + buf.len());
    raw.extend_from_slice(h.method.as_str().as_bytes());
    raw.extend_from_slice(b" ");
    raw.extend_from_slice(h.uri.to_string().as_bytes());
    raw.extend_from_slice(if h.version == Version::HTTP_10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    for (name, value) in &h.headers {
        raw.extend_from_slice(name.as_str().as_bytes());
        raw.extend_from_slice(b": ");
        raw.extend_from_slice(value.as_bytes());
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    raw.extend_from_slice(buf);
    *buf = raw;
}

enum Watch {
    /// The client closed its side (or the connection failed).
    Closed,
    /// Bytes of a later request arrived (kept in the buffer).
    Data,
    /// The read-ahead is full: stop watching.
    Full,
}

/// Waits for the client to send or close while a request is served.
async fn watch(stream: &TcpStream, buf: &mut BytesMut) -> Watch {
    if buf.len() >= READ_AHEAD {
        return Watch::Full;
    }
    if stream.readable().await.is_err() {
        return Watch::Closed;
    }
    let got = if buf.is_empty() {
        read_fresh(stream, buf)
    } else {
        if buf.capacity() == buf.len() {
            buf.reserve(HEAD_BUF);
        }
        stream.try_read_buf(buf)
    };
    match got {
        Ok(0) => Watch::Closed,
        Ok(_) => Watch::Data,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Watch::Data,
        Err(_) => Watch::Closed,
    }
}

/// Reads the request body the pipeline asked for.
async fn read_body(
    stream: &TcpStream,
    buf: &mut BytesMut,
    owed: &mut Owed,
    limit: usize,
    expect_continue: bool,
) -> Result<Bytes, BodyFailure> {
    if expect_continue && buf.is_empty() {
        write_all(stream, b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| BodyFailure::Failed)?;
    }
    match *owed {
        Owed::Nothing => Ok(Bytes::new()),
        Owed::Length(n) => {
            if n > limit as u64 {
                return Err(BodyFailure::TooLarge);
            }
            let n = n as usize;
            if buf.len() >= n {
                *owed = Owed::Nothing;
                return Ok(take_body(buf, n));
            }
            let mut out = BytesMut::with_capacity(n);
            out.extend_from_slice(buf);
            buf.clear();
            while out.len() < n {
                // The capacity is exactly the body: a read never takes
                // bytes of the next request.
                match read_some(stream, &mut out).await {
                    Ok(0) | Err(_) => {
                        *owed = Owed::Length((n - out.len()) as u64);
                        return Err(BodyFailure::Failed);
                    }
                    Ok(_) => {}
                }
            }
            *owed = Owed::Nothing;
            Ok(out.freeze())
        }
        Owed::Chunked => {
            let mut d = ChunkDecoder::new();
            let mut out = BytesMut::new();
            loop {
                while !buf.is_empty() {
                    let (used, step) = d.step(buf).map_err(|_| BodyFailure::Failed)?;
                    let done = match step {
                        Step::Data(b) => {
                            if out.len() + b.len() > limit {
                                return Err(BodyFailure::TooLarge);
                            }
                            out.extend_from_slice(b);
                            false
                        }
                        Step::Done => true,
                        Step::More => false,
                    };
                    buf.advance(used);
                    if done {
                        *owed = Owed::Nothing;
                        return Ok(out.freeze());
                    }
                }
                buf.reserve(BODY_READ);
                match read_some(stream, buf).await {
                    Ok(0) | Err(_) => return Err(BodyFailure::Failed),
                    Ok(_) => {}
                }
            }
        }
    }
}

async fn read_some(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How the response body is delimited on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Writes one response. `Ok(true)`: the connection can serve another
/// request.
async fn write_response<B>(
    stream: &TcpStream,
    buf: &mut BytesMut,
    response: Response<B>,
    version: Version,
    is_head: bool,
    mut reuse: bool,
    mut watching: bool,
) -> io::Result<bool>
where
    B: Body<Data = Bytes>,
{
    let (mut parts, body) = response.into_parts();
    let status = parts.status;
    let code = status.as_u16();
    let headers = &mut parts.headers;
    if headers
        .get(header::CONNECTION)
        .is_some_and(|v| has_token(v.as_bytes(), b"close"))
    {
        reuse = false;
    }
    let bodiless = is_head || (100..200).contains(&code) || code == 204 || code == 304;
    if (100..200).contains(&code) || code == 204 {
        headers.remove(header::CONTENT_LENGTH);
    }
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::CONNECTION);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_none() {
        headers.remove(header::CONTENT_LENGTH);
    }
    let exact = body.size_hint().exact();
    let out = match declared {
        _ if bodiless => Out::None,
        Some(n) => Out::Length(n),
        None => match exact {
            Some(n) => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                Out::Length(n)
            }
            None if version == Version::HTTP_11 => Out::Chunked,
            None => {
                reuse = false;
                Out::UntilClose
            }
        },
    };
    if is_head
        && declared.is_none()
        && let Some(n) = exact
    {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }

    let mut w = Vec::with_capacity(512);
    w.extend_from_slice(b"HTTP/1.1 ");
    w.extend_from_slice(status.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    w.extend_from_slice(b"\r\n");
    write_fields(&mut w, headers, &[]);
    if !headers.contains_key(header::DATE) {
        w.extend_from_slice(b"date: ");
        date(&mut w);
        w.extend_from_slice(b"\r\n");
    }
    if out == Out::Chunked {
        w.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !reuse {
        w.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        w.extend_from_slice(b"connection: keep-alive\r\n");
    }
    w.extend_from_slice(b"\r\n");
    // The head is written out: its fields (and the instance's read buffer
    // their values may share) are not kept while the body streams.
    drop(parts);

    let mut body = pin!(body);
    if out == Out::None {
        write_all(stream, &w).await?;
        // A HEAD answer's body is not sent, but run to its end so the
        // request is accounted as complete.
        while let Some(f) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            if f.is_err() {
                break;
            }
        }
        return Ok(reuse);
    }
    let mut sent: u64 = 0;
    loop {
        // Gather what is ready; write when the body has to wait.
        let polled = poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
        let frame = match polled {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !w.is_empty() {
                    write_all(stream, &w).await?;
                }
                // Nothing is held while the instance is waited for (an SSE
                // stream waits between every event).
                w = Vec::new();
                let next = next_frame(body.as_mut(), stream, buf, &mut watching).await;
                match next {
                    Some(f) => f,
                    // The client went away.
                    None => return Ok(false),
                }
            }
        };
        match frame {
            None => break,
            // The instance failed mid-body: the client must see the
            // response cut short, not a clean end. What was gathered (the
            // head at least) goes out first, so the client learns the
            // status it was given rather than meeting a bare close.
            Some(Err(_)) => {
                let _ = write_all(stream, &w).await;
                return Ok(false);
            }
            Some(Ok(f)) => {
                let Ok(data) = f.into_data() else { continue };
                if data.is_empty() {
                    continue;
                }
                // The size line and the CRLFs of a chunk included.
                w.reserve(data.len() + 24);
                match out {
                    Out::Length(n) => {
                        let room = n - sent;
                        if data.len() as u64 > room {
                            w.extend_from_slice(&data[..room as usize]);
                            let _ = write_all(stream, &w).await;
                            return Ok(false);
                        }
                        w.extend_from_slice(&data);
                    }
                    Out::Chunked => {
                        chunk_size_line(&mut w, data.len());
                        w.extend_from_slice(&data);
                        w.extend_from_slice(b"\r\n");
                    }
                    Out::UntilClose => w.extend_from_slice(&data),
                    Out::None => {}
                }
                sent += data.len() as u64;
                if w.len() >= WRITE_BATCH {
                    write_all(stream, &w).await?;
                    w.clear();
                }
            }
        }
    }
    match out {
        Out::Chunked => w.extend_from_slice(b"0\r\n\r\n"),
        Out::Length(n) if sent != n => {
            write_all(stream, &w).await?;
            return Ok(false);
        }
        Out::UntilClose => reuse = false,
        _ => {}
    }
    write_all(stream, &w).await?;
    Ok(reuse)
}

/// The next body frame, or `None` when the client closed its side first.
async fn next_frame<B: Body<Data = Bytes>>(
    mut body: Pin<&mut B>,
    stream: &TcpStream,
    buf: &mut BytesMut,
    watching: &mut bool,
) -> Option<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
    loop {
        tokio::select! {
            biased;
            f = poll_fn(|cx: &mut Context<'_>| body.as_mut().poll_frame(cx)) => return Some(f),
            w = watch(stream, buf), if *watching => match w {
                Watch::Closed => return None,
                Watch::Full => *watching = false,
                Watch::Data => {}
            },
        }
    }
}

fn chunk_size_line(w: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = HEX[v & 0xf];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    w.extend_from_slice(&digits[i..]);
    w.extend_from_slice(b"\r\n");
}

/// Writes `name: value` lines for every field of `headers` but those named
/// in `skip` (the framing fields a head writer sets itself).
fn write_fields(w: &mut Vec<u8>, headers: &http::HeaderMap, skip: &[http::HeaderName]) {
    for (name, value) in headers {
        if skip.contains(name) {
            continue;
        }
        w.extend_from_slice(name.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
}

/// True when the comma-separated field value `v` lists `token` (ASCII case
/// ignored), as `Connection: keep-alive, close` does.
fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',').any(|t| {
        let t: &[u8] = t.trim_ascii();
        t.eq_ignore_ascii_case(token)
    })
}

thread_local! {
    /// The `date` header value of the current second.
    static DATE: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((0, [0; 29])) };
}

fn date(w: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let s = httpdate::fmt_http_date(now);
            if s.len() == 29 {
                d.1.copy_from_slice(s.as_bytes());
                d.0 = secs;
            } else {
                w.extend_from_slice(s.as_bytes());
                return;
            }
        }
        w.extend_from_slice(&d.1);
    });
}

/// The answer to a refused head: an OpenAI-shaped error, then the
/// connection closes.
fn refusal(e: &HeadError) -> Vec<u8> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let body = serde_json::json!({
        "error": {
            "code": match e {
                HeadError::TooLarge | HeadError::TooManyHeaders => "request_header_fields_too_large",
                HeadError::UnsupportedCoding => "not_implemented",
                _ => "invalid_request",
            },
            "message": e.to_string(),
            "type": "invalid_request_error",
            "param": null,
        }
    })
    .to_string();
    let mut w = Vec::with_capacity(256 + body.len());
    w.extend_from_slice(b"HTTP/1.1 ");
    w.extend_from_slice(status.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(status.canonical_reason().unwrap_or("Error").as_bytes());
    w.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    w.extend_from_slice(body.len().to_string().as_bytes());
    w.extend_from_slice(b"\r\ndate: ");
    date(&mut w);
    w.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    w.extend_from_slice(body.as_bytes());
    w
}

/// A stream that yields `pre` before reading from `inner`: hands a
/// connection to hyper with the bytes the relay already read.
pub struct Rewind<T> {
    pre: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// `pre` is read first, then `inner`.
    pub fn new(inner: T, pre: Bytes) -> Self {
        Self { pre, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(out.remaining());
            out.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
