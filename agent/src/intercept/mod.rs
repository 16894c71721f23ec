//! Loads the kernel programs, fills their maps, attaches them to a cgroup, and answers "where
//! did this accepted connection come from?".
#![forbid(unsafe_code)]

pub mod cgroup;
pub mod target;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Mutex;

use agent_common::{Config, Origin, PeerKey, TargetKey, counter, names, v4_mapped};
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps};

pub use target::Target;

/// The kernel programs, built from agent-ebpf by the build script and embedded here.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("invalid target `{spec}`: {why}")]
    BadTarget { spec: String, why: String },
    #[error(
        "loading the eBPF programs failed: {0}; mcptrail must run as root on a kernel with BPF and cgroup v2 (5.15 or newer)"
    )]
    Load(#[source] aya::EbpfError),
    #[error(
        "the embedded eBPF object has no {0}; the build is broken, rebuild with `cargo xtask build`"
    )]
    Missing(&'static str),
    #[error("eBPF program {name} failed to {what}: {source}")]
    Program {
        name: &'static str,
        what: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("too many targets: the kernel map holds {max} address:port entries")]
    TooManyTargets { max: u32 },
    #[error("cgroup {path}: {why}")]
    Cgroup { path: PathBuf, why: String },
    #[error(
        "no cgroup v2 file system is mounted (looked in /proc/self/mountinfo); mount one, or pass --cgroup PATH"
    )]
    NoCgroup2,
}

/// aya attaches through bpf links on kernels that have them (5.7+). The kernel takes no flags
/// for cgroup links (it answers EINVAL) and always runs them alongside the other programs on
/// the cgroup, so "single" here means "no flags", and other tools' programs stay attached.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// What the kernel side needs to know.
pub struct Settings {
    pub targets: Vec<Target>,
    /// The proxy listener (IPv4 loopback).
    pub proxy: SocketAddrV4,
    /// Network namespace the proxy listens in.
    pub netns_cookie: u64,
    /// The cgroup to attach to.
    pub cgroup: PathBuf,
}

/// Loaded, configured and attached programs. Dropping it detaches them.
pub struct Interceptor {
    // Owns the programs and their links: dropping it detaches them.
    ebpf: Mutex<Option<Ebpf>>,
    origins: Mutex<HashMap<MapData, PeerKey, Origin>>,
    counters: PerCpuArray<MapData, u64>,
    netns_cookie: u64,
    cgroup: PathBuf,
    /// Target entries as installed, for reporting (`target id` indexes this).
    pub targets: Vec<(Target, TargetKey)>,
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> InterceptError {
    move |source| InterceptError::Map { name, source }
}

impl Interceptor {
    pub fn start(settings: Settings) -> Result<Self, InterceptError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(InterceptError::Load)?;

        let mut installed = Vec::new();
        {
            let map = ebpf
                .map_mut(names::TARGETS)
                .ok_or(InterceptError::Missing(names::TARGETS))?;
            let mut targets: HashMap<_, TargetKey, u32> =
                HashMap::try_from(map).map_err(map_err(names::TARGETS))?;
            for target in &settings.targets {
                for key in target.keys()? {
                    let id = installed.len() as u32;
                    if id >= agent_common::TARGETS_MAX {
                        return Err(InterceptError::TooManyTargets {
                            max: agent_common::TARGETS_MAX,
                        });
                    }
                    targets
                        .insert(key, id, 0)
                        .map_err(map_err(names::TARGETS))?;
                    installed.push((target.clone(), key));
                }
            }
        }
        {
            let map = ebpf
                .map_mut(names::CONFIG)
                .ok_or(InterceptError::Missing(names::CONFIG))?;
            let mut config: Array<_, Config> =
                Array::try_from(map).map_err(map_err(names::CONFIG))?;
            let cfg = Config {
                agent_tgid: std::process::id(),
                proxy_port: u32::from(settings.proxy.port()),
                proxy_ip4: u32::from_ne_bytes(settings.proxy.ip().octets()),
                ready: 1,
                netns_cookie: settings.netns_cookie,
            };
            config.set(0, cfg, 0).map_err(map_err(names::CONFIG))?;
        }

        let cgroup_fd = File::open(&settings.cgroup).map_err(|e| InterceptError::Cgroup {
            path: settings.cgroup.clone(),
            why: e.to_string(),
        })?;
        // sockops first: once connect4 redirects, the established callback must be there to
        // hand the origin over, or the proxy would refuse the first connections.
        {
            let name = names::PROG_SOCKOPS;
            let prog: &mut SockOps = ebpf
                .program_mut(name)
                .ok_or(InterceptError::Missing(names::PROG_SOCKOPS))?
                .try_into()
                .map_err(prog_err(name, "be found as sockops"))?;
            prog.load().map_err(prog_err(name, "load"))?;
            prog.attach(&cgroup_fd, LINK_MODE)
                .map_err(prog_err(name, "attach"))?;
        }
        {
            let name = names::PROG_CONNECT4;
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(InterceptError::Missing(names::PROG_CONNECT4))?
                .try_into()
                .map_err(prog_err(name, "be found as cgroup/connect4"))?;
            prog.load().map_err(prog_err(name, "load"))?;
            prog.attach(&cgroup_fd, LINK_MODE)
                .map_err(prog_err(name, "attach"))?;
        }

        let origins = HashMap::try_from(
            ebpf.take_map(names::ORIGIN_PEER)
                .ok_or(InterceptError::Missing(names::ORIGIN_PEER))?,
        )
        .map_err(map_err(names::ORIGIN_PEER))?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(names::COUNTERS)
                .ok_or(InterceptError::Missing(names::COUNTERS))?,
        )
        .map_err(map_err(names::COUNTERS))?;

        Ok(Interceptor {
            ebpf: Mutex::new(Some(ebpf)),
            origins: Mutex::new(origins),
            counters,
            netns_cookie: settings.netns_cookie,
            cgroup: settings.cgroup,
            targets: installed,
        })
    }

    /// Detaches the programs: new connections go direct from now on. The origin map stays
    /// readable for connections already waiting in the accept queue.
    pub fn detach(&self) {
        self.ebpf.lock().expect("ebpf lock poisoned").take();
    }

    pub fn cgroup(&self) -> &std::path::Path {
        &self.cgroup
    }

    /// Takes (looks up and deletes) the origin of a connection the proxy accepted from `peer`.
    pub fn take_origin(&self, peer: SocketAddr) -> Result<Option<Origin>, InterceptError> {
        let key = PeerKey {
            addr: addr_words(peer.ip()),
            port: u32::from(peer.port()),
            pad: 0,
            netns_cookie: self.netns_cookie,
        };
        let mut origins = self.origins.lock().expect("origin map lock poisoned");
        match origins.get(&key, 0) {
            Ok(origin) => {
                // Deleting keeps the LRU free for live connections; a failure only means the
                // entry ages out later.
                if let Err(e) = origins.remove(&key) {
                    tracing::debug!(error = %e, "removing a used origin entry failed");
                }
                Ok(Some(origin))
            }
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(InterceptError::Map {
                name: names::ORIGIN_PEER,
                source: e,
            }),
        }
    }

    /// The kernel counters, summed over CPUs, by name.
    pub fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for (i, name) in counter::NAMES.iter().enumerate() {
            let total = self
                .counters
                .get(&(i as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            out.insert((*name).to_owned(), total);
        }
        out
    }
}

fn prog_err(name: &'static str, what: &'static str) -> impl Fn(ProgramError) -> InterceptError {
    move |source| InterceptError::Program { name, what, source }
}

/// An address as the kernel maps spell it (IPv4 mapped into IPv6, network-order words).
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_mapped(u32::from_ne_bytes(v4.octets())),
            None => {
                let o = v6.octets();
                std::array::from_fn(|i| u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().unwrap()))
            }
        },
    }
}

/// The inverse of [`addr_words`], giving IPv4 back for mapped addresses.
pub fn words_addr(words: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The origin's destination as a socket address.
pub fn origin_destination(origin: &Origin) -> SocketAddr {
    SocketAddr::new(words_addr(origin.dst_addr), origin.dst_port as u16)
}

/// The proxy listener address used when none is configured.
pub const DEFAULT_PROXY_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_words_round_trip() {
        for ip in ["127.0.0.1", "10.1.2.3", "2001:db8::7", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(words_addr(addr_words(ip)), ip);
        }
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            words_addr(addr_words(mapped)),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
