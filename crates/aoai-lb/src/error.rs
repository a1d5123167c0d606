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

use http::{HeaderValue, Response, StatusCode, header};

/// Where in the request lifecycle an error arose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The client's request itself (body too large, unreadable body).
    Client,
    /// Client authentication.
    Auth,
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
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized | ProxyError::InvalidToken(_) => "invalid_request_error",
            ProxyError::BodyTooLarge { .. }
            | ProxyError::ClientBody
            | ProxyError::BadRequest(_)
            | ProxyError::DeploymentNotFound => "invalid_request_error",
            ProxyError::AllCooling { .. } => "rate_limit_error",
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
    /// [`ProxyError::AllCooling`] the `retry-after-ms` and `retry-after`
    /// (whole seconds, rounded up) headers the SDKs honour.
    pub fn into_response<B>(self, body: impl FnOnce(Vec<u8>) -> B) -> Response<B> {
        let mut resp = Response::new(body(self.body()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let ProxyError::AllCooling { retry_after_ms } = self {
            h.insert("retry-after-ms", HeaderValue::from(retry_after_ms));
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_ms.div_ceil(1000)),
            );
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
