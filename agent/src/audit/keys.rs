//! The host's checkpoint signing key: an ed25519 seed in `STATE_DIR/keys/checkpoint.ed25519`,
//! mode 0600 in a 0700 folder, made on first use.
#![forbid(unsafe_code)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};

use super::AuditError;

pub const KEYS_DIR: &str = "keys";
pub const SIGNING_KEY_FILE: &str = "checkpoint.ed25519";

pub fn signing_key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(KEYS_DIR).join(SIGNING_KEY_FILE)
}

fn key_err(path: &Path, why: impl ToString) -> AuditError {
    AuditError::Key {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// The host-local key that token fingerprints are keyed with (HMAC-SHA256).
pub const FINGERPRINT_KEY_FILE: &str = "fingerprint.hmac";

/// Loads the signing key, making it (and its folder) first if there is none.
pub fn load_or_create(state_dir: &Path) -> Result<SigningKey, AuditError> {
    let seed = load_or_create_secret(state_dir, SIGNING_KEY_FILE, "an ed25519 seed")?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Loads the token fingerprint key, making it first if there is none. It never leaves the
/// host: without it, a fingerprint cannot be used to confirm a guessed token.
pub fn load_or_create_fingerprint_key(state_dir: &Path) -> Result<[u8; 32], AuditError> {
    load_or_create_secret(state_dir, FINGERPRINT_KEY_FILE, "a fingerprint key")
}

/// 32 random bytes in `STATE_DIR/keys/FILE`, mode 0600 in a 0700 folder, made on first use.
fn load_or_create_secret(
    state_dir: &Path,
    file_name: &str,
    what: &str,
) -> Result<[u8; 32], AuditError> {
    let path = state_dir.join(KEYS_DIR).join(file_name);
    let dir = path.parent().expect("key path has a folder");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| key_err(dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| key_err(dir, e))?;
    match fs::read(&path) {
        Ok(bytes) => {
            let secret: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                key_err(
                    &path,
                    format!("not {what} (32 bytes); restore it from backup, or move it away to start a new key"),
                )
            })?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(|e| key_err(&path, e))?;
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| key_err(&path, e))?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| key_err(&path, e))?;
            file.write_all(&secret).map_err(|e| key_err(&path, e))?;
            file.sync_all().map_err(|e| key_err(&path, e))?;
            Ok(secret)
        }
        Err(e) => Err(key_err(&path, e)),
    }
}

/// The public key of this host's signing key, without making one.
pub fn local_public_key(state_dir: &Path) -> Result<VerifyingKey, AuditError> {
    let path = signing_key_path(state_dir);
    let bytes = fs::read(&path).map_err(|e| key_err(&path, e))?;
    let seed: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| key_err(&path, "not a 32-byte ed25519 seed"))?;
    Ok(SigningKey::from_bytes(&seed).verifying_key())
}

/// Parses an exported public key: 64 hex digits, surrounding whitespace allowed.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("not hex: {e}"))?;
    let bytes: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| "an ed25519 public key is 32 bytes (64 hex digits)".to_owned())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not a valid ed25519 key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn made_once_root_only_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        let path = signing_key_path(dir.path());
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        assert_eq!(local_public_key(dir.path()).unwrap(), a.verifying_key());
        let f = load_or_create_fingerprint_key(dir.path()).unwrap();
        assert_eq!(f, load_or_create_fingerprint_key(dir.path()).unwrap());
        assert_ne!(f, a.to_bytes(), "two keys, not one");
        let fpath = path.parent().unwrap().join(FINGERPRINT_KEY_FILE);
        assert_eq!(fs::metadata(&fpath).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn public_keys_round_trip_as_hex() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create(dir.path()).unwrap().verifying_key();
        let text = format!("{}\n", hex::encode(key.to_bytes()));
        assert_eq!(parse_public_key(&text).unwrap(), key);
        assert!(parse_public_key("abcd").is_err());
    }
}
