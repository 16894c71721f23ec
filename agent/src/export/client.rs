//! OTLP/HTTP: one protobuf `ExportLogsServiceRequest`, gzipped, POSTed to `/v1/logs`, and
//! what the collector's answer means for the batch (accepted, partly rejected, retry later,
//! failed). One connection is kept and reused; a broken one is replaced at the next send.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{HeaderName, HeaderValue};
use prost::Message as _;

use super::ExportError;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};

/// The most of a collector's answer that is read.
const ANSWER_MAX: usize = 64 * 1024;

/// What the collector said about a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Accepted,
    /// HTTP 200 with a partial success: `rejected` log records were not taken.
    Partial {
        rejected: i64,
        message: String,
    },
    /// 429, 502, 503, 504, or no answer at all: try again, after `after` if it said.
    Retry {
        why: String,
        after: Option<Duration>,
    },
    /// Any other answer: counted, logged, tried again more slowly.
    Failed {
        why: String,
    },
}

/// Where and how to send.
#[derive(Clone)]
pub struct Target {
    pub uri: hyper::Uri,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub timeout: Duration,
}

impl Target {
    /// `http(s)://HOST:PORT[/PATH]`; without a path, the OTLP default `/v1/logs`.
    pub fn new(
        endpoint: &str,
        headers: Vec<(HeaderName, HeaderValue)>,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Self, ExportError> {
        let bad = |why: &str| ExportError::Endpoint {
            endpoint: endpoint.to_owned(),
            why: why.to_owned(),
        };
        let uri: hyper::Uri = endpoint
            .parse()
            .map_err(|_| bad("not a URL; write for example http://collector:4318"))?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => Some(Arc::new(tls_config(ca_file)?)),
            _ => return Err(bad("the scheme must be http or https")),
        };
        if uri.host().is_none() {
            return Err(bad("no host"));
        }
        let path = match uri.path() {
            "" | "/" => "/v1/logs",
            p => p,
        };
        let uri = hyper::Uri::builder()
            .scheme(uri.scheme().expect("checked").clone())
            .authority(uri.authority().expect("a host").clone())
            .path_and_query(path)
            .build()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Target {
            uri,
            headers,
            tls,
            timeout,
        })
    }
}

/// The system's roots (so an internal CA installed on the host works) plus `ca_file`.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ExportError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        for cert in crate::proxy::tls::read_pem_certs(path)? {
            roots.add(cert).map_err(|e| ExportError::Ca {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// `Retry-After`: seconds, or an HTTP date.
pub fn retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// What an HTTP answer means, given its status, `Retry-After` and body.
pub fn classify(status: u16, retry_after_header: Option<&str>, body: &[u8]) -> Outcome {
    let message = || {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.is_empty() {
            format!("the collector answered {status}")
        } else {
            format!(
                "the collector answered {status}: {}",
                text.chars().take(300).collect::<String>()
            )
        }
    };
    match status {
        200..=299 => match ExportLogsServiceResponse::decode(body) {
            Ok(ExportLogsServiceResponse {
                partial_success: Some(p),
            }) if p.rejected_log_records > 0 => Outcome::Partial {
                rejected: p.rejected_log_records,
                message: p.error_message,
            },
            // An empty or undecodable 2xx body is a success, as the OTLP specification says.
            _ => Outcome::Accepted,
        },
        429 | 502 | 503 | 504 => Outcome::Retry {
            why: message(),
            after: retry_after_header.and_then(|v| retry_after(v, chrono::Utc::now())),
        },
        _ => Outcome::Failed { why: message() },
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A connection to the collector, opened when needed.
pub struct Client {
    target: Target,
    sender: Option<Sender>,
}

impl Client {
    pub fn new(target: Target) -> Self {
        Client {
            target,
            sender: None,
        }
    }

    pub fn endpoint(&self) -> String {
        self.target.uri.to_string()
    }

    async fn connect(&self) -> Result<Sender, String> {
        let uri = &self.target.uri;
        let host = uri.host().expect("checked").trim_matches(['[', ']']);
        let port = uri
            .port_u16()
            .unwrap_or(if self.target.tls.is_some() { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        async fn handshake<IO>(io: IO) -> Result<Sender, String>
        where
            IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        {
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        }
        match &self.target.tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| format!("{host} is not a TLS server name: {e}"))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {host}: {e}"))?;
                handshake(tls).await
            }
            None => handshake(tcp).await,
        }
    }

    /// Sends one request; never fails, the outcome says what happened.
    pub async fn send(&mut self, request: &ExportLogsServiceRequest) -> Outcome {
        let body = match gzip(&request.encode_to_vec()) {
            Ok(b) => b,
            Err(e) => {
                return Outcome::Failed {
                    why: format!("compressing the batch: {e}"),
                };
            }
        };
        let timeout = self.target.timeout;
        match tokio::time::timeout(timeout, self.post(body)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.sender = None;
                Outcome::Retry {
                    why: format!("no answer from {} within {timeout:?}", self.target.uri),
                    after: None,
                }
            }
        }
    }

    async fn post(&mut self, body: Vec<u8>) -> Outcome {
        let mut sender = match self.sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => match self.connect().await {
                Ok(s) => s,
                Err(why) => return Outcome::Retry { why, after: None },
            },
        };
        if sender.ready().await.is_err() {
            match self.connect().await {
                Ok(s) => sender = s,
                Err(why) => return Outcome::Retry { why, after: None },
            }
        }
        let authority = self
            .target
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let mut req = hyper::Request::post(
            self.target
                .uri
                .path_and_query()
                .map_or("/v1/logs", |p| p.as_str()),
        )
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
        .header(hyper::header::CONTENT_ENCODING, "gzip")
        .header(
            hyper::header::USER_AGENT,
            concat!("mcptrail/", env!("CARGO_PKG_VERSION")),
        );
        for (name, value) in &self.target.headers {
            req = req.header(name, value);
        }
        let req = match req.body(Full::new(Bytes::from(body))) {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Failed {
                    why: format!("building the request: {e}"),
                };
            }
        };
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Retry {
                    why: format!("sending to {}: {e}", self.target.uri),
                    after: None,
                };
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match Limited::new(resp.into_body(), ANSWER_MAX).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return Outcome::Retry {
                    why: format!("reading the collector's answer: {e}"),
                    after: None,
                };
            }
        };
        self.sender = Some(sender);
        classify(status, retry_after.as_deref(), &body)
    }
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 4),
        flate2::Compression::fast(),
    );
    enc.write_all(bytes)?;
    enc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsPartialSuccess;

    #[test]
    fn answers_are_classified() {
        assert_eq!(classify(200, None, b""), Outcome::Accepted);
        let partial = ExportLogsServiceResponse {
            partial_success: Some(ExportLogsPartialSuccess {
                rejected_log_records: 2,
                error_message: "too old".into(),
            }),
        }
        .encode_to_vec();
        assert_eq!(
            classify(200, None, &partial),
            Outcome::Partial {
                rejected: 2,
                message: "too old".into()
            }
        );
        assert!(matches!(
            classify(503, Some("7"), b"busy"),
            Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        assert!(matches!(
            classify(429, None, b""),
            Outcome::Retry { after: None, .. }
        ));
        match classify(400, None, b"bad attributes") {
            Outcome::Failed { why } => assert!(why.contains("400: bad attributes"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(retry_after("30", now), Some(Duration::from_secs(30)));
        assert_eq!(
            retry_after("Tue, 01 Dec 2026 10:00:05 GMT", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn the_endpoint_gets_the_otlp_path_and_bad_ones_say_why() {
        let t = Target::new(
            "http://collector:4318",
            vec![],
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(t.uri.to_string(), "http://collector:4318/v1/logs");
        let t = Target::new(
            "http://c:1/custom/logs",
            vec![],
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(t.uri.path(), "/custom/logs");
        let err = Target::new("collector:4318", vec![], None, Duration::from_secs(5))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("http or https"), "{err}");
    }
}
