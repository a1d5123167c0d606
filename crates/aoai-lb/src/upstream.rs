//! The pooled upstream HTTP client.
//!
//! Keep-alive connections, HTTP/1.1 and HTTP/2 by ALPN, rustls with the
//! webpki roots plus optional extra CAs, and one connect deadline over TCP
//! connect and TLS handshake. Built once per gateway; [`crate::send`] sends
//! every attempt through it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Config;
use crate::error::GatewayError;

/// The pooled upstream client.
pub type UpstreamClient = Client<TimedConnector, Full<Bytes>>;

/// The HTTPS connector with one deadline over TCP connect and TLS
/// handshake (`timeouts.connect`). The plain connector's own timeout
/// covers only the TCP part, so an instance that accepts and then stalls
/// the handshake would otherwise hold the attempt until the response
/// header timeout.
#[derive(Clone)]
pub struct TimedConnector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

/// Error of a connection attempt that ran out of time.
#[derive(Debug, thiserror::Error)]
#[error("connecting to the instance timed out (TCP connect and TLS handshake)")]
pub struct ConnectTimeout;

type ConnectError = Box<dyn std::error::Error + Send + Sync>;
/// What the connector yields: a plain TCP or a TLS stream.
pub type ConnectStream =
    hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>;

impl tower_service::Service<http::Uri> for TimedConnector {
    type Response = ConnectStream;
    type Error = ConnectError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<ConnectStream, ConnectError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ConnectError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result,
                Err(_) => Err(Box::new(ConnectTimeout) as ConnectError),
            }
        })
    }
}

/// Builds the upstream client from the configuration. With `http2`, ALPN
/// offers h2 and http/1.1; without, only http/1.1 (WebSocket upgrades need
/// an HTTP/1.1 connection).
///
/// # Errors
/// When the extra CA file cannot be read or holds no certificate, or TLS
/// cannot be initialised.
pub fn build_client(config: &Config, http2: bool) -> Result<UpstreamClient, GatewayError> {
    let timed = build_connector(config, http2)?;
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.upstream.pool_idle_timeout)
        .pool_max_idle_per_host(config.upstream.pool_max_idle_per_host)
        .build(timed))
}

/// The connector [`build_client`] uses: TCP (no Nagle), TLS with ALPN h2
/// and http/1.1 (only http/1.1 without `http2`), one connect deadline.
///
/// # Errors
/// As [`build_client`].
pub fn build_connector(config: &Config, http2: bool) -> Result<TimedConnector, GatewayError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &config.upstream.extra_ca_file {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| GatewayError::ExtraCa(e.to_string()))?;
        let mut added = 0usize;
        for cert in certs {
            let cert = cert.map_err(|e| GatewayError::ExtraCa(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| GatewayError::ExtraCa(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(GatewayError::ExtraCa(
                "no PEM certificate found in the file".to_owned(),
            ));
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| GatewayError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.timeouts.connect));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    let https = if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
    };
    Ok(TimedConnector {
        inner: https,
        timeout: config.timeouts.connect,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use std::time::Instant;

    fn config_with_ca(path: &std::path::Path) -> Config {
        let doc = serde_json::json!({
            "instances": [{"name": "a", "url": "https://127.0.0.1:9", "api_key": "k"}],
            "upstream": {"extra_ca_file": path},
        });
        Config::from_json(&doc.to_string()).unwrap()
    }

    #[test]
    fn refuses_a_missing_or_empty_extra_ca_file() {
        let dir = std::env::temp_dir().join(format!("aoai-lb-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        assert!(matches!(
            build_client(&config_with_ca(&missing), true),
            Err(GatewayError::ExtraCa(_))
        ));
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = build_client(&config_with_ca(&empty), true).err().unwrap();
        assert!(e.to_string().starts_with("upstream.extra_ca_file: "), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn builds_a_client_with_the_webpki_roots() {
        let c = Config::from_json(
            r#"{"instances":[{"name":"a","url":"https://127.0.0.1:9","api_key":"k"}]}"#,
        )
        .unwrap();
        assert!(build_client(&c, true).is_ok());
        assert!(build_client(&c, false).is_ok());
    }

    #[tokio::test]
    async fn the_connect_timeout_covers_a_stalled_tls_handshake() {
        // Accepts TCP and never answers the ClientHello.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
            }
        });
        let doc = serde_json::json!({
            "instances": [{"name": "a", "url": format!("https://127.0.0.1:{port}"), "api_key": "k"}],
            "timeouts": {"connect_ms": 200},
        });
        let config = Config::from_json(&doc.to_string()).unwrap();
        let client = build_client(&config, true).unwrap();
        let req = Request::builder()
            .uri(format!("https://127.0.0.1:{port}/"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .expect("the request must end on the connect timeout, not hang");
        assert!(result.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        held.abort();
    }
}
