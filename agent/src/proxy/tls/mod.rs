//! TLS to the gateways. A connection whose first bytes are a TLS ClientHello is either
//! terminated (the default: the gateway is reached and verified first, then the client's
//! handshake is finished with a leaf from the host CA, and the plaintext goes through the
//! same HTTP pipeline as plain traffic) or passed through (relayed untouched, with what the
//! two hellos said recorded). A gateway that cannot be verified refuses the client: never an
//! unverified relay.
#![forbid(unsafe_code)]

pub mod ca;
pub mod hello;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite};

use self::ca::HostCa;
use self::hello::{ClientHelloInfo, Hello, MAX_RECORD};
use super::http::gateway::{BoxIo, Connect, Io};
use crate::audit::record::{Tls, UpstreamCert};
use crate::policy::tls::{GatewayConfig, Mode};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the host CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the host CA key {path} is readable by others (mode {mode:o}): run `chmod 600 {path}`, or `mcptrail ca rotate` if it may have leaked"
    )]
    CaKeyOpen { path: PathBuf, mode: u32 },
    #[error("the host CA: {0}")]
    Ca(String),
    #[error(
        "no host CA in {0} yet: it is made when the agent first runs (`mcptrail run`, with the policy's `[tls] ca_name_constraints`), or by `mcptrail ca rotate --policy FILE`"
    )]
    NoCa(PathBuf),
    #[error(
        "the host CA's name constraints do not allow {0:?}: add it to `[tls] ca_name_constraints` and run `mcptrail ca rotate`, or pass this gateway through"
    )]
    NameNotPermitted(String),
    #[error("reading the roots in {path}: {why}; it must be a PEM bundle of CA certificates")]
    Roots { path: PathBuf, why: String },
    #[error(
        "the client key {path} for a gateway is readable by others (mode {mode:o}): run `chmod 600 {path}`"
    )]
    ClientKeyOpen { path: PathBuf, mode: u32 },
    #[error("the client certificate or key {path}: {why}")]
    ClientCert { path: PathBuf, why: String },
    #[error("the ClientHello: {0}")]
    Hello(String),
    #[error("the client's TLS hello did not arrive within {0:?}")]
    HelloTimeout(Duration),
    #[error("reading the client's TLS hello failed: {0}")]
    HelloIo(#[source] std::io::Error),
    #[error("the gateway's TLS: {0}")]
    Upstream(String),
    #[error("the client's TLS: {0}")]
    Client(String),
}

impl TlsError {
    /// Which side's handshake failed, for the `tls_failure` record.
    pub fn side(&self) -> &'static str {
        match self {
            TlsError::Upstream(_)
            | TlsError::Roots { .. }
            | TlsError::NameNotPermitted(_)
            | TlsError::ClientKeyOpen { .. }
            | TlsError::ClientCert { .. } => "upstream",
            _ => "client",
        }
    }
}

impl TlsError {
    /// The failure in a word from a short, fixed list: a metric label that a client cannot
    /// grow without bound, unlike the message.
    pub fn reason_class(&self) -> &'static str {
        let text = match self {
            TlsError::Hello(_) => return "bad_hello",
            TlsError::HelloTimeout(_) => return "hello_timeout",
            TlsError::HelloIo(_) => return "hello_io",
            TlsError::NameNotPermitted(_) => return "name_not_permitted",
            TlsError::Roots { .. }
            | TlsError::ClientKeyOpen { .. }
            | TlsError::ClientCert { .. } => {
                return "configuration";
            }
            TlsError::CaFile { .. }
            | TlsError::CaKeyOpen { .. }
            | TlsError::Ca(_)
            | TlsError::NoCa(_) => {
                return "host_ca";
            }
            TlsError::Upstream(t) | TlsError::Client(t) => t,
        };
        if text.contains("UnknownIssuer") {
            "unknown_issuer"
        } else if text.contains("UnknownCA")
            || text.contains("unknown ca")
            || text.contains("BadCertificate")
        {
            "client_distrusts_host_ca"
        } else if text.contains("Expired") {
            "expired"
        } else if text.contains("NotValidForName") {
            "name_mismatch"
        } else if text.contains(CERTIFICATE_REQUIRED)
            || text.contains("CertificateRequired")
            || text.contains("certificate required")
        {
            "certificate_required"
        } else if text.contains("timed out") || text.contains("did not") {
            "timeout"
        } else {
            "handshake"
        }
    }
}

/// What the agent keeps for TLS: the host CA, the roots gateways are checked against, and
/// the mode when no `[[tls.gateways]]` entry says.
pub struct TlsContext {
    pub ca: HostCa,
    /// The system's roots plus `--upstream-ca`, never the host CA (nor a retired one).
    roots: Arc<RootCertStore>,
    pub default_mode: Mode,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The host CA and retired ones, DER: kept out of every set of roots.
    own: Vec<Vec<u8>>,
    /// For gateways with no files of their own: the roots above, no client certificate.
    plain_upstream: Arc<Upstream>,
    /// For gateways with their own roots or client certificate, by what their files were
    /// when read: a file that changes is read again, one that does not is read once.
    upstreams: std::sync::Mutex<lru::LruCache<UpstreamKey, Arc<Upstream>>>,
    /// The clients' sessions, shared by every connection's server configuration, so that a
    /// client that reconnects resumes instead of doing a full handshake again.
    client_sessions: Arc<dyn rustls::server::StoresServerSessions>,
}

/// What connections to gateways with the same files share: the verifier (the roots), the
/// client certificate, and the sessions to resume.
struct Upstream {
    verifier: Arc<rustls::client::WebPkiServerVerifier>,
    auth: Arc<ClientAuth>,
    /// Per verifier: a session is resumed only with the roots that verified it.
    sessions: Arc<dyn rustls::client::ClientSessionStore>,
}

/// A file as it was when read: its path, inode, owner, mode, length and change times (a
/// `chown` or `chmod` changes it too, so the root-only check runs again).
#[derive(Clone, PartialEq, Eq, Hash)]
struct Stamp(PathBuf, [u64; 4], [i64; 4]);

impl Stamp {
    fn of(path: &Path) -> Result<Stamp, std::io::Error> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path)?;
        Ok(Stamp(
            path.to_path_buf(),
            [
                m.ino(),
                m.len(),
                u64::from(m.uid()) << 32 | u64::from(m.gid()),
                u64::from(m.mode()),
            ],
            [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()],
        ))
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct UpstreamKey {
    roots: Option<Stamp>,
    identity: Option<(Stamp, Stamp)>,
}

/// How many sets of gateway files are kept read, and how many sessions each side keeps.
const UPSTREAMS_KEPT: usize = 64;
const SESSIONS_KEPT: usize = 4096;

/// Answers a gateway's request for a client certificate with the configured one (or none).
/// One per [`Upstream`]: rustls resumes a session only with the resolver (and verifier) that
/// made it. Whether a connection's gateway asked is told through [`ASKED`], set by the task
/// whose handshake this is.
#[derive(Debug)]
struct ClientAuth {
    identity: Option<Arc<rustls::sign::CertifiedKey>>,
}

tokio::task_local! {
    /// Set while a gateway handshake runs: whether the gateway asked for a certificate.
    static ASKED: std::cell::Cell<bool>;
}

impl rustls::client::ResolvesClientCert for ClientAuth {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        // Outside a scope (a reconnect), nobody is waiting to know.
        let _ = ASKED.try_with(|a| a.set(true));
        self.identity.clone()
    }

    fn has_certs(&self) -> bool {
        self.identity.is_some()
    }
}

/// The refusal of a gateway that asks for a client certificate when none is configured.
const CERTIFICATE_REQUIRED: &str = "the gateway asks for a client certificate and none is configured for it: set `client_cert_file` and `client_key_file` in its `[[tls.gateways]]` entry, or pass it through (`mode = \"passthrough\"`)";

/// Reads a PEM bundle of certificates.
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject as _;
    let err = |why: String| TlsError::Roots {
        path: path.to_path_buf(),
        why,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in it".into()));
    }
    Ok(certs)
}

impl TlsContext {
    /// Loads (or makes) the host CA, and the roots: the system's (as rustls-native-certs
    /// finds them, so internal CAs installed on the host count) and `extra` files.
    pub fn new(
        state_dir: &Path,
        default_mode: Mode,
        extra: &[PathBuf],
        constraints: &[String],
    ) -> Result<Self, TlsError> {
        let ca = HostCa::load_or_create(state_dir, constraints)?;
        // The host CA may be in the system store (`ca install`): a gateway must never be
        // trusted because the agent itself vouched for it.
        let own: Vec<Vec<u8>> = ca::all_ca_pems(state_dir)
            .iter()
            .filter_map(|(_, pem)| {
                use rustls::pki_types::pem::PemObject as _;
                CertificateDer::from_pem_slice(pem.as_bytes()).ok()
            })
            .map(|d| d.to_vec())
            .collect();
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "a system root could not be read");
        }
        let (added, _) = roots.add_parsable_certificates(
            native
                .certs
                .into_iter()
                .filter(|c| !own.iter().any(|o| o[..] == c[..])),
        );
        for path in extra {
            // A bundle that holds the host CA (the system's, after `ca install`) must not
            // make the agent trust its own leaves as gateways.
            for cert in read_pem_certs(path)?
                .into_iter()
                .filter(|c| !own.iter().any(|o| o[..] == c[..]))
            {
                roots.add(cert).map_err(|e| TlsError::Roots {
                    path: path.clone(),
                    why: e.to_string(),
                })?;
            }
        }
        tracing::info!(
            system_roots = added,
            extra = extra.len(),
            "TLS: gateways are checked against the system's roots and the extra ones"
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(roots);
        let plain_upstream = Arc::new(Upstream {
            verifier: verifier(roots.clone(), &provider).map_err(|why| TlsError::Roots {
                path: PathBuf::from("(the system's roots)"),
                why,
            })?,
            auth: Arc::new(ClientAuth { identity: None }),
            sessions: Arc::new(rustls::client::ClientSessionMemoryCache::new(SESSIONS_KEPT)),
        });
        Ok(TlsContext {
            ca,
            roots,
            default_mode,
            provider,
            own,
            plain_upstream,
            upstreams: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(UPSTREAMS_KEPT).expect("not zero"),
            )),
            client_sessions: rustls::server::ServerSessionMemoryCache::new(SESSIONS_KEPT),
        })
    }

    /// What a gateway's connections share: read from its files the first time, and again
    /// only when one of them changes (a stat per connection, no read).
    fn upstream(&self, gateway: Option<&GatewayConfig>) -> Result<Arc<Upstream>, TlsError> {
        let ca_file = gateway.and_then(|g| g.upstream_ca_file.as_deref());
        let identity_files = gateway.and_then(|g| {
            g.client_cert_file
                .as_deref()
                .zip(g.client_key_file.as_deref())
        });
        if ca_file.is_none() && identity_files.is_none() {
            return Ok(self.plain_upstream.clone());
        }
        let key = UpstreamKey {
            roots: ca_file
                .map(|p| {
                    Stamp::of(p).map_err(|e| TlsError::Roots {
                        path: p.to_path_buf(),
                        why: e.to_string(),
                    })
                })
                .transpose()?,
            identity: identity_files
                .map(|(c, k)| {
                    let stamp = |p: &Path| {
                        Stamp::of(p).map_err(|e| TlsError::ClientCert {
                            path: p.to_path_buf(),
                            why: e.to_string(),
                        })
                    };
                    Ok::<_, TlsError>((stamp(c)?, stamp(k)?))
                })
                .transpose()?,
        };
        if let Some(u) = self
            .upstreams
            .lock()
            .expect("upstream cache lock")
            .get(&key)
        {
            return Ok(u.clone());
        }
        let roots = match ca_file {
            None => self.roots.clone(),
            Some(path) => {
                let mut more = (*self.roots).clone();
                for cert in read_pem_certs(path)?
                    .into_iter()
                    .filter(|c| !self.own.iter().any(|o| o[..] == c[..]))
                {
                    more.add(cert).map_err(|e| TlsError::Roots {
                        path: path.to_path_buf(),
                        why: e.to_string(),
                    })?;
                }
                Arc::new(more)
            }
        };
        let verifier = verifier(roots, &self.provider).map_err(|why| TlsError::Roots {
            path: ca_file.map(Path::to_path_buf).unwrap_or_default(),
            why,
        })?;
        let identity = match identity_files {
            None => None,
            Some((cert, key)) => {
                let (chain, key_der) = read_client_identity(cert, key)?;
                let signer = self
                    .provider
                    .key_provider
                    .load_private_key(key_der)
                    .map_err(|e| TlsError::ClientCert {
                        path: key.to_path_buf(),
                        why: e.to_string(),
                    })?;
                let certified = rustls::sign::CertifiedKey::new(chain, signer);
                certified.keys_match().map_err(|e| TlsError::ClientCert {
                    path: cert.to_path_buf(),
                    why: format!("the key does not belong to the certificate: {e}"),
                })?;
                Some(Arc::new(certified))
            }
        };
        let upstream = Arc::new(Upstream {
            verifier,
            auth: Arc::new(ClientAuth { identity }),
            sessions: Arc::new(rustls::client::ClientSessionMemoryCache::new(SESSIONS_KEPT)),
        });
        self.upstreams
            .lock()
            .expect("upstream cache lock")
            .put(key, upstream.clone());
        Ok(upstream)
    }

    /// The client configuration for one connection to a gateway (what its connections share
    /// and the ALPN offer), and whether a client certificate is configured for it.
    fn client_config(
        &self,
        gateway: Option<&GatewayConfig>,
        alpn: &[Vec<u8>],
    ) -> Result<(Arc<ClientConfig>, bool), TlsError> {
        let upstream = self.upstream(gateway)?;
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Upstream(e.to_string()))?
            .with_webpki_verifier(upstream.verifier.clone())
            .with_client_cert_resolver(upstream.auth.clone());
        config.resumption = rustls::client::Resumption::store(upstream.sessions.clone());
        config.alpn_protocols = alpn.to_vec();
        Ok((Arc::new(config), upstream.auth.identity.is_some()))
    }
}

fn verifier(
    roots: Arc<RootCertStore>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::client::WebPkiServerVerifier>, String> {
    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| e.to_string())
}

/// A gateway's client certificate chain and key: the key must be root's alone, like every
/// credential the agent brokers.
fn read_client_identity(
    cert: &Path,
    key: &Path,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    TlsError,
> {
    use rustls::pki_types::pem::PemObject as _;
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(key).map_err(|e| TlsError::ClientCert {
        path: key.to_path_buf(),
        why: e.to_string(),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::ClientKeyOpen {
            path: key.to_path_buf(),
            mode,
        });
    }
    let chain = read_pem_certs(cert).map_err(|e| TlsError::ClientCert {
        path: cert.to_path_buf(),
        why: e.to_string(),
    })?;
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::ClientCert {
            path: key.to_path_buf(),
            why: e.to_string(),
        })?;
    Ok((chain, key))
}

/// Reads the rest of the client's first TLS record (the ClientHello) after `first`.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut first: Vec<u8>,
    timeout: Duration,
) -> Result<(ClientHelloInfo, Vec<u8>), TlsError> {
    let read = async {
        loop {
            match hello::client_hello(&first) {
                Hello::Parsed(info) => return Ok(info),
                Hello::Invalid(why) => return Err(TlsError::Hello(why)),
                Hello::NeedMore(n) if n > MAX_RECORD => {
                    return Err(TlsError::Hello("a record longer than TLS allows".into()));
                }
                Hello::NeedMore(n) => {
                    let at = first.len();
                    first.resize(n, 0);
                    let got = stream
                        .read(&mut first[at..])
                        .await
                        .map_err(TlsError::HelloIo)?;
                    first.truncate(at + got);
                    if got == 0 {
                        return Err(TlsError::Hello(
                            "the client closed the connection inside its hello".into(),
                        ));
                    }
                }
            }
        }
    };
    let info = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| TlsError::HelloTimeout(timeout))??;
    Ok((info, first))
}

/// A terminated connection: the client's side decrypted, the gateway's too, ready for the
/// HTTP pipeline.
pub struct Terminated {
    pub client: BoxIo,
    pub upstream: BoxIo,
    /// Opens another verified TLS connection to the same gateway.
    pub connect: Connect,
    pub info: Tls,
}

/// A handshake that failed, and what was learnt of the connection before it did.
pub struct Failed {
    pub error: TlsError,
    pub info: Tls,
}

/// The name to ask the gateway for: the client's SNI, else the configured one, else the
/// target's host name, else its address.
fn upstream_name(
    sni: Option<&str>,
    gateway: Option<&GatewayConfig>,
    target: Option<&str>,
    dst: SocketAddr,
) -> Result<ServerName<'static>, TlsError> {
    let target_host = target
        .and_then(|t| t.rsplit_once(':').map(|(h, _)| h))
        .filter(|h| *h != "*" && h.parse::<IpAddr>().is_err() && !h.starts_with('['));
    let name = sni
        .or(gateway.and_then(|g| g.server_name.as_deref()))
        .or(target_host);
    match name {
        Some(n) => ServerName::try_from(n.to_owned())
            .map_err(|e| TlsError::Upstream(format!("{n:?} is not a server name: {e}"))),
        None => Ok(ServerName::IpAddress(dst.ip().into())),
    }
}

/// What the gateway's leaf says, for the record and for the client's leaf.
fn describe_cert(der: &CertificateDer<'_>) -> (UpstreamCert, Vec<String>) {
    let sha256 = hex::encode(Sha256::digest(der));
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return (
            UpstreamCert {
                sha256,
                verified: true,
                ..Default::default()
            },
            Vec::new(),
        );
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                    4 => names.push(IpAddr::from(<[u8; 4]>::try_from(*ip).expect("4")).to_string()),
                    16 => {
                        names.push(IpAddr::from(<[u8; 16]>::try_from(*ip).expect("16")).to_string())
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let not_after = cert
        .validity()
        .not_after
        .to_rfc2822()
        .ok()
        .and_then(|t| chrono::DateTime::parse_from_rfc2822(&t).ok())
        .map(|t| crate::audit::record::rfc3339(t.with_timezone(&chrono::Utc)))
        .unwrap_or_default();
    (
        UpstreamCert {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            sans: names.clone(),
            not_after,
            sha256,
            verified: true,
            resumed: false,
        },
        names,
    )
}

/// Why a rustls handshake failed, in words an operator can act on.
fn explain(side: &str, e: &std::io::Error) -> String {
    let text = e.to_string();
    let hint = if text.contains("UnknownIssuer") {
        match side {
            "upstream" => {
                "; the gateway's certificate is not signed by a root this host trusts: install its CA in the system store, or give it with --upstream-ca or `upstream_ca_file`"
            }
            _ => "",
        }
    } else if text.contains("UnknownCA")
        || text.contains("unknown ca")
        || text.contains("BadCertificate")
    {
        "; the client does not trust the host CA: `mcptrail ca install` (and the runtime's variable, see README)"
    } else if text.contains("Expired") {
        "; the gateway's certificate has expired"
    } else if text.contains("NotValidForName") {
        "; the gateway's certificate does not name the server the client asked for"
    } else if text.contains("CertificateRequired") || text.contains("certificate required") {
        "; the gateway asks for a client certificate: configure `client_cert_file` and `client_key_file` for it in `[[tls.gateways]]`, or pass it through (`mode = \"passthrough\"`)"
    } else {
        ""
    };
    format!("{text}{hint}")
}

/// Terminates a TLS connection: the gateway first (over `tcp`, verified), then the client
/// (`client` replays the hello already read), with a leaf for the names the gateway's
/// certificate carries.
#[allow(clippy::too_many_arguments)]
pub async fn terminate<C: Io>(
    ctx: &Arc<TlsContext>,
    client: C,
    tcp: BoxIo,
    connect_tcp: Connect,
    hello: &ClientHelloInfo,
    gateway: Option<&GatewayConfig>,
    target: Option<&str>,
    dst: SocketAddr,
    handshake_timeout: Duration,
) -> Result<Terminated, Box<Failed>> {
    let mut info = Tls {
        mode: Mode::Terminate.as_str().to_owned(),
        sni: hello.sni.clone(),
        alpn_offered: hello.alpn.clone(),
        ..Default::default()
    };
    // The client's offer, as far as the proxy speaks it (HTTP/2 and HTTP/1.1), goes to the
    // gateway; the client is then offered only what the gateway chose, so both sides speak
    // the same version and nothing is translated.
    let alpn: Vec<Vec<u8>> = hello
        .alpn
        .iter()
        .filter(|p| matches!(p.as_str(), "h2" | "http/1.1"))
        .map(|p| p.as_bytes().to_vec())
        .collect();
    let fail = |error: TlsError, info: &Tls| {
        Err(Box::new(Failed {
            error,
            info: info.clone(),
        }))
    };
    let name = match upstream_name(hello.sni.as_deref(), gateway, target, dst) {
        Ok(n) => n,
        Err(e) => return fail(e, &info),
    };
    let (config, has_identity) = match ctx.client_config(gateway, &alpn) {
        Ok(c) => c,
        Err(e) => return fail(e, &info),
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    // Each handshake is bounded: a gateway or a client that stalls in it must not hold a
    // task and two sockets for ever.
    let started = std::time::Instant::now();
    let (handshake, asked) = ASKED
        .scope(std::cell::Cell::new(false), async {
            let r =
                tokio::time::timeout(handshake_timeout, connector.connect(name.clone(), tcp)).await;
            (r, ASKED.with(|a| a.get()))
        })
        .await;
    let asked_without_certificate = asked && !has_identity;
    let upstream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if asked_without_certificate => {
            return fail(
                TlsError::Upstream(format!("{CERTIFICATE_REQUIRED} ({e})")),
                &info,
            );
        }
        Ok(Err(e)) => return fail(TlsError::Upstream(explain("upstream", &e)), &info),
        Err(_) => {
            return fail(
                TlsError::Upstream(format!(
                    "the gateway's handshake took longer than {handshake_timeout:?}"
                )),
                &info,
            );
        }
    };
    // In TLS 1.3 a gateway judges the client's (empty) certificate only after the client's
    // handshake is over: its refusal is an alert that follows. When it asked and got none,
    // wait for that verdict (twice the handshake's time, at least 20 ms, at most 1 s) rather
    // than take the client on and answer its first call with a 502. A gateway for which the
    // certificate is optional says nothing, and the connection goes on.
    let mut upstream = upstream;
    let mut early = Vec::new();
    if asked_without_certificate {
        use tokio::io::AsyncReadExt as _;
        let wait = (started.elapsed() * 2 + Duration::from_millis(20)).min(Duration::from_secs(1));
        let mut buf = vec![0u8; 16 * 1024];
        match tokio::time::timeout(wait, upstream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) => {
                return fail(
                    TlsError::Upstream(format!(
                        "{CERTIFICATE_REQUIRED} (it closed the connection)"
                    )),
                    &info,
                );
            }
            Ok(Ok(n)) => early.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => {
                return fail(
                    TlsError::Upstream(format!("{CERTIFICATE_REQUIRED} ({e})")),
                    &info,
                );
            }
        }
    }
    let (conn_info, names) = {
        let (_, session) = upstream.get_ref();
        info.version = session
            .protocol_version()
            .map(|v| format!("{v:?}").replace('_', "."));
        // IANA names, as passthrough records them from the ServerHello.
        info.cipher = session.negotiated_cipher_suite().map(|c| {
            let id = u16::from(c.suite());
            tls_parser::TlsCipherSuite::from_id(id)
                .map_or_else(|| format!("0x{id:04x}"), |s| s.name.to_owned())
        });
        info.alpn = session
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        match session.peer_certificates().and_then(|c| c.first()) {
            Some(der) => {
                let (mut cert, names) = describe_cert(der);
                cert.resumed = resumed;
                (cert, names)
            }
            None => {
                return fail(
                    TlsError::Upstream("the gateway sent no certificate".into()),
                    &info,
                );
            }
        }
    };
    info.upstream = Some(conn_info);
    // The client's leaf names what the gateway's names, and what the client asked for.
    let mut leaf_names = names;
    match &hello.sni {
        Some(sni) => leaf_names.push(sni.clone()),
        None => leaf_names.push(dst.ip().to_string()),
    }
    let leaf = match ctx.ca.leaf(&leaf_names) {
        Ok(l) => l,
        Err(e) => return fail(e, &info),
    };
    let mut server = ServerConfig::builder_with_provider(ctx.provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            Box::new(Failed {
                error: TlsError::Client(e.to_string()),
                info: info.clone(),
            })
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(leaf)));
    server.alpn_protocols = info.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // Sessions shared across connections: a client resumes (rustls resumes only for the same
    // SNI, and a client offers a session only to the server name it got it from).
    server.session_storage = ctx.client_sessions.clone();
    let acceptor =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client);
    let accepted = tokio::time::timeout(handshake_timeout, async {
        let start = acceptor.await?;
        start.into_stream(Arc::new(server)).await
    })
    .await;
    let client = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(TlsError::Client(explain("client", &e)), &info),
        Err(_) => {
            return fail(
                TlsError::Client(format!(
                    "the client's handshake took longer than {handshake_timeout:?}"
                )),
                &info,
            );
        }
    };
    let again = {
        let connector = connector.clone();
        Arc::new(move || {
            let (connector, name, connect_tcp) =
                (connector.clone(), name.clone(), connect_tcp.clone());
            Box::pin(async move {
                let tcp = connect_tcp().await?;
                let tls = tokio::time::timeout(handshake_timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                Ok(Box::new(tls) as BoxIo)
            })
                as std::pin::Pin<
                    Box<dyn std::future::Future<Output = std::io::Result<BoxIo>> + Send>,
                >
        }) as Connect
    };
    Ok(Terminated {
        client: Box::new(client),
        upstream: if early.is_empty() {
            Box::new(upstream)
        } else {
            Box::new(crate::proxy::detect::Rewind::new(early, upstream))
        },
        connect: again,
        info,
    })
}

/// Relays a passed-through connection and says what the gateway's hello chose.
pub async fn passthrough<C, U>(
    client: C,
    mut upstream: U,
    hello: &ClientHelloInfo,
    hello_timeout: Duration,
) -> (Tls, std::io::Result<()>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut info = Tls {
        mode: Mode::Passthrough.as_str().to_owned(),
        sni: hello.sni.clone(),
        alpn_offered: hello.alpn.clone(),
        ..Default::default()
    };
    // The client's hello goes first (it is in `client`'s replay); the gateway's answer is
    // read here, looked at, and passed on before the bytes flow both ways.
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let mut to_gateway = Vec::new();
    let mut from_gateway = Vec::new();
    let result: std::io::Result<()> = async {
        use tokio::io::AsyncWriteExt as _;
        // The replayed hello (and whatever else the client sent) reaches the gateway.
        // Room for the whole replayed hello in one read: the gateway answers only once it has it.
        let mut buf = vec![0u8; MAX_RECORD + 1024];
        let n = client_r.read(&mut buf).await?;
        to_gateway.extend_from_slice(&buf[..n]);
        upstream.write_all(&to_gateway).await?;
        loop {
            match hello::server_hello(&from_gateway) {
                Hello::Parsed(s) => {
                    info.version = Some(s.version);
                    info.cipher = Some(s.cipher);
                    info.alpn = s.alpn;
                    break;
                }
                Hello::Invalid(why) => {
                    tracing::debug!(%why, "a passed-through gateway's first bytes are not a ServerHello");
                    break;
                }
                Hello::NeedMore(want) if want > MAX_RECORD || from_gateway.len() >= want => break,
                Hello::NeedMore(_) => {
                    let n = tokio::time::timeout(hello_timeout, upstream.read(&mut buf))
                        .await
                        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                    if n == 0 {
                        break;
                    }
                    from_gateway.extend_from_slice(&buf[..n]);
                }
            }
        }
        client_w.write_all(&from_gateway).await?;
        let client = client_r.unsplit(client_w);
        super::relay::relay(client, upstream, &super::relay::Counts::default()).await
    }
    .await;
    (info, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_name_comes_from_sni_then_config_then_target() {
        let dst: SocketAddr = "10.0.0.5:8443".parse().unwrap();
        let n = upstream_name(Some("gw.corp"), None, Some("other:8443"), dst).unwrap();
        assert_eq!(n.to_str(), "gw.corp");
        let n = upstream_name(None, None, Some("mcp-gw.internal:8443"), dst).unwrap();
        assert_eq!(n.to_str(), "mcp-gw.internal");
        let n = upstream_name(None, None, Some("*:8443"), dst).unwrap();
        assert_eq!(n, ServerName::IpAddress(dst.ip().into()));
    }
}
