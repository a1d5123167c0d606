//! RS256 JSON Web Tokens for the simulated Entra ID: the three committed
//! test-only RSA keys, signing, verification and the JWKS document.
//!
//! The keys under `src/keys/` were generated for this simulator and protect
//! nothing; they are committed because `ring` can sign with an RSA key but
//! cannot generate one. Keys 1 and 2 are the tenant's published signing keys
//! (2 takes over on a rotation); the "foreign" key is never published, so a
//! token signed with it has a well-formed but wrong signature.

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, KeyPair as _, RsaKeyPair};

/// Which key signs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SigningKey {
    /// The first published key (`kid` `sim-key-1`), current until a rotation.
    Primary,
    /// The second published key (`kid` `sim-key-2`), current after a rotation.
    Secondary,
    /// A key the tenant never publishes (`kid` `sim-key-1`, so a verifier
    /// finds a key and the signature check itself fails).
    Foreign,
}

impl SigningKey {
    /// The `kid` written in the token header.
    pub fn kid(self) -> &'static str {
        match self {
            SigningKey::Primary | SigningKey::Foreign => "sim-key-1",
            SigningKey::Secondary => "sim-key-2",
        }
    }

    fn index(self) -> usize {
        match self {
            SigningKey::Primary => 0,
            SigningKey::Secondary => 1,
            SigningKey::Foreign => 2,
        }
    }
}

struct Loaded {
    pair: RsaKeyPair,
    n: Vec<u8>,
    e: Vec<u8>,
}

const PKCS8: [&[u8]; 3] = [
    include_bytes!("keys/test-rsa-1.pk8"),
    include_bytes!("keys/test-rsa-2.pk8"),
    include_bytes!("keys/test-rsa-foreign.pk8"),
];

fn keys() -> Option<&'static [Loaded; 3]> {
    static KEYS: OnceLock<Option<[Loaded; 3]>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let load = |der: &[u8]| {
            let pair = RsaKeyPair::from_pkcs8(der).ok()?;
            let c: signature::RsaPublicKeyComponents<Vec<u8>> = pair.public_key().into();
            Some(Loaded {
                pair,
                n: c.n,
                e: c.e,
            })
        };
        Some([load(PKCS8[0])?, load(PKCS8[1])?, load(PKCS8[2])?])
    })
    .as_ref()
}

/// base64url without padding, as JOSE uses.
pub(crate) fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs `claims` with `key` (RS256). `None` only if the committed keys
/// cannot be loaded or signing fails, which the unit tests rule out.
pub(crate) fn sign(key: SigningKey, claims: &serde_json::Value) -> Option<String> {
    let k = &keys()?[key.index()];
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "kid": key.kid()});
    let mut out = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut sig = vec![0u8; k.pair.public().modulus_len()];
    k.pair
        .sign(
            &signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            out.as_bytes(),
            &mut sig,
        )
        .ok()?;
    out.push('.');
    out.push_str(&b64(&sig));
    Some(out)
}

/// The JWK of a published key; `issuer` as Entra adds it to each key.
pub(crate) fn jwk(key: SigningKey, issuer: &str) -> serde_json::Value {
    let Some(k) = keys().map(|k| &k[key.index()]) else {
        return serde_json::Value::Null;
    };
    serde_json::json!({
        "kty": "RSA",
        "use": "sig",
        "kid": key.kid(),
        "n": b64(&k.n),
        "e": b64(&k.e),
        "issuer": issuer,
    })
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalid {
    Malformed,
    Signature,
}

/// Checks the signature of `token` against the published keys in
/// `published` (matched by `kid`, RS256 only) and returns its claims.
pub(crate) fn verify(
    token: &str,
    published: &[SigningKey],
) -> Result<serde_json::Map<String, serde_json::Value>, Invalid> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Invalid::Malformed);
    };
    let decode = |p: &str| URL_SAFE_NO_PAD.decode(p).map_err(|_| Invalid::Malformed);
    let header: serde_json::Value =
        serde_json::from_slice(&decode(h)?).map_err(|_| Invalid::Malformed)?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("RS256") {
        return Err(Invalid::Signature);
    }
    let kid = header.get("kid").and_then(|k| k.as_str());
    let key = published
        .iter()
        .find(|k| Some(k.kid()) == kid)
        .ok_or(Invalid::Signature)?;
    let k = &keys().ok_or(Invalid::Signature)?[key.index()];
    let public = signature::RsaPublicKeyComponents { n: &k.n, e: &k.e };
    let signed = &token[..h.len() + 1 + c.len()];
    public
        .verify(
            &signature::RSA_PKCS1_2048_8192_SHA256,
            signed.as_bytes(),
            &decode(s)?,
        )
        .map_err(|_| Invalid::Signature)?;
    serde_json::from_slice(&decode(c)?).map_err(|_| Invalid::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies_with_each_published_key() {
        for key in [SigningKey::Primary, SigningKey::Secondary] {
            let t = sign(key, &serde_json::json!({"a": 1})).unwrap();
            let claims = verify(&t, &[SigningKey::Primary, SigningKey::Secondary]).unwrap();
            assert_eq!(claims["a"], 1);
        }
    }

    #[test]
    fn refuses_a_foreign_key_an_unpublished_kid_and_a_tampered_token() {
        let both = [SigningKey::Primary, SigningKey::Secondary];
        let t = sign(SigningKey::Foreign, &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(verify(&t, &both), Err(Invalid::Signature));
        let t = sign(SigningKey::Secondary, &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(verify(&t, &[SigningKey::Primary]), Err(Invalid::Signature));
        let t = sign(SigningKey::Primary, &serde_json::json!({"a": 1})).unwrap();
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = b64(br#"{"a":2}"#);
        parts[1] = &forged;
        assert_eq!(verify(&parts.join("."), &both), Err(Invalid::Signature));
        assert_eq!(verify("not-a-jwt", &both), Err(Invalid::Malformed));
    }

    #[test]
    fn publishes_the_modulus_and_exponent() {
        let j = jwk(SigningKey::Primary, "iss");
        assert_eq!(j["kid"], "sim-key-1");
        assert_eq!(j["e"], "AQAB");
        assert!(j["n"].as_str().unwrap().len() > 300);
    }
}
