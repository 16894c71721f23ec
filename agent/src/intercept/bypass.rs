//! Connections to targets that do not go through the proxy: they were opened before the
//! agent attached its hooks (or by the agent itself). Read from /proc/net/tcp{,6}.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agent_common::TargetKey;
use serde::Serialize;

use super::addr_words;

/// TCP_ESTABLISHED in /proc/net/tcp's `st` column.
const ESTABLISHED: u8 = 0x01;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub inode: u64,
}

/// Parses the text of /proc/net/tcp or /proc/net/tcp6. Lines it cannot read are skipped.
pub fn parse_proc_net_tcp(text: &str) -> Vec<TcpSocket> {
    text.lines().skip(1).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<TcpSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 {
        return None;
    }
    Some(TcpSocket {
        local: parse_endpoint(fields[1])?,
        remote: parse_endpoint(fields[2])?,
        state: u8::from_str_radix(fields[3], 16).ok()?,
        inode: fields[9].parse().ok()?,
    })
}

/// `0100007F:1F90` or 32 hex digits for IPv6: the kernel prints each 32-bit word of the
/// network-order address as a native-endian integer.
fn parse_endpoint(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut o = [0u8; 16];
            for i in 0..4 {
                o[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Established sockets whose remote end is a target, minus the agent's own (by inode).
pub fn bypassing(
    sockets: &[TcpSocket],
    targets: &[TargetKey],
    own_inodes: &HashSet<u64>,
) -> Vec<TcpSocket> {
    sockets
        .iter()
        .filter(|s| s.state == ESTABLISHED && !own_inodes.contains(&s.inode))
        .filter(|s| {
            let addr = addr_words(s.remote.ip());
            let port = u32::from(s.remote.port());
            targets
                .iter()
                .any(|t| t.port == port && (t.addr == [0; 4] || t.addr == addr))
        })
        .cloned()
        .collect()
}

/// Inodes of the sockets this process holds open.
pub fn own_socket_inodes() -> HashSet<u64> {
    let mut out = HashSet::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for entry in dir.flatten() {
            if let Ok(link) = std::fs::read_link(entry.path()) {
                let link = link.to_string_lossy();
                if let Some(inode) = link
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse().ok())
                {
                    out.insert(inode);
                }
            }
        }
    }
    out
}

/// Reads both tables of this network namespace.
pub fn read_tcp_tables() -> Vec<TcpSocket> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| parse_proc_net_tcp(&t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::Target;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3DE3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 11111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:B3A2 0100007F:2263 01 00000000:00000000 00:00000000 00000000     0        0 22222 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:9C40 00000000000000000000000001000000:2263 01 00000000:00000000 00:00000000 00000000     0        0 33333 1 0000000000000000 20 4 0 10 -1
";

    #[test]
    fn parses_both_tables() {
        let v4 = parse_proc_net_tcp(TCP);
        assert_eq!(v4.len(), 2);
        assert_eq!(v4[1].local, "127.0.0.1:45986".parse().unwrap());
        assert_eq!(v4[1].remote, "127.0.0.1:8803".parse().unwrap());
        assert_eq!((v4[1].state, v4[1].inode), (1, 22222));
        let v6 = parse_proc_net_tcp(TCP6);
        assert_eq!(v6[0].remote, "[::1]:8803".parse().unwrap());
    }

    #[test]
    fn finds_established_connections_to_targets_but_not_our_own() {
        let mut all = parse_proc_net_tcp(TCP);
        all.extend(parse_proc_net_tcp(TCP6));
        let targets: Vec<TargetKey> = ["127.0.0.1:8803", "[::1]:8803"]
            .iter()
            .flat_map(|t| t.parse::<Target>().unwrap().keys().unwrap())
            .collect();
        let found = bypassing(&all, &targets, &HashSet::new());
        assert_eq!(
            found.iter().map(|s| s.inode).collect::<Vec<_>>(),
            [22222, 33333]
        );
        let ours = HashSet::from([22222]);
        assert_eq!(bypassing(&all, &targets, &ours).len(), 1);
        let wildcard = "*:8803".parse::<Target>().unwrap().keys().unwrap();
        assert_eq!(bypassing(&all, &wildcard, &HashSet::new()).len(), 2);
    }
}
