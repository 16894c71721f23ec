//! An issuer's signing keys: a JWKS from a file or an HTTP(S) URL, cached, refreshed on a
//! schedule and when a token names a `kid` the cache does not have (key rotation), with a
//! floor between refreshes so that tokens with made-up kids cannot hammer the issuer.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};

/// A JWKS larger than this is refused.
const JWKS_MAX: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read the JWKS file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "fetching the JWKS from {url} failed: {why}; check the URL and that the issuer is reachable from this host"
    )]
    Fetch { url: String, why: String },
    #[error("the JWKS from {source_name} is not a valid JWK set: {why}")]
    Parse { source_name: String, why: String },
    #[error("the JWKS URL {0} is neither https:// nor http://")]
    Scheme(String),
    #[error("cannot use the CA file {path} for the JWKS URL: {why}")]
    Ca { path: PathBuf, why: String },
}

#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    /// An http or https URL; https with the TLS settings to use.
    Url {
        uri: hyper::Uri,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
}

impl Source {
    /// An `https://` URL is checked against `ca_file` (a PEM bundle: the issuer's internal
    /// CA, say) when given, else against the Mozilla roots (webpki-roots).
    pub fn parse_url(url: &str, ca_file: Option<&Path>) -> Result<Source, JwksError> {
        let uri: hyper::Uri = url.parse().map_err(|e| JwksError::Fetch {
            url: url.to_owned(),
            why: format!("not a URL: {e}"),
        })?;
        if uri.host().is_none() {
            return Err(JwksError::Scheme(url.to_owned()));
        }
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => Some(Arc::new(tls_config(ca_file)?)),
            _ => return Err(JwksError::Scheme(url.to_owned())),
        };
        Ok(Source::Url { uri, tls })
    }

    fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Url { uri, .. } => uri.to_string(),
        }
    }
}

fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, JwksError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let ca_err = |why: String| JwksError::Ca {
                path: path.to_path_buf(),
                why,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_err(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_err(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_err(
                    "no certificate in it (a PEM bundle is expected)".into(),
                ));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A key usable for verification, and the algorithm its JWK pins, if it pins one.
#[derive(Clone)]
pub struct Key {
    pub key: DecodingKey,
    pub alg: Option<Algorithm>,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, Key>,
    /// Keys without a `kid`, usable only when the set has a single key.
    unnamed: Vec<Key>,
    loaded: bool,
    last_error: Option<String>,
    last_attempt: Option<Instant>,
}

/// What a lookup found.
pub enum Lookup {
    Found(Key),
    /// The set is loaded but has no such key (`kid` absent: several keys, none chosen).
    Missing(String),
    /// The set could not be loaded.
    Unavailable(String),
}

pub struct Jwks {
    source: Source,
    min_refresh: Duration,
    state: tokio::sync::RwLock<State>,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
}

impl Jwks {
    pub fn new(source: Source, min_refresh: Duration) -> Self {
        Jwks {
            source,
            min_refresh,
            state: tokio::sync::RwLock::default(),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn source_name(&self) -> String {
        self.source.name()
    }

    /// Loads the set now. Returns whether the keys changed.
    pub async fn refresh(&self) -> Result<bool, JwksError> {
        let _one = self.refreshing.lock().await;
        self.state.write().await.last_attempt = Some(Instant::now());
        let loaded = match &self.source {
            Source::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    std::fs::read(&path).map_err(|source| JwksError::Read { path, source })
                })
                .await
                .expect("reading a file does not panic")
            }
            Source::Url { uri, tls } => fetch(uri, tls.clone()).await,
        }
        .and_then(|bytes| parse(&bytes, &self.source.name()));
        let mut state = self.state.write().await;
        match loaded {
            Ok((keys, unnamed)) => {
                let changed = !state.loaded
                    || state.keys.len() != keys.len()
                    || keys.keys().any(|k| !state.keys.contains_key(k))
                    || state.unnamed.len() != unnamed.len();
                state.keys = keys;
                state.unnamed = unnamed;
                state.loaded = true;
                state.last_error = None;
                Ok(changed)
            }
            Err(e) => {
                // The last good set stays in use.
                state.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// The key for a token's `kid`, refreshing once if the set does not have it and the
    /// last attempt is older than the floor.
    pub async fn lookup(&self, kid: Option<&str>) -> (Lookup, bool) {
        let first = self.find(kid).await;
        if matches!(first, Lookup::Found(_)) {
            return (first, false);
        }
        let due = self
            .state
            .read()
            .await
            .last_attempt
            .is_none_or(|t| t.elapsed() >= self.min_refresh);
        if !due {
            return (first, false);
        }
        let changed = match self.refresh().await {
            Ok(changed) => changed,
            Err(e) => {
                tracing::warn!(error = %e, "refreshing an issuer's keys failed; the last good keys stay in use");
                false
            }
        };
        (self.find(kid).await, changed)
    }

    async fn find(&self, kid: Option<&str>) -> Lookup {
        let state = self.state.read().await;
        if !state.loaded {
            return Lookup::Unavailable(
                state
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the keys were never loaded".into()),
            );
        }
        match kid {
            Some(kid) => state.keys.get(kid).cloned().map_or_else(
                || {
                    Lookup::Missing(format!(
                        "kid {kid:?} is not among the {} keys of {}",
                        state.keys.len(),
                        self.source.name()
                    ))
                },
                Lookup::Found,
            ),
            None => {
                let all: Vec<&Key> = state.keys.values().chain(state.unnamed.iter()).collect();
                match all.as_slice() {
                    [only] => Lookup::Found((*only).clone()),
                    _ => Lookup::Missing(format!(
                        "the token names no kid and {} has {} keys",
                        self.source.name(),
                        all.len()
                    )),
                }
            }
        }
    }
}

type Parsed = (HashMap<String, Key>, Vec<Key>);

/// Parses a JWK set. Keys of kinds this build cannot use are skipped, not fatal.
pub fn parse(bytes: &[u8], source_name: &str) -> Result<Parsed, JwksError> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| JwksError::Parse {
        source_name: source_name.to_owned(),
        why: e.to_string(),
    })?;
    let mut keys = HashMap::new();
    let mut unnamed = Vec::new();
    for jwk in &set.keys {
        let key = match DecodingKey::from_jwk(jwk) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(source = source_name, kid = ?jwk.common.key_id, error = %e, "skipping a JWK this build cannot use");
                continue;
            }
        };
        let key = Key {
            key,
            alg: jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse().ok()),
        };
        match &jwk.common.key_id {
            Some(kid) => {
                keys.insert(kid.clone(), key);
            }
            None => unnamed.push(key),
        }
    }
    Ok((keys, unnamed))
}

/// An HTTP/1.1 client connection over `io` (plain or TLS), driven by a task of its own.
async fn http1<IO>(
    io: IO,
) -> Result<
    hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    hyper::Error,
>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn fetch(
    uri: &hyper::Uri,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Vec<u8>, JwksError> {
    let err = |why: String| JwksError::Fetch {
        url: uri.to_string(),
        why,
    };
    let host = uri.host().ok_or_else(|| err("no host".into()))?;
    let port = uri
        .port_u16()
        .unwrap_or(if tls.is_some() { 443 } else { 80 });
    let bare_host = host.trim_matches(['[', ']']);
    let work = async {
        let stream = tokio::net::TcpStream::connect((bare_host, port))
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut sender = match tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(bare_host.to_owned())
                    .map_err(|e| err(format!("not a TLS server name: {e}")))?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, stream)
                    .await
                    .map_err(|e| err(format!("TLS: {e}")))?;
                http1(stream).await
            }
            None => http1(stream).await,
        }
        .map_err(|e| err(e.to_string()))?;
        let authority = uri.authority().map_or(host, |a| a.as_str());
        let req = hyper::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| err(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| err(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(err(format!("the server answered {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), JWKS_MAX)
            .collect()
            .await
            .map_err(|e| err(format!("reading the body: {e}")))?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .map_err(|_| err(format!("no answer within {FETCH_TIMEOUT:?}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sets_and_skips_what_it_cannot_use() {
        let text = r#"{"keys":[
            {"kty":"oct","kid":"h1","k":"c2VjcmV0","alg":"HS256"},
            {"kty":"OKP","crv":"Ed25519","kid":"e1","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","alg":"EdDSA"},
            {"kty":"EC","crv":"P-256","kid":"bad","x":"AA","y":"AA"}
        ]}"#;
        let (keys, unnamed) = parse(text.as_bytes(), "t").unwrap();
        assert!(keys.contains_key("e1"));
        assert_eq!(keys["e1"].alg, Some(Algorithm::EdDSA));
        assert!(unnamed.is_empty());
        assert!(matches!(parse(b"{", "t"), Err(JwksError::Parse { .. })));
    }

    #[test]
    fn http_and_https_urls_only() {
        assert!(Source::parse_url("http://issuer.internal/jwks.json", None).is_ok());
        assert!(Source::parse_url("https://issuer.internal/jwks.json", None).is_ok());
        assert!(matches!(
            Source::parse_url("ftp://x/y", None),
            Err(JwksError::Scheme(_))
        ));
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            Source::parse_url("https://x/y", Some(empty.path())),
            Err(JwksError::Ca { .. })
        ));
    }

    /// An https issuer with its own CA: trusted through `ca_file`, refused without it.
    #[tokio::test]
    async fn https_with_an_internal_ca() {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let ca = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca.path(), ck.cert.pem()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![ck.cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let body = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"e1","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","alg":"EdDSA"}]}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        let url = format!("https://localhost:{port}/jwks.json");
        let trusted = Jwks::new(
            Source::parse_url(&url, Some(ca.path())).unwrap(),
            Duration::ZERO,
        );
        assert!(matches!(
            trusted.lookup(Some("e1")).await.0,
            Lookup::Found(_)
        ));
        let untrusted = Jwks::new(Source::parse_url(&url, None).unwrap(), Duration::ZERO);
        match untrusted.lookup(Some("e1")).await.0 {
            Lookup::Unavailable(why) => assert!(why.contains("TLS"), "{why}"),
            _ => panic!("a certificate from an unknown CA was accepted"),
        }
    }

    #[tokio::test]
    async fn a_missing_file_is_unavailable_and_says_why() {
        let jwks = Jwks::new(
            Source::File("/nonexistent/jwks.json".into()),
            Duration::ZERO,
        );
        let (found, _) = jwks.lookup(Some("k")).await;
        match found {
            Lookup::Unavailable(why) => assert!(why.contains("/nonexistent/jwks.json"), "{why}"),
            _ => panic!("expected unavailable"),
        }
    }
}
