//! Policy files: TOML, schema version 1. The embedded default is `policies/default.toml`.
#![forbid(unsafe_code)]

pub mod access;
pub mod approvals;
pub mod brokering;
pub mod gateway;
pub mod http2;
pub mod live;
pub mod masking;
mod prefilter;
pub mod tls;
pub mod validators;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::audit::record::PolicyRef;
use crate::identity::IdentityConfig;

/// The default policy, compiled into the binary.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../policies/default.toml");

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the policy file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the policy {source_name} is not valid: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
    #[error(
        "the policy {source_name} has schema version {found}; this mcptrail reads version {SCHEMA_VERSION}: upgrade mcptrail or rewrite the policy"
    )]
    Version { source_name: String, found: u32 },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u32,
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    identity: IdentityConfig,
    #[serde(default)]
    masking: MaskingSection,
    #[serde(default)]
    access: access::AccessConfig,
    #[serde(default)]
    brokering: brokering::BrokeringConfig,
    #[serde(default)]
    gateway: gateway::GatewayConfig,
    #[serde(default)]
    tls: tls::TlsConfig,
    #[serde(default)]
    http2: http2::Http2Limits,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MaskingSection {
    #[serde(default)]
    rules: Vec<masking::RuleConfig>,
}

/// A loaded policy and where it came from.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub description: String,
    /// How callers are identified: process details, CI context, service tokens.
    pub identity: IdentityConfig,
    /// Masking rules, in the order they apply.
    pub masking: Vec<masking::RuleConfig>,
    /// Access rules, tried in order.
    pub access: access::AccessConfig,
    /// Headers set on requests to gateways from the secrets file (read when the policy is put
    /// in force, not when it is checked).
    pub brokering: brokering::BrokeringConfig,
    /// What the proxy does with traffic it cannot read (`[gateway]`).
    pub gateway: gateway::GatewayConfig,
    /// How TLS to each gateway is handled (`[tls]`).
    pub tls: tls::TlsConfig,
    /// The bounds of HTTP/2 client connections (`[http2]`).
    pub http2: http2::Http2Limits,
    /// `embedded` or the file's path.
    pub source: String,
    pub sha256: [u8; 32],
}

impl Policy {
    pub fn embedded_default() -> Result<Self, PolicyError> {
        Self::parse(EMBEDDED_DEFAULT, "embedded")
    }

    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses policy text; errors name the line and column.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Invalid {
            source_name: source_name.to_owned(),
            message: describe_toml_error(text, &e),
        })?;
        for issuer in &file.identity.issuers {
            if let Err(why) = issuer.algorithms() {
                return Err(PolicyError::Invalid {
                    source_name: source_name.to_owned(),
                    message: format!("identity.issuers {:?}: {why}", issuer.issuer),
                });
            }
            let sources = [
                issuer.jwks_file.is_some(),
                issuer.jwks_url.is_some(),
                issuer.hs_secret_file.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                return Err(PolicyError::Invalid {
                    source_name: source_name.to_owned(),
                    message: format!(
                        "identity.issuers {:?}: set exactly one of jwks_file, jwks_url and hs_secret_file",
                        issuer.issuer
                    ),
                });
            }
        }
        // The rules compile and their examples hold, or the policy is refused.
        let masker = masking::Masker::new(&file.masking.rules, [0; 32]).map_err(|e| {
            PolicyError::Invalid {
                source_name: source_name.to_owned(),
                message: at_rule(text, &e),
            }
        })?;
        masker
            .check_examples(&file.masking.rules)
            .map_err(|e| PolicyError::Invalid {
                source_name: source_name.to_owned(),
                message: at_rule(text, &e),
            })?;
        access::Access::new(&file.access).map_err(|e| PolicyError::Invalid {
            source_name: source_name.to_owned(),
            message: at_access_rule(text, &e),
        })?;
        tls::TlsRules::new(&file.tls).map_err(|message| PolicyError::Invalid {
            source_name: source_name.to_owned(),
            message,
        })?;
        file.http2.check().map_err(|message| PolicyError::Invalid {
            source_name: source_name.to_owned(),
            message,
        })?;
        if file.version != SCHEMA_VERSION {
            return Err(PolicyError::Version {
                source_name: source_name.to_owned(),
                found: file.version,
            });
        }
        Ok(Policy {
            name: file.name,
            description: file.description,
            identity: file.identity,
            masking: file.masking.rules,
            access: file.access,
            brokering: file.brokering,
            gateway: file.gateway,
            tls: file.tls,
            http2: file.http2,
            source: source_name.to_owned(),
            sha256: Sha256::digest(text.as_bytes()).into(),
        })
    }

    pub fn reference(&self) -> PolicyRef {
        PolicyRef {
            name: self.name.clone(),
            source: self.source.clone(),
            sha256: hex::encode(self.sha256),
        }
    }
}

fn at_access_rule(text: &str, e: &access::AccessError) -> String {
    let rule = match e {
        access::AccessError::Glob { rule, .. } | access::AccessError::Rule { rule, .. } => rule,
    };
    at_name(text, rule, e)
}

/// `line L, column C: message` for a rule's error: where its `name = "…"` is.
fn at_rule(text: &str, e: &masking::MaskingError) -> String {
    let rule = match e {
        masking::MaskingError::Pattern { rule, .. }
        | masking::MaskingError::Rule { rule, .. }
        | masking::MaskingError::Example { rule, .. } => rule,
    };
    at_name(text, rule, e)
}

fn at_name(text: &str, rule: &str, e: &dyn std::fmt::Display) -> String {
    let needle = format!("\"{rule}\"");
    match text
        .lines()
        .enumerate()
        .find(|(_, l)| l.trim_start().starts_with("name") && l.contains(&needle))
    {
        Some((n, line)) => {
            let column = line.len() - line.trim_start().len() + 1;
            format!("line {}, column {column}: {e}", n + 1)
        }
        None => e.to_string(),
    }
}

impl Policy {
    /// The compiled masking rules; `hash_key` keys the `hash` action.
    pub fn masker(&self, hash_key: [u8; 32]) -> Result<masking::Masker, masking::MaskingError> {
        masking::Masker::new(&self.masking, hash_key)
    }
}

/// `line L, column C: message`, from the byte span toml reports.
/// A TOML error as `line L, column C: message`, for the policy and the configuration file.
pub fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().to_owned();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_loads() {
        let p = Policy::embedded_default().unwrap();
        assert_eq!(p.name, "default");
        assert_eq!(p.source, "embedded");
    }

    #[test]
    fn errors_name_line_and_column() {
        let err = Policy::parse("version = 1\nname = \"x\"\nbogus = 3\n", "p.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("p.toml"), "{msg}");
        assert!(msg.contains("line 3, column 1"), "{msg}");
    }

    #[test]
    fn future_versions_are_refused() {
        let err = Policy::parse("version = 2\nname = \"x\"\n", "p.toml").unwrap_err();
        assert!(matches!(err, PolicyError::Version { found: 2, .. }));
    }

    #[test]
    fn the_default_pack_has_25_detectors_each_with_cases() {
        let p = Policy::embedded_default().unwrap();
        assert!(p.masking.len() >= 25, "{}", p.masking.len());
        for rule in &p.masking {
            assert!(!rule.examples.is_empty(), "{} has no examples", rule.name);
            assert!(
                !rule.counterexamples.is_empty(),
                "{} has no counterexamples",
                rule.name
            );
        }
        let m = p.masker([1; 32]).unwrap();
        assert!(m.check_examples(&p.masking).unwrap() >= 75);
    }

    #[test]
    fn bad_rules_are_refused_with_their_line() {
        let text = "version = 1\nname = \"x\"\n\n[[masking.rules]]\nname = \"broken\"\npattern = '(unclosed'\n";
        let msg = Policy::parse(text, "p.toml").unwrap_err().to_string();
        assert!(msg.contains("line 5") && msg.contains("broken"), "{msg}");
        let text = "version = 1\nname = \"x\"\n[[masking.rules]]\nname = \"digits\"\npattern = '\\d+'\ncounterexamples = [\"42\"]\n";
        let msg = Policy::parse(text, "p.toml").unwrap_err().to_string();
        assert!(msg.contains("\"42\" should be left alone"), "{msg}");
    }

    #[test]
    fn digest_covers_the_bytes() {
        let a = Policy::parse("version = 1\nname = \"x\"\n", "a").unwrap();
        let b = Policy::parse("version = 1\nname = \"x\" # c\n", "b").unwrap();
        assert_ne!(a.sha256, b.sha256);
    }
}
