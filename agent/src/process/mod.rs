//! Process identity: what the kernel captured at connect() plus what /proc still knows.
//!
//! The kernel's part (pid, thread, uid, gid, comm, cgroup id) is taken in the caller's own
//! context and is always there. /proc adds the executable, command line, start time, parent
//! chain, cgroup path (with the systemd unit and container it names) and CI context from
//! allow-listed environment variables. A process that has exited by the time the proxy looks
//! still gets a record, which says the enrichment missed; its cgroup path is then found from
//! the kernel's cgroup id.
//!
//! What /proc says is cached per process, keyed by pid *and* start time, so that a reused
//! pid never inherits another process's identity.
#![forbid(unsafe_code)]

pub mod ci;
pub mod container;
pub mod procfs;
pub mod scrub;

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agent_common::Origin;
use lru::LruCache;

use crate::audit::record::{Ci, Parent, Process};

/// Bytes of command line kept; argv beyond this is cut and the record says so.
pub const CMDLINE_MAX: usize = 4096;
/// Parents recorded when the policy does not say.
pub const DEFAULT_PARENT_DEPTH: usize = 4;
/// Processes whose enrichment is cached; when the cache is full the least recently used
/// process is forgotten (never the lot: a burst of short-lived processes must not make every
/// long-lived caller be read from /proc again).
const CACHE_MAX: usize = 4096;
/// Folders visited at most when looking for a cgroup by id.
const CGROUP_WALK_MAX: usize = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot read {path}: {source} (the process may have exited)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: procfs::ProcfsError,
    },
}

/// How identities are read.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `/proc`, or a stand-in in tests.
    pub proc_root: PathBuf,
    /// Mount point of the cgroup v2 hierarchy, to find a gone process's cgroup by id.
    pub cgroup_root: Option<PathBuf>,
    pub parent_depth: usize,
    /// Environment variable names that may be read; nothing else is.
    pub env_allow: HashSet<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            proc_root: PathBuf::from("/proc"),
            cgroup_root: None,
            parent_depth: DEFAULT_PARENT_DEPTH,
            env_allow: ci::default_allowlist(),
        }
    }
}

/// What /proc told about one process, shared by every connection it makes.
#[derive(Debug, Clone, Default)]
struct Enrichment {
    exe: Option<String>,
    cmdline: Option<Vec<String>>,
    cmdline_truncated: bool,
    cmdline_redacted: bool,
    start_time: Option<String>,
    parents: Vec<Parent>,
    cgroup: Option<String>,
    ci: Option<Ci>,
}

/// Reads identities, with the caches that keep that cheap.
pub struct Identifier {
    settings: Settings,
    clk_tck: u64,
    btime: Option<u64>,
    /// By pid and start time; least recently used evicted first, O(1) per lookup and insert.
    cache: Mutex<LruCache<(u32, u64), Arc<Enrichment>>>,
    cgroup_paths: Mutex<HashMap<u64, String>>,
    users: Mutex<HashMap<u32, Option<String>>>,
    groups: Mutex<HashMap<u32, Option<String>>>,
}

impl Identifier {
    pub fn new(settings: Settings) -> Self {
        let clk_tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|&t| t > 0)
            .map_or(100, |t| t as u64);
        let btime = std::fs::read_to_string(settings.proc_root.join("stat"))
            .ok()
            .and_then(|s| procfs::parse_btime(&s));
        Identifier {
            settings,
            clk_tck,
            btime,
            cache: Mutex::new(enrichment_cache(CACHE_MAX)),
            cgroup_paths: Mutex::default(),
            users: Mutex::default(),
            groups: Mutex::default(),
        }
    }

    /// The same identifier with room for only `capacity` processes, to watch eviction in tests.
    #[cfg(test)]
    fn with_cache_capacity(self, capacity: usize) -> Self {
        Identifier {
            cache: Mutex::new(enrichment_cache(capacity)),
            ..self
        }
    }

    /// The identity of the process behind an origin record.
    pub fn identify(&self, origin: &Origin) -> Process {
        let mut p = Process {
            pid: origin.tgid,
            tid: origin.tid,
            uid: origin.uid,
            gid: origin.gid,
            comm: comm(&origin.comm),
            cgroup_id: origin.cgroup_id,
            ..Default::default()
        };
        p.user = self.user_name(origin.uid);
        p.group = self.group_name(origin.gid);
        match self.enrichment(origin.tgid, &p.comm) {
            Ok(e) => {
                p.exe = e.exe.clone();
                p.cmdline = e.cmdline.clone();
                p.cmdline_truncated = e.cmdline_truncated;
                p.cmdline_redacted = e.cmdline_redacted;
                p.start_time = e.start_time.clone();
                p.parents = e.parents.clone();
                p.cgroup = e.cgroup.clone();
                p.ci = e.ci.clone();
            }
            Err(why) => p.enrichment_error = Some(why),
        }
        if p.cgroup.is_none() {
            p.cgroup = self.cgroup_path(origin.cgroup_id);
        }
        if let Some(path) = &p.cgroup {
            (p.unit, p.container) = container::classify(path);
        }
        p
    }

    /// /proc's part, from the cache when this very process (pid and start time) was read.
    fn enrichment(&self, pid: u32, kernel_comm: &str) -> Result<Arc<Enrichment>, String> {
        let dir = self.settings.proc_root.join(pid.to_string());
        let stat = read_stat(&dir).map_err(|e| e.to_string())?;
        // The kernel's comm is at most 15 bytes; /proc's is the same name.
        if !kernel_comm.is_empty() && stat.comm != kernel_comm {
            return Err(format!(
                "pid {pid} is now {:?}, not {kernel_comm:?} as at connect(): it exec'd or exited and the pid was reused; /proc is not used",
                stat.comm
            ));
        }
        let key = (pid, stat.start_ticks);
        // `get`: a hit makes the process the most recently used.
        if let Some(hit) = self.cache.lock().expect("cache lock").get(&key) {
            return Ok(hit.clone());
        }
        let mut errors = Vec::new();
        let mut e = Enrichment {
            start_time: self.start_time(stat.start_ticks),
            ..Default::default()
        };
        match read_link(&dir.join("exe")) {
            Ok(exe) => e.exe = Some(exe),
            Err(err) => errors.push(err.to_string()),
        }
        match read(&dir.join("cmdline")) {
            Ok(raw) => {
                let (mut args, truncated) = parse_cmdline(&raw, CMDLINE_MAX);
                e.cmdline_redacted = scrub::credentials(&mut args);
                e.cmdline = Some(args);
                e.cmdline_truncated = truncated;
            }
            Err(err) => errors.push(err.to_string()),
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup")) {
            e.cgroup = procfs::parse_cgroup(&text);
        }
        if !self.settings.env_allow.is_empty()
            && let Ok(raw) = read(&dir.join("environ"))
        {
            e.ci = ci::detect(&procfs::parse_environ(&raw, &self.settings.env_allow));
        }
        e.parents = self.parents(stat.ppid);
        // Read it all again if the pid changed hands while we read.
        match read_stat(&dir) {
            Ok(again) if again.start_ticks == stat.start_ticks => {}
            _ => return Err(format!("pid {pid} exited while /proc was being read")),
        }
        if !errors.is_empty() {
            // A zombie (exited, not yet reaped) has a stat but no exe or cmdline.
            return Err(errors.join("; "));
        }
        let e = Arc::new(e);
        // When full, the least recently used process makes room.
        self.cache.lock().expect("cache lock").put(key, e.clone());
        Ok(e)
    }

    fn parents(&self, mut ppid: u32) -> Vec<Parent> {
        let mut out = Vec::new();
        while ppid != 0 && out.len() < self.settings.parent_depth {
            let dir = self.settings.proc_root.join(ppid.to_string());
            let Ok(stat) = read_stat(&dir) else { break };
            out.push(Parent {
                pid: ppid,
                comm: stat.comm,
                exe: read_link(&dir.join("exe")).ok(),
            });
            ppid = stat.ppid;
        }
        out
    }

    fn start_time(&self, ticks: u64) -> Option<String> {
        let btime = self.btime?;
        let nanos = (ticks % self.clk_tck) * (1_000_000_000 / self.clk_tck);
        let secs = btime + ticks / self.clk_tck;
        let t = chrono::DateTime::from_timestamp(secs as i64, nanos as u32)?;
        Some(crate::audit::record::rfc3339(t))
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        let mut users = self.users.lock().expect("users lock");
        users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(uid.into())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        let mut groups = self.groups.lock().expect("groups lock");
        groups
            .entry(gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(gid.into())
                    .ok()
                    .flatten()
                    .map(|g| g.name)
            })
            .clone()
    }

    /// The cgroup path of a cgroup id (the inode number of its folder), from the cache or a
    /// walk of the hierarchy. Used when the process is gone but its cgroup may not be.
    fn cgroup_path(&self, id: u64) -> Option<String> {
        let root = self.settings.cgroup_root.as_ref()?;
        if let Some(path) = self.cgroup_paths.lock().expect("cgroup lock").get(&id) {
            return Some(path.clone());
        }
        let found = walk_cgroups(root);
        let mut paths = self.cgroup_paths.lock().expect("cgroup lock");
        *paths = found;
        paths.get(&id).cloned()
    }
}

/// An empty enrichment cache for at most `capacity` processes (at least one). `sparse`: it
/// grows as processes come instead of taking room for all of them up front.
fn enrichment_cache(capacity: usize) -> LruCache<(u32, u64), Arc<Enrichment>> {
    LruCache::sparse(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN))
}

/// Every cgroup folder under `root` by inode number, as paths from the root (`/a/b`).
fn walk_cgroups(root: &Path) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if out.len() >= CGROUP_WALK_MAX {
            tracing::warn!(
                max = CGROUP_WALK_MAX,
                "the cgroup hierarchy is larger than the walk allows; some exited callers keep only their cgroup id"
            );
            break;
        }
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        let rel = dir.strip_prefix(root).unwrap_or(&dir);
        out.insert(meta.ino(), format!("/{}", rel.display()));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    out
}

/// The command name as the kernel hands it over: NUL-padded bytes.
pub fn comm(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Splits /proc/PID/cmdline (NUL-separated argv) into arguments, bounded to `max` bytes.
/// Returns the arguments and whether any were cut.
pub fn parse_cmdline(raw: &[u8], max: usize) -> (Vec<String>, bool) {
    let truncated = raw.len() > max;
    let raw = &raw[..raw.len().min(max)];
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    if raw.is_empty() {
        return (Vec::new(), truncated);
    }
    let args = raw
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (args, truncated)
}

fn read_stat(dir: &Path) -> Result<procfs::Stat, ProcessError> {
    let path = dir.join("stat");
    let text = std::fs::read_to_string(&path).map_err(|source| ProcessError::Read {
        path: path.clone(),
        source,
    })?;
    procfs::parse_stat(&text).map_err(|source| ProcessError::Parse { path, source })
}

fn read_link(path: &Path) -> Result<String, ProcessError> {
    std::fs::read_link(path)
        .map(|p| p.display().to_string())
        .map_err(|source| ProcessError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn read(path: &Path) -> Result<Vec<u8>, ProcessError> {
    std::fs::read(path).map_err(|source| ProcessError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Environment names for the CI allowlist: the built-in list, replaced by `names` when given,
/// plus `extra`.
pub fn env_allowlist(names: Option<&[String]>, extra: &[String]) -> HashSet<String> {
    let mut allow = match names {
        Some(names) => names.iter().cloned().collect(),
        None => ci::default_allowlist(),
    };
    allow.extend(extra.iter().cloned());
    allow
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin_of_self(comm_bytes: &[u8]) -> Origin {
        let mut comm = [0u8; 16];
        comm[..comm_bytes.len()].copy_from_slice(comm_bytes);
        Origin {
            tgid: std::process::id(),
            tid: std::process::id(),
            comm,
            ..Default::default()
        }
    }

    fn own_comm() -> Vec<u8> {
        std::fs::read_to_string("/proc/self/comm")
            .unwrap()
            .trim_end()
            .as_bytes()
            .to_vec()
    }

    #[test]
    fn comm_stops_at_nul() {
        assert_eq!(comm(b"curl\0\0\0\0\0\0\0\0\0\0\0\0"), "curl");
        assert_eq!(comm(b"sixteen-chars-xx"), "sixteen-chars-xx");
    }

    #[test]
    fn cmdline_splits_and_bounds() {
        assert_eq!(
            parse_cmdline(b"curl\0-s\0http://x/\0", 4096),
            (vec!["curl".into(), "-s".into(), "http://x/".into()], false)
        );
        assert_eq!(parse_cmdline(b"", 4096), (vec![], false));
        let (args, cut) = parse_cmdline(b"aaaa\0bbbb\0", 7);
        assert_eq!(args, vec!["aaaa".to_owned(), "bb".to_owned()]);
        assert!(cut);
    }

    #[test]
    fn identifies_this_process() {
        let id = Identifier::new(Settings::default());
        let p = id.identify(&origin_of_self(&own_comm()));
        assert_eq!(p.enrichment_error, None);
        assert_eq!(
            p.exe.as_deref(),
            Some(std::env::current_exe().unwrap().to_str().unwrap())
        );
        assert!(!p.cmdline.unwrap().is_empty());
        assert_eq!(p.user.as_deref(), Some("root"));
        assert_eq!(p.parents[0].pid, std::os::unix::process::parent_id());
        assert!(p.parents.len() <= DEFAULT_PARENT_DEPTH);
        assert!(p.cgroup.unwrap().starts_with('/'));
        let start = chrono::DateTime::parse_from_rfc3339(&p.start_time.unwrap()).unwrap();
        assert!(start <= chrono::Utc::now());
    }

    #[test]
    fn a_reused_pid_is_not_believed() {
        let id = Identifier::new(Settings::default());
        let p = id.identify(&origin_of_self(b"someone-else"));
        assert_eq!(p.exe, None);
        assert!(p.enrichment_error.unwrap().contains("reused"));
    }

    #[test]
    fn the_cache_is_keyed_by_start_time() {
        let id = Identifier::new(Settings::default());
        let origin = origin_of_self(&own_comm());
        id.identify(&origin);
        let keys: Vec<(u32, u64)> = id.cache.lock().unwrap().iter().map(|(k, _)| *k).collect();
        let stat =
            procfs::parse_stat(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert_eq!(keys, vec![(std::process::id(), stat.start_ticks)]);
    }

    /// A stand-in /proc entry for `pid`: a stat with that start time, an exe link, a cmdline.
    fn fake_process(proc_root: &Path, pid: u32, start_ticks: u64) {
        let dir = proc_root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        // Fields 3 (state) and 4 (ppid 0: no parents), then 5 to 21, then 22 (starttime).
        let middle = ["0"; 17].join(" ");
        std::fs::write(
            dir.join("stat"),
            format!("{pid} (fake) S 0 {middle} {start_ticks} 0 0\n"),
        )
        .unwrap();
        std::os::unix::fs::symlink(format!("/usr/bin/fake-{pid}"), dir.join("exe")).unwrap();
        std::fs::write(dir.join("cmdline"), format!("fake-{pid}\0--flag\0")).unwrap();
    }

    fn cached(id: &Identifier) -> Vec<(u32, u64)> {
        let mut keys: Vec<(u32, u64)> = id.cache.lock().unwrap().iter().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn a_full_cache_forgets_the_least_recently_used_process_only() {
        let proc_root = tempfile::tempdir().unwrap();
        for pid in [101, 102, 103] {
            fake_process(proc_root.path(), pid, 1000 + u64::from(pid));
        }
        let id = Identifier::new(Settings {
            proc_root: proc_root.path().to_path_buf(),
            ..Settings::default()
        })
        .with_cache_capacity(2);
        // An empty kernel comm skips the comm check, which the fake entries would fail.
        let origin = |pid: u32| Origin {
            tgid: pid,
            tid: pid,
            ..Default::default()
        };
        for pid in [101, 102] {
            let p = id.identify(&origin(pid));
            assert_eq!(p.enrichment_error, None);
            assert_eq!(p.exe, Some(format!("/usr/bin/fake-{pid}")));
        }
        assert_eq!(cached(&id), vec![(101, 1101), (102, 1102)]);
        // 101 again comes from the cache (its exe link is gone now) and is the most
        // recently used.
        std::fs::remove_file(proc_root.path().join("101/exe")).unwrap();
        let p = id.identify(&origin(101));
        assert_eq!(p.exe.as_deref(), Some("/usr/bin/fake-101"), "a cache hit");
        // A third process evicts the least recently used, 102; the table is not emptied.
        assert_eq!(id.identify(&origin(103)).enrichment_error, None);
        assert_eq!(cached(&id), vec![(101, 1101), (103, 1103)]);
        assert_eq!(
            id.identify(&origin(101)).exe.as_deref(),
            Some("/usr/bin/fake-101"),
            "still cached"
        );
    }

    #[test]
    fn a_gone_process_keeps_the_kernel_identity() {
        let origin = Origin {
            tgid: 7,
            uid: 0,
            comm: *b"ghost\0\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        };
        let empty = tempfile::tempdir().unwrap();
        let id = Identifier::new(Settings {
            proc_root: empty.path().to_path_buf(),
            ..Settings::default()
        });
        let p = id.identify(&origin);
        assert_eq!((p.pid, p.uid, p.comm.as_str()), (7, 0, "ghost"));
        assert_eq!(p.user.as_deref(), Some("root"));
        assert_eq!(p.exe, None);
        assert!(p.enrichment_error.unwrap().contains("may have exited"));
    }

    #[test]
    fn cgroup_paths_are_found_by_id() {
        let root = tempfile::tempdir().unwrap();
        let leaf = root.path().join("system.slice/ci.service");
        std::fs::create_dir_all(&leaf).unwrap();
        let ino = std::fs::metadata(&leaf).unwrap().ino();
        let id = Identifier::new(Settings {
            cgroup_root: Some(root.path().to_path_buf()),
            ..Settings::default()
        });
        assert_eq!(
            id.cgroup_path(ino).as_deref(),
            Some("/system.slice/ci.service")
        );
        assert_eq!(id.cgroup_path(1), None);
    }

    #[test]
    fn allowlist_is_replaced_or_extended() {
        let only = env_allowlist(Some(&["A".into()]), &["B".into()]);
        assert_eq!(only, ["A".to_owned(), "B".to_owned()].into());
        assert!(env_allowlist(None, &[]).contains("GITHUB_JOB"));
    }
}
