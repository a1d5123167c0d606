//! `ready`: polls a server until it is ready, for start-up timing and for the
//! driver script to know when a server can take load.
//!
//! Start-up time is measured from a wall-clock timestamp taken by the caller
//! just before it spawned the server (`--since-ns`, from `date +%s%N`), so the
//! figure includes process start, configuration and bind, and this client's
//! own start-up overlaps it instead of adding to it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;

/// Options of `ready`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// URL to poll with GET; ready means status 200.
    #[arg(long)]
    url: String,
    /// Ready as soon as a TCP connection is accepted.
    #[arg(long)]
    tcp: bool,
    /// Wall-clock start, in nanoseconds since the Unix epoch; the printed
    /// `ready_ms` counts from it. Default: when this command started.
    #[arg(long)]
    since_ns: Option<u128>,
    /// Pause between attempts.
    #[arg(long, default_value_t = 1)]
    interval_ms: u64,
    /// Give up (exit status 1) after this long.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

async fn attempt(target: &crate::Target, tcp_only: bool) -> Option<u16> {
    let stream = TcpStream::connect(&target.authority).await.ok()?;
    if tcp_only {
        return Some(0);
    }
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = Request::get(target.path_and_query.as_str())
        .header(header::HOST, target.host_header.as_str())
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    Some(resp.status().as_u16())
}

/// Polls until ready; fails when `--timeout-s` passes first.
pub async fn run(args: Args) -> Result<serde_json::Value> {
    let since = args.since_ns.unwrap_or_else(now_ns);
    let target = crate::parse_target(&args.url)?;
    let give_up = Instant::now() + Duration::from_secs(args.timeout_s);
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let per_try = Duration::from_millis(500);
        let status = tokio::time::timeout(per_try, attempt(&target, args.tcp))
            .await
            .ok()
            .flatten();
        if let Some(status) = status
            && (args.tcp || status == 200)
        {
            let ready_ns = now_ns().saturating_sub(since);
            return Ok(json!({
                "ready_ms": ready_ns as f64 / 1e6,
                "status": status,
                "attempts": attempts,
            }));
        }
        if Instant::now() >= give_up {
            bail!("{} was not ready within {} s", args.url, args.timeout_s);
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_ready_once_a_listener_accepts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let args = Args {
            url: format!("http://127.0.0.1:{port}/"),
            tcp: true,
            since_ns: None,
            interval_ms: 1,
            timeout_s: 5,
        };
        let out = run(args).await.unwrap();
        assert_eq!(out["status"], 0);
        assert!(out["ready_ms"].as_f64().unwrap() < 5000.0);
    }

    #[tokio::test]
    async fn gives_up_when_nothing_listens() {
        // Bind then drop, so the port is very likely closed.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let args = Args {
            url: format!("http://127.0.0.1:{port}/"),
            tcp: true,
            since_ns: None,
            interval_ms: 10,
            timeout_s: 0,
        };
        assert!(run(args).await.is_err());
    }
}
