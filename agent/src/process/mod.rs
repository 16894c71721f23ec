//! Process identity: what the kernel captured at connect() plus what /proc still knows.
//!
//! The kernel's part (pid, thread, uid, gid, comm, cgroup id) is taken in the caller's own
//! context and is always there. /proc adds the executable and command line; a process that
//! has exited by the time the proxy looks still gets a record, which says the enrichment
//! missed.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use agent_common::Origin;

use crate::audit::record::Process;

/// Bytes of command line kept; argv beyond this is cut and the record says so.
pub const CMDLINE_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot read {path}: {source} (the process may have exited)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// The identity of the process behind an origin record, read from `proc_root` (`/proc`).
pub fn identify(origin: &Origin, proc_root: &Path) -> Process {
    let mut p = Process {
        pid: origin.tgid,
        tid: origin.tid,
        uid: origin.uid,
        gid: origin.gid,
        comm: comm(&origin.comm),
        cgroup_id: origin.cgroup_id,
        ..Default::default()
    };
    let dir = proc_root.join(origin.tgid.to_string());
    let mut errors = Vec::new();
    match read_link(&dir.join("exe")) {
        Ok(exe) => p.exe = Some(exe),
        Err(e) => errors.push(e.to_string()),
    }
    match read(&dir.join("cmdline")) {
        Ok(raw) => {
            let (args, truncated) = parse_cmdline(&raw, CMDLINE_MAX);
            p.cmdline = Some(args);
            p.cmdline_truncated = truncated;
        }
        Err(e) => errors.push(e.to_string()),
    }
    if !errors.is_empty() {
        p.enrichment_error = Some(errors.join("; "));
    }
    p
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let origin = Origin {
            tgid: std::process::id(),
            tid: std::process::id(),
            comm: *b"test\0\0\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        };
        let p = identify(&origin, Path::new("/proc"));
        assert_eq!(p.comm, "test");
        assert_eq!(
            p.exe.as_deref(),
            Some(std::env::current_exe().unwrap().to_str().unwrap())
        );
        assert!(!p.cmdline.unwrap().is_empty());
        assert_eq!(p.enrichment_error, None);
    }

    #[test]
    fn a_gone_process_keeps_the_kernel_identity() {
        let origin = Origin {
            tgid: 7,
            uid: 1000,
            comm: *b"ghost\0\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        };
        let empty = tempfile::tempdir().unwrap();
        let p = identify(&origin, empty.path());
        assert_eq!((p.pid, p.uid, p.comm.as_str()), (7, 1000, "ghost"));
        assert_eq!(p.exe, None);
        assert!(p.enrichment_error.unwrap().contains("may have exited"));
    }
}
