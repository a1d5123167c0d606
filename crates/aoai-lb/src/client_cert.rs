//! The client assertion of a certificate credential (`auth.type`
//! `client_certificate`): what an app registration with a certificate sends
//! to the Entra ID token endpoint instead of a secret.
//!
//! Entra ID wants a JWT signed with the certificate's private key (PS256;
//! RS256 is the legacy form) whose header names the certificate by
//! `x5t#S256`, the base64url SHA-256 of its DER encoding, and whose claims
//! are `aud` = the token endpoint, `iss` = `sub` = the client id, a random
//! `jti`, and `nbf`/`iat`/`exp` at most 10 minutes apart.
//!
//! No OpenSSL: the PEM file is split with `rustls-pki-types`, the key is
//! loaded and the signature made with `ring`, and the certificate is only
//! hashed, never parsed (Entra ID checks it against what the app
//! registration holds). The file must hold the certificate and its private
//! key, unencrypted, as PEM: PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1
//! (`BEGIN RSA PRIVATE KEY`), the form `az ad sp create-for-rbac
//! --create-cert` writes. Only RSA keys of 2048 to 8192 bits are accepted,
//! as Entra ID accepts only RSA certificates for app credentials.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{RSA_PSS_SHA256, RsaKeyPair};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};

/// Lifetime of an assertion: Entra ID refuses `exp` more than 10 minutes
/// after `nbf`; 5 minutes leaves room for clock skew.
const ASSERTION_LIFETIME_SECS: u64 = 300;

/// Why a certificate file cannot be used. `Display` never contains key
/// material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// No `CERTIFICATE` block.
    #[error("no PEM certificate (BEGIN CERTIFICATE) in the file")]
    NoCertificate,
    /// No private key block.
    #[error(
        "no unencrypted PEM private key (BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY) in the file"
    )]
    NoKey,
    /// An EC key, or a key ring refuses (too short, malformed).
    #[error("the private key is not a usable RSA key of 2048 to 8192 bits")]
    BadKey,
    /// The system random source failed (no `jti`, no PSS salt).
    #[error("no randomness available to sign the client assertion")]
    Random,
}

/// A certificate and its private key, ready to sign assertions.
pub struct CertificateKey {
    key: RsaKeyPair,
    /// base64url SHA-256 of the leaf certificate's DER.
    x5t_s256: String,
}

impl std::fmt::Debug for CertificateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateKey")
            .field("x5t_s256", &self.x5t_s256)
            .finish_non_exhaustive()
    }
}

impl CertificateKey {
    /// Reads the first certificate and the first private key of `pem`.
    ///
    /// # Errors
    /// [`CertError::NoCertificate`], [`CertError::NoKey`] (also for an
    /// encrypted key) or [`CertError::BadKey`].
    pub fn from_pem(pem: &[u8]) -> Result<Self, CertError> {
        let cert = CertificateDer::pem_slice_iter(pem)
            .find_map(Result::ok)
            .ok_or(CertError::NoCertificate)?;
        let key = PrivateKeyDer::from_pem_slice(pem).map_err(|_| CertError::NoKey)?;
        let key = match &key {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => return Err(CertError::BadKey),
        }
        .map_err(|_| CertError::BadKey)?;
        Ok(Self {
            key,
            x5t_s256: URL_SAFE_NO_PAD.encode(Sha256::digest(cert.as_ref())),
        })
    }

    /// The certificate's `x5t#S256` thumbprint (base64url SHA-256 of the
    /// DER), as the assertion header carries it.
    pub fn thumbprint_s256(&self) -> &str {
        &self.x5t_s256
    }

    /// The RSA public key (PKCS#1 `RSAPublicKey` DER): what the app
    /// registration's certificate carries, for checking assertions.
    pub fn public_key_der(&self) -> &[u8] {
        self.key.public().as_ref()
    }

    /// A PS256 client assertion for `client_id` at the token endpoint
    /// `audience`, valid from `now_secs` (Unix) for 5 minutes.
    ///
    /// # Errors
    /// [`CertError::Random`] when the system random source fails.
    pub fn assertion(
        &self,
        client_id: &str,
        audience: &str,
        now_secs: u64,
    ) -> Result<String, CertError> {
        let rng = SystemRandom::new();
        let mut id = [0u8; 16];
        rng.fill(&mut id).map_err(|_| CertError::Random)?;
        // A version-4 GUID, as the SDKs send.
        id[6] = (id[6] & 0x0f) | 0x40;
        id[8] = (id[8] & 0x3f) | 0x80;
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let jti = format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        );
        let header = serde_json::json!({
            "alg": "PS256",
            "typ": "JWT",
            "x5t#S256": self.x5t_s256,
        });
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": jti,
            "nbf": now_secs,
            "iat": now_secs,
            "exp": now_secs + ASSERTION_LIFETIME_SECS,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PSS_SHA256, &rng, input.as_bytes(), &mut sig)
            .map_err(|_| CertError::Random)?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{RSA_PSS_2048_8192_SHA256, UnparsedPublicKey};

    const PKCS8: &str = include_str!("../tests/fixtures/entra-test-cert.pem");
    const PKCS1: &str = include_str!("../tests/fixtures/entra-test-cert-pkcs1.pem");

    fn part(token: &str, i: usize) -> serde_json::Value {
        let p = token.split('.').nth(i).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
    }

    #[test]
    fn signs_a_ps256_assertion_naming_the_certificate_and_the_endpoint() {
        let k = CertificateKey::from_pem(PKCS8.as_bytes()).unwrap();
        let aud = "https://login.microsoftonline.com/t/oauth2/v2.0/token";
        let a = k.assertion("app-id", aud, 1_700_000_000).unwrap();
        let h = part(&a, 0);
        assert_eq!(h["alg"], "PS256");
        assert_eq!(h["x5t#S256"], k.thumbprint_s256());
        let c = part(&a, 1);
        assert_eq!(c["aud"], aud);
        assert_eq!(c["iss"], "app-id");
        assert_eq!(c["sub"], "app-id");
        assert_eq!(c["exp"].as_u64().unwrap() - c["nbf"].as_u64().unwrap(), 300);
        assert_eq!(c["jti"].as_str().unwrap().len(), 36);
        let (input, sig) = a.rsplit_once('.').unwrap();
        UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, k.public_key_der())
            .verify(input.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
            .unwrap();
        // A new jti every time: Entra ID refuses a replayed assertion.
        let b = k.assertion("app-id", aud, 1_700_000_000).unwrap();
        assert_ne!(part(&b, 1)["jti"], c["jti"]);
    }

    #[test]
    fn reads_pkcs1_keys_too_and_the_same_certificate_gives_the_same_thumbprint() {
        let a = CertificateKey::from_pem(PKCS8.as_bytes()).unwrap();
        let b = CertificateKey::from_pem(PKCS1.as_bytes()).unwrap();
        assert_eq!(a.thumbprint_s256(), b.thumbprint_s256());
        assert_eq!(a.thumbprint_s256().len(), 43);
    }

    #[test]
    fn refuses_a_file_without_certificate_or_key() {
        let cert_only: String = PKCS8
            .split_inclusive('\n')
            .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
            .collect();
        assert_eq!(
            CertificateKey::from_pem(cert_only.as_bytes()).unwrap_err(),
            CertError::NoKey
        );
        let key_only: String = PKCS8
            .split_inclusive('\n')
            .take_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
            .collect();
        assert_eq!(
            CertificateKey::from_pem(key_only.as_bytes()).unwrap_err(),
            CertError::NoCertificate
        );
        assert_eq!(
            CertificateKey::from_pem(b"not a pem").unwrap_err(),
            CertError::NoCertificate
        );
    }
}
