//! JSON Web Tokens, as far as the gateway needs them: the parts of a
//! compact JWS, its claims, and RS256 signature verification with `ring`
//! against a JSON Web Key Set. Nothing else is accepted: `alg` must be
//! `RS256` (never `none`, never an HMAC that a public key could forge).

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature;

/// Why a token is not acceptable, in words a client may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts with JSON header and claims.
    #[error("token is malformed")]
    Malformed,
    /// `alg` other than RS256.
    #[error("token algorithm not accepted (RS256 only)")]
    Algorithm,
    /// No published key has the token's `kid`.
    #[error("token signing key is unknown")]
    UnknownKey,
    /// The signature does not verify.
    #[error("token signature is invalid")]
    Signature,
}

/// A decoded, not yet verified token.
pub struct Decoded<'a> {
    /// The header's `kid`.
    pub kid: Option<String>,
    /// The claims object.
    pub claims: serde_json::Map<String, serde_json::Value>,
    signing_input: &'a str,
    signature: Vec<u8>,
}

/// Whether `s` has the shape of a compact JWS (`eyJ….….…`); a client key
/// does not.
pub fn looks_like_jwt(s: &str) -> bool {
    s.starts_with("eyJ") && s.bytes().filter(|&b| b == b'.').count() == 2
}

/// Splits and decodes a token; checks `alg` is RS256.
///
/// # Errors
/// [`JwtError::Malformed`] or [`JwtError::Algorithm`].
pub fn decode(token: &str) -> Result<Decoded<'_>, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let b64 = |p: &str| URL_SAFE_NO_PAD.decode(p).map_err(|_| JwtError::Malformed);
    let header: serde_json::Value =
        serde_json::from_slice(&b64(h)?).map_err(|_| JwtError::Malformed)?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("RS256") {
        return Err(JwtError::Algorithm);
    }
    let claims = match serde_json::from_slice(&b64(c)?) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => return Err(JwtError::Malformed),
    };
    Ok(Decoded {
        kid: header
            .get("kid")
            .and_then(|k| k.as_str())
            .map(str::to_owned),
        claims,
        signing_input: &token[..h.len() + 1 + c.len()],
        signature: b64(s)?,
    })
}

/// The `exp` of a token without checking anything else: only to schedule
/// the refresh of a token the gateway fetched itself.
pub fn unverified_exp(token: &str) -> Option<u64> {
    let c = token.split('.').nth(1)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
    claims.get("exp")?.as_u64()
}

/// An RSA public key from a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

/// Keys by `kid`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet(HashMap<String, RsaKey>);

impl KeySet {
    /// Parses a JWKS document, keeping the RSA signing keys.
    ///
    /// # Errors
    /// [`JwtError::Malformed`] when it is not a JWKS.
    pub fn parse(doc: &[u8]) -> Result<KeySet, JwtError> {
        #[derive(serde::Deserialize)]
        struct Jwks {
            keys: Vec<Jwk>,
        }
        #[derive(serde::Deserialize)]
        struct Jwk {
            kty: Option<String>,
            kid: Option<String>,
            #[serde(rename = "use")]
            use_: Option<String>,
            n: Option<String>,
            e: Option<String>,
        }
        let jwks: Jwks = serde_json::from_slice(doc).map_err(|_| JwtError::Malformed)?;
        let mut out = HashMap::new();
        for k in jwks.keys {
            let (Some("RSA"), Some(kid), Some(n), Some(e)) =
                (k.kty.as_deref(), k.kid, k.n.as_deref(), k.e.as_deref())
            else {
                continue;
            };
            if k.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let (Ok(n), Ok(e)) = (URL_SAFE_NO_PAD.decode(n), URL_SAFE_NO_PAD.decode(e)) else {
                continue;
            };
            out.insert(kid, RsaKey { n, e });
        }
        Ok(KeySet(out))
    }

    /// Whether a key has this id.
    pub fn has(&self, kid: &str) -> bool {
        self.0.contains_key(kid)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True without keys.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Verifies the signature of `d` with the key named by its `kid`.
    ///
    /// # Errors
    /// [`JwtError::UnknownKey`] or [`JwtError::Signature`].
    pub fn verify(&self, d: &Decoded<'_>) -> Result<(), JwtError> {
        let key = d
            .kid
            .as_deref()
            .and_then(|k| self.0.get(k))
            .ok_or(JwtError::UnknownKey)?;
        signature::RsaPublicKeyComponents {
            n: &key.n,
            e: &key.e,
        }
        .verify(
            &signature::RSA_PKCS1_2048_8192_SHA256,
            d.signing_input.as_bytes(),
            &d.signature,
        )
        .map_err(|_| JwtError::Signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn refuses_other_algorithms_and_malformed_tokens() {
        let none = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(r#"{"exp":1}"#));
        assert_eq!(decode(&none).err(), Some(JwtError::Algorithm));
        let hs = format!("{}.{}.c2ln", b64(r#"{"alg":"HS256"}"#), b64("{}"));
        assert_eq!(decode(&hs).err(), Some(JwtError::Algorithm));
        assert_eq!(decode("a.b").err(), Some(JwtError::Malformed));
        assert_eq!(decode("a.b.c.d").err(), Some(JwtError::Malformed));
        let not_obj = format!("{}.{}.c2ln", b64(r#"{"alg":"RS256"}"#), b64("[1]"));
        assert_eq!(decode(&not_obj).err(), Some(JwtError::Malformed));
    }

    #[test]
    fn reads_exp_without_verifying() {
        let t = format!(
            "{}.{}.x",
            b64(r#"{"alg":"RS256"}"#),
            b64(r#"{"exp":1700000000}"#)
        );
        assert_eq!(unverified_exp(&t), Some(1_700_000_000));
        assert!(looks_like_jwt(&t));
        assert!(!looks_like_jwt("my-client-key"));
    }

    #[test]
    fn parses_only_rsa_signing_keys() {
        let doc = br#"{"keys":[
            {"kty":"RSA","kid":"a","use":"sig","n":"AQAB","e":"AQAB"},
            {"kty":"RSA","kid":"b","use":"enc","n":"AQAB","e":"AQAB"},
            {"kty":"EC","kid":"c","crv":"P-256","x":"AQAB","y":"AQAB"}]}"#;
        let ks = KeySet::parse(doc).unwrap();
        assert!(ks.has("a") && !ks.has("b") && !ks.has("c"));
        assert_eq!(KeySet::parse(b"[]").err(), Some(JwtError::Malformed));
    }
}
