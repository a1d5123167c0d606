//! Hostile clients on raw sockets: oversized bodies (declared and chunked),
//! header floods, slowloris, connection floods, malformed JSON, path tricks
//! and bytes that are not HTTP. None of them may crash the gateway, reach a
//! backend they should not, or reach an unintended upstream path.
//!
//! Prints `FIGURE <name> ...` lines for RELIABILITY.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NONE: &[(&str, &str)] = &[];

async fn gateway(extra: serde_json::Value) -> (Vec<aoai_sim::SimHandle>, TestGateway) {
    let sims = sims(2).await;
    let gw = start_gateway(&config_with(&sims, extra), Some(CLIENT_KEY)).await;
    (sims, gw)
}

/// Reads until the peer closes or `limit` passes. Returns the bytes and
/// whether the peer closed (EOF or reset) within the limit.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0) | Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads until a full response head has arrived (or `limit` passes).
async fn read_head(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    out
}

/// The body of a raw HTTP/1.1 response with a Content-Length.
fn raw_body(resp: &[u8]) -> &[u8] {
    let at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |i| i + 4);
    &resp[at..]
}

fn assert_openai_error(body: &[u8]) {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(body)));
    let e = &v["error"];
    assert!(e["code"].is_string(), "{v}");
    assert!(e["message"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("type").is_some(), "{v}");
}

fn status_of(resp: &[u8]) -> u16 {
    std::str::from_utf8(resp.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn auth_line() -> String {
    format!("Authorization: Bearer {CLIENT_KEY}\r\n")
}

#[tokio::test]
async fn answers_413_to_a_huge_declared_length_without_reading_the_body() {
    let (sims, gw) = gateway(serde_json::json!({"max_request_body_bytes": 65536})).await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let head = format!(
        "POST /openai/deployments/gpt-4o/chat/completions HTTP/1.1\r\nHost: x\r\n{}\
         Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n",
        auth_line()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&[b'x'; 1024]).await.unwrap();
    let started = Instant::now();
    let head = read_head(&mut s, Duration::from_secs(5)).await;
    let answered = started.elapsed();
    assert_eq!(
        status_of(&head),
        413,
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    // The connection is not kept for the rest of a 10 GB body.
    let (rest, closed) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    let mut all = head.clone();
    all.extend_from_slice(&rest);
    assert_openai_error(raw_body(&all));
    println!(
        "FIGURE body_413_declared answered_ms={} connection_closed={closed}",
        answered.as_millis()
    );
    assert!(answered < Duration::from_secs(1), "{answered:?}");
    assert!(
        closed,
        "connection kept open for a body that will never be read"
    );
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);
}

#[tokio::test]
async fn stops_reading_a_chunked_body_at_the_limit() {
    const LIMIT: usize = 65_536;
    const OFFERED: usize = 256 << 20;
    let (sims, gw) = gateway(serde_json::json!({"max_request_body_bytes": LIMIT})).await;
    let s = TcpStream::connect(gw.addr()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let head = format!(
        "POST /openai/deployments/gpt-4o/chat/completions HTTP/1.1\r\nHost: x\r\n{}\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        auth_line()
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    // An endless chunked body: the writer stops when the gateway stops
    // taking bytes (connection closed) or after OFFERED bytes or 10 s.
    let writer = tokio::spawn(async move {
        let chunk = [
            format!("{:x}\r\n", 16384).into_bytes(),
            vec![b'a'; 16384],
            b"\r\n".to_vec(),
        ]
        .concat();
        let mut written = 0usize;
        let deadline = Instant::now() + Duration::from_secs(10);
        while written < OFFERED && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(2), wr.write_all(&chunk)).await {
                Ok(Ok(())) => written += 16384,
                _ => break,
            }
        }
        written
    });
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !resp.windows(4).any(|w| w == b"\r\n\r\n") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => resp.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let written = writer.await.unwrap();
    println!(
        "FIGURE body_413_chunked status={} limit={LIMIT} client_bytes_written={written} offered={OFFERED}",
        status_of(&resp)
    );
    assert_eq!(
        status_of(&resp),
        413,
        "{:?}",
        String::from_utf8_lossy(&resp)
    );
    // Only socket buffers' worth past the limit was accepted, not the body.
    assert!(written < 32 << 20, "gateway kept reading: {written} bytes");
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);
}

#[tokio::test]
async fn rejects_oversized_and_too_many_headers_before_any_backend() {
    let (sims, gw) = gateway(serde_json::json!({"server": {"max_headers": 32}})).await;
    let mut many = format!("GET /openai/models HTTP/1.1\r\nHost: x\r\n{}", auth_line());
    for i in 0..200 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let big = format!(
        "GET /openai/models HTTP/1.1\r\nHost: x\r\n{}x-big: {}\r\n\r\n",
        auth_line(),
        "b".repeat(1 << 20)
    );
    for req in [many, big] {
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        let _ = s.write_all(req.as_bytes()).await;
        let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert!(closed, "connection closed");
        let code = status_of(&answer);
        assert!(
            answer.is_empty() || code == 431 || code == 400,
            "{:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
    }
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);
    let (s, _, _) = send(Method::GET, &format!("{}/healthz", gw.url()), NONE, "").await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn slowloris_connections_hit_the_header_read_timeout_and_others_are_served() {
    const HEADER_MS: u64 = 600;
    const SLOW: usize = 40;
    let (sims, gw) = gateway(serde_json::json!({
        "server": {"header_read_timeout_ms": HEADER_MS, "max_connections": 256}
    }))
    .await;
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let addr = gw.addr();
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let t0 = Instant::now();
            let _ = s
                .write_all(
                    b"POST /openai/deployments/gpt-4o/chat/completions HTTP/1.1\r\nHost: x\r\n",
                )
                .await;
            // One byte every 50 ms, forever (bounded at 10 s): each byte
            // arrives well within any per-read timeout.
            let mut buf = [0u8; 1024];
            let deadline = t0 + Duration::from_secs(10);
            loop {
                if Instant::now() > deadline {
                    return (None, i);
                }
                if s.write_all(b"x").await.is_err() {
                    return (Some(t0.elapsed()), i);
                }
                match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => return (Some(t0.elapsed()), i),
                    Ok(Ok(_)) => return (Some(t0.elapsed()), i), // an error answer, then close
                    Err(_) => {}
                }
            }
        }));
    }
    // While they dribble, a normal client is served.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, _, _) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let mut closed_after = Vec::new();
    for t in slow {
        let (d, i) = t.await.unwrap();
        closed_after.push(d.unwrap_or_else(|| panic!("slow connection {i} never closed")));
    }
    let worst = closed_after.iter().max().unwrap();
    let best = closed_after.iter().min().unwrap();
    println!(
        "FIGURE slowloris connections={SLOW} header_read_timeout_ms={HEADER_MS} closed_after_ms_min={} max={}",
        best.as_millis(),
        worst.as_millis()
    );
    assert!(*best >= Duration::from_millis(HEADER_MS - 50), "{best:?}");
    assert!(*worst < Duration::from_millis(HEADER_MS * 3), "{worst:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(sims.iter().map(|s| s.request_count()).sum::<usize>(), 1);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[tokio::test]
async fn a_connection_flood_hits_the_cap_and_service_resumes() {
    // It counts the process's descriptors: no other test may open any meanwhile.
    if !alone(
        module_path!(),
        "a_connection_flood_hits_the_cap_and_service_resumes",
    ) {
        return;
    }
    const CAP: usize = 16;
    const FLOOD: usize = 300;
    let (_sims, gw) = gateway(serde_json::json!({
        "server": {"max_connections": CAP, "header_read_timeout_ms": 1000}
    }))
    .await;
    let (s, _, _) = send(Method::GET, &format!("{}/healthz", gw.url()), NONE, "").await;
    assert_eq!(s, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fds_before = open_fds();

    let mut conns = Vec::new();
    for _ in 0..FLOOD {
        conns.push(TcpStream::connect(gw.addr()).await.unwrap());
    }
    // The ones over the cap are closed at once; the rest are held open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut shed = 0;
    let mut held = 0;
    for c in &mut conns {
        let mut b = [0u8; 16];
        match tokio::time::timeout(Duration::from_millis(5), c.read(&mut b)).await {
            Ok(Ok(0) | Err(_)) => shed += 1,
            _ => held += 1,
        }
    }
    println!("FIGURE connection_flood flood={FLOOD} cap={CAP} held={held} shed={shed}");
    assert!(held <= CAP + 1, "held {held} over a cap of {CAP}");
    assert!(shed >= FLOOD - CAP - 1, "shed {shed}");
    drop(conns);

    // Idle held connections hit the header deadline; service resumes.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ok = tokio::time::timeout(Duration::from_secs(1), async {
            let mut s = TcpStream::connect(gw.addr()).await.ok()?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let (r, _) = read_until_closed(&mut s, Duration::from_secs(1)).await;
            Some(status_of(&r) == 200)
        })
        .await
        .ok()
        .flatten()
        .unwrap_or(false);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "service did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every flood socket was released on the server side too.
    let deadline = Instant::now() + Duration::from_secs(3);
    while open_fds() > fds_before + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "FIGURE connection_flood_fds before={fds_before} after={}",
        open_fds()
    );
    assert!(open_fds() <= fds_before + 2, "descriptors leaked");
}

#[tokio::test]
async fn malformed_json_where_routing_needs_the_model_gets_an_openai_shaped_400() {
    let (sims, gw) = gateway(serde_json::json!({})).await;
    let url = format!("{}/openai/v1/chat/completions", gw.url());
    for body in [
        &b"{\"model\": "[..],
        b"{\"model\": 42, \"messages\": []}",
        b"not json at all",
        b"{\"model\":\"gpt-4o\",}",
        b"{\"model\":\"gpt-4o\"} trailing",
        b"\xff\xfe{\"model\":\"gpt-4o\"}",
        b"{\"model\":\"gpt-4o\",\"model\":\"other\"}",
    ] {
        let (s, _, resp) = send(Method::POST, &url, &auth(), body.to_vec()).await;
        assert_eq!(
            s,
            StatusCode::BAD_REQUEST,
            "{:?}",
            String::from_utf8_lossy(body)
        );
        assert_openai_error(&resp);
        let text = String::from_utf8_lossy(&resp);
        assert!(
            !text.contains("127.0.0.1") && !text.contains("sim-key"),
            "{text}"
        );
    }
    assert_eq!(sims[0].request_count() + sims[1].request_count(), 0);
}

/// Sends `target` raw (no client-side normalisation) and returns the status.
async fn raw_status(gw: &TestGateway, method: &str, target: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    req.extend_from_slice(auth_line().as_bytes());
    req.extend_from_slice(b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}");
    let _ = s.write_all(&req).await;
    let (r, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "answered and closed");
    (status_of(&r), r)
}

/// Percent-decodes one segment; bad escapes are kept as they are.
fn decode(seg: &str) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = seg.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[tokio::test]
async fn path_tricks_never_reach_an_unintended_upstream_path() {
    let (sims, gw) = gateway(serde_json::json!({})).await;
    let must_reject: [&[u8]; 14] = [
        b"/openai/deployments/x/../../admin",
        b"/openai/deployments/%2e%2e/chat/completions",
        b"/openai/deployments/gpt-4o/%2E./x",
        b"/openai/deployments/gpt-4o/.%2e/.%2E/x",
        b"/openai/./deployments/gpt-4o/chat/completions",
        b"/openai/deployments/a%2Fb/chat/completions",
        b"/openai/deployments/a%2fb/chat/completions",
        b"/openai/deployments/a%5Cb/chat/completions",
        b"/openai%2Fdeployments/gpt-4o/chat/completions",
        b"/openai/deployments/gpt%C0%AE%C0%AE/chat/completions",
        b"/openai/deployments/%ff/chat/completions",
        b"/openai/deployments/%zz/chat/completions",
        b"/openai/deployments//chat/completions",
        b"/../openai/deployments/gpt-4o/chat/completions",
    ];
    for t in must_reject {
        let (code, resp) = raw_status(&gw, "POST", t).await;
        assert_eq!(
            code,
            400,
            "{}: {:?}",
            String::from_utf8_lossy(t),
            String::from_utf8_lossy(&resp)
        );
        assert_openai_error(raw_body(&resp));
    }
    // Bytes hyper itself refuses in a request line: still a 4xx, no crash.
    let refused: [&[u8]; 3] = [
        b"/openai/deployments/gpt\xff/chat/completions",
        b"/openai/deployments/a b/chat",
        b"/openai/deployments/\x00/chat",
    ];
    for t in refused {
        let (code, resp) = raw_status(&gw, "POST", t).await;
        assert!(
            code == 0 || (400..500).contains(&code),
            "{}: {:?}",
            String::from_utf8_lossy(t),
            String::from_utf8_lossy(&resp)
        );
    }
    assert_eq!(
        sims[0].request_count() + sims[1].request_count(),
        0,
        "a rejected path reached a backend"
    );

    // Odd but harmless targets: they may be forwarded, but only under
    // /openai on a configured instance, with no dot segment or encoded slash.
    let odd: [(&str, &[u8]); 6] = [
        ("POST", b"//evil/openai/deployments/gpt-4o/chat/completions"),
        (
            "POST",
            b"http://127.0.0.2:9/openai/deployments/gpt-4o/chat/completions",
        ),
        ("POST", b"/openai/deployments/%252e%252e/chat/completions"),
        (
            "POST",
            b"/openai/deployments/gpt-4o/chat/completions%3Fapi-key=x",
        ),
        ("GET", b"/openai/deployments/gpt-4o/..x/..."),
        ("OPTIONS", b"*"),
    ];
    let mut answered = Vec::new();
    for (m, t) in odd {
        let (code, _) = raw_status(&gw, m, t).await;
        answered.push((String::from_utf8_lossy(t).into_owned(), code));
        assert!(
            code != 0 && code != 500,
            "{}: {code}",
            String::from_utf8_lossy(t)
        );
    }
    let (code, _) = raw_status(&gw, "CONNECT", b"127.0.0.1:9").await;
    assert!(code == 0 || code >= 400, "CONNECT must not tunnel: {code}");

    let journal: Vec<_> = sims.iter().flat_map(|s| s.journal()).collect();
    println!(
        "FIGURE path_tricks rejected={} forwarded={} answered={answered:?} upstream_paths={:?}",
        must_reject.len() + refused.len(),
        journal.len(),
        journal.iter().map(|e| e.path.clone()).collect::<Vec<_>>()
    );
    for e in &journal {
        assert!(
            e.path == "/openai" || e.path.starts_with("/openai/"),
            "escaped /openai: {}",
            e.path
        );
        let lower = e.path.to_ascii_lowercase();
        assert!(
            !lower.contains("%2f") && !lower.contains("%5c") && !e.path.contains('\\'),
            "{}",
            e.path
        );
        for seg in e.path.split('/') {
            let d = decode(seg);
            assert!(d != b"." && d != b"..", "dot segment upstream: {}", e.path);
        }
        assert!(e.header("authorization").is_none());
    }
}

#[tokio::test]
async fn bytes_that_are_not_http_never_crash_the_server() {
    let (sims, gw) = gateway(serde_json::json!({"server": {"header_read_timeout_ms": 500}})).await;
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut blobs: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\xff\xff\xff\xff".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec(),
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nzz\r\n".to_vec(),
        format!(
            "POST /openai/deployments/gpt-4o/chat/completions HTTP/1.1\r\nHost: x\r\n{}\
             Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            auth_line()
        )
        .into_bytes(),
        b"\r\n\r\n\r\n\r\n".to_vec(),
        vec![0u8; 70_000],
    ];
    for _ in 0..40 {
        let n = rng.usize(1..4096);
        blobs.push((0..n).map(|_| rng.u8(..)).collect());
    }
    let mut outcomes = std::collections::BTreeMap::<u16, usize>::new();
    for blob in &blobs {
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        let _ = s.write_all(blob).await;
        let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(3)).await;
        assert!(closed, "junk connection closed within the header deadline");
        let code = status_of(&answer);
        // The HTTP/2 preface is answered in HTTP/2 (SETTINGS, then GOAWAY).
        let h2 = blob.starts_with(b"PRI * HTTP/2.0");
        assert!(
            h2 || answer.is_empty() || (400..500).contains(&code),
            "{:?} -> {:?}",
            String::from_utf8_lossy(&blob[..blob.len().min(120)]),
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
        *outcomes.entry(code).or_default() += 1;
    }
    println!(
        "FIGURE junk_bytes blobs={} answers_by_status={outcomes:?}",
        blobs.len()
    );
    let (s, _, _) = send(
        Method::POST,
        &format!("{}{}", gw.url(), chat_path("gpt-4o")),
        &auth(),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "still serving");
    assert_eq!(sims.iter().map(|s| s.request_count()).sum::<usize>(), 1);
}
