//! `mcptrail doctor`: is this host ready for the agent, and is the agent doing its job? Each
//! check prints one verdict line and, when something is wrong, the fix. Exit status 1 when any
//! check fails (a warning alone does not fail). It runs as root: the agent's control socket,
//! its capabilities and its keys are root's to look at.
#![forbid(unsafe_code)]

use std::fmt;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::config::{self, ConfigFile, Explicit};
use super::run::RunArgs;
use crate::control::{self, Request};
use crate::intercept::target::TargetHost;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The agent's configuration file, for its targets, mark and retention [default:
    /// /etc/mcptrail/mcptrail.toml when it exists]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Seconds to wait for each gateway to accept a connection.
    #[arg(long, value_name = "SECS", default_value_t = 3)]
    pub connect_timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        })
    }
}

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do, when the verdict is not `Ok`.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Check {
            name,
            verdict: Verdict::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn bad(
        name: &'static str,
        verdict: Verdict,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Check {
            name,
            verdict,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:<14} {}", self.verdict, self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n     {:<14} fix: {fix}", "")?;
        }
        Ok(())
    }
}

/// `6.18.44-fc` → (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn kernel() -> Check {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    match kernel_version(&release) {
        Some(v) if v >= (5, 15) => Check::ok("kernel", format!("Linux {release}")),
        _ => Check::bad(
            "kernel",
            Verdict::Fail,
            format!("Linux {release}"),
            "the agent needs Linux 5.15 or newer (cgroup sock_addr hooks with the socket cookie)",
        ),
    }
}

fn btf() -> Check {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Check::ok("kernel BTF", "/sys/kernel/btf/vmlinux")
    } else {
        Check::bad(
            "kernel BTF",
            Verdict::Warn,
            "no /sys/kernel/btf/vmlinux",
            "a kernel built with CONFIG_DEBUG_INFO_BTF=y gives better verifier messages",
        )
    }
}

fn cgroup2() -> Check {
    match crate::intercept::cgroup::cgroup2_root() {
        Some(p) => Check::ok("cgroup2", format!("mounted at {}", p.display())),
        None => Check::bad(
            "cgroup2",
            Verdict::Fail,
            "no cgroup2 mount",
            "mount it: `mount -t cgroup2 none /sys/fs/cgroup/unified` (or boot with systemd.unified_cgroup_hierarchy=1)",
        ),
    }
}

/// Whether `mounts` (the text of /proc/self/mounts) has a bpf file system at `at`.
pub fn has_bpffs(mounts: &str, at: &str) -> bool {
    mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == at && f[2] == "bpf"
    })
}

fn bpffs() -> Check {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if has_bpffs(&mounts, "/sys/fs/bpf") {
        Check::ok("bpffs", "mounted at /sys/fs/bpf")
    } else {
        Check::bad(
            "bpffs",
            Verdict::Fail,
            "no bpf file system at /sys/fs/bpf (`--fail-mode closed` pins its programs there)",
            "`mount -t bpf bpf /sys/fs/bpf`",
        )
    }
}

/// The running agent's capabilities when there is one (`pid`), else this process's: what
/// `mcptrail run` would have if started from here.
fn capabilities(pid: Option<i32>) -> Check {
    let whose = match pid {
        Some(p) => format!("the agent (pid {p})"),
        None => "this process (no agent runs)".to_owned(),
    };
    let effective = match caps::read(pid, caps::CapSet::Effective) {
        Ok(e) => e,
        Err(e) => {
            return Check::bad(
                "capabilities",
                Verdict::Fail,
                format!("cannot read those of {whose}: {e}"),
                "run doctor as root",
            );
        }
    };
    let missing = super::privileges::missing(&effective);
    if missing.is_empty() {
        Check::ok(
            "capabilities",
            format!("{whose} has every capability `mcptrail run` needs"),
        )
    } else {
        let names: Vec<String> = missing.iter().map(|(c, _)| c.to_string()).collect();
        Check::bad(
            "capabilities",
            Verdict::Fail,
            format!("{whose} lacks {}", names.join(", ")),
            "run the agent as root or as the packaged unit does (AmbientCapabilities in mcptrail.service)",
        )
    }
}

/// Whether a mode lets anyone but the owner in.
pub fn open_to_others(mode: u32) -> bool {
    mode & 0o077 != 0
}

fn state_dir_check(state_dir: &Path) -> Check {
    let meta = match std::fs::metadata(state_dir) {
        Ok(m) => m,
        Err(e) => {
            return Check::bad(
                "state dir",
                Verdict::Warn,
                format!("{}: {e}", state_dir.display()),
                "the agent makes it (mode 0700) at its first start",
            );
        }
    };
    let owner = nix::unistd::User::from_uid(meta.uid().into())
        .ok()
        .flatten()
        .map_or_else(|| meta.uid().to_string(), |u| u.name);
    let mode = meta.mode() & 0o7777;
    if open_to_others(mode) {
        return Check::bad(
            "state dir",
            Verdict::Fail,
            format!(
                "{} is mode {mode:04o}: others can read the trail and its keys",
                state_dir.display()
            ),
            format!("`chmod 700 {}`", state_dir.display()),
        );
    }
    if meta.uid() != 0 && owner != "mcptrail" {
        return Check::bad(
            "state dir",
            Verdict::Fail,
            format!("{} belongs to {owner}", state_dir.display()),
            format!(
                "`chown -R root:root {}` (or mcptrail:mcptrail for the packaged service)",
                state_dir.display()
            ),
        );
    }
    let keys = state_dir.join(crate::audit::keys::KEYS_DIR);
    let entries = match std::fs::read_dir(&keys) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Check::ok(
                "state dir",
                format!(
                    "{} (mode {mode:04o}, owner {owner}; no keys yet)",
                    state_dir.display()
                ),
            );
        }
        Err(e) => {
            return Check::bad(
                "state dir",
                Verdict::Warn,
                format!("cannot read {}: {e}", keys.display()),
                "run doctor as root to check the keys' modes",
            );
        }
    };
    for entry in entries.flatten() {
        let Ok(m) = entry.metadata() else { continue };
        // Certificates (`.pem`) are public; every other file there is a private key.
        let public = entry.path().extension().is_some_and(|e| e == "pem");
        if m.is_file() && !public && open_to_others(m.mode()) {
            return Check::bad(
                "state dir",
                Verdict::Fail,
                format!(
                    "the key {} is mode {:04o}",
                    entry.path().display(),
                    m.mode() & 0o7777
                ),
                format!("`chmod 600 {}`", entry.path().display()),
            );
        }
    }
    Check::ok(
        "state dir",
        format!("{} (mode {mode:04o}, owner {owner})", state_dir.display()),
    )
}

const GIB: u64 = 1024 * 1024 * 1024;

fn disk(state_dir: &Path, args: &RunArgs) -> Check {
    let at = if state_dir.exists() {
        state_dir
    } else {
        state_dir.parent().unwrap_or(Path::new("/"))
    };
    let free = match nix::sys::statvfs::statvfs(at) {
        Ok(s) => s.blocks_available() * s.fragment_size(),
        Err(e) => {
            return Check::bad(
                "disk",
                Verdict::Warn,
                format!("cannot read the free space of {}: {e}", at.display()),
                "check the state directory's file system",
            );
        }
    };
    let used = crate::audit::store::dir_size(state_dir);
    let mib = |b: u64| b / (1024 * 1024);
    match args.retain_mb {
        Some(limit) => {
            let room = (limit * 1024 * 1024).saturating_sub(used);
            if free >= room {
                Check::ok(
                    "disk",
                    format!(
                        "{} MiB free; the trail uses {} MiB of its {limit} MiB (retain_mb)",
                        mib(free),
                        mib(used)
                    ),
                )
            } else {
                Check::bad(
                    "disk",
                    Verdict::Fail,
                    format!(
                        "{} MiB free, but retention lets the trail grow {} MiB more",
                        mib(free),
                        mib(room)
                    ),
                    "free space or lower `[trail] retain_mb`; with the disk full, calls are refused (on_audit_failure = \"block\")",
                )
            }
        }
        None if free < GIB => Check::bad(
            "disk",
            Verdict::Warn,
            format!(
                "{} MiB free and no size limit on the trail ({} MiB now)",
                mib(free),
                mib(used)
            ),
            "set `[trail] retain_mb` (or retain_days) so the trail cannot fill the disk",
        ),
        None => Check::ok(
            "disk",
            format!(
                "{} MiB free; the trail uses {} MiB (no retain_mb limit)",
                mib(free),
                mib(used)
            ),
        ),
    }
}

fn host_ca(state_dir: &Path) -> Vec<Check> {
    let ca = match crate::proxy::tls::ca::HostCa::load(state_dir, &[]) {
        Ok(ca) => ca,
        Err(_) => {
            return vec![Check::bad(
                "host CA",
                Verdict::Warn,
                "no host CA yet",
                "the agent makes it at its first start; then `mcptrail ca install`",
            )];
        }
    };
    let installed = Path::new(super::ca::SYSTEM_CA_DIR).join(super::ca::installed_name(ca.pem()));
    let mut out = vec![if installed.exists() {
        Check::ok(
            "host CA",
            format!("in the system store ({})", installed.display()),
        )
    } else {
        Check::bad(
            "host CA",
            Verdict::Fail,
            "not in the system store: clients of HTTPS gateways will refuse the agent's leaves",
            "`mcptrail ca install`",
        )
    }];
    let environment = std::fs::read_to_string("/etc/environment").unwrap_or_default();
    let unset: Vec<&str> = ["NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"]
        .into_iter()
        .filter(|v| {
            std::env::var_os(v).is_none()
                && !environment
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("{v}=")))
        })
        .collect();
    out.push(if unset.is_empty() {
        Check::ok(
            "runtime CAs",
            "NODE_EXTRA_CA_CERTS, REQUESTS_CA_BUNDLE and SSL_CERT_FILE are set",
        )
    } else {
        Check::bad(
            "runtime CAs",
            Verdict::Warn,
            format!(
                "not set here or in /etc/environment: {}",
                unset.join(", ")
            ),
            "Node.js, Python requests and httpx do not read the system store by default: set the lines `mcptrail ca install` prints where their jobs get their environment",
        )
    });
    out
}

fn targets(args: &RunArgs, timeout: Duration) -> Vec<Check> {
    let targets = match super::run::all_targets(args) {
        Ok(t) => t,
        Err(e) => {
            return vec![Check::bad(
                "targets",
                Verdict::Fail,
                format!("{e:#}"),
                "fix the targets (`mcptrail config check`)",
            )];
        }
    };
    let mut out = Vec::new();
    for target in targets {
        if target.host == TargetHost::Any {
            out.push(Check::ok(
                "gateway",
                format!("{target}: any address on the port (nothing to dial)"),
            ));
            continue;
        }
        let addrs = match &target.host {
            TargetHost::Ip(ip) => vec![std::net::SocketAddr::new(*ip, target.port)],
            TargetHost::Name(n) => {
                match std::net::ToSocketAddrs::to_socket_addrs(&(n.as_str(), target.port)) {
                    Ok(a) => a.collect(),
                    Err(e) => {
                        out.push(Check::bad(
                            "gateway",
                            Verdict::Fail,
                            format!("{target}: does not resolve: {e}"),
                            "fix the name or the host's resolver",
                        ));
                        continue;
                    }
                }
            }
            TargetHost::Any => unreachable!("handled above"),
        };
        for addr in addrs {
            let what = match &target.host {
                TargetHost::Name(_) => format!("{target} ({addr})"),
                _ => addr.to_string(),
            };
            out.push(match dial(addr, args.upstream_mark, timeout) {
                Ok(()) => Check::ok("gateway", format!("{what} accepts connections")),
                Err(e) => Check::bad(
                    "gateway",
                    Verdict::Fail,
                    format!("{what} unreachable: {e}"),
                    "check the gateway and the network path to it",
                ),
            });
        }
    }
    out
}

/// A TCP connection with the agent's mark, so the hooks let it go direct (doctor asks whether
/// the gateway answers, not whether the agent does).
fn dial(addr: std::net::SocketAddr, mark: u32, timeout: Duration) -> std::io::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if mark != 0 {
        // Without CAP_NET_ADMIN the mark is refused; the connection then goes through the
        // agent, which answers for a live gateway too.
        let _ = socket.set_mark(mark);
    }
    socket.connect_timeout(&addr.into(), timeout)
}

fn agent(status: &Result<serde_json::Value, control::ControlError>) -> Vec<Check> {
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return vec![Check::bad(
                "agent",
                Verdict::Fail,
                format!("not running ({e})"),
                "`systemctl start mcptrail` (or `mcptrail run`); until then nothing is audited",
            )];
        }
    };
    let mut out = vec![Check::ok(
        "agent",
        format!(
            "running: pid {}, up {} s, {} programs attached",
            status["pid"],
            status["uptime_secs"],
            status["programs"].as_array().map_or(0, Vec::len)
        ),
    )];
    let bypassing = status["bypassing"].as_array().cloned().unwrap_or_default();
    out.push(if bypassing.is_empty() {
        Check::ok("bypassing", "no connection to a target goes around the agent")
    } else {
        Check::bad(
            "bypassing",
            Verdict::Fail,
            format!(
                "{} connection(s) to a target do not go through the agent (`mcptrail status` lists them)",
                bypassing.len()
            ),
            "restart the processes that opened them before the agent started, or find what routes around it",
        )
    });
    let failures = status["tls_client_failures"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    out.push(if failures.is_empty() {
        Check::ok("TLS clients", "no client has refused the agent's TLS")
    } else {
        let exes: Vec<String> = failures.keys().cloned().collect();
        Check::bad(
            "TLS clients",
            Verdict::Fail,
            format!(
                "handshakes failed for {} (most likely they do not trust the host CA)",
                exes.join(", ")
            ),
            "`mcptrail ca install`, and the runtime's variable (README: HTTPS gateways)",
        )
    });
    out
}

/// The run settings doctor judges: the configuration file's, or the defaults.
fn settings(config_file: Option<&Path>) -> anyhow::Result<RunArgs> {
    let mut args = RunArgs::defaults();
    if let Some(path) = config::config_path(config_file) {
        ConfigFile::load(&path)?.apply(&mut args, &Explicit::default());
    }
    Ok(args)
}

pub fn run(state_dir: &Path, args: DoctorArgs) -> anyhow::Result<()> {
    let settings = settings(args.config.as_deref())?;
    let status = control::request(state_dir, &Request::Status);
    let pid = status
        .as_ref()
        .ok()
        .and_then(|s| s["pid"].as_i64())
        .and_then(|p| i32::try_from(p).ok());
    let mut checks = vec![
        kernel(),
        btf(),
        cgroup2(),
        bpffs(),
        capabilities(pid),
        state_dir_check(state_dir),
        disk(state_dir, &settings),
    ];
    checks.extend(host_ca(state_dir));
    checks.extend(targets(
        &settings,
        Duration::from_secs(args.connect_timeout.max(1)),
    ));
    checks.extend(agent(&status));
    for c in &checks {
        println!("{c}");
    }
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    let warned = checks.iter().filter(|c| c.verdict == Verdict::Warn).count();
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed, {warned} warning(s)");
    }
    println!("all checks passed ({warned} warning(s))");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v857"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert!(kernel_version("5.4.0") < Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn bpffs_is_found_in_mounts() {
        let mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,nosuid 0 0\n";
        assert!(has_bpffs(mounts, "/sys/fs/bpf"));
        assert!(!has_bpffs("sysfs /sys sysfs rw 0 0\n", "/sys/fs/bpf"));
    }

    #[test]
    fn modes_open_to_others_are_caught() {
        assert!(!open_to_others(0o700));
        assert!(!open_to_others(0o600));
        assert!(open_to_others(0o755));
        assert!(open_to_others(0o640));
    }

    #[test]
    fn a_failed_check_prints_its_fix_on_the_next_line() {
        let c = Check::bad("state dir", Verdict::Fail, "mode 0755", "`chmod 700 /x`");
        assert_eq!(
            c.to_string(),
            "FAIL state dir      mode 0755\n                    fix: `chmod 700 /x`"
        );
        assert_eq!(
            Check::ok("kernel", "Linux 6.1").to_string(),
            "ok   kernel         Linux 6.1"
        );
    }
}
