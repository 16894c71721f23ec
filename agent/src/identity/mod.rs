//! Who is calling: the process (from [`crate::process`]) and the service token its request
//! carried, verified here. [`Caller`] is the one typed view the policy engine matches on.
//!
//! The raw token never leaves this module's stack frames: records carry its claims, whether
//! it verified, and a keyed fingerprint; `RawToken`'s Debug is redacted, and no error message
//! quotes it.
#![forbid(unsafe_code)]

pub mod extract;
pub mod fingerprint;
pub mod jwks;
pub mod verify;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;

use crate::audit::record::{Process, Token};

pub use verify::Verifier;

/// The `[identity]` section of a policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Parents of the calling process recorded (pid, comm, exe), nearest first.
    #[serde(default = "default_parent_depth")]
    pub parent_depth: usize,
    /// Environment variables that may be read for the CI context; replaces the built-in list
    /// (every variable the GitHub Actions, GitLab CI, Jenkins, Buildkite, CircleCI and Azure
    /// Pipelines mappings use).
    #[serde(default)]
    pub ci_env: Option<Vec<String>>,
    /// Names added to the allowlist; they appear under `ci.vars`.
    #[serde(default)]
    pub ci_env_extra: Vec<String>,
    /// Request headers that may carry the service token, first found wins.
    #[serde(default = "default_token_headers")]
    pub token_headers: Vec<String>,
    /// Claims recorded besides the registered ones.
    #[serde(default = "default_token_claims")]
    pub token_claims: Vec<String>,
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            parent_depth: default_parent_depth(),
            ci_env: None,
            ci_env_extra: Vec::new(),
            token_headers: default_token_headers(),
            token_claims: default_token_claims(),
            issuers: Vec::new(),
        }
    }
}

/// One `[[identity.issuers]]` entry: whose tokens verify, with which keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The `iss` claim, exactly.
    pub issuer: String,
    /// Accepted `aud` values; when set, a token must name one of them.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// A JWK set on disk (re-read on refresh).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A JWK set served over https (or http).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// PEM bundle of the CAs an https `jwks_url` is checked against; default: the Mozilla
    /// roots (webpki-roots).
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// A shared secret for HS256/384/512, in a root-only file.
    #[serde(default)]
    pub hs_secret_file: Option<PathBuf>,
    /// Accepted algorithms; default: RS*, PS*, ES256/384 and EdDSA for a JWKS, HS* for a secret.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// Seconds between scheduled refreshes of a JWKS.
    #[serde(default = "default_refresh_secs")]
    pub refresh_secs: u64,
    /// At least this many seconds between refreshes caused by an unknown `kid`.
    #[serde(default = "default_min_refresh_secs")]
    pub min_refresh_secs: u64,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    /// Tokens without `exp` fail with `missing_claim`.
    #[serde(default = "default_true")]
    pub require_exp: bool,
}

impl IssuerConfig {
    pub fn algorithms(&self) -> Result<Vec<Algorithm>, String> {
        use Algorithm::*;
        let hs = self.hs_secret_file.is_some();
        if self.algorithms.is_empty() {
            return Ok(if hs {
                vec![HS256, HS384, HS512]
            } else {
                vec![
                    RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
                ]
            });
        }
        self.algorithms
            .iter()
            .map(|name| {
                let alg = Algorithm::from_str(name).map_err(|_| {
                    format!(
                        "{name:?} is not a JWT algorithm (RS256, PS256, ES256, EdDSA, HS256, ...)"
                    )
                })?;
                let is_hs = matches!(alg, HS256 | HS384 | HS512);
                if is_hs != hs {
                    return Err(format!(
                        "{name} needs {}",
                        if is_hs {
                            "hs_secret_file"
                        } else {
                            "jwks_file or jwks_url"
                        }
                    ));
                }
                Ok(alg)
            })
            .collect()
    }

    fn min_refresh(&self) -> Duration {
        Duration::from_secs(self.min_refresh_secs)
    }
}

fn default_parent_depth() -> usize {
    crate::process::DEFAULT_PARENT_DEPTH
}
fn default_token_headers() -> Vec<String> {
    vec!["authorization".into()]
}
fn default_token_claims() -> Vec<String> {
    ["groups", "scope", "scp", "roles"]
        .map(String::from)
        .to_vec()
}
fn default_refresh_secs() -> u64 {
    300
}
fn default_min_refresh_secs() -> u64 {
    10
}
fn default_leeway_secs() -> u64 {
    60
}
fn default_true() -> bool {
    true
}

/// Who is calling, as the policy engine sees it: the process (with its CI context) and the
/// token of this request.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub process: &'a Process,
    pub token: Option<&'a Token>,
}

impl Caller<'_> {
    pub fn exe(&self) -> Option<&str> {
        self.process.exe.as_deref()
    }

    pub fn uid(&self) -> u32 {
        self.process.uid
    }

    pub fn unit(&self) -> Option<&str> {
        self.process.unit.as_deref()
    }

    pub fn container_id(&self) -> Option<&str> {
        self.process.container.as_ref().map(|c| c.id.as_str())
    }

    pub fn ci_repository(&self) -> Option<&str> {
        self.process.ci.as_ref()?.repository.as_deref()
    }

    /// True only for a token that verified.
    pub fn token_verified(&self) -> bool {
        self.token.is_some_and(|t| t.verified)
    }

    /// The subject of a verified token; an unverified token's claims are not identity.
    pub fn subject(&self) -> Option<&str> {
        self.token.filter(|t| t.verified)?.sub.as_deref()
    }

    pub fn issuer(&self) -> Option<&str> {
        self.token.filter(|t| t.verified)?.iss.as_deref()
    }

    /// `groups` (or `roles`) of a verified token.
    pub fn groups(&self) -> Vec<&str> {
        let Some(t) = self.token.filter(|t| t.verified) else {
            return Vec::new();
        };
        ["groups", "roles"]
            .iter()
            .filter_map(|k| t.claims.get(*k)?.as_array())
            .flatten()
            .filter_map(|v| v.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let cfg: IdentityConfig = toml::from_str("").unwrap();
        assert_eq!(cfg, IdentityConfig::default());
        let cfg: IdentityConfig = toml::from_str(
            "[[issuers]]\nissuer = \"https://id\"\njwks_file = \"/k.json\"\nalgorithms = [\"HS256\"]\n",
        )
        .unwrap();
        assert!(
            cfg.issuers[0]
                .algorithms()
                .unwrap_err()
                .contains("hs_secret_file")
        );
        let cfg: IdentityConfig = toml::from_str(
            "[[issuers]]\nissuer = \"x\"\njwks_file = \"/k\"\nalgorithms = [\"RS257\"]\n",
        )
        .unwrap();
        assert!(
            cfg.issuers[0]
                .algorithms()
                .unwrap_err()
                .contains("not a JWT algorithm")
        );
        assert!(toml::from_str::<IdentityConfig>("bogus = 1").is_err());
    }

    #[test]
    fn caller_trusts_only_verified_claims() {
        let process = Process::default();
        let mut token = Token {
            sub: Some("svc-a".into()),
            claims: [("groups".to_owned(), serde_json::json!(["ci", "ml"]))].into(),
            ..Default::default()
        };
        let caller = Caller {
            process: &process,
            token: Some(&token),
        };
        assert_eq!((caller.subject(), caller.groups().len()), (None, 0));
        token.verified = true;
        let caller = Caller {
            process: &process,
            token: Some(&token),
        };
        assert_eq!(caller.subject(), Some("svc-a"));
        assert_eq!(caller.groups(), vec!["ci", "ml"]);
    }
}
