//! The `[gateway]` section: what the proxy does with traffic it cannot read. Fail closed: a
//! policy that can refuse a call (a deny, approve or rate-limit rule, or `default = "deny"`)
//! also refuses what it cannot judge, unless told otherwise; a policy that only records lets
//! it through, recorded.
#![forbid(unsafe_code)]

use std::time::Duration;

use serde::Deserialize;

/// Bytes to a gateway that are not HTTP (or a protocol the proxy does not speak yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Opaque {
    /// Relayed byte for byte; the connection record counts them.
    Relay,
    /// The connection is closed at once and the refusal recorded.
    Refuse,
}

/// A request body the proxy cannot read as JSON-RPC (malformed JSON, a batch with a bad
/// element, a body over the parse limit, a content type or encoding it does not read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unparsed {
    /// Forwarded as it came, recorded as malformed.
    Forward,
    /// Answered with an error naming why; nothing reaches the gateway.
    Refuse,
}

/// How long a new connection may take to send the bytes that tell its protocol.
pub const DEFAULT_FIRST_BYTES_TIMEOUT_SECS: u64 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Default: `refuse` when the access rules can refuse, else `relay`.
    #[serde(default)]
    pub opaque: Option<Opaque>,
    /// Default: `refuse` when the access rules can refuse, else `forward`.
    #[serde(default)]
    pub unparsed: Option<Unparsed>,
    /// A connection that has not shown its protocol by then is refused (never relayed).
    #[serde(default = "default_first_bytes")]
    pub first_bytes_timeout_secs: u64,
    /// A client that reads nothing of what the proxy sends it for this long is cut off.
    #[serde(default = "default_stalled_client")]
    pub stalled_client_secs: u64,
}

/// How long a client may leave the proxy's writes to it waiting.
pub const DEFAULT_STALLED_CLIENT_SECS: u64 = 60;

fn default_stalled_client() -> u64 {
    DEFAULT_STALLED_CLIENT_SECS
}

fn default_first_bytes() -> u64 {
    DEFAULT_FIRST_BYTES_TIMEOUT_SECS
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            opaque: None,
            unparsed: None,
            first_bytes_timeout_secs: DEFAULT_FIRST_BYTES_TIMEOUT_SECS,
            stalled_client_secs: DEFAULT_STALLED_CLIENT_SECS,
        }
    }
}

/// The section with its defaults worked out against the access rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gateway {
    pub opaque: Opaque,
    pub unparsed: Unparsed,
    pub first_bytes_timeout: Duration,
    pub stalled_client: Duration,
}

impl Gateway {
    /// `strict`: the access rules can refuse a call (`AccessConfig::can_refuse`).
    pub fn new(cfg: &GatewayConfig, strict: bool) -> Self {
        Gateway {
            opaque: cfg.opaque.unwrap_or(if strict {
                Opaque::Refuse
            } else {
                Opaque::Relay
            }),
            unparsed: cfg.unparsed.unwrap_or(if strict {
                Unparsed::Refuse
            } else {
                Unparsed::Forward
            }),
            first_bytes_timeout: Duration::from_secs(cfg.first_bytes_timeout_secs.max(1)),
            stalled_client: Duration::from_secs(cfg.stalled_client_secs.max(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::access::AccessConfig;

    fn access(text: &str) -> AccessConfig {
        toml::from_str(text).unwrap()
    }

    fn can_refuse(a: &AccessConfig) -> bool {
        a.can_refuse()
    }

    #[test]
    fn defaults_follow_the_rules_and_an_explicit_setting_wins() {
        let record_only = access("");
        let g = Gateway::new(&GatewayConfig::default(), can_refuse(&record_only));
        assert_eq!((g.opaque, g.unparsed), (Opaque::Relay, Unparsed::Forward));
        let allow_only =
            access("[[rules]]\nname = \"a\"\naction = \"allow\"\nmatch = { tool = \"x\" }\n");
        assert!(!can_refuse(&allow_only));
        let deny = access("[[rules]]\nname = \"d\"\naction = \"deny\"\nmatch = { tool = \"x\" }\n");
        let g = Gateway::new(&GatewayConfig::default(), can_refuse(&deny));
        assert_eq!((g.opaque, g.unparsed), (Opaque::Refuse, Unparsed::Refuse));
        assert!(can_refuse(&access("default = \"deny\"\n")));
        let cfg: GatewayConfig =
            toml::from_str("opaque = \"relay\"\nunparsed = \"forward\"\n").unwrap();
        let g = Gateway::new(&cfg, can_refuse(&deny));
        assert_eq!((g.opaque, g.unparsed), (Opaque::Relay, Unparsed::Forward));
        assert_eq!(g.first_bytes_timeout, Duration::from_secs(10));
        assert!(toml::from_str::<GatewayConfig>("opaque = \"maybe\"\n").is_err());
    }
}
