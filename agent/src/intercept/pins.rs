//! Fail-closed mode: the programs' links and maps pinned in bpffs, so the redirect outlives
//! the agent. While no agent runs, redirected connections find no listener and are refused:
//! calls fail instead of going through unaudited. A restarted agent adopts what is pinned.
//!
//! Layout: `/sys/fs/bpf/mcptrail/<instance>/<object>/{link_<program>,map_<name>}`, where
//! `instance` comes from the state directory (one agent per trail) and `object` from the
//! embedded eBPF object, so an upgraded agent never adopts programs it did not build.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::InterceptError;

pub const BPFFS: &str = "/sys/fs/bpf";

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// The hooks die with the agent; traffic then goes direct (unaudited) until it restarts.
    Open,
    /// The hooks stay pinned while the agent is down; calls are refused until it restarts.
    Closed,
}

impl std::fmt::Display for FailMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        })
    }
}

fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..6])
}

/// The folder of this agent's pins (all object versions).
pub fn instance_dir(state_dir: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    Path::new(BPFFS)
        .join("mcptrail")
        .join(short_hash(canonical.as_os_str().as_encoded_bytes()))
}

/// The folder for the pins of one eBPF object inside an instance folder.
pub fn object_dir(instance: &Path, object: &[u8]) -> PathBuf {
    instance.join(short_hash(object))
}

pub fn link_path(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("link_{program}"))
}

pub fn map_path(dir: &Path, map: &str) -> PathBuf {
    dir.join(format!("map_{map}"))
}

/// True when a bpf file system is mounted at `mount_point` according to a mountinfo text.
pub fn bpffs_mounted(mountinfo: &str, mount_point: &str) -> bool {
    mountinfo.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        left.split_whitespace().nth(4) == Some(mount_point)
            && right.split_whitespace().next() == Some("bpf")
    })
}

/// Mounts bpffs at /sys/fs/bpf unless it already is (systemd usually does this).
pub fn ensure_bpffs() -> Result<(), InterceptError> {
    let err = |why: String| InterceptError::Pin {
        path: BPFFS.into(),
        why,
    };
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| err(e.to_string()))?;
    if bpffs_mounted(&mountinfo, BPFFS) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| err(format!("mounting bpffs failed: {e}")))
}

/// Removes every pin of an instance: the links go (and with them the programs' attachment)
/// once nothing else holds them. Returns how many pins were removed.
pub fn remove_instance(instance: &Path) -> Result<usize, InterceptError> {
    let err = |path: &Path, e: std::io::Error| InterceptError::Pin {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    let mut removed = 0;
    let objects = match std::fs::read_dir(instance) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(err(instance, e)),
    };
    for object in objects {
        let object = object.map_err(|e| err(instance, e))?.path();
        for pin in std::fs::read_dir(&object).map_err(|e| err(&object, e))? {
            let pin = pin.map_err(|e| err(&object, e))?.path();
            std::fs::remove_file(&pin).map_err(|e| err(&pin, e))?;
            removed += 1;
        }
        std::fs::remove_dir(&object).map_err(|e| err(&object, e))?;
    }
    std::fs::remove_dir(instance).map_err(|e| err(instance, e))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_depend_on_state_dir_and_object() {
        let a = instance_dir(Path::new("/var/lib/a"));
        let b = instance_dir(Path::new("/var/lib/b"));
        assert_ne!(a, b);
        assert!(a.starts_with("/sys/fs/bpf/mcptrail"));
        assert_ne!(object_dir(&a, b"one"), object_dir(&a, b"two"));
        assert_eq!(link_path(Path::new("/x"), "p"), PathBuf::from("/x/link_p"));
    }

    #[test]
    fn recognises_a_bpffs_mount() {
        let text = "40 25 0:33 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:15 - bpf bpf rw,mode=700\n";
        assert!(bpffs_mounted(text, "/sys/fs/bpf"));
        assert!(!bpffs_mounted(text, "/sys/fs/other"));
        assert!(!bpffs_mounted(
            "1 1 0:1 / /sys/fs/bpf rw - tmpfs t rw\n",
            "/sys/fs/bpf"
        ));
    }
}
