//! The `[tls]` section: how the proxy handles TLS to each gateway, and what the host CA may
//! vouch for. Per gateway (`[[tls.gateways]]`, first match wins): `terminate` (the proxy reads
//! the traffic, showing the client a leaf from the host CA and checking the gateway's
//! certificate) or `passthrough` (relayed untouched, recorded with what the hellos said).
#![forbid(unsafe_code)]

use std::path::PathBuf;

use globset::{Glob, GlobMatcher};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Decrypt: the client gets a leaf from the host CA; the gateway is verified.
    Terminate,
    /// Relay the encrypted bytes untouched.
    Passthrough,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Terminate => "terminate",
            Mode::Passthrough => "passthrough",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub gateways: Vec<GatewayConfig>,
    /// DNS names (`mcp-gw.corp`) or suffixes (`*.internal`) the host CA may vouch for; set
    /// when the CA is made (`mcptrail ca rotate` makes one with new constraints).
    #[serde(default)]
    pub ca_name_constraints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// `ADDR:PORT` or `HOST:PORT` glob, matched against the original destination and against
    /// the configured target it matched (never the client's SNI, which the client chooses).
    pub destination: String,
    #[serde(default)]
    pub mode: Option<Mode>,
    /// More roots (a PEM bundle) for this gateway's certificate, besides the system's.
    #[serde(default)]
    pub upstream_ca_file: Option<PathBuf>,
    /// The server name to ask the gateway for when the client sent none.
    #[serde(default)]
    pub server_name: Option<String>,
    /// The client certificate (PEM chain) and key the agent presents to a gateway that asks
    /// for one (mTLS brokered like a header: callers never hold it). Root's alone.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

/// The section compiled: globs ready to match.
#[derive(Debug)]
pub struct TlsRules {
    gateways: Vec<(GlobMatcher, GatewayConfig)>,
    pub ca_name_constraints: Vec<String>,
}

impl TlsRules {
    pub fn new(cfg: &TlsConfig) -> Result<Self, String> {
        if let Some(g) = cfg
            .gateways
            .iter()
            .find(|g| g.client_cert_file.is_some() != g.client_key_file.is_some())
        {
            return Err(format!(
                "tls.gateways {:?}: give both client_cert_file and client_key_file, or neither",
                g.destination
            ));
        }
        let gateways = cfg
            .gateways
            .iter()
            .map(|g| {
                Glob::new(&g.destination)
                    .map(|glob| (glob.compile_matcher(), g.clone()))
                    .map_err(|e| format!("tls.gateways destination {:?}: {e}", g.destination))
            })
            .collect::<Result<_, _>>()?;
        Ok(TlsRules {
            gateways,
            ca_name_constraints: cfg.ca_name_constraints.clone(),
        })
    }

    /// The first gateway entry for a connection to `dst` (`ADDR:PORT`, where the client
    /// connected) or to `target` (the configured target it matched, `HOST:PORT` for a name).
    /// Never by the server name the client asks for: the client chooses that freely, and
    /// could otherwise pick a passthrough entry for a gateway the rules must see.
    pub fn gateway(&self, dst: &str, target: Option<&str>) -> Option<&GatewayConfig> {
        self.gateways
            .iter()
            .find(|(glob, _)| glob.is_match(dst) || target.is_some_and(|t| glob.is_match(t)))
            .map(|(_, g)| g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateways_match_by_address_or_by_configured_name_never_by_sni() {
        let cfg: TlsConfig = toml::from_str(
            r#"
            [[gateways]]
            destination = "vault.corp:443"
            mode = "passthrough"
            [[gateways]]
            destination = "10.0.0.*:8443"
            upstream_ca_file = "/etc/mcptrail/internal-ca.pem"
            "#,
        )
        .unwrap();
        let rules = TlsRules::new(&cfg).unwrap();
        let g = rules
            .gateway("10.9.9.9:443", Some("vault.corp:443"))
            .unwrap();
        assert_eq!(g.mode, Some(Mode::Passthrough), "by the configured target");
        let g = rules.gateway("10.0.0.5:8443", None).unwrap();
        assert_eq!(g.mode, None);
        assert!(rules.gateway("10.0.1.5:8443", Some("*:8443")).is_none());
        assert!(
            rules.gateway("10.9.9.9:443", None).is_none(),
            "a client asking for vault.corp by SNI does not make 10.9.9.9 a passthrough"
        );
        assert!(
            toml::from_str::<TlsConfig>("[[gateways]]\ndestination = \"x\"\nmode = \"maybe\"\n")
                .is_err()
        );
    }
}
