//! Signed checkpoints: `(seq, hash, time)` of a chain link, signed with the host's ed25519
//! key. A chain alone only shows careless edits (anyone can recompute SHA-256); a signature
//! over a link fixes everything up to it.
#![forbid(unsafe_code)]

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::chain::Hash;

/// Domain separation, so a checkpoint signature can never be taken for anything else.
const CONTEXT: &[u8] = b"mcptrail checkpoint v1\0";
/// A retention anchor says more than a checkpoint: that every record up to `seq` was removed
/// on purpose. Its own context keeps a checkpoint from being passed off as one.
const ANCHOR_CONTEXT: &[u8] = b"mcptrail retention anchor v1\0";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub v: u32,
    pub seq: u64,
    /// Hex chain hash of record `seq`.
    pub hash: String,
    /// RFC 3339 time of signing.
    pub time: String,
    /// Hex ed25519 public key of the signer.
    pub public_key: String,
    /// Hex ed25519 signature over the context, seq, hash and time.
    pub signature: String,
}

fn message(context: &[u8], seq: u64, hash: &Hash, time: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(context.len() + 8 + 32 + time.len());
    m.extend_from_slice(context);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(time.as_bytes());
    m
}

impl Checkpoint {
    pub fn sign(key: &SigningKey, seq: u64, hash: &Hash, time: String) -> Checkpoint {
        Self::sign_with(CONTEXT, key, seq, hash, time)
    }

    /// Signs a retention anchor: records up to `seq` (whose chain hash is `hash`) were removed.
    pub fn sign_anchor(key: &SigningKey, seq: u64, hash: &Hash, time: String) -> Checkpoint {
        Self::sign_with(ANCHOR_CONTEXT, key, seq, hash, time)
    }

    fn sign_with(
        context: &[u8],
        key: &SigningKey,
        seq: u64,
        hash: &Hash,
        time: String,
    ) -> Checkpoint {
        let signature = key.sign(&message(context, seq, hash, &time));
        Checkpoint {
            v: 1,
            seq,
            hash: hex::encode(hash),
            public_key: hex::encode(key.verifying_key().to_bytes()),
            signature: hex::encode(signature.to_bytes()),
            time,
        }
    }

    /// Checks the signature against `key`; Err says what is wrong.
    pub fn verify(&self, key: &VerifyingKey) -> Result<Hash, String> {
        self.verify_with(CONTEXT, key)
    }

    /// Checks a retention anchor's signature.
    pub fn verify_anchor(&self, key: &VerifyingKey) -> Result<Hash, String> {
        self.verify_with(ANCHOR_CONTEXT, key)
    }

    fn verify_with(&self, context: &[u8], key: &VerifyingKey) -> Result<Hash, String> {
        let hash: Hash = hex::decode(&self.hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or("its hash is not 32 bytes of hex")?;
        let sig: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or("its signature is not 64 bytes of hex")?;
        if self.public_key != hex::encode(key.to_bytes()) {
            return Err(format!(
                "it was signed by key {}, not by the key verified against",
                self.public_key
            ));
        }
        key.verify(
            &message(context, self.seq, &hash, &self.time),
            &Signature::from_bytes(&sig),
        )
        .map_err(|_| "its signature does not verify".to_owned())?;
        Ok(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    #[test]
    fn signs_and_verifies() {
        let cp = Checkpoint::sign(&key(1), 7, &[9; 32], "2026-11-26T10:00:00Z".into());
        assert_eq!(cp.verify(&key(1).verifying_key()), Ok([9; 32]));
    }

    #[test]
    fn any_change_breaks_it() {
        let cp = Checkpoint::sign(&key(1), 7, &[9; 32], "2026-11-26T10:00:00Z".into());
        let vk = key(1).verifying_key();
        let mut seq = cp.clone();
        seq.seq = 8;
        assert!(seq.verify(&vk).is_err());
        let mut hash = cp.clone();
        hash.hash = hex::encode([8u8; 32]);
        assert!(hash.verify(&vk).is_err());
        let mut time = cp.clone();
        time.time = "2026-11-26T10:00:01Z".into();
        assert!(time.verify(&vk).is_err());
        assert!(cp.verify(&key(2).verifying_key()).is_err(), "another key");
    }

    #[test]
    fn a_checkpoint_is_not_an_anchor_and_back() {
        let vk = key(1).verifying_key();
        let cp = Checkpoint::sign(&key(1), 7, &[9; 32], "t".into());
        let anchor = Checkpoint::sign_anchor(&key(1), 7, &[9; 32], "t".into());
        assert!(cp.verify_anchor(&vk).is_err());
        assert!(anchor.verify(&vk).is_err());
        assert_eq!(anchor.verify_anchor(&vk), Ok([9; 32]));
    }
}
