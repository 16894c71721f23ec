//! Loads the kernel programs, fills their maps, attaches them to a cgroup, and answers "where
//! did this accepted connection come from?".
#![forbid(unsafe_code)]

pub mod bypass;
pub mod cgroup;
pub mod pins;
pub mod target;

use std::fs::File;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use agent_common::{
    CONFIG_PROXY_V6, CONFIG_READY, Config, Origin, PeerKey, TargetKey, counter, names, v4_mapped,
};
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps};

pub use pins::FailMode;
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
    #[error("targets file, line {line}: {why}")]
    TargetsFile { line: usize, why: String },
    #[error("too many targets: the kernel map holds {max} address:port entries")]
    TooManyTargets { max: u32 },
    #[error("bpffs pin {path}: {why}")]
    Pin { path: PathBuf, why: String },
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

/// The cgroup sock_addr programs, in attach order after sockops.
const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    names::PROG_GETPEERNAME4,
    names::PROG_GETPEERNAME6,
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
];

/// What the kernel side needs to know.
pub struct Settings {
    pub targets: Vec<Target>,
    /// The IPv4 proxy listener.
    pub proxy: SocketAddrV4,
    /// Whether the proxy also listens on `[::1]` (same port).
    pub proxy_v6: bool,
    /// Network namespace the proxy listens in.
    pub netns_cookie: u64,
    /// The cgroup to attach to.
    pub cgroup: PathBuf,
    /// SO_MARK on the agent's upstream sockets (0: that guard is off).
    pub mark: u32,
    /// Entries in each origin map (LRU).
    pub origin_map_size: u32,
    pub fail_mode: FailMode,
    /// The agent's state directory: names its pins in fail-closed mode.
    pub state_dir: PathBuf,
}

impl Settings {
    fn config(&self) -> Config {
        let mut flags = CONFIG_READY;
        if self.proxy_v6 {
            flags |= CONFIG_PROXY_V6;
        }
        Config {
            agent_tgid: std::process::id(),
            proxy_port: u32::from(self.proxy.port()),
            proxy_ip4: u32::from_ne_bytes(self.proxy.ip().octets()),
            flags,
            netns_cookie: self.netns_cookie,
            mark: self.mark,
            pad: 0,
        }
    }
}

/// One address:port entry in the kernel's target map and the target it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub target: Target,
    pub key: TargetKey,
}

struct TargetTable {
    map: HashMap<MapData, TargetKey, u32>,
    installed: Vec<Installed>,
}

/// A loaded program as `status` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadedProgram {
    pub name: &'static str,
    pub id: u32,
}

/// Loaded, configured and attached programs. Dropping it (or `detach`) detaches them.
pub struct Interceptor {
    // Owns the programs and their links: dropping it detaches them.
    ebpf: Mutex<Option<Ebpf>>,
    targets: Mutex<TargetTable>,
    origins: Mutex<HashMap<MapData, PeerKey, Origin>>,
    counters: PerCpuArray<MapData, u64>,
    netns_cookie: u64,
    cgroup: PathBuf,
    programs: Vec<LoadedProgram>,
    adopted: bool,
}

/// Maps pinned in fail-closed mode: everything the programs and the agent share.
const PINNED_MAPS: [&str; 5] = [
    names::TARGETS,
    names::CONFIG,
    names::ORIGIN_COOKIE,
    names::ORIGIN_PEER,
    names::COUNTERS,
];

fn pin_link(
    link: Result<FdLink, aya::programs::links::LinkError>,
    dir: &Path,
    name: &'static str,
) -> Result<(), InterceptError> {
    let path = pins::link_path(dir, name);
    let why = |e: String| InterceptError::Pin {
        path: path.clone(),
        why: e,
    };
    let link = link.map_err(|e| why(e.to_string()))?;
    // The pinned link stays in bpffs after this handle is dropped: that is the point.
    link.pin(&path).map_err(|e| why(e.to_string()))?;
    Ok(())
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> InterceptError {
    move |source| InterceptError::Map { name, source }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, InterceptError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(InterceptError::Missing(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl Interceptor {
    /// Loads and attaches the programs, or, in fail-closed mode, adopts the ones a previous
    /// run left pinned.
    pub fn start(settings: Settings) -> Result<Self, InterceptError> {
        let instance = pins::instance_dir(&settings.state_dir);
        match settings.fail_mode {
            FailMode::Open => {
                if instance.exists() {
                    let n = pins::remove_instance(&instance)?;
                    tracing::warn!(
                        pins = n,
                        dir = %instance.display(),
                        "removed the pins of a fail-closed run: the hooks now live as long as this agent"
                    );
                }
                Self::load(settings, None)
            }
            FailMode::Closed => {
                pins::ensure_bpffs()?;
                let dir = pins::object_dir(&instance, EBPF_OBJECT);
                if pins::link_path(&dir, names::PROG_SOCKOPS).exists() {
                    return Self::adopt(settings, &dir);
                }
                if instance.exists() {
                    // Pins of another build: replace them. Between removing the old links
                    // and attaching ours, connections go direct for a moment.
                    let n = pins::remove_instance(&instance)?;
                    tracing::warn!(pins = n, "replaced the pins of another mcptrail build");
                }
                std::fs::create_dir_all(&dir).map_err(|e| InterceptError::Pin {
                    path: dir.clone(),
                    why: e.to_string(),
                })?;
                Self::load(settings, Some(&dir))
            }
        }
    }

    /// Loads the embedded object and attaches it; with `pin_dir`, pins maps and links there.
    fn load(settings: Settings, pin_dir: Option<&Path>) -> Result<Self, InterceptError> {
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries(names::ORIGIN_COOKIE, settings.origin_map_size)
            .map_max_entries(names::ORIGIN_PEER, settings.origin_map_size)
            .load(EBPF_OBJECT)
            .map_err(InterceptError::Load)?;
        if let Some(dir) = pin_dir {
            for name in PINNED_MAPS {
                let path = pins::map_path(dir, name);
                ebpf.map(name)
                    .ok_or(InterceptError::Missing(name))?
                    .pin(&path)
                    .map_err(|e| InterceptError::Pin {
                        path,
                        why: e.to_string(),
                    })?;
            }
        }

        let mut targets = TargetTable {
            map: take(&mut ebpf, names::TARGETS)?,
            installed: Vec::new(),
        };
        targets.replace(resolve_all(&settings.targets, &[])?)?;
        {
            // Borrowed, not taken: the map must outlive this block until the programs that
            // refer to it are loaded.
            let map = ebpf
                .map_mut(names::CONFIG)
                .ok_or(InterceptError::Missing(names::CONFIG))?;
            let mut config: Array<_, Config> =
                Array::try_from(map).map_err(map_err(names::CONFIG))?;
            config
                .set(0, settings.config(), 0)
                .map_err(map_err(names::CONFIG))?;
        }

        let cgroup_fd = File::open(&settings.cgroup).map_err(|e| InterceptError::Cgroup {
            path: settings.cgroup.clone(),
            why: e.to_string(),
        })?;
        let mut programs = Vec::new();
        // sockops first: once connect redirects, the established callback must be there to
        // hand the origin over, or the proxy would refuse the first connections. getpeername
        // before connect, so no redirected client ever sees the proxy as its peer.
        // SockOps and CgroupSockAddr share these methods but no trait; one macro keeps the
        // steps (load, attach, describe, pin) the same for both kinds.
        macro_rules! attach {
            ($ty:ty, $name:expr, $kind:literal) => {{
                let name = $name;
                let prog: &mut $ty = ebpf
                    .program_mut(name)
                    .ok_or(InterceptError::Missing(name))?
                    .try_into()
                    .map_err(prog_err(name, concat!("be found as ", $kind)))?;
                prog.load().map_err(prog_err(name, "load"))?;
                let link = prog
                    .attach(&cgroup_fd, LINK_MODE)
                    .map_err(prog_err(name, "attach"))?;
                let id = prog.info().map_err(prog_err(name, "describe"))?.id();
                if let Some(dir) = pin_dir {
                    let link = prog
                        .take_link(link)
                        .map_err(prog_err(name, "detach its link"))?;
                    pin_link(FdLink::try_from(link), dir, name)?;
                }
                programs.push(LoadedProgram { name, id });
            }};
        }
        attach!(SockOps, names::PROG_SOCKOPS, "sockops");
        for name in SOCK_ADDR_PROGRAMS {
            attach!(CgroupSockAddr, name, "a cgroup sock_addr program");
        }

        Ok(Interceptor {
            origins: Mutex::new(take(&mut ebpf, names::ORIGIN_PEER)?),
            counters: take(&mut ebpf, names::COUNTERS)?,
            ebpf: Mutex::new(Some(ebpf)),
            targets: Mutex::new(targets),
            netns_cookie: settings.netns_cookie,
            cgroup: settings.cgroup,
            programs,
            adopted: false,
        })
    }

    /// Takes over the pinned programs of a previous fail-closed run: they kept redirecting
    /// while no agent ran; now their maps get this agent's settings.
    fn adopt(settings: Settings, dir: &Path) -> Result<Self, InterceptError> {
        fn pinned<T>(dir: &Path, name: &'static str) -> Result<T, InterceptError>
        where
            T: TryFrom<aya::maps::Map, Error = MapError>,
        {
            let data = MapData::from_pin(pins::map_path(dir, name)).map_err(map_err(name))?;
            let map = aya::maps::Map::from_map_data(data).map_err(map_err(name))?;
            T::try_from(map).map_err(map_err(name))
        }
        let mut config: Array<MapData, Config> = pinned(dir, names::CONFIG)?;
        config
            .set(0, settings.config(), 0)
            .map_err(map_err(names::CONFIG))?;
        let map: HashMap<MapData, TargetKey, u32> = pinned(dir, names::TARGETS)?;
        let mut installed = Vec::new();
        for key in map.keys() {
            let key = key.map_err(map_err(names::TARGETS))?;
            let entry = Installed {
                target: Target::placeholder(&key),
                key,
            };
            installed.push(entry);
        }
        let mut targets = TargetTable { map, installed };
        targets.replace(resolve_all(&settings.targets, &[])?)?;
        let mut programs = Vec::new();
        for name in std::iter::once(names::PROG_SOCKOPS).chain(SOCK_ADDR_PROGRAMS) {
            let path = pins::link_path(dir, name);
            let link = PinnedLink::from_pin(&path).map_err(|e| InterceptError::Pin {
                path: path.clone(),
                why: e.to_string(),
            })?;
            let id = FdLink::from(link)
                .info()
                .map(|i| i.program_id())
                .map_err(|e| InterceptError::Pin {
                    path,
                    why: e.to_string(),
                })?;
            programs.push(LoadedProgram { name, id });
        }
        tracing::info!(dir = %dir.display(), "adopted the pinned programs of the previous fail-closed run");
        Ok(Interceptor {
            origins: Mutex::new(pinned(dir, names::ORIGIN_PEER)?),
            counters: pinned(dir, names::COUNTERS)?,
            ebpf: Mutex::new(None),
            targets: Mutex::new(targets),
            netns_cookie: settings.netns_cookie,
            cgroup: settings.cgroup,
            programs,
            adopted: true,
        })
    }

    /// True when the programs were taken over from a previous fail-closed run.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Detaches the programs: new connections go direct from now on. The origin map stays
    /// readable for connections already waiting in the accept queue.
    pub fn detach(&self) {
        self.ebpf.lock().expect("ebpf lock poisoned").take();
    }

    pub fn cgroup(&self) -> &std::path::Path {
        &self.cgroup
    }

    pub fn programs(&self) -> &[LoadedProgram] {
        &self.programs
    }

    /// Run counts and total run time of our programs, by program id. The kernel only counts
    /// while `kernel.bpf_stats_enabled` is 1 (it costs a little on every run).
    pub fn program_stats(&self) -> std::collections::HashMap<u32, (u64, u64)> {
        let ours: Vec<u32> = self.programs.iter().map(|p| p.id).collect();
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|info| ours.contains(&info.id()))
            .map(|info| {
                (
                    info.id(),
                    (info.run_count(), info.run_time().as_nanos() as u64),
                )
            })
            .collect()
    }

    /// The target entries in the kernel map now.
    pub fn installed(&self) -> Vec<Installed> {
        self.targets
            .lock()
            .expect("target lock poisoned")
            .installed
            .clone()
    }

    /// Makes the kernel's target map match `targets`, resolving names again. A name that does
    /// not resolve keeps its previous addresses (a DNS hiccup must not open a hole); a target
    /// spec that is invalid fails the whole change and leaves the map as it was.
    pub fn set_targets(&self, targets: &[Target]) -> Result<TargetChange, InterceptError> {
        let previous = self.installed();
        let wanted = resolve_all(targets, &previous)?;
        let mut table = self.targets.lock().expect("target lock poisoned");
        let added = wanted
            .iter()
            .filter(|w| !table.installed.iter().any(|i| i.key == w.key))
            .count();
        let removed = table
            .installed
            .iter()
            .filter(|i| !wanted.iter().any(|w| w.key == i.key))
            .count();
        table.replace(wanted)?;
        Ok(TargetChange {
            added,
            removed,
            total: table.installed.len(),
        })
    }

    /// The target spec that a destination matched, for the record.
    pub fn target_for(&self, dst: SocketAddr) -> Option<Target> {
        let addr = addr_words(dst.ip());
        let port = u32::from(dst.port());
        let table = self.targets.lock().expect("target lock poisoned");
        let exact = table
            .installed
            .iter()
            .find(|i| i.key == TargetKey { addr, port });
        exact
            .or_else(|| {
                table
                    .installed
                    .iter()
                    .find(|i| i.key == TargetKey { addr: [0; 4], port })
            })
            .map(|i| i.target.clone())
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

impl Installed {
    /// `10.0.0.5:8811`, `[2001:db8::1]:8811`, or `*:8811`.
    pub fn entry(&self) -> String {
        if self.key.addr == [0; 4] {
            format!("*:{}", self.key.port)
        } else {
            SocketAddr::new(words_addr(self.key.addr), self.key.port as u16).to_string()
        }
    }
}

/// What a target change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetChange {
    pub added: usize,
    pub removed: usize,
    pub total: usize,
}

impl TargetTable {
    fn replace(&mut self, wanted: Vec<Installed>) -> Result<(), InterceptError> {
        if wanted.len() > agent_common::TARGETS_MAX as usize {
            return Err(InterceptError::TooManyTargets {
                max: agent_common::TARGETS_MAX,
            });
        }
        // Add first, then remove: a target present before and after never leaves the map.
        for (id, w) in wanted.iter().enumerate() {
            self.map
                .insert(w.key, id as u32, 0)
                .map_err(map_err(names::TARGETS))?;
        }
        for old in &self.installed {
            if !wanted.iter().any(|w| w.key == old.key) {
                match self.map.remove(&old.key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(names::TARGETS)(e)),
                }
            }
        }
        self.installed = wanted;
        Ok(())
    }
}

/// Map entries for every target. A name that fails to resolve keeps the entries it had in
/// `previous`; with none, the failure is an error.
fn resolve_all(
    targets: &[Target],
    previous: &[Installed],
) -> Result<Vec<Installed>, InterceptError> {
    let mut out: Vec<Installed> = Vec::new();
    for target in targets {
        let keys = match target.keys() {
            Ok(keys) => keys,
            Err(e) => {
                let kept: Vec<TargetKey> = previous
                    .iter()
                    .filter(|i| &i.target == target)
                    .map(|i| i.key)
                    .collect();
                if kept.is_empty() {
                    return Err(e);
                }
                tracing::warn!(target = %target, error = %e, "keeping the previous addresses");
                kept
            }
        };
        for key in keys {
            if !out.iter().any(|i| i.key == key) {
                out.push(Installed {
                    target: target.clone(),
                    key,
                });
            }
        }
    }
    Ok(out)
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
