//! Secrets: API keys that must never print themselves.
//!
//! Backend keys and the client key live in [`Secret`]. It has no `Display`,
//! its `Debug` prints a fixed mask, and it has no `Serialize`, so a key
//! cannot reach a log line, a metric, an error body or the admin output by
//! accident. Comparison against client input is constant-time.

use subtle::ConstantTimeEq;

/// An API key or other credential.
///
/// `Debug` prints `Secret(***)`; there is deliberately no `Display` and no
/// `Serialize`. Use [`Secret::expose`] only where the value must go on the
/// wire (the upstream `api-key` header).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<Box<str>>) -> Self {
        Self(value.into())
    }

    /// The raw value, for the one place it belongs: an outgoing header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares `candidate` with this secret in constant time.
    ///
    /// The time taken depends only on the lengths, never on where the first
    /// differing byte is, so a client cannot guess the key byte by byte.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        // Length is not secret for a configured key of fixed size; the
        // content comparison below is what must not leak.
        if ours.len() != candidate.len() {
            return false;
        }
        ours.ct_eq(candidate).into()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_value() {
        let s = Secret::new("very-secret-key");
        let printed = format!("{s:?} {:?}", vec![s.clone()]);
        assert!(!printed.contains("very-secret-key"), "{printed}");
        assert!(printed.contains("***"));
    }

    #[test]
    fn matches_only_the_exact_value() {
        let s = Secret::new("abc123");
        assert!(s.matches(b"abc123"));
        assert!(!s.matches(b"abc124"));
        assert!(!s.matches(b"abc12"));
        assert!(!s.matches(b"abc1234"));
        assert!(!s.matches(b""));
    }
}
