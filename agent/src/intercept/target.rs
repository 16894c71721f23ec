//! Redirect targets as the user writes them: `ADDR:PORT`, `*:PORT`, `HOST:PORT`.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::str::FromStr;

use agent_common::TargetKey;

use super::InterceptError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHost {
    /// `*`: any address on the port.
    Any,
    Ip(IpAddr),
    /// A name resolved when the agent starts.
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: TargetHost,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            TargetHost::Any => write!(f, "*:{}", self.port),
            TargetHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            TargetHost::Ip(ip) => write!(f, "{ip}:{}", self.port),
            TargetHost::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl FromStr for Target {
    type Err = InterceptError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| InterceptError::BadTarget {
            spec: s.to_owned(),
            why: why.to_owned(),
        };
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT, for example 10.0.0.5:8811 or *:8811"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port must be a number from 1 to 65535"))?;
        if port == 0 {
            return Err(bad("the port must be a number from 1 to 65535"));
        }
        let host = if host == "*" {
            TargetHost::Any
        } else if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            TargetHost::Ip(IpAddr::V6(
                v6.parse().map_err(|_| bad("not a valid IPv6 address"))?,
            ))
        } else if let Ok(ip) = host.parse::<Ipv4Addr>() {
            TargetHost::Ip(IpAddr::V4(ip))
        } else if host.contains(':') {
            return Err(bad("write IPv6 addresses in brackets: [2001:db8::1]:8811"));
        } else if is_host_name(host) {
            TargetHost::Name(host.to_owned())
        } else {
            return Err(bad("not an IP address, `*`, or a host name"));
        };
        Ok(Target { host, port })
    }
}

/// Read from the configuration file as the same `HOST:PORT` text the flag takes; an error
/// carries the value's place in the file.
impl<'de> serde::Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Target {
    /// The kernel map keys for this target. Names are resolved now, to every IPv4 and IPv6
    /// address they have.
    pub fn keys(&self) -> Result<Vec<TargetKey>, InterceptError> {
        let port = u32::from(self.port);
        match &self.host {
            TargetHost::Any => Ok(vec![TargetKey { addr: [0; 4], port }]),
            TargetHost::Ip(ip) => Ok(vec![ip_key(*ip, port)]),
            TargetHost::Name(name) => {
                let addrs = (name.as_str(), self.port).to_socket_addrs().map_err(|e| {
                    InterceptError::BadTarget {
                        spec: self.to_string(),
                        why: format!("cannot resolve {name}: {e}"),
                    }
                })?;
                let mut keys: Vec<TargetKey> = Vec::new();
                for addr in addrs {
                    let key = ip_key(addr.ip(), port);
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                }
                if keys.is_empty() {
                    return Err(InterceptError::BadTarget {
                        spec: self.to_string(),
                        why: format!("{name} resolved to no address"),
                    });
                }
                Ok(keys)
            }
        }
    }
}

impl Target {
    /// The target an adopted map entry stands for, when the spec that made it is unknown.
    pub fn placeholder(key: &TargetKey) -> Target {
        let port = key.port as u16;
        if key.addr == [0; 4] {
            Target {
                host: TargetHost::Any,
                port,
            }
        } else {
            Target {
                host: TargetHost::Ip(super::words_addr(key.addr)),
                port,
            }
        }
    }
}

/// Reads a targets file: one `HOST:PORT` per line; blank lines and `#` comments are skipped.
/// Errors name the line.
pub fn parse_targets_file(text: &str) -> Result<Vec<Target>, InterceptError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let target: Target =
            line.parse()
                .map_err(|e: InterceptError| InterceptError::TargetsFile {
                    line: i + 1,
                    why: e.to_string(),
                })?;
        out.push(target);
    }
    Ok(out)
}

fn ip_key(ip: IpAddr, port: u32) -> TargetKey {
    TargetKey {
        addr: super::addr_words(ip),
        port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::v4_mapped;

    fn v4_key(ip: Ipv4Addr, port: u32) -> TargetKey {
        TargetKey {
            addr: v4_mapped(u32::from_ne_bytes(ip.octets())),
            port,
        }
    }

    fn parse(s: &str) -> Result<Target, InterceptError> {
        s.parse()
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(parse("*:8811").unwrap().host, TargetHost::Any);
        assert_eq!(
            parse("10.0.0.5:8811").unwrap().host,
            TargetHost::Ip("10.0.0.5".parse().unwrap())
        );
        assert_eq!(
            parse("[2001:db8::1]:443").unwrap().host,
            TargetHost::Ip("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            parse("mcp-gw.internal:8811").unwrap().host,
            TargetHost::Name("mcp-gw.internal".into())
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "*:8811",
            "10.0.0.5:8811",
            "[2001:db8::1]:443",
            "gw.example:1",
        ] {
            assert_eq!(parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_specs_with_reasons() {
        for (s, want) in [
            ("8811", "HOST:PORT"),
            ("*:0", "1 to 65535"),
            ("*:99999", "1 to 65535"),
            ("2001:db8::1:443", "brackets"),
            ("bad_name!:80", "host name"),
            ("[zz]:80", "IPv6"),
        ] {
            let err = parse(s).unwrap_err().to_string();
            assert!(err.contains(want), "{s}: {err}");
        }
    }

    #[test]
    fn keys_for_addresses_and_wildcards() {
        let k = parse("127.0.0.1:8811").unwrap().keys().unwrap();
        assert_eq!(k.len(), 1);
        assert_eq!(k[0].port, 8811);
        assert_eq!(k[0].addr[3], u32::from_ne_bytes([127, 0, 0, 1]));
        let any = parse("*:8811").unwrap().keys().unwrap();
        assert_eq!(any[0].addr, [0; 4]);
        let v6 = parse("[::1]:8811").unwrap().keys().unwrap();
        assert_eq!(v6[0].addr, agent_common::LOOPBACK6);
        let mapped = parse("[::ffff:10.0.0.1]:1").unwrap().keys().unwrap();
        assert_eq!(mapped[0], v4_key("10.0.0.1".parse().unwrap(), 1));
    }

    #[test]
    fn targets_files_skip_comments_and_name_bad_lines() {
        let t = parse_targets_file("# gateways\n10.0.0.5:8811  # main\n\n*:9000\n").unwrap();
        assert_eq!(t.len(), 2);
        let err = parse_targets_file("*:1\nnope\n").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn names_resolve() {
        let k = parse("localhost:8811").unwrap().keys().unwrap();
        assert!(k.contains(&v4_key(Ipv4Addr::LOCALHOST, 8811)));
    }

    #[test]
    fn unresolvable_names_say_so() {
        let err = parse("no-such-host.invalid:1").unwrap().keys().unwrap_err();
        assert!(err.to_string().contains("cannot resolve"), "{err}");
    }
}
