//! The host CA: made on first use in `STATE_DIR/keys/` (ECDSA P-256, the key root's alone),
//! it signs the short-lived leaves the proxy shows clients for the gateways it terminates.
//! Leaves are cached per set of names (bounded, least recently used first).
#![forbid(unsafe_code)]

use std::fs;
use std::io::Write as _;
use std::num::NonZeroUsize;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::TlsError;

pub const CA_KEY: &str = "ca.key";
pub const CA_CERT: &str = "ca.pem";
/// CAs replaced by `ca rotate`, kept so that `ca uninstall` can take them out of the system
/// store too (they stay trusted there until then).
pub const RETIRED_DIR: &str = "ca-retired";

/// How long a leaf is valid, and how long before its end a fresh one is minted.
const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(3600);
/// Leaves kept at once (one per set of names a gateway is reached by).
const LEAF_CACHE: usize = 1024;

/// Leaves by their sorted names, with when each stops being valid.
type LeafCache = lru::LruCache<Vec<String>, (Arc<CertifiedKey>, Instant)>;

pub struct HostCa {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// DNS names (and suffixes, `*.corp` or `.corp`) leaves may carry; empty: any.
    constraints: Vec<String>,
    leaves: Mutex<LeafCache>,
}

fn keys_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("keys")
}

/// Writes `bytes` to `path` with `mode`, replacing it atomically.
fn write_private(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let io = |source| TlsError::CaFile {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

impl HostCa {
    /// The host CA of `state_dir`, made now if there is none. `constraints` apply to a CA
    /// made now (a CA's name constraints are part of it: `ca rotate` makes one with new ones).
    pub fn load_or_create(state_dir: &Path, constraints: &[String]) -> Result<Self, TlsError> {
        let dir = keys_dir(state_dir);
        if !dir.join(CA_KEY).exists() {
            Self::create(&dir, constraints)?;
        }
        Self::load(state_dir, constraints)
    }

    /// The host CA of `state_dir`; an error if the agent has not made one yet (the CLI does
    /// not make one: it would lack the policy's name constraints).
    pub fn load(state_dir: &Path, constraints: &[String]) -> Result<Self, TlsError> {
        let dir = keys_dir(state_dir);
        let (key_path, cert_path) = (dir.join(CA_KEY), dir.join(CA_CERT));
        if !key_path.exists() {
            return Err(TlsError::NoCa(dir));
        }
        let meta = fs::metadata(&key_path).map_err(|source| TlsError::CaFile {
            path: key_path.clone(),
            source,
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(TlsError::CaKeyOpen {
                path: key_path,
                mode: meta.permissions().mode() & 0o777,
            });
        }
        let read = |p: &Path| {
            fs::read_to_string(p).map_err(|source| TlsError::CaFile {
                path: p.to_path_buf(),
                source,
            })
        };
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| TlsError::Ca(e.to_string()))?;
        let pem = read(&cert_path)?;
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map_err(|e| TlsError::Ca(format!("{}: {e}", cert_path.display())))?;
        let issuer =
            Issuer::from_ca_cert_pem(&pem, key).map_err(|e| TlsError::Ca(e.to_string()))?;
        Ok(HostCa {
            pem,
            der,
            issuer,
            constraints: constraints.to_vec(),
            leaves: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(LEAF_CACHE).expect("non-zero"),
            )),
        })
    }

    fn create(dir: &Path, constraints: &[String]) -> Result<(), TlsError> {
        fs::create_dir_all(dir).map_err(|source| TlsError::CaFile {
            path: dir.to_path_buf(),
            source,
        })?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TlsError::Ca(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "mcptrail");
        dn.push(
            DnType::CommonName,
            format!("mcptrail host CA {}", host_name()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        if !constraints.is_empty() {
            params.name_constraints = Some(NameConstraints {
                permitted_subtrees: constraints
                    .iter()
                    .map(|c| GeneralSubtree::DnsName(c.trim_start_matches('*').to_owned()))
                    .collect(),
                excluded_subtrees: Vec::new(),
            });
        }
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsError::Ca(e.to_string()))?;
        // The key first: a certificate without its key would be a CA nobody can use.
        write_private(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
        write_private(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
        tracing::info!(dir = %dir.display(), "made the host CA (`mcptrail ca export` prints it, `mcptrail ca install` trusts it on this host)");
        Ok(())
    }

    /// Replaces the host CA with a new one; the old certificate is kept under
    /// `keys/ca-retired/` (and stays in the system store, if installed, until `ca uninstall`).
    pub fn rotate(state_dir: &Path, constraints: &[String]) -> Result<PathBuf, TlsError> {
        let dir = keys_dir(state_dir);
        let retired = dir.join(RETIRED_DIR);
        fs::create_dir_all(&retired).map_err(|source| TlsError::CaFile {
            path: retired.clone(),
            source,
        })?;
        let old = dir.join(CA_CERT);
        let kept = retired.join(format!(
            "ca-{}.pem",
            chrono::Utc::now().format("%Y%m%dT%H%M%S")
        ));
        if old.exists() {
            fs::rename(&old, &kept).map_err(|source| TlsError::CaFile {
                path: old.clone(),
                source,
            })?;
        }
        let _ = fs::remove_file(dir.join(CA_KEY));
        Self::create(&dir, constraints)?;
        Ok(kept)
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// Whether the CA may vouch for `name`.
    pub fn permits(&self, name: &str) -> bool {
        self.constraints.is_empty()
            || self.constraints.iter().any(|c| {
                let c = c.trim_start_matches('*');
                if let Some(suffix) = c.strip_prefix('.') {
                    name.ends_with(&format!(".{suffix}")) || name == suffix
                } else {
                    name == c || name.ends_with(&format!(".{c}"))
                }
            })
    }

    /// A leaf for `names` (DNS names or IP addresses), from the cache while it has an hour
    /// left, else minted now.
    pub fn leaf(&self, names: &[String]) -> Result<Arc<CertifiedKey>, TlsError> {
        let mut key: Vec<String> = names.to_vec();
        key.sort();
        key.dedup();
        if let Some(bad) = key
            .iter()
            .find(|n| n.parse::<std::net::IpAddr>().is_err() && !self.permits(n))
        {
            return Err(TlsError::NameNotPermitted(bad.clone()));
        }
        let mut cache = self.leaves.lock().expect("leaf cache lock");
        if let Some((leaf, until)) = cache.get(&key)
            && until.saturating_duration_since(Instant::now()) > LEAF_RENEW_BEFORE
        {
            return Ok(leaf.clone());
        }
        let leaf = Arc::new(self.mint(&key)?);
        cache.put(key, (leaf.clone(), Instant::now() + LEAF_LIFETIME));
        Ok(leaf)
    }

    fn mint(&self, names: &[String]) -> Result<CertifiedKey, TlsError> {
        let err = |e: rcgen::Error| TlsError::Ca(e.to_string());
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e: rcgen::Error| TlsError::Ca(format!("{n:?}: {e}"))),
            })
            .collect::<Result<_, _>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        // A little before now: clocks on the host's clients may run behind.
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(LEAF_LIFETIME.as_secs() as i64);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
            key.serialize_der().into(),
        ))
        .map_err(|e| TlsError::Ca(e.to_string()))?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.der.clone()],
            signer,
        ))
    }
}

/// The certificates of the host CA and of every retired one (to keep out of the roots the
/// proxy trusts for gateways, and to take out of the system store on uninstall).
pub fn all_ca_pems(state_dir: &Path) -> Vec<(PathBuf, String)> {
    let dir = keys_dir(state_dir);
    let mut out = Vec::new();
    if let Ok(pem) = fs::read_to_string(dir.join(CA_CERT)) {
        out.push((dir.join(CA_CERT), pem));
    }
    if let Ok(entries) = fs::read_dir(dir.join(RETIRED_DIR)) {
        for e in entries.flatten() {
            if let Ok(pem) = fs::read_to_string(e.path()) {
                out.push((e.path(), pem));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_root_only_and_leaves_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        let ca = HostCa::load_or_create(dir.path(), &[]).unwrap();
        let key = dir.path().join("keys").join(CA_KEY);
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = HostCa::load_or_create(dir.path(), &[]).unwrap();
        assert_eq!(ca.pem(), again.pem(), "made once");
        let a = ca.leaf(&["gw.internal".into(), "10.0.0.5".into()]).unwrap();
        let b = ca.leaf(&["10.0.0.5".into(), "gw.internal".into()]).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "cached by the set of names");
        assert_eq!(a.cert.len(), 2, "the leaf and the CA");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = HostCa::load_or_create(dir.path(), &[]).err().unwrap();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn name_constraints_bound_what_leaves_may_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = HostCa::load_or_create(dir.path(), &["*.internal".into(), "mcp-gw.corp".into()])
            .unwrap();
        assert!(ca.permits("a.internal") && ca.permits("mcp-gw.corp"));
        assert!(!ca.permits("bank.example") && !ca.permits("xinternal"));
        assert!(ca.leaf(&["gw.internal".into()]).is_ok());
        let err = ca.leaf(&["bank.example".into()]).err().unwrap();
        assert!(matches!(err, TlsError::NameNotPermitted(_)), "{err}");
    }

    #[test]
    fn rotation_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let old = HostCa::load_or_create(dir.path(), &[]).unwrap();
        let kept = HostCa::rotate(dir.path(), &[]).unwrap();
        let new = HostCa::load_or_create(dir.path(), &[]).unwrap();
        assert_ne!(old.pem(), new.pem());
        assert_eq!(fs::read_to_string(kept).unwrap(), old.pem());
        assert_eq!(all_ca_pems(dir.path()).len(), 2);
    }
}
