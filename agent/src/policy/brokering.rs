//! Credential brokering: the agent adds or replaces a header on requests to a gateway with a
//! value from a root-only secrets file, so callers never hold the gateway credential. The
//! value is never recorded; records name the header that was set.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobMatcher};
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum BrokeringError {
    #[error("cannot read the secrets file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the secrets file {path} is readable by others than root (mode {mode:o}, owner uid {uid}); `chown root {path}; chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32, uid: u32 },
    #[error("the secrets file {path} is not valid TOML (`name = \"value\"` lines): {why}")]
    Parse { path: PathBuf, why: String },
    #[error("brokering for {destination:?}: {why}")]
    Rule { destination: String, why: String },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Set the header, whatever the caller sent.
    #[default]
    Replace,
    /// Set it only when the caller sent none.
    Add,
}

/// The `[brokering]` section.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokeringConfig {
    /// TOML `name = "value"` pairs, root-owned, mode 0600 or 0400.
    #[serde(default)]
    pub secrets_file: Option<PathBuf>,
    #[serde(default)]
    pub headers: Vec<HeaderRule>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRule {
    /// The gateway, as an `ADDR:PORT` glob (`10.0.0.5:8811`, `*:8811`).
    pub destination: String,
    pub header: String,
    /// The name of the value in the secrets file.
    pub secret: String,
    /// How the value is written, `{secret}` standing for it (`Bearer {secret}`).
    #[serde(default = "default_format")]
    pub format: String,
    #[serde(default)]
    pub mode: Mode,
}

fn default_format() -> String {
    "{secret}".into()
}

struct Rule {
    destination: GlobMatcher,
    header: HeaderName,
    value: HeaderValue,
    mode: Mode,
}

pub struct Broker {
    rules: Vec<Rule>,
    /// The raw secret values, to scrub from anything recorded (a gateway that echoes them).
    secrets: Vec<String>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the values.
        f.debug_struct("Broker")
            .field(
                "headers",
                &self
                    .rules
                    .iter()
                    .map(|r| r.header.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Broker {
    /// No brokered headers (for trying a policy without its secrets).
    pub fn none() -> Self {
        Broker {
            rules: Vec::new(),
            secrets: Vec::new(),
        }
    }

    /// Reads the secrets file (which must be root's alone) and prepares the headers.
    pub fn new(cfg: &BrokeringConfig) -> Result<Self, BrokeringError> {
        if cfg.headers.is_empty() {
            return Ok(Broker {
                rules: Vec::new(),
                secrets: Vec::new(),
            });
        }
        let Some(path) = &cfg.secrets_file else {
            return Err(BrokeringError::Rule {
                destination: cfg.headers[0].destination.clone(),
                why: "brokered headers need `secrets_file`".into(),
            });
        };
        let secrets = read_secrets(path)?;
        let mut rules = Vec::new();
        let mut used = Vec::new();
        for h in &cfg.headers {
            let err = |why: String| BrokeringError::Rule {
                destination: h.destination.clone(),
                why,
            };
            let destination = Glob::new(&h.destination)
                .map_err(|e| err(format!("not a glob: {e}")))?
                .compile_matcher();
            let header = HeaderName::try_from(h.header.as_str())
                .map_err(|e| err(format!("{:?} is not a header name: {e}", h.header)))?;
            let secret = secrets
                .get(&h.secret)
                .ok_or_else(|| err(format!("no {:?} in {}", h.secret, path.display())))?;
            if !h.format.contains("{secret}") {
                return Err(err("`format` must contain {secret}".into()));
            }
            let mut value = HeaderValue::from_str(&h.format.replace("{secret}", secret))
                // Not the value itself in the message: it is secret.
                .map_err(|_| {
                    err(format!(
                        "the value of {:?} is not a valid header value",
                        h.secret
                    ))
                })?;
            value.set_sensitive(true);
            if secret.len() >= 4 {
                used.push(secret.clone());
            }
            rules.push(Rule {
                destination,
                header,
                value,
                mode: h.mode,
            });
        }
        Ok(Broker {
            rules,
            secrets: used,
        })
    }

    /// Replaces every brokered secret in the string values of `value` (a gateway may echo
    /// what it got); true when one was found.
    pub fn scrub(&self, value: &mut serde_json::Value) -> bool {
        self.secrets.iter().fold(false, |hit, secret| {
            super::masking::scrub_literal(value, secret, "[REDACTED:brokered]") | hit
        })
    }

    /// Sets the brokered headers for a request to `destination`; returns their names.
    pub fn apply(&self, destination: &str, headers: &mut HeaderMap) -> Vec<String> {
        let mut set = Vec::new();
        for r in self
            .rules
            .iter()
            .filter(|r| r.destination.is_match(destination))
        {
            if r.mode == Mode::Add && headers.contains_key(&r.header) {
                continue;
            }
            headers.insert(r.header.clone(), r.value.clone());
            set.push(r.header.as_str().to_owned());
        }
        set
    }
}

fn read_secrets(path: &Path) -> Result<BTreeMap<String, String>, BrokeringError> {
    let meta = std::fs::metadata(path).map_err(|source| BrokeringError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.mode() & 0o777;
    if meta.uid() != 0 || mode & 0o077 != 0 {
        return Err(BrokeringError::Exposed {
            path: path.to_path_buf(),
            mode,
            uid: meta.uid(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| BrokeringError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // The parser's message may quote the line; say only where.
    toml::from_str(&text).map_err(|e| BrokeringError::Parse {
        path: path.to_path_buf(),
        why: e
            .span()
            .map(|s| format!("at byte {}", s.start))
            .unwrap_or_else(|| "syntax error".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn secrets(dir: &Path, mode: u32) -> PathBuf {
        let p = dir.join("secrets.toml");
        std::fs::write(&p, "gateway = \"gw-s3cret\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn cfg(path: &Path, mode: &str) -> BrokeringConfig {
        toml::from_str(&format!(
            "secrets_file = \"{}\"\n[[headers]]\ndestination = \"*:8811\"\nheader = \"authorization\"\nsecret = \"gateway\"\nformat = \"Bearer {{secret}}\"\nmode = \"{mode}\"\n",
            path.display()
        ))
        .unwrap()
    }

    #[test]
    fn replaces_or_adds_for_matching_gateways() {
        let dir = tempfile::tempdir().unwrap();
        let b = Broker::new(&cfg(&secrets(dir.path(), 0o600), "replace")).unwrap();
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer caller".parse().unwrap());
        assert_eq!(b.apply("10.0.0.5:8811", &mut h), ["authorization"]);
        assert_eq!(h["authorization"], "Bearer gw-s3cret");
        assert!(h["authorization"].is_sensitive());
        let mut other = HeaderMap::new();
        assert!(b.apply("10.0.0.5:9999", &mut other).is_empty());
        let add = Broker::new(&cfg(&secrets(dir.path(), 0o400), "add")).unwrap();
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer caller".parse().unwrap());
        assert!(add.apply("10.0.0.5:8811", &mut h).is_empty());
        assert_eq!(h["authorization"], "Bearer caller");
        assert!(!format!("{add:?}").contains("s3cret"));
        let mut echoed = serde_json::json!({"auth": ["Bearer gw-s3cret"], "n": 1});
        assert!(b.scrub(&mut echoed));
        assert_eq!(echoed["auth"][0], "Bearer [REDACTED:brokered]");
    }

    #[test]
    fn a_secrets_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Broker::new(&cfg(&secrets(dir.path(), 0o644), "replace")).unwrap_err();
        assert!(
            matches!(err, BrokeringError::Exposed { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn unknown_secrets_are_named_but_values_never() {
        let dir = tempfile::tempdir().unwrap();
        let p = secrets(dir.path(), 0o600);
        let mut c = cfg(&p, "replace");
        c.headers[0].secret = "nope".into();
        let err = Broker::new(&c).unwrap_err().to_string();
        assert!(err.contains("\"nope\"") && !err.contains("s3cret"), "{err}");
    }
}
