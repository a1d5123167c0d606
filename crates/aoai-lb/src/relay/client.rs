//! The lean upstream HTTP/1 client: one request and its response on a
//! connection the pool ([`crate::pool`]) hands it, without hyper's
//! per-connection machinery.
//!
//! What it saves against `hyper::client::conn::http1`, per connection:
//! - no task and no dispatch channel: the request is written and the head
//!   read by the future that asked, and the response body reads the socket
//!   itself when the client side polls it;
//! - no read or write buffer held: reads go into one scratch buffer per
//!   thread and only the bytes read are copied out, so a connection waiting
//!   for the next SSE event holds no buffer at all; the request head and a
//!   body up to [`ONE_WRITE`] go out in one write from a buffer freed after
//!   it.
//!
//! Response framing follows RFC 9112 §6.3: no body for a `HEAD` request
//! and for 1xx, 204 and 304; `Transfer-Encoding` ending in `chunked` is
//! decoded strictly ([`super::h1::ChunkDecoder`]); any other transfer
//! coding, or neither header, is read until the instance closes; a valid
//! `Content-Length` otherwise. An invalid or conflicting `Content-Length`
//! fails the exchange. Interim 1xx responses before the final one are
//! skipped. A connection goes back to the pool only after its body ended
//! exactly where the framing said, and only when neither side asked to
//! close it; a body dropped before its end closes the connection, which
//! cancels the request at the instance.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use serde_json::ser::{CompactFormatter, Formatter as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::h1::{ChunkDecoder, Step};
use crate::upstream::ConnectStream;

/// Size of the per-thread read buffer: the most one read takes.
const READ_SIZE: usize = 16 * 1024;
/// Largest response head accepted (status line and fields).
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
const MAX_FIELDS: usize = 100;
/// Request bodies up to this size are written with the head in one write.
const ONE_WRITE: usize = 16 * 1024;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Why an exchange failed. Texts never name the instance.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Nothing of the request reached the connection: a pooled connection
    /// found closed, or the first write failed. Safe to send again on a
    /// fresh connection.
    #[error("the pooled connection was closed before the request was sent")]
    NotSent,
    /// Reading or writing the connection failed after the request may have
    /// been sent.
    #[error("the connection to the instance failed")]
    Io(#[source] io::Error),
    /// The instance closed the connection before a complete response head.
    #[error("the instance closed the connection before sending a response")]
    Closed,
    /// The response head or its framing was invalid.
    #[error("the instance sent an invalid response: {0}")]
    Invalid(&'static str),
}

/// A connection to an instance, plain TCP or TLS.
pub enum Io {
    /// `http://`: the socket itself.
    Tcp(TcpStream),
    /// `https://` (HTTP/1.1 by ALPN, or no ALPN): boxed, as the TLS state is
    /// large and the common benchmark and sidecar case is plain TCP.
    Tls(Box<hyper_util::rt::TokioIo<ConnectStream>>),
}

impl Io {
    /// Takes the socket out of the connector's stream when it is plain TCP.
    pub fn from_connected(stream: ConnectStream) -> Self {
        match stream {
            hyper_rustls::MaybeHttpsStream::Http(tcp) => Io::Tcp(tcp.into_inner()),
            tls => Io::Tls(Box::new(hyper_util::rt::TokioIo::new(tls))),
        }
    }

    /// False when the instance has closed the connection or sent bytes
    /// nobody asked for (either makes it unusable). Costs no system call
    /// when the runtime has seen no event on the socket.
    pub fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut one = [0u8; 1];
        let mut buf = ReadBuf::new(&mut one);
        matches!(Pin::new(self).poll_read(&mut cx, &mut buf), Poll::Pending)
    }

    /// Reads what is available, up to [`READ_SIZE`], into the thread's
    /// scratch buffer and returns a copy of exactly those bytes; empty at
    /// the end of the stream. Nothing is held while it waits.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < READ_SIZE {
                s.resize(READ_SIZE, 0);
            }
            let mut buf = ReadBuf::new(&mut s[..]);
            match Pin::new(&mut *self).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(Bytes::copy_from_slice(buf.filled()))),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    }

    async fn chunk(&mut self) -> io::Result<Bytes> {
        poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// Writes all of `bytes`. With `first` (nothing of the request written
    /// yet), a failure of the first write is [`ExchangeError::NotSent`].
    async fn write_all(&mut self, mut bytes: &[u8], first: bool) -> Result<(), ExchangeError> {
        let mut untouched = first;
        while !bytes.is_empty() {
            match poll_fn(|cx| Pin::new(&mut *self).poll_write(cx, bytes)).await {
                Ok(0) => {
                    return Err(ExchangeError::Io(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => {
                    untouched = false;
                    bytes = &bytes[n..];
                }
                Err(_) if untouched => return Err(ExchangeError::NotSent),
                Err(e) => return Err(ExchangeError::Io(e)),
            }
        }
        Ok(())
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Where a connection goes when its response has ended cleanly.
pub trait Home: Send + Unpin + 'static {
    /// Takes the connection back for later requests (or closes it).
    fn park(self, io: Io);
}

/// The request as it goes out: method, origin-form target, fields (the
/// pipeline's, minus any framing fields, which are written here), body.
pub struct Outgoing<'a> {
    /// The request method.
    pub method: &'a Method,
    /// Path and query.
    pub target: &'a str,
    /// The fields to send; `Host`, `Content-Length`, `Transfer-Encoding`
    /// and `Connection` among them are ignored.
    pub headers: &'a HeaderMap,
    /// The `Host` value.
    pub host: &'a [u8],
    /// The whole body.
    pub body: &'a Bytes,
}

/// Sends `req` on `io` and reads the response head. With `reused`, the
/// connection came from the pool: one found closed is reported as
/// [`ExchangeError::NotSent`] without writing.
///
/// # Errors
/// [`ExchangeError`]; the connection is dropped (closed) with it.
pub async fn exchange<H: Home>(
    mut io: Io,
    reused: bool,
    req: &Outgoing<'_>,
    home: H,
) -> Result<Response<LeanBody<H>>, ExchangeError> {
    if reused && !io.is_open() {
        return Err(ExchangeError::NotSent);
    }
    let mut head = Vec::with_capacity(256 + 64 * req.headers.len());
    write_head(&mut head, req);
    if req.body.len() <= ONE_WRITE {
        head.extend_from_slice(req.body);
        io.write_all(&head, true).await?;
    } else {
        io.write_all(&head, true).await?;
        io.write_all(req.body, false).await?;
    }
    drop(head);
    poll_fn(|cx| Pin::new(&mut io).poll_flush(cx))
        .await
        .map_err(ExchangeError::Io)?;

    let head_only = *req.method == Method::HEAD;
    let mut input = Bytes::new();
    loop {
        if !input.is_empty() {
            match parse_head(&input, head_only)? {
                Some(Parsed::Final(head)) => return Ok(head.into_response(input, io, home)),
                // A 100 or 103 before the final answer: skipped.
                Some(Parsed::Interim(used)) => {
                    input = input.slice(used..);
                    continue;
                }
                None if input.len() > MAX_HEAD => {
                    return Err(ExchangeError::Invalid("response head too large"));
                }
                None => {}
            }
        }
        let chunk = io.chunk().await.map_err(ExchangeError::Io)?;
        if chunk.is_empty() {
            return Err(ExchangeError::Closed);
        }
        // Parsed from the chunk itself when the head came whole (the usual
        // case), so the field values share its bytes.
        input = if input.is_empty() {
            chunk
        } else {
            let mut joined = Vec::with_capacity(input.len() + chunk.len());
            joined.extend_from_slice(&input);
            joined.extend_from_slice(&chunk);
            Bytes::from(joined)
        };
    }
}

fn write_head(w: &mut Vec<u8>, req: &Outgoing<'_>) {
    w.extend_from_slice(req.method.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(req.target.as_bytes());
    w.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    w.extend_from_slice(req.host);
    w.extend_from_slice(b"\r\n");
    super::write_fields(
        w,
        req.headers,
        &[
            header::HOST,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::CONNECTION,
        ],
    );
    // As hyper does: no length on an empty body of a method that has none.
    let bodiless = matches!(
        *req.method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    );
    if !req.body.is_empty() || !bodiless {
        w.extend_from_slice(b"content-length: ");
        let _ = CompactFormatter.write_u64(w, req.body.len() as u64);
        w.extend_from_slice(b"\r\n");
    }
    w.extend_from_slice(b"\r\n");
}

/// How the body of a response is delimited.
#[derive(Debug)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304, or `Content-Length: 0`).
    Empty,
    /// This many bytes still to come.
    Length(u64),
    /// Chunked transfer coding.
    Chunked(ChunkDecoder),
    /// Until the instance closes.
    Close,
}

enum Parsed {
    /// An interim 1xx of this many bytes.
    Interim(usize),
    Final(Head),
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
    len: usize,
}

impl Head {
    fn into_response<H: Home>(self, input: Bytes, mut io: Io, home: H) -> Response<LeanBody<H>> {
        let pre = input.slice(self.len..);
        let mut body = LeanBody {
            io: None,
            framing: self.framing,
            pre,
            keep_alive: self.keep_alive,
            home: None,
            done: false,
        };
        // A body that came whole with its head frees the connection now,
        // so the next request can reuse it before this body is read.
        let whole = match body.framing {
            Framing::Empty => body.pre.is_empty(),
            Framing::Length(n) => body.pre.len() as u64 == n,
            Framing::Chunked(_) | Framing::Close => false,
        };
        if whole {
            if body.keep_alive && io.is_open() {
                home.park(io);
            }
            if let Framing::Empty = body.framing {
                body.done = true;
            }
        } else {
            body.io = Some(io);
            body.home = Some(home);
        }
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        *response.version_mut() = self.version;
        *response.headers_mut() = self.headers;
        response
    }
}

/// Parses a response head at the start of `input`; `None` when incomplete.
fn parse_head(input: &Bytes, head_only: bool) -> Result<Option<Parsed>, ExchangeError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut r = httparse::Response::new(&mut fields);
    let len = match r.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::Invalid("too many response header fields"));
        }
        Err(_) => return Err(ExchangeError::Invalid("malformed response head")),
    };
    let code = r.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| ExchangeError::Invalid("invalid response status"))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Some(Parsed::Interim(len)));
    }
    let version = if r.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(r.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut coded = false;
    let mut close = version == Version::HTTP_10;
    for f in r.headers.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| ExchangeError::Invalid("invalid response header name"))?;
        let value = HeaderValue::from_maybe_shared(input.slice_ref(f.value))
            .map_err(|_| ExchangeError::Invalid("invalid response header value"))?;
        if name == header::CONTENT_LENGTH {
            let n = super::h1::content_length(f.value.trim_ascii())
                .ok_or(ExchangeError::Invalid("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(ExchangeError::Invalid("conflicting content-length"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            coded = true;
            // Only the last coding matters: is the body chunked?
            chunked = last_token(f.value).eq_ignore_ascii_case(b"chunked");
        } else if name == header::CONNECTION {
            if super::has_token(f.value, b"close") {
                close = true;
            } else if version == Version::HTTP_10 && super::has_token(f.value, b"keep-alive") {
                close = false;
            }
        }
        headers.append(name, value);
    }
    let framing = if head_only
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::SWITCHING_PROTOCOLS
    {
        Framing::Empty
    } else if coded && chunked {
        Framing::Chunked(ChunkDecoder::new())
    } else if coded {
        Framing::Close
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    // A length and a coding together, a body delimited by the close and a
    // switched protocol all leave the connection unusable afterwards.
    let unusable = close
        || (coded && length.is_some())
        || matches!(framing, Framing::Close)
        || status == StatusCode::SWITCHING_PROTOCOLS;
    let keep_alive = !unusable;
    Ok(Some(Parsed::Final(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
        len,
    })))
}

fn last_token(v: &[u8]) -> &[u8] {
    v.rsplit(|&b| b == b',').next().unwrap_or(v).trim_ascii()
}

/// Why a lean response body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection failed or closed before the framing's end.
    #[error("the instance's connection failed mid-body")]
    Io,
    /// The chunked framing was invalid.
    #[error("the instance sent invalid chunked framing")]
    Framing,
}

/// A response body read straight from the instance's connection.
pub struct LeanBody<H: Home> {
    /// `None` once the body ended, or when it came whole with the head.
    io: Option<Io>,
    framing: Framing,
    /// Bytes read but not yet passed on.
    pre: Bytes,
    keep_alive: bool,
    home: Option<H>,
    done: bool,
}

impl<H: Home> std::fmt::Debug for LeanBody<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanBody")
            .field("framing", &self.framing)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<H: Home> LeanBody<H> {
    /// The body ended where its framing said: the connection goes home if
    /// it can be reused (no stray bytes after the body).
    fn end(&mut self) {
        self.done = true;
        if let (Some(io), Some(home)) = (self.io.take(), self.home.take())
            && self.keep_alive
            && self.pre.is_empty()
        {
            home.park(io);
        }
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.done = true;
        self.io = None;
        self.home = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl<H: Home> Body for LeanBody<H> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match &mut this.framing {
                Framing::Empty | Framing::Length(0) => {
                    this.end();
                    return Poll::Ready(None);
                }
                Framing::Length(rem) if !this.pre.is_empty() => {
                    let n = usize::try_from(*rem)
                        .unwrap_or(usize::MAX)
                        .min(this.pre.len());
                    let data = this.pre.split_to(n);
                    *rem -= n as u64;
                    if *rem == 0 {
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(d) if !this.pre.is_empty() => {
                    let (used, step) = match d.step(&this.pre) {
                        Ok(s) => s,
                        Err(_) => return this.fail(BodyError::Framing),
                    };
                    let data = match step {
                        Step::Data(b) => Some(b.len()),
                        Step::Done => None,
                        Step::More => Some(0),
                    };
                    match data {
                        Some(n) => {
                            let chunk = this.pre.slice(used - n..used);
                            this.pre = this.pre.slice(used..);
                            if n > 0 {
                                return Poll::Ready(Some(Ok(Frame::data(chunk))));
                            }
                        }
                        None => {
                            this.pre = this.pre.slice(used..);
                            this.end();
                            return Poll::Ready(None);
                        }
                    }
                }
                Framing::Close if !this.pre.is_empty() => {
                    let data = std::mem::take(&mut this.pre);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                _ => {
                    let Some(io) = this.io.as_mut() else {
                        // Only a whole body has no connection, and it has
                        // ended above.
                        return this.fail(BodyError::Io);
                    };
                    match io.poll_chunk(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(_)) => return this.fail(BodyError::Io),
                        Poll::Ready(Ok(b)) if b.is_empty() => {
                            if let Framing::Close = this.framing {
                                this.done = true;
                                this.io = None;
                                return Poll::Ready(None);
                            }
                            return this.fail(BodyError::Io);
                        }
                        Poll::Ready(Ok(b)) => this.pre = b,
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || matches!(self.framing, Framing::Empty | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Chunked(_) | Framing::Close => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Records the connections handed back.
    #[derive(Clone, Default)]
    struct Spy(Arc<Mutex<Vec<Io>>>);

    impl Home for Spy {
        fn park(self, io: Io) {
            self.0.lock().unwrap().push(io);
        }
    }

    impl Spy {
        fn parked(&self) -> usize {
            self.0.lock().unwrap().len()
        }
        fn take(&self) -> Io {
            self.0.lock().unwrap().pop().unwrap()
        }
    }

    /// A server on 127.0.0.1 that, on one connection, answers each request
    /// head it reads with the next of `replies` (written in pieces split at
    /// `|`), then keeps the connection open; it returns the requests read.
    async fn server(replies: Vec<&'static str>) -> (u16, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = Vec::new();
            for reply in replies {
                // A request: its head, then Content-Length bytes.
                loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        if buf.len() >= end + 4 + len {
                            let whole = buf.drain(..end + 4 + len).collect::<Vec<u8>>();
                            seen.push(String::from_utf8(whole).unwrap());
                            break;
                        }
                    }
                    let mut chunk = [0u8; 4096];
                    let n = tcp.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return seen;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                for (i, piece) in reply.split('|').enumerate() {
                    if i > 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    if piece == "CLOSE" {
                        return seen;
                    }
                    tcp.write_all(piece.as_bytes()).await.unwrap();
                }
            }
            // Hold the connection until the client closes it.
            let mut rest = [0u8; 64];
            while tcp.read(&mut rest).await.unwrap_or(0) > 0 {}
            seen
        });
        (port, task)
    }

    async fn connect(port: u16) -> Io {
        Io::Tcp(TcpStream::connect(("127.0.0.1", port)).await.unwrap())
    }

    async fn send(
        io: Io,
        method: &Method,
        body: &str,
        spy: &Spy,
    ) -> Result<Response<LeanBody<Spy>>, ExchangeError> {
        let mut headers = HeaderMap::new();
        headers.insert("api-key", HeaderValue::from_static("k"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let body = Bytes::from(body.to_owned());
        let out = Outgoing {
            method,
            target: "/openai/deployments/d/chat/completions?api-version=2024-10-21",
            headers: &headers,
            host: b"example.test",
            body: &body,
        };
        exchange(io, false, &out, spy.clone()).await
    }

    async fn text<H: Home>(r: Response<LeanBody<H>>) -> Result<String, BodyError> {
        let bytes = r.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn writes_origin_form_host_and_its_own_content_length() {
        let (port, server) = server(vec!["HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]).await;
        let spy = Spy::default();
        let r = send(connect(port).await, &Method::POST, "{}", &spy)
            .await
            .unwrap();
        assert_eq!(text(r).await.unwrap(), "ok");
        drop(spy.take());
        let seen = server.await.unwrap();
        assert_eq!(
            seen[0],
            "POST /openai/deployments/d/chat/completions?api-version=2024-10-21 HTTP/1.1\r\n\
             host: example.test\r\napi-key: k\r\ncontent-length: 2\r\n\r\n{}"
        );
    }

    #[tokio::test]
    async fn a_body_that_came_with_its_head_frees_the_connection_at_once() {
        let (port, _server) = server(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello",
        ])
        .await;
        let spy = Spy::default();
        let r = send(connect(port).await, &Method::POST, "{}", &spy)
            .await
            .unwrap();
        assert_eq!(spy.parked(), 1, "parked before the body was read");
        assert_eq!(r.headers()["x-a"], "1");
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "5");
        assert_eq!(text(r).await.unwrap(), "hello");
    }

    #[tokio::test]
    async fn decodes_a_chunked_body_in_pieces_and_reuses_the_connection() {
        let (port, server) = server(vec![
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n|\
             9\r\ndata: |a\n\n\r\n|7;x=y\r\ndata: b\r\n|0\r\n\r\n",
            "HTTP/1.1 204 No Content\r\n\r\n",
        ])
        .await;
        let spy = Spy::default();
        let r = send(connect(port).await, &Method::POST, "{}", &spy)
            .await
            .unwrap();
        assert_eq!(spy.parked(), 0, "streaming: still in use");
        assert_eq!(text(r).await.unwrap(), "data: a\n\ndata: b");
        assert_eq!(spy.parked(), 1);
        let r = send(spy.take(), &Method::GET, "", &spy).await.unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(text(r).await.unwrap(), "");
        drop(spy.take());
        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 2);
        assert!(seen[1].starts_with("GET "), "{}", seen[1]);
        assert!(!seen[1].contains("content-length"), "{}", seen[1]);
    }

    #[tokio::test]
    async fn a_length_body_split_over_reads_is_passed_on_as_it_arrives() {
        let (port, _server) = server(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234|5678|9",
        ])
        .await;
        let spy = Spy::default();
        let r = send(connect(port).await, &Method::POST, "{}", &spy)
            .await
            .unwrap();
        let mut body = r.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"01234");
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(&rest[..], b"56789");
        assert_eq!(spy.parked(), 1);
    }

    #[tokio::test]
    async fn skips_interim_responses_and_reads_no_body_after_head() {
        let (port, _server) = server(vec![
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\n|\
             HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody",
            "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n",
        ])
        .await;
        let spy = Spy::default();
        let r = send(connect(port).await, &Method::POST, "{}", &spy)
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(text(r).await.unwrap(), "body");
        let r = send(spy.take(), &Method::HEAD, "", &spy).await.unwrap();
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "4");
        assert_eq!(text(r).await.unwrap(), "");
        assert_eq!(spy.parked(), 1);
    }

    #[tokio::test]
    async fn a_body_delimited_by_the_close_is_read_to_the_end_and_not_reused() {
        let (port, _server) =
            server(vec!["HTTP/1.1 200 OK\r\n\r\npart one|, part two|CLOSE"]).await;
        let spy = Spy::default();
        let r = send(connect(port).await, &Method::POST, "{}", &spy)
            .await
            .unwrap();
        assert_eq!(text(r).await.unwrap(), "part one, part two");
        assert_eq!(spy.parked(), 0);
    }

    #[tokio::test]
    async fn connection_close_or_http10_keeps_the_connection_out_of_the_pool() {
        for reply in [
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok+stray",
        ] {
            let (port, _server) = server(vec![reply]).await;
            let spy = Spy::default();
            let r = send(connect(port).await, &Method::POST, "{}", &spy)
                .await
                .unwrap();
            assert_eq!(text(r).await.unwrap(), "ok", "{reply}");
            assert_eq!(spy.parked(), 0, "{reply}");
        }
    }

    #[tokio::test]
    async fn an_http10_answer_asking_for_keep_alive_keeps_the_connection() {
        let (port, _server) = server(vec![
            "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let spy = Spy::default();
        let r = send(connect(port).await, &Method::POST, "{}", &spy)
            .await
            .unwrap();
        assert_eq!(text(r).await.unwrap(), "ok");
        assert_eq!(spy.parked(), 1);
    }

    #[tokio::test]
    async fn a_body_cut_before_its_length_is_an_error_not_an_end() {
        let (port, _server) = server(vec![
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort|CLOSE",
        ])
        .await;
        let spy = Spy::default();
        let r = send(connect(port).await, &Method::POST, "{}", &spy)
            .await
            .unwrap();
        assert!(matches!(text(r).await, Err(BodyError::Io)));
        assert_eq!(spy.parked(), 0);
    }

    #[tokio::test]
    async fn refuses_invalid_framing_from_the_instance() {
        for (reply, chunked) in [
            ("HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok", false),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
                false,
            ),
            ("HTTP/1.1 2000 OK\r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\nbad header\r\n\r\n", false),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                true,
            ),
        ] {
            let (port, _server) = server(vec![reply]).await;
            let spy = Spy::default();
            match send(connect(port).await, &Method::POST, "{}", &spy).await {
                Ok(r) => {
                    assert!(chunked, "{reply}");
                    assert!(matches!(text(r).await, Err(BodyError::Framing)), "{reply}");
                }
                Err(e) => assert!(matches!(e, ExchangeError::Invalid(_)), "{reply}: {e:?}"),
            }
            assert_eq!(spy.parked(), 0, "{reply}");
        }
    }

    #[tokio::test]
    async fn a_closed_connection_is_found_before_anything_is_sent() {
        let (port, server) =
            server(vec!["HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok|CLOSE"]).await;
        let spy = Spy::default();
        let r = send(connect(port).await, &Method::POST, "{}", &spy)
            .await
            .unwrap();
        assert_eq!(text(r).await.unwrap(), "ok");
        server.await.unwrap();
        let mut io = spy.take();
        // The runtime sees the close once its driver has run.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!io.is_open());
        let mut headers = HeaderMap::new();
        headers.insert("api-key", HeaderValue::from_static("k"));
        let body = Bytes::new();
        let out = Outgoing {
            method: &Method::GET,
            target: "/",
            headers: &headers,
            host: b"h",
            body: &body,
        };
        let e = exchange(io, true, &out, spy.clone()).await.unwrap_err();
        assert!(matches!(e, ExchangeError::NotSent), "{e:?}");
    }

    #[tokio::test]
    async fn an_instance_that_closes_without_answering_is_an_error() {
        let (port, _server) = server(vec!["CLOSE"]).await;
        let spy = Spy::default();
        let e = send(connect(port).await, &Method::POST, "{}", &spy)
            .await
            .unwrap_err();
        assert!(matches!(e, ExchangeError::Closed), "{e:?}");
    }
}
