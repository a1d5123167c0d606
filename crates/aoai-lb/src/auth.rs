//! Phase 1: client authentication.
//!
//! The client key is accepted as `Authorization: Bearer <key>` (the seed's
//! curl, and the plain OpenAI client on `/openai/v1`) or `api-key: <key>`
//! (what the Azure SDKs send). Comparison is constant-time. Which client a
//! key belongs to is decided in [`crate::clients`]. A key in the
//! query string is deliberately not accepted: query strings end up in access
//! logs of every proxy in front of us. Failure is answered by the caller with
//! a 401 before any backend is contacted.

use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::error::ProxyError;
use crate::secret::Secret;

/// Checks the request's credential headers against `key`.
///
/// `None` means unauthenticated mode (the operator opted out explicitly):
/// every request passes.
///
/// # Errors
/// [`ProxyError::Unauthorized`] when no header carries the key.
pub fn authenticate(key: Option<&Secret>, headers: &HeaderMap) -> Result<(), ProxyError> {
    let Some(key) = key else {
        return Ok(());
    };
    // Every present credential header is checked, so a stale `api-key` next
    // to a valid bearer token (or the reverse) still authenticates.
    if presented_keys(headers).any(|k| key.matches(k)) {
        Ok(())
    } else {
        Err(ProxyError::Unauthorized)
    }
}

/// Every key the request presents, in the order they are tried: each
/// `api-key` header, then each `Authorization: Bearer` token.
pub fn presented_keys(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all("api-key")
        .into_iter()
        .map(http::HeaderValue::as_bytes)
        .chain(
            headers
                .get_all(AUTHORIZATION)
                .into_iter()
                .filter_map(|v| bearer_token(v.as_bytes())),
        )
}

/// The token of `Bearer <token>`; the scheme is case-insensitive (RFC 9110
/// §11.1) and surrounding blanks are ignored.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(value[7..].trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn accepts_bearer_and_api_key_headers() {
        let k = Secret::new("s3cret");
        assert!(authenticate(Some(&k), &headers(&[("authorization", "Bearer s3cret")])).is_ok());
        assert!(authenticate(Some(&k), &headers(&[("authorization", "bearer  s3cret ")])).is_ok());
        assert!(authenticate(Some(&k), &headers(&[("api-key", "s3cret")])).is_ok());
    }

    #[test]
    fn rejects_wrong_or_missing_keys() {
        let k = Secret::new("s3cret");
        for h in [
            headers(&[]),
            headers(&[("api-key", "s3cre")]),
            headers(&[("authorization", "Basic s3cret")]),
            headers(&[("authorization", "s3cret")]),
            headers(&[("authorization", "Bearer")]),
        ] {
            assert_eq!(authenticate(Some(&k), &h), Err(ProxyError::Unauthorized));
        }
    }

    #[test]
    fn accepts_any_matching_header_among_several() {
        let k = Secret::new("s3cret");
        let h = headers(&[("api-key", "old"), ("authorization", "Bearer s3cret")]);
        assert!(authenticate(Some(&k), &h).is_ok());
    }

    #[test]
    fn unauthenticated_mode_lets_everything_through() {
        assert!(authenticate(None, &headers(&[])).is_ok());
    }
}
