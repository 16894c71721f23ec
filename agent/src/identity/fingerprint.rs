//! Token fingerprints: HMAC-SHA256 under a host-local key. Equal tokens give equal
//! fingerprints, so one token's calls correlate across records; without the key, which never
//! leaves the host, a guessed token cannot be confirmed against a fingerprint.
#![forbid(unsafe_code)]

use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Clone)]
pub struct Fingerprinter {
    key: [u8; 32],
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter(<key>)")
    }
}

impl Fingerprinter {
    pub fn new(key: [u8; 32]) -> Self {
        Fingerprinter { key }
    }

    /// Hex HMAC-SHA256 of the token.
    pub fn of(&self, token: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key size");
        mac.update(token.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn keyed_and_stable() {
        let a = Fingerprinter::new([1; 32]);
        let b = Fingerprinter::new([2; 32]);
        assert_eq!(a.of("tok"), a.of("tok"));
        assert_ne!(a.of("tok"), a.of("tok2"));
        assert_ne!(
            a.of("tok"),
            b.of("tok"),
            "another host's key gives another fingerprint"
        );
        assert_ne!(
            a.of("tok"),
            hex::encode(Sha256::digest(b"tok")),
            "not a bare hash"
        );
        // RFC 4231 test case 2.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
