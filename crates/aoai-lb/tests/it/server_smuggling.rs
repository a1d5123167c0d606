//! Request smuggling and HTTP/1 framing against the real binary, over raw
//! TCP: the RFC 9112 rules the client-facing HTTP/1 server enforces
//! (ambiguous lengths, transfer codings, bare CR/LF, obs-fold, a missing
//! or doubled Host, invalid chunks), and the exchanges it must get right
//! (pipelining, HEAD, `Expect: 100-continue`, `Connection: close`,
//! keep-alive). A refused
//! request gets exactly one OpenAI-shaped answer and the connection closes,
//! so no byte of a smuggled second request is ever served.
// Helpers outside #[test] functions fail the test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response read off a connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// A raw connection with what was read but not yet taken as a response.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Conn {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, raw: &[u8]) {
        self.s.write_all(raw).await.unwrap();
    }

    /// Reads more; false on close, error or 5 s without a byte.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// The next response (interim 1xx included), or `None` if the
    /// connection closed (or went quiet) before a complete one.
    async fn answer(&mut self, head_request: bool) -> Option<Answer> {
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        self.buf.drain(..end);
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let mut a = Answer {
            status,
            head,
            body: Vec::new(),
        };
        if head_request || status < 200 || status == 204 || status == 304 {
            return Some(a);
        }
        if let Some(n) = a.header("content-length") {
            let n: usize = n.parse().unwrap();
            while self.buf.len() < n {
                if !self.fill().await {
                    return None;
                }
            }
            a.body = self.buf.drain(..n).collect();
        } else if a
            .header("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let line = loop {
                    if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break p;
                    }
                    if !self.fill().await {
                        return None;
                    }
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&self.buf[..line]).unwrap(), 16)
                        .unwrap();
                while self.buf.len() < line + 2 + size + 2 {
                    if !self.fill().await {
                        return None;
                    }
                }
                a.body
                    .extend_from_slice(&self.buf[line + 2..line + 2 + size]);
                self.buf.drain(..line + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            while self.fill().await {}
            a.body = std::mem::take(&mut self.buf);
        }
        Some(a)
    }

    /// True when the server closed the connection (nothing more arrives
    /// within 5 s and the read ends).
    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return false,
            }
        }
    }
}

/// A chat request: the fixed head lines, `extra_headers` (each ending in
/// CRLF), the blank line, then `body` as given.
fn chat_request(extra_headers: &str, body: &str) -> Vec<u8> {
    chat_head_then(&format!("{extra_headers}\r\n{body}"))
}

/// The fixed head lines of a chat request followed by `rest` verbatim
/// (more header lines, the blank line, the body).
fn chat_head_then(rest: &str) -> Vec<u8> {
    format!(
        "POST {} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\n{rest}",
        chat_path("gpt-4o")
    )
    .into_bytes()
}

fn assert_openai_error(a: &Answer) {
    let v: serde_json::Value = serde_json::from_slice(&a.body)
        .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&a.body)));
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(v["error"]["type"].is_string(), "{v}");
}

/// Sends `raw` on a fresh connection and expects one refusal with `status`,
/// an OpenAI-shaped body, and the connection closed with nothing more
/// (the smuggled request after it is never answered).
async fn assert_refused(addr: SocketAddr, raw: &[u8], status: u16) {
    let mut c = Conn::open(addr).await;
    c.send(raw).await;
    let a = c
        .answer(false)
        .await
        .unwrap_or_else(|| panic!("no answer to {:?}", String::from_utf8_lossy(raw)));
    assert_eq!(
        a.status,
        status,
        "{:?} answered {}",
        String::from_utf8_lossy(raw),
        a.head
    );
    assert_openai_error(&a);
    assert!(c.closed().await, "connection left open after a refusal");
    assert!(
        c.buf.is_empty(),
        "bytes after the refusal: {:?}",
        String::from_utf8_lossy(&c.buf)
    );
}

const SMUGGLED: &str = "GET /openai/models?api-version=2024-10-21 HTTP/1.1\r\nHost: gw\r\n\r\n";

async fn gateway(extra: serde_json::Value) -> (Vec<aoai_sim::SimHandle>, Binary, SocketAddr) {
    let sims = sims(1).await;
    let doc = config_with(&sims, extra);
    let (bin, addr) = spawn_gateway_binary(&doc);
    (sims, bin, addr)
}

#[tokio::test]
async fn refuses_ambiguous_message_lengths_and_closes() {
    let (sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let cases: Vec<(String, u16)> = vec![
        // CL.TE and TE.CL: both framings present.
        (
            format!("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            400,
        ),
        (
            format!("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            400,
        ),
        // Two lengths, equal or not, or a list.
        (
            format!("Content-Length: 2\r\nContent-Length: 2\r\n\r\n{{}}{SMUGGLED}"),
            400,
        ),
        (
            format!("Content-Length: 2\r\nContent-Length: 60\r\n\r\n{{}}{SMUGGLED}"),
            400,
        ),
        (format!("Content-Length: 2, 2\r\n\r\n{{}}{SMUGGLED}"), 400),
        // Lengths that are not plain digits.
        (format!("Content-Length: +2\r\n\r\n{{}}{SMUGGLED}"), 400),
        (format!("Content-Length: 0x2\r\n\r\n{{}}{SMUGGLED}"), 400),
        (format!("Content-Length: 2 2\r\n\r\n{{}}{SMUGGLED}"), 400),
        (
            format!("Content-Length: 99999999999999999999\r\n\r\n{{}}{SMUGGLED}"),
            400,
        ),
    ];
    for (rest, status) in cases {
        assert_refused(addr, &chat_head_then(&rest), status).await;
    }
    assert!(
        sims[0].journal().is_empty(),
        "a refused request reached the instance"
    );
}

#[tokio::test]
async fn refuses_transfer_codings_it_cannot_frame() {
    let (sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let cases: Vec<(String, u16)> = vec![
        // The last coding is not chunked: the length is unknowable.
        (
            format!("Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            400,
        ),
        // chunked twice, across two lines.
        (
            format!(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            400,
        ),
        // A coding the gateway does not decode.
        (
            format!("Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            501,
        ),
        (
            format!("Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            501,
        ),
        // Whitespace before the colon hides the field from some parsers.
        (
            format!("Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            400,
        ),
    ];
    for (rest, status) in cases {
        assert_refused(addr, &chat_head_then(&rest), status).await;
    }
    // HTTP/1.0 has no chunked coding: Transfer-Encoding there is faulty
    // framing.
    let raw = format!(
        "POST {} HTTP/1.0\r\nHost: gw\r\nAuthorization: Bearer {CLIENT_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}",
        chat_path("gpt-4o")
    );
    assert_refused(addr, raw.as_bytes(), 400).await;
    assert!(sims[0].journal().is_empty());
}

#[tokio::test]
async fn refuses_bare_line_ends_and_folded_headers() {
    let (sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let p = chat_path("gpt-4o");
    let auth = format!("Authorization: Bearer {CLIENT_KEY}");
    let cases = [
        // Bare LF line ends throughout, and in one place only.
        format!("GET {p} HTTP/1.1\nHost: gw\n{auth}\n\n"),
        format!("GET {p} HTTP/1.1\r\nHost: gw\n{auth}\r\n\r\n"),
        // A bare CR inside the head.
        format!("GET {p} HTTP/1.1\r\nHost: gw\r{auth}\r\n\r\n"),
        // obs-fold: a continuation line.
        format!("GET {p} HTTP/1.1\r\nHost: gw\r\n{auth}\r\nX-Folded: a\r\n b\r\n\r\n"),
        format!("GET {p} HTTP/1.1\r\nHost: gw\r\n{auth}\r\nX-Folded: a\r\n\tb\r\n\r\n"),
        // Two Host fields.
        format!("GET {p} HTTP/1.1\r\nHost: gw\r\nHost: other\r\n{auth}\r\n\r\n"),
    ];
    for raw in cases {
        assert_refused(addr, raw.as_bytes(), 400).await;
    }
    assert!(sims[0].journal().is_empty());
}

#[tokio::test]
async fn rejects_http11_request_without_host() {
    // RFC 9112 §3.2: an HTTP/1.1 request without Host gets 400. HTTP/1.0
    // clients may omit it.
    let (sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let body = chat_body(false);
    let cases = [
        format!("GET /healthz HTTP/1.1\r\n\r\n{SMUGGLED}"),
        format!(
            "POST {} HTTP/1.1\r\nAuthorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}{SMUGGLED}",
            chat_path("gpt-4o"),
            body.len()
        ),
        // A Host spelled differently is not one.
        format!("GET /healthz HTTP/1.1\r\nX-Host: gw\r\n\r\n{SMUGGLED}"),
    ];
    for raw in cases {
        assert_refused(addr, raw.as_bytes(), 400).await;
    }
    assert!(sims[0].journal().is_empty());

    let mut c = Conn::open(addr).await;
    c.send(b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert_eq!(c.answer(false).await.unwrap().status, 200);
    let mut c = Conn::open(addr).await;
    c.send(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n").await;
    assert_eq!(c.answer(false).await.unwrap().status, 200);
}

#[tokio::test]
async fn refuses_invalid_chunks_with_an_openai_shaped_400() {
    let (sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let te = "Transfer-Encoding: chunked\r\n";
    let cases = [
        // Not hex, signed, overlong, empty.
        "zz\r\n{}\r\n0\r\n\r\n",
        "-2\r\n{}\r\n0\r\n\r\n",
        "0x2\r\n{}\r\n0\r\n\r\n",
        "00000000000000002\r\n{}\r\n0\r\n\r\n",
        "\r\n{}\r\n0\r\n\r\n",
        // Data longer than its size says, or not followed by CRLF.
        "1\r\n{}\r\n0\r\n\r\n",
        "2\r\n{}XX0\r\n\r\n",
        // A bare LF in the size line; an extension without a name; a
        // control byte in an extension.
        "2\n{}\r\n0\r\n\r\n",
        "2;\r\n{}\r\n0\r\n\r\n",
        "2;a=\x01\r\n{}\r\n0\r\n\r\n",
        // A malformed trailer.
        "2\r\n{}\r\n0\r\nno colon here\r\n\r\n",
    ];
    for body in cases {
        let raw = chat_request(te, &format!("{body}{SMUGGLED}"));
        assert_refused(addr, &raw, 400).await;
    }
    assert!(sims[0].journal().is_empty());
}

#[tokio::test]
async fn serves_valid_chunked_bodies_with_extensions_and_trailers() {
    let (sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let body = chat_body(false);
    let (a, b) = body.split_at(10);
    let framed = format!(
        "{:x};name=value;q=\"x y\"\r\n{a}\r\n{:X}\r\n{b}\r\n0\r\nX-Trailer: t\r\n\r\n",
        a.len(),
        b.len()
    );
    let mut c = Conn::open(addr).await;
    c.send(&chat_request("Transfer-Encoding: chunked\r\n", &framed))
        .await;
    let r = c.answer(false).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(sims[0].journal().len(), 1);
}

#[tokio::test]
async fn serves_pipelined_requests_in_order_on_one_connection() {
    let (_sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let body = chat_body(false);
    let mut raw = Vec::new();
    for id in ["first-req", "second-req", "third-req"] {
        raw.extend(chat_request(
            &format!(
                "x-ms-client-request-id: {id}\r\nContent-Length: {}\r\n",
                body.len()
            ),
            &body,
        ));
    }
    let mut c = Conn::open(addr).await;
    // All three in one write: the server must not lose the bytes after the
    // first request, nor answer out of order.
    c.send(&raw).await;
    for id in ["first-req", "second-req", "third-req"] {
        let a = c.answer(false).await.expect("answer");
        assert_eq!(a.status, 200);
        assert_eq!(a.header("x-aoai-lb-request-id").as_deref(), Some(id));
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert!(v["choices"].is_array());
    }
}

#[tokio::test]
async fn reads_bodies_and_heads_that_arrive_in_pieces_and_keeps_the_connection() {
    let (sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let body = chat_body(false);
    let mut c = Conn::open(addr).await;
    // A head of about 20 KiB (past the first read buffer), then the body in
    // two parts after a pause: read when the pipeline asks for it.
    let big = "x".repeat(20_000);
    c.send(&chat_request(
        &format!("X-Big: {big}\r\nContent-Length: {}\r\n", body.len()),
        "",
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (a, b) = body.split_at(7);
    c.send(a.as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send(b.as_bytes()).await;
    let r = c.answer(false).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    // The same connection serves the next request, chunked in pieces.
    c.send(&chat_request("Transfer-Encoding: chunked\r\n", ""))
        .await;
    for part in [
        format!("{:x}\r\n{body}\r\n", body.len()),
        "0\r\n\r\n".to_owned(),
    ] {
        tokio::time::sleep(Duration::from_millis(30)).await;
        c.send(part.as_bytes()).await;
    }
    let r = c.answer(false).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.header("connection"), None);
    let journal = sims[0].journal();
    assert_eq!(journal.len(), 2);
}

#[tokio::test]
async fn head_responses_carry_no_body_and_the_connection_stays_usable() {
    let (_sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let mut c = Conn::open(addr).await;
    c.send(b"HEAD /healthz HTTP/1.1\r\nHost: gw\r\n\r\nGET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await;
    let head = c.answer(true).await.unwrap();
    assert_eq!(head.status, 200);
    // The next bytes are the second response's status line, not a body.
    let get = c.answer(false).await.unwrap();
    assert_eq!(get.status, 200, "{}", get.head);
    assert_eq!(get.body, br#"{"status":"ok"}"#);
    assert_eq!(
        head.header("content-length"),
        Some(get.body.len().to_string())
    );
}

#[tokio::test]
async fn answers_expect_100_continue_before_the_body_is_sent() {
    let (_sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let body = chat_body(false);
    let mut c = Conn::open(addr).await;
    c.send(&chat_request(
        &format!("Expect: 100-continue\r\nContent-Length: {}\r\n", body.len()),
        "",
    ))
    .await;
    let interim = c.answer(false).await.expect("100 Continue");
    assert_eq!(interim.status, 100);
    c.send(body.as_bytes()).await;
    let a = c.answer(false).await.unwrap();
    assert_eq!(a.status, 200);

    // Refused before the body is wanted: no 100, and the connection closes
    // (the body the client may still send cannot be told from a request).
    let mut c = Conn::open(addr).await;
    c.send(
        format!(
            "POST {} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer wrong\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
            chat_path("gpt-4o")
        )
        .as_bytes(),
    )
    .await;
    let a = c.answer(false).await.unwrap();
    assert_eq!(a.status, 401);
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    assert!(c.closed().await);
}

#[tokio::test]
async fn honours_connection_close_and_http_1_0_keep_alive_rules() {
    let (_sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let mut c = Conn::open(addr).await;
    c.send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\nGET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await;
    let a = c.answer(false).await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    assert!(c.closed().await);
    assert!(c.buf.is_empty(), "answered past Connection: close");

    // HTTP/1.0 closes by default, keeps alive when asked.
    let mut c = Conn::open(addr).await;
    c.send(b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert_eq!(c.answer(false).await.unwrap().status, 200);
    assert!(c.closed().await);
    let mut c = Conn::open(addr).await;
    for _ in 0..2 {
        c.send(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let a = c.answer(false).await.unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.header("connection").as_deref(), Some("keep-alive"));
    }
}

#[tokio::test]
async fn streams_sse_with_chunked_framing_to_http_1_1_clients() {
    let (_sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let body = chat_body(true);
    let mut c = Conn::open(addr).await;
    for _ in 0..2 {
        c.send(&chat_request(
            &format!("Content-Length: {}\r\n", body.len()),
            &body,
        ))
        .await;
        let a = c.answer(false).await.unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.header("transfer-encoding").as_deref(), Some("chunked"));
        let text = String::from_utf8(a.body).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
}

#[tokio::test]
async fn streams_sse_to_http_1_0_clients_delimited_by_the_close() {
    // HTTP/1.0 has no chunked coding: a body of unknown length ends when
    // the server closes the connection.
    let (_sims, _bin, addr) = gateway(serde_json::json!({})).await;
    let body = chat_body(true);
    let mut c = Conn::open(addr).await;
    c.send(
        format!(
            "POST {} HTTP/1.0\r\nHost: gw\r\nAuthorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\nConnection: keep-alive\r\nContent-Length: {}\r\n\r\n{body}",
            chat_path("gpt-4o"),
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let a = c.answer(false).await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.header("transfer-encoding"), None);
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    let text = String::from_utf8(a.body).unwrap();
    assert!(text.starts_with("data: "), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn the_hyper_server_stays_available_as_a_fallback() {
    // server.http1 = "hyper": hyper (through httparse) takes a bare LF as a
    // line end; the relay refuses it. That difference shows which server
    // answered.
    let (_sims, _bin, addr) = gateway(serde_json::json!({"server": {"http1": "hyper"}})).await;
    let mut c = Conn::open(addr).await;
    c.send(b"GET /healthz HTTP/1.1\nHost: gw\n\n").await;
    assert_eq!(c.answer(false).await.unwrap().status, 200);
    let (sims, _bin, addr) = gateway(serde_json::json!({})).await;
    assert_refused(addr, b"GET /healthz HTTP/1.1\nHost: gw\n\n", 400).await;

    // The same through the environment, overriding the document.
    let doc = config_with(&sims, serde_json::json!({"server": {"http1": "relay"}}));
    let (_bin, addr, _) = spawn_gateway_binary_with_env(&doc, &[("AOAI_LB_HTTP1", "hyper")]);
    let mut c = Conn::open(addr).await;
    c.send(b"GET /healthz HTTP/1.1\nHost: gw\n\n").await;
    assert_eq!(c.answer(false).await.unwrap().status, 200);
}
