//! Errors the gateway answers itself, and where each one came from.
//!
//! Every way a request can fail inside the gateway is one [`ProxyError`]. It
//! records the [`Phase`] it came from and whether trying another instance
//! may help, and it maps to exactly one HTTP status, one OpenAI-shaped body
//! (`{"error":{"code","message","type","param"}}`) and one low-cardinality
//! metric label. Bodies never contain a backend URL or a key: messages are
//! fixed strings chosen here, never text taken from a lower-level error.
//!
//! Errors that Azure itself returned are not `ProxyError`s: those responses
//! go back to the client unchanged.

use std::sync::Arc;

use http::{HeaderValue, Response, StatusCode, header};

/// Where in the request lifecycle an error arose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The client's request itself (body too large, unreadable body).
    Client,
    /// Client authentication.
    Auth,
    /// The client's permissions and limits.
    Admit,
    /// Path and body classification.
    Route,
    /// Choosing an instance.
    Select,
    /// Talking to an instance before response headers arrived.
    Upstream,
    /// The response body, after headers went to the client.
    Stream,
    /// A bug or resource problem inside the gateway.
    Internal,
}

impl Phase {
    /// Low-cardinality name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Client => "client",
            Phase::Auth => "auth",
            Phase::Admit => "admit",
            Phase::Route => "route",
            Phase::Select => "select",
            Phase::Upstream => "upstream",
            Phase::Stream => "stream",
            Phase::Internal => "internal",
        }
    }
}

/// Why a request path or body was refused at routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    /// A `.` or `..` segment, raw or percent-encoded.
    DotSegment,
    /// `%2F` or `%5C` (or a raw backslash) inside the path.
    EncodedSlash,
    /// Percent-decoding produced invalid UTF-8 or a bad escape.
    InvalidEncoding,
    /// Routing needed the body's `model`, and the body is not valid JSON.
    MalformedJson,
    /// `model` is present but is not a string.
    ModelNotString,
    /// The deployment segment of `/openai/deployments/{dep}/...` is empty.
    EmptyDeployment,
    /// The request target is not a path (`*`, or not starting with `/`).
    NotAPath,
}

impl BadRequest {
    fn message(self) -> &'static str {
        match self {
            BadRequest::DotSegment => "The request path must not contain '.' or '..' segments.",
            BadRequest::EncodedSlash => {
                "The request path must not contain encoded slashes (%2F, %5C) or backslashes."
            }
            BadRequest::InvalidEncoding => {
                "The request path is not valid UTF-8 after percent-decoding."
            }
            BadRequest::MalformedJson => {
                "The request body is not valid JSON; it is needed to read the 'model' field."
            }
            BadRequest::ModelNotString => "The 'model' field must be a string.",
            BadRequest::EmptyDeployment => "The deployment name in the path is empty.",
            BadRequest::NotAPath => "The request target must be a path starting with '/'.",
        }
    }

    fn param(self) -> Option<&'static str> {
        match self {
            BadRequest::MalformedJson | BadRequest::ModelNotString => Some("model"),
            _ => None,
        }
    }
}

/// An error the gateway answers on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// No or wrong client key.
    #[error("missing or invalid client key")]
    Unauthorized,
    /// A client's Entra ID token was refused; the reason goes in the body.
    #[error("client token refused: {0}")]
    InvalidToken(crate::entra::TokenRejection),
    /// The request body exceeds `max_request_body_bytes`.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge {
        /// The configured cap.
        limit: usize,
    },
    /// The client's body could not be read (it disconnected or broke framing).
    #[error("could not read the request body")]
    ClientBody,
    /// The path or body cannot be routed safely.
    #[error("bad request: {0:?}")]
    BadRequest(BadRequest),
    /// No configured instance serves the requested deployment.
    #[error("no instance serves the deployment")]
    DeploymentNotFound,
    /// Every candidate is cooling down after a 429.
    #[error("every instance is cooling down for {retry_after_ms} ms")]
    AllCooling {
        /// Time until the first candidate is free again.
        retry_after_ms: u64,
    },
    /// Candidates exist but none could be tried (breakers open) and no
    /// instance gave a response.
    #[error("no instance available")]
    NoBackend,
    /// The last attempt failed to connect or broke before response headers.
    #[error("upstream connection failed")]
    UpstreamConnect,
    /// The last attempt timed out before response headers.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// Something inside the gateway went wrong.
    #[error("internal error")]
    Internal,
    /// The client's `deployments` do not list the requested one (403).
    #[error("client may not use the deployment")]
    DeploymentNotAllowed {
        /// The client's name.
        client: Arc<str>,
        /// The client-facing deployment it asked for.
        deployment: String,
    },
    /// The client is over its `rpm` or `tpm` (429).
    #[error("client over its rate limit; retry after {retry_after_ms} ms")]
    ClientRateLimited {
        /// The client's name.
        client: Arc<str>,
        /// Which limit, with its configured value.
        limit: RateLimit,
        /// Until the entry that frees enough room leaves the window.
        retry_after_ms: u64,
    },
    /// The request alone needs more tokens than the client's whole `tpm`
    /// (429 that must not be retried).
    #[error("request larger than the client's token rate limit")]
    RequestTooLarge {
        /// The client's name.
        client: Arc<str>,
        /// The client's tokens per minute.
        tpm: u64,
        /// The request's admission estimate.
        estimate: u64,
    },
    /// The client's `token_quota` is used up for this period (403).
    #[error("client token quota exceeded")]
    QuotaExceeded {
        /// The client's name.
        client: Arc<str>,
        /// The configured quota.
        tokens: u64,
        /// `day` or `month`.
        period: &'static str,
        /// When the next period starts (RFC 3339, UTC).
        renews_at: String,
    },
}

/// Which per-minute limit a client exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimit {
    /// `rpm`, with its value.
    Requests(u64),
    /// `tpm`, with its value.
    Tokens(u64),
    /// The `token_quota` (its tokens) has some left across replicas, but
    /// this replica's lease of it is empty until the next top-up (shared
    /// through Redis).
    QuotaLease(u64),
}

impl ProxyError {
    /// The phase this error belongs to.
    pub fn phase(&self) -> Phase {
        match self {
            ProxyError::Unauthorized | ProxyError::InvalidToken(_) => Phase::Auth,
            ProxyError::BodyTooLarge { .. } | ProxyError::ClientBody => Phase::Client,
            ProxyError::BadRequest(_) => Phase::Route,
            ProxyError::DeploymentNotFound
            | ProxyError::AllCooling { .. }
            | ProxyError::NoBackend => Phase::Select,
            ProxyError::UpstreamConnect | ProxyError::UpstreamTimeout => Phase::Upstream,
            ProxyError::Internal => Phase::Internal,
            ProxyError::DeploymentNotAllowed { .. }
            | ProxyError::ClientRateLimited { .. }
            | ProxyError::RequestTooLarge { .. }
            | ProxyError::QuotaExceeded { .. } => Phase::Admit,
        }
    }

    /// Whether trying another instance could help.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamConnect | ProxyError::UpstreamTimeout
        )
    }

    /// The status the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unauthorized | ProxyError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBody | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::DeploymentNotFound => StatusCode::NOT_FOUND,
            ProxyError::AllCooling { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NoBackend | ProxyError::UpstreamConnect => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::DeploymentNotAllowed { .. } | ProxyError::QuotaExceeded { .. } => {
                StatusCode::FORBIDDEN
            }
            ProxyError::ClientRateLimited { .. } | ProxyError::RequestTooLarge { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
        }
    }

    /// The `reason` label of `aoai_lb_client_errors_total` and the access
    /// log's `error` field.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::InvalidToken(_) => "invalid_token",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::ClientBody | ProxyError::BadRequest(_) => "bad_request",
            ProxyError::DeploymentNotFound => "deployment_not_found",
            ProxyError::AllCooling { .. } => "all_cooling",
            ProxyError::NoBackend => "no_backend",
            ProxyError::UpstreamConnect => "upstream_connect",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::Internal => "internal",
            ProxyError::DeploymentNotAllowed { .. } => "deployment_not_allowed",
            ProxyError::ClientRateLimited {
                limit: RateLimit::Requests(_),
                ..
            } => "client_rpm",
            ProxyError::ClientRateLimited {
                limit: RateLimit::Tokens(_),
                ..
            } => "client_tpm",
            ProxyError::ClientRateLimited {
                limit: RateLimit::QuotaLease(_),
                ..
            } => "client_quota_lease",
            ProxyError::RequestTooLarge { .. } => "client_request_too_large",
            ProxyError::QuotaExceeded { .. } => "quota_exceeded",
        }
    }

    /// The client and `reason` label of `aoai_lb_client_rejections_total`
    /// (`deployment`, `rpm`, `tpm`, `too_large`, `quota`, `quota_lease`), for the refusals
    /// that come from a client's own permissions and limits.
    pub fn rejection(&self) -> Option<(&Arc<str>, &'static str)> {
        match self {
            ProxyError::DeploymentNotAllowed { client, .. } => Some((client, "deployment")),
            ProxyError::ClientRateLimited {
                client,
                limit: RateLimit::Requests(_),
                ..
            } => Some((client, "rpm")),
            ProxyError::ClientRateLimited {
                client,
                limit: RateLimit::Tokens(_),
                ..
            } => Some((client, "tpm")),
            ProxyError::ClientRateLimited {
                client,
                limit: RateLimit::QuotaLease(_),
                ..
            } => Some((client, "quota_lease")),
            ProxyError::RequestTooLarge { client, .. } => Some((client, "too_large")),
            ProxyError::QuotaExceeded { client, .. } => Some((client, "quota")),
            _ => None,
        }
    }

    /// The OpenAI-shaped `code` field.
    fn code(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized => "401",
            ProxyError::InvalidToken(_) => "invalid_token",
            ProxyError::BodyTooLarge { .. } => "request_too_large",
            ProxyError::ClientBody | ProxyError::BadRequest(_) => "invalid_request",
            // Azure's own spelling, so SDKs and tools recognise it.
            ProxyError::DeploymentNotFound => "DeploymentNotFound",
            ProxyError::AllCooling { .. } => "429",
            ProxyError::NoBackend => "no_backend_available",
            ProxyError::UpstreamConnect => "bad_gateway",
            ProxyError::UpstreamTimeout => "gateway_timeout",
            ProxyError::Internal => "internal_error",
            ProxyError::DeploymentNotAllowed { .. } => "DeploymentNotAllowed",
            // Azure's code for its own rate limits.
            ProxyError::ClientRateLimited { .. } => "429",
            // OpenAI's code for a request over the whole TPM.
            ProxyError::RequestTooLarge { .. } => "rate_limit_exceeded",
            ProxyError::QuotaExceeded { .. } => "QuotaExceeded",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized | ProxyError::InvalidToken(_) => "invalid_request_error",
            ProxyError::BodyTooLarge { .. }
            | ProxyError::ClientBody
            | ProxyError::BadRequest(_)
            | ProxyError::DeploymentNotFound => "invalid_request_error",
            ProxyError::AllCooling { .. } | ProxyError::ClientRateLimited { .. } => {
                "rate_limit_error"
            }
            ProxyError::RequestTooLarge { .. } => "tokens",
            ProxyError::DeploymentNotAllowed { .. } | ProxyError::QuotaExceeded { .. } => {
                "permission_error"
            }
            _ => "server_error",
        }
    }

    fn message(&self) -> String {
        match self {
            ProxyError::Unauthorized => "Access denied due to a missing or invalid API key. Send it as 'api-key: <key>' or 'Authorization: Bearer <key>'.".to_owned(),
            ProxyError::InvalidToken(r) => format!("Access denied: {r}."),
            ProxyError::BodyTooLarge { limit } => {
                format!("The request body exceeds the gateway's limit of {limit} bytes.")
            }
            ProxyError::ClientBody => "The request body could not be read.".to_owned(),
            ProxyError::BadRequest(b) => b.message().to_owned(),
            ProxyError::DeploymentNotFound => "The API deployment for this resource does not exist on any instance behind this gateway.".to_owned(),
            ProxyError::AllCooling { retry_after_ms } => format!(
                "Every instance serving this deployment is rate limited. Please retry after {retry_after_ms} milliseconds."
            ),
            ProxyError::NoBackend => {
                "No instance serving this deployment is available right now.".to_owned()
            }
            ProxyError::UpstreamConnect => {
                "The gateway could not get a response from any instance.".to_owned()
            }
            ProxyError::UpstreamTimeout => {
                "No instance answered before the gateway's response timeout.".to_owned()
            }
            ProxyError::Internal => "The gateway hit an internal error.".to_owned(),
            ProxyError::DeploymentNotAllowed { client, deployment } => format!(
                "Client '{client}' is not allowed to use the deployment '{deployment}'."
            ),
            ProxyError::ClientRateLimited {
                client,
                limit,
                retry_after_ms,
            } => {
                let (kind, value, unit) = match limit {
                    RateLimit::Requests(v) => ("call rate limit", v, "requests"),
                    RateLimit::Tokens(v) => ("token rate limit", v, "tokens"),
                    RateLimit::QuotaLease(v) => {
                        return format!(
                            "Client '{client}' has tokens left in its token quota of {v}, but this gateway replica is still fetching its share of them. Please retry after {} seconds.",
                            retry_after_ms.div_ceil(1000)
                        );
                    }
                };
                format!(
                    "Requests from client '{client}' have exceeded its {kind} of {value} {unit} per minute. Please retry after {} seconds.",
                    retry_after_ms.div_ceil(1000)
                )
            }
            ProxyError::RequestTooLarge {
                client,
                tpm,
                estimate,
            } => format!(
                "Request too large for client '{client}' on tokens per min (TPM): Limit {tpm}, Requested {estimate}. The input or output tokens must be reduced in order to run successfully."
            ),
            ProxyError::QuotaExceeded {
                client,
                tokens,
                period,
                renews_at,
            } => format!(
                "Client '{client}' has used its token quota of {tokens} tokens for this {period}. It renews at {renews_at}."
            ),
        }
    }

    /// The OpenAI-shaped JSON body.
    pub fn body(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        #[derive(serde::Serialize)]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
        }
        let message = self.message();
        let param = match self {
            ProxyError::BadRequest(b) => b.param(),
            _ => None,
        };
        let outer = Outer {
            error: Inner {
                code: self.code(),
                message: &message,
                kind: self.kind(),
                param,
            },
        };
        // Serialising plain strings cannot fail; fall back to a fixed body
        // rather than panicking if it ever did.
        serde_json::to_vec(&outer)
            .unwrap_or_else(|_| br#"{"error":{"code":"internal_error","message":"error","type":"server_error","param":null}}"#.to_vec())
    }

    /// The complete response: status, JSON body, and for
    /// [`ProxyError::AllCooling`] and [`ProxyError::ClientRateLimited`] the
    /// `retry-after-ms` and `retry-after` (whole seconds, rounded up)
    /// headers the SDKs honour; `x-should-retry: false` for
    /// [`ProxyError::RequestTooLarge`].
    pub fn into_response<B>(self, body: impl FnOnce(Vec<u8>) -> B) -> Response<B> {
        let mut resp = Response::new(body(self.body()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let ProxyError::AllCooling { retry_after_ms }
        | ProxyError::ClientRateLimited { retry_after_ms, .. } = self
        {
            h.insert("retry-after-ms", HeaderValue::from(retry_after_ms));
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_ms.div_ceil(1000)),
            );
        }
        if let ProxyError::RequestTooLarge { .. } = self {
            // Waiting cannot help: the OpenAI SDKs honour this and do not
            // retry.
            h.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if self == ProxyError::Unauthorized {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ProxyError::InvalidToken(_) = self {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        resp
    }
}

/// Failure to build a [`crate::proxy::Gateway`].
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The extra CA file could not be read or holds no usable certificate.
    #[error("upstream.extra_ca_file: {0}")]
    ExtraCa(String),
    /// TLS could not be set up.
    #[error("upstream TLS: {0}")]
    Tls(String),
    /// The client table cannot be built (`API_KEY` clashes with a client).
    #[error("{0}")]
    Clients(String),
    /// The `redis` block cannot be turned into a client (the message
    /// starts with the field: `redis.url` or `redis.ca_file`).
    #[error("{0}")]
    Redis(String),
    /// More instances than the selector supports.
    #[error("instances: at most {max} instances are supported")]
    TooManyInstances {
        /// The supported maximum.
        max: usize,
    },
    /// An instance's name, host or key cannot be put in an HTTP header.
    #[error("instances[{index}].{field}: not valid in an HTTP header")]
    InvalidHeader {
        /// Index of the instance in the document.
        index: usize,
        /// `api_key` or `url`.
        field: &'static str,
    },
    /// Client tokens cannot be validated here (a bad `AZURE_AUTHORITY_HOST`).
    #[error("entra: {0}")]
    Entra(String),
    /// An instance's Entra ID credential cannot work here (a variable it
    /// needs is missing or invalid).
    #[error("instances[{index}].auth: {reason}")]
    Credential {
        /// Index of the (first) instance using the credential.
        index: usize,
        /// What is missing, in words.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_json(e: &ProxyError) -> serde_json::Value {
        serde_json::from_slice(&e.body()).unwrap()
    }

    #[test]
    fn every_error_has_an_openai_shaped_body() {
        let all = [
            ProxyError::Unauthorized,
            ProxyError::BodyTooLarge { limit: 10 },
            ProxyError::ClientBody,
            ProxyError::BadRequest(BadRequest::DotSegment),
            ProxyError::DeploymentNotFound,
            ProxyError::AllCooling {
                retry_after_ms: 1500,
            },
            ProxyError::NoBackend,
            ProxyError::UpstreamConnect,
            ProxyError::UpstreamTimeout,
            ProxyError::Internal,
            ProxyError::DeploymentNotAllowed {
                client: "a".into(),
                deployment: "d".into(),
            },
            ProxyError::ClientRateLimited {
                client: "a".into(),
                limit: RateLimit::Tokens(5),
                retry_after_ms: 1,
            },
            ProxyError::RequestTooLarge {
                client: "a".into(),
                tpm: 5,
                estimate: 6,
            },
            ProxyError::QuotaExceeded {
                client: "a".into(),
                tokens: 5,
                period: "day",
                renews_at: "2026-12-01T00:00:00Z".into(),
            },
        ];
        for e in all {
            let v = body_json(&e);
            let err = &v["error"];
            assert!(err["code"].is_string(), "{v}");
            assert!(err["message"].is_string(), "{v}");
            assert!(err["type"].is_string(), "{v}");
            assert!(err.get("param").is_some(), "{v}");
            assert!(!e.label().is_empty());
            let _ = e.phase().as_str();
        }
    }

    #[test]
    fn all_cooling_sets_retry_headers_rounded_up() {
        let r = ProxyError::AllCooling {
            retry_after_ms: 1500,
        }
        .into_response(|b| b);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["retry-after-ms"], "1500");
        assert_eq!(r.headers()["retry-after"], "2");
    }

    #[test]
    fn deployment_not_found_uses_azures_code() {
        let v = body_json(&ProxyError::DeploymentNotFound);
        assert_eq!(v["error"]["code"], "DeploymentNotFound");
        assert_eq!(
            ProxyError::DeploymentNotFound.status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn only_upstream_errors_are_retryable() {
        assert!(ProxyError::UpstreamConnect.retryable());
        assert!(ProxyError::UpstreamTimeout.retryable());
        assert!(!ProxyError::Unauthorized.retryable());
        assert!(!ProxyError::BadRequest(BadRequest::MalformedJson).retryable());
    }
}
