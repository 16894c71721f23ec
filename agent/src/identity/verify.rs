//! Service token verification: a JWT checked with jsonwebtoken against the configured
//! issuers' keys; every outcome becomes a [`Token`] record with the reason when it failed.
//! Results are cached by fingerprint, so a token is verified once, not on every call.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::extract::{RawToken, extract};
use super::fingerprint::Fingerprinter;
use super::jwks::{Jwks, Lookup, Source};
use super::{IdentityConfig, IssuerConfig};
use crate::audit::record::{Token, TokenFailure};

/// How long a verification result is reused (a verified one never past its `exp`).
const CACHE_TTL: Duration = Duration::from_secs(300);
/// Failures that a key refresh can cure are reused only briefly.
const RETRY_TTL: Duration = Duration::from_secs(2);
const CACHE_MAX: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("issuer {issuer}: set exactly one of jwks_file, jwks_url and hs_secret_file")]
    KeySource { issuer: String },
    #[error("issuer {issuer}: {why}")]
    Algorithm { issuer: String, why: String },
    #[error("issuer {issuer}: cannot read hs_secret_file {path}: {source}")]
    Secret {
        issuer: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("issuer {issuer}: {source}")]
    Jwks {
        issuer: String,
        #[source]
        source: super::jwks::JwksError,
    },
}

enum Keys {
    Secret(DecodingKey),
    Jwks(Box<Jwks>),
}

struct Issuer {
    cfg: IssuerConfig,
    algorithms: Vec<Algorithm>,
    keys: Keys,
}

pub struct Verifier {
    fingerprints: Fingerprinter,
    headers: Vec<String>,
    claims: Vec<String>,
    issuers: Vec<Issuer>,
    cache: Mutex<HashMap<String, (Token, Instant)>>,
}

impl Verifier {
    /// Builds the verifier; key files are read now so that a wrong path fails the start, and
    /// JWKS URLs are fetched (a failure there is logged: the keys come when the issuer does).
    pub async fn new(
        cfg: &IdentityConfig,
        fingerprints: Fingerprinter,
    ) -> Result<Self, VerifyError> {
        let mut issuers = Vec::new();
        for ic in &cfg.issuers {
            let issuer = ic.issuer.clone();
            let algorithms = ic.algorithms().map_err(|why| VerifyError::Algorithm {
                issuer: issuer.clone(),
                why,
            })?;
            let keys = match (&ic.jwks_file, &ic.jwks_url, &ic.hs_secret_file) {
                (Some(path), None, None) => {
                    let jwks = Jwks::new(Source::File(path.clone()), ic.min_refresh());
                    jwks.refresh().await.map_err(|source| VerifyError::Jwks {
                        issuer: issuer.clone(),
                        source,
                    })?;
                    Keys::Jwks(Box::new(jwks))
                }
                (None, Some(url), None) => {
                    let source =
                        Source::parse_url(url, ic.jwks_ca_file.as_deref()).map_err(|source| {
                            VerifyError::Jwks {
                                issuer: issuer.clone(),
                                source,
                            }
                        })?;
                    let jwks = Jwks::new(source, ic.min_refresh());
                    if let Err(e) = jwks.refresh().await {
                        tracing::warn!(%issuer, error = %e, "the issuer's keys are not available yet; its tokens are recorded as keys_unavailable until they are");
                    }
                    Keys::Jwks(Box::new(jwks))
                }
                (None, None, Some(path)) => {
                    let secret = std::fs::read(path).map_err(|source| VerifyError::Secret {
                        issuer: issuer.clone(),
                        path: path.clone(),
                        source,
                    })?;
                    let trimmed = secret.strip_suffix(b"\n").unwrap_or(&secret);
                    Keys::Secret(DecodingKey::from_secret(trimmed))
                }
                _ => return Err(VerifyError::KeySource { issuer }),
            };
            issuers.push(Issuer {
                cfg: ic.clone(),
                algorithms,
                keys,
            });
        }
        Ok(Verifier {
            fingerprints,
            headers: cfg.token_headers.clone(),
            claims: cfg.token_claims.clone(),
            issuers,
            cache: Mutex::default(),
        })
    }

    /// Refreshes every JWKS issuer's keys (the scheduled refresh). Changed keys empty the
    /// result cache, so a removed key stops verifying at once.
    pub async fn refresh_all(&self) {
        let mut changed = false;
        for issuer in &self.issuers {
            if let Keys::Jwks(jwks) = &issuer.keys {
                match jwks.refresh().await {
                    Ok(c) => changed |= c,
                    Err(e) => {
                        tracing::warn!(issuer = %issuer.cfg.issuer, error = %e, "refreshing the issuer's keys failed; the last good keys stay in use");
                    }
                }
            }
        }
        if changed {
            self.cache.lock().expect("cache lock").clear();
        }
    }

    /// The shortest refresh interval among the issuers, if any has a JWKS.
    pub fn refresh_interval(&self) -> Option<Duration> {
        self.issuers
            .iter()
            .filter(|i| matches!(i.keys, Keys::Jwks(_)))
            .map(|i| Duration::from_secs(i.cfg.refresh_secs.max(1)))
            .min()
    }

    /// The headers that may carry a token.
    pub fn token_headers(&self) -> &[String] {
        &self.headers
    }

    /// The token a request carries, verified, and the raw token for the caller to scrub from
    /// what else it records (and then drop).
    pub async fn token(&self, headers: &hyper::HeaderMap) -> Option<(Token, RawToken)> {
        let raw = extract(headers, &self.headers)?;
        Some((self.verify(&raw).await, raw))
    }

    pub async fn verify(&self, raw: &RawToken) -> Token {
        let fingerprint = self.fingerprints.of(&raw.value);
        if let Some((token, until)) = self.cache.lock().expect("cache lock").get(&fingerprint)
            && Instant::now() < *until
            && token.header == raw.header
        {
            return token.clone();
        }
        let mut token = Token {
            header: raw.header.clone(),
            scheme: raw.scheme.clone(),
            fingerprint: fingerprint.clone(),
            ..Default::default()
        };
        // Boxed: a JWKS fetch's state is kilobytes, and every request's handler would carry it
        // inline though a cached token needs none of it.
        let outcome = Box::pin(self.evaluate(raw, &mut token)).await;
        let ttl = match outcome {
            Ok(()) => {
                token.verified = true;
                let left = token
                    .exp
                    .map(|exp| exp - chrono::Utc::now().timestamp())
                    .map_or(CACHE_TTL, |s| Duration::from_secs(s.max(0) as u64));
                left.min(CACHE_TTL)
            }
            Err((reason, detail)) => {
                token.reason = Some(reason);
                token.detail = detail;
                match reason {
                    TokenFailure::UnknownKid | TokenFailure::KeysUnavailable => RETRY_TTL,
                    _ => CACHE_TTL,
                }
            }
        };
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(fingerprint, (token.clone(), Instant::now() + ttl));
        token
    }

    async fn evaluate(
        &self,
        raw: &RawToken,
        token: &mut Token,
    ) -> Result<(), (TokenFailure, Option<String>)> {
        if raw.scheme.as_deref() == Some("basic") {
            return Err((TokenFailure::NotJwt, Some("Basic credentials".into())));
        }
        let value = raw.value.as_str();
        if value.split('.').count() != 3 {
            return Err((TokenFailure::NotJwt, None));
        }
        let header = jsonwebtoken::decode_header(value)
            .map_err(|e| (TokenFailure::Malformed, Some(format!("header: {e}"))))?;
        token.alg = Some(format!("{:?}", header.alg));
        token.kid = header.kid.clone();
        let claims = jsonwebtoken::dangerous::insecure_decode::<Map<String, Value>>(value)
            .map_err(|e| (TokenFailure::Malformed, Some(format!("claims: {e}"))))?
            .claims;
        fill_claims(token, &claims, &self.claims);

        if self.issuers.is_empty() {
            return Err((
                TokenFailure::NoKey,
                Some("no issuer is configured ([[identity.issuers]] in the policy)".into()),
            ));
        }
        let Some(issuer) = self
            .issuers
            .iter()
            .find(|i| token.iss.as_deref() == Some(i.cfg.issuer.as_str()))
        else {
            return Err((
                TokenFailure::UnknownIssuer,
                Some(format!("iss {:?} is not a configured issuer", token.iss)),
            ));
        };
        if !issuer.algorithms.contains(&header.alg) {
            return Err((
                TokenFailure::AlgorithmNotAllowed,
                Some(format!(
                    "{:?} is not allowed for {}",
                    header.alg, issuer.cfg.issuer
                )),
            ));
        }
        let key = match &issuer.keys {
            Keys::Secret(key) => key.clone(),
            Keys::Jwks(jwks) => {
                let (found, changed) = jwks.lookup(header.kid.as_deref()).await;
                if changed {
                    self.cache.lock().expect("cache lock").clear();
                }
                match found {
                    Lookup::Found(k) => {
                        if let Some(alg) = k.alg
                            && alg != header.alg
                        {
                            return Err((
                                TokenFailure::AlgorithmNotAllowed,
                                Some(format!(
                                    "the key is for {alg:?}, the token says {:?}",
                                    header.alg
                                )),
                            ));
                        }
                        k.key
                    }
                    Lookup::Missing(why) => return Err((TokenFailure::UnknownKid, Some(why))),
                    Lookup::Unavailable(why) => {
                        return Err((TokenFailure::KeysUnavailable, Some(why)));
                    }
                }
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = issuer.cfg.leeway_secs;
        validation.set_issuer(&[&issuer.cfg.issuer]);
        if issuer.cfg.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&issuer.cfg.audiences);
            validation.set_required_spec_claims(&["aud"]);
        }
        if issuer.cfg.require_exp {
            validation.required_spec_claims.insert("exp".into());
        } else {
            validation.required_spec_claims.remove("exp");
        }
        validation.validate_nbf = true;
        jsonwebtoken::decode::<Map<String, Value>>(value, &key, &validation)
            .map(|_| ())
            .map_err(|e| failure(e.kind()))
    }
}

fn failure(kind: &ErrorKind) -> (TokenFailure, Option<String>) {
    let r = match kind {
        ErrorKind::InvalidSignature => TokenFailure::BadSignature,
        ErrorKind::ExpiredSignature => TokenFailure::Expired,
        ErrorKind::ImmatureSignature => TokenFailure::NotYetValid,
        ErrorKind::InvalidAudience => TokenFailure::WrongAudience,
        ErrorKind::InvalidIssuer => TokenFailure::UnknownIssuer,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            TokenFailure::AlgorithmNotAllowed
        }
        ErrorKind::MissingRequiredClaim(c) => {
            return (TokenFailure::MissingClaim, Some(format!("no {c} claim")));
        }
        ErrorKind::InvalidClaimFormat(c) => {
            return (
                TokenFailure::Malformed,
                Some(format!("the {c} claim is not valid")),
            );
        }
        ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::InvalidToken => TokenFailure::Malformed,
        // A key of the wrong kind for the algorithm, and the like.
        other => return (TokenFailure::BadSignature, Some(format!("{other:?}"))),
    };
    (r, None)
}

fn text(claims: &Map<String, Value>, name: &str) -> Option<String> {
    claims.get(name).and_then(Value::as_str).map(str::to_owned)
}

fn number(claims: &Map<String, Value>, name: &str) -> Option<i64> {
    claims
        .get(name)
        .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
}

/// The registered claims and the configured extra ones, as the token states them.
fn fill_claims(token: &mut Token, claims: &Map<String, Value>, extra: &[String]) {
    token.iss = text(claims, "iss");
    token.sub = text(claims, "sub");
    token.aud = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    token.azp = text(claims, "azp");
    token.client_id = text(claims, "client_id");
    token.jti = text(claims, "jti");
    token.exp = number(claims, "exp");
    token.iat = number(claims, "iat");
    token.nbf = number(claims, "nbf");
    token.claims = extra
        .iter()
        .filter_map(|name| {
            claims
                .get(name)
                .map(|v| (name.clone(), crate::mcp::bounded(v.clone(), 4096)))
        })
        .collect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const EC_PEM: &str = include_str!("../../../tests/fixtures/keys/ec-1.pem");
    const RSA_PEM: &str = include_str!("../../../tests/fixtures/keys/rsa-1.pem");
    const ISS: &str = "https://id.test";

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn ec_key() -> EncodingKey {
        EncodingKey::from_ec_pem(EC_PEM.as_bytes()).unwrap()
    }

    fn sign(
        alg: Algorithm,
        key: &EncodingKey,
        kid: Option<&str>,
        claims: serde_json::Value,
    ) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        encode(&header, &claims, key).unwrap()
    }

    fn claims() -> serde_json::Value {
        json!({"iss": ISS, "sub": "svc-build", "aud": "mcp-gateway", "exp": now() + 600,
               "iat": now(), "jti": "j-1", "azp": "ci", "groups": ["ci", "ml"]})
    }

    /// A verifier with one issuer whose JWKS file holds the EC key as `ec-1`.
    async fn verifier(dir: &tempfile::TempDir, audiences: &[&str]) -> Verifier {
        let mut jwk = Jwk::from_encoding_key(&ec_key(), Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("ec-1".into());
        let path = dir.path().join("jwks.json");
        std::fs::write(
            &path,
            serde_json::to_vec(&JwkSet { keys: vec![jwk] }).unwrap(),
        )
        .unwrap();
        let cfg: IdentityConfig = toml::from_str(&format!(
            "[[issuers]]\nissuer = \"{ISS}\"\njwks_file = \"{}\"\naudiences = {audiences:?}\nmin_refresh_secs = 0\n",
            path.display()
        ))
        .unwrap();
        Verifier::new(&cfg, Fingerprinter::new([7; 32]))
            .await
            .unwrap()
    }

    fn raw(value: &str) -> RawToken {
        RawToken {
            header: "authorization".into(),
            scheme: Some("bearer".into()),
            value: value.into(),
        }
    }

    async fn reason(v: &Verifier, token: &str) -> Option<TokenFailure> {
        v.verify(&raw(token)).await.reason
    }

    #[tokio::test]
    async fn a_good_token_verifies_and_says_who() {
        let dir = tempfile::tempdir().unwrap();
        let v = verifier(&dir, &["mcp-gateway"]).await;
        let jwt = sign(Algorithm::ES256, &ec_key(), Some("ec-1"), claims());
        let t = v.verify(&raw(&jwt)).await;
        assert!(t.verified, "{t:?}");
        assert_eq!(t.reason, None);
        assert_eq!(
            (t.iss.as_deref(), t.sub.as_deref()),
            (Some(ISS), Some("svc-build"))
        );
        assert_eq!(t.aud, vec!["mcp-gateway".to_owned()]);
        assert_eq!(
            (t.jti.as_deref(), t.azp.as_deref()),
            (Some("j-1"), Some("ci"))
        );
        assert_eq!(t.claims["groups"], json!(["ci", "ml"]));
        assert_eq!(
            (t.alg.as_deref(), t.kid.as_deref()),
            (Some("ES256"), Some("ec-1"))
        );
        assert_eq!(t.fingerprint, Fingerprinter::new([7; 32]).of(&jwt));
        let text = serde_json::to_string(&t).unwrap();
        assert!(!text.contains(&jwt), "the record never holds the token");
        // The second time comes from the cache and says the same.
        assert_eq!(v.verify(&raw(&jwt)).await, t);
    }

    #[tokio::test]
    async fn every_failure_has_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let v = verifier(&dir, &["mcp-gateway"]).await;
        let key = ec_key();
        let with = |patch: serde_json::Value| {
            let mut c = claims();
            for (k, val) in patch.as_object().unwrap() {
                if val.is_null() {
                    c.as_object_mut().unwrap().remove(k);
                } else {
                    c[k] = val.clone();
                }
            }
            sign(Algorithm::ES256, &key, Some("ec-1"), c)
        };
        assert_eq!(
            reason(&v, &with(json!({"exp": now() - 3600}))).await,
            Some(TokenFailure::Expired)
        );
        assert_eq!(
            reason(&v, &with(json!({"nbf": now() + 3600}))).await,
            Some(TokenFailure::NotYetValid)
        );
        assert_eq!(
            reason(&v, &with(json!({"aud": "elsewhere"}))).await,
            Some(TokenFailure::WrongAudience)
        );
        assert_eq!(
            reason(&v, &with(json!({"exp": null}))).await,
            Some(TokenFailure::MissingClaim)
        );
        assert_eq!(
            reason(&v, &with(json!({"iss": "https://evil"}))).await,
            Some(TokenFailure::UnknownIssuer)
        );
        let unknown_kid = sign(Algorithm::ES256, &key, Some("ec-9"), claims());
        assert_eq!(
            reason(&v, &unknown_kid).await,
            Some(TokenFailure::UnknownKid)
        );
        // Signed by another key under the right kid.
        let other = EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap();
        let forged = sign(Algorithm::RS256, &other, Some("ec-1"), claims());
        assert_eq!(
            reason(&v, &forged).await,
            Some(TokenFailure::AlgorithmNotAllowed)
        );
        let good = with(json!({}));
        let mut parts: Vec<&str> = good.split('.').collect();
        let tampered_claims = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"iss": ISS, "sub": "admin", "exp": now() + 600, "aud": "mcp-gateway"}),
            &EncodingKey::from_secret(b"x"),
        )
        .unwrap();
        let payload = tampered_claims.split('.').nth(1).unwrap().to_owned();
        parts[1] = &payload;
        assert_eq!(
            reason(&v, &parts.join(".")).await,
            Some(TokenFailure::BadSignature)
        );
        let hs = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"s"),
            Some("ec-1"),
            claims(),
        );
        assert_eq!(
            reason(&v, &hs).await,
            Some(TokenFailure::AlgorithmNotAllowed)
        );
        assert_eq!(
            reason(&v, "opaque-api-key-123").await,
            Some(TokenFailure::NotJwt)
        );
        assert_eq!(reason(&v, "a.b.c").await, Some(TokenFailure::Malformed));
        let basic = RawToken {
            scheme: Some("basic".into()),
            ..raw("dXNlcjpwYXNz")
        };
        assert_eq!(v.verify(&basic).await.reason, Some(TokenFailure::NotJwt));
    }

    #[tokio::test]
    async fn no_issuer_means_no_key_and_claims_still_shown() {
        let v = Verifier::new(&IdentityConfig::default(), Fingerprinter::new([1; 32]))
            .await
            .unwrap();
        let t = v
            .verify(&raw(&sign(Algorithm::ES256, &ec_key(), None, claims())))
            .await;
        assert_eq!(t.reason, Some(TokenFailure::NoKey));
        assert!(!t.verified);
        assert_eq!(
            t.sub.as_deref(),
            Some("svc-build"),
            "what it claims, marked unverified"
        );
    }

    #[tokio::test]
    async fn shared_secret_issuers() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("hs.secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let cfg: IdentityConfig = toml::from_str(&format!(
            "[[issuers]]\nissuer = \"{ISS}\"\nhs_secret_file = \"{}\"\n",
            secret.display()
        ))
        .unwrap();
        let v = Verifier::new(&cfg, Fingerprinter::new([1; 32]))
            .await
            .unwrap();
        let good = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"s3cret"),
            None,
            claims(),
        );
        assert!(v.verify(&raw(&good)).await.verified);
        let bad = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"guess"),
            None,
            claims(),
        );
        assert_eq!(reason(&v, &bad).await, Some(TokenFailure::BadSignature));
    }

    #[tokio::test]
    async fn keys_that_cannot_be_fetched_are_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg: IdentityConfig = toml::from_str(&format!(
            "[[issuers]]\nissuer = \"{ISS}\"\njwks_url = \"http://127.0.0.1:{port}/jwks\"\nmin_refresh_secs = 0\n"
        ))
        .unwrap();
        let v = Verifier::new(&cfg, Fingerprinter::new([1; 32]))
            .await
            .unwrap();
        let t = v
            .verify(&raw(&sign(
                Algorithm::ES256,
                &ec_key(),
                Some("ec-1"),
                claims(),
            )))
            .await;
        assert_eq!(t.reason, Some(TokenFailure::KeysUnavailable));
        assert!(t.detail.unwrap().contains(&port.to_string()));
    }

    #[tokio::test]
    async fn a_wrong_key_source_stops_the_start() {
        let cfg: IdentityConfig =
            toml::from_str("[[issuers]]\nissuer = \"x\"\njwks_file = \"/nonexistent/jwks.json\"\n")
                .unwrap();
        let err = Verifier::new(&cfg, Fingerprinter::new([1; 32]))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/jwks.json"), "{err}");
    }
}
