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
}

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
        Ok(TlsContext {
            ca,
            roots: Arc::new(roots),
            default_mode,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            own,
        })
    }

    /// The client configuration for a gateway: the roots, plus its own extra ones.
    fn client_config(
        &self,
        gateway: Option<&GatewayConfig>,
        alpn: &[Vec<u8>],
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = match gateway.and_then(|g| g.upstream_ca_file.as_deref()) {
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
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Upstream(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match gateway.and_then(|g| {
            g.client_cert_file
                .as_deref()
                .zip(g.client_key_file.as_deref())
        }) {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let (chain, key) = read_client_identity(cert, key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::ClientCert {
                        path: cert.to_path_buf(),
                        why: e.to_string(),
                    })?
            }
        };
        config.alpn_protocols = alpn.to_vec();
        Ok(Arc::new(config))
    }
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
    // Only HTTP/1.1 is spoken on either side so far: mirror that much of the offer.
    let alpn: Vec<Vec<u8>> = hello
        .alpn
        .iter()
        .filter(|p| p.as_str() == "http/1.1")
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
    let config = match ctx.client_config(gateway, &alpn) {
        Ok(c) => c,
        Err(e) => return fail(e, &info),
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    // Each handshake is bounded: a gateway or a client that stalls in it must not hold a
    // task and two sockets for ever.
    let upstream =
        match tokio::time::timeout(handshake_timeout, connector.connect(name.clone(), tcp)).await {
            Ok(Ok(s)) => s,
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
        match session.peer_certificates().and_then(|c| c.first()) {
            Some(der) => describe_cert(der),
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
        upstream: Box::new(upstream),
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
