//! Finding the cgroup v2 hierarchy the hooks attach to.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use super::InterceptError;

/// The mount point of the first cgroup2 file system in a `/proc/self/mountinfo` text.
/// `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape(mount_point)))
    })
}

/// The cgroup2 mount point of this host, if one is mounted.
pub fn cgroup2_root() -> Option<PathBuf> {
    cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup to attach to: the one given, checked, or the cgroup2 root of this host.
pub fn resolve(given: Option<&Path>) -> Result<PathBuf, InterceptError> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| {
                InterceptError::Cgroup {
                    path: "/proc/self/mountinfo".into(),
                    why: e.to_string(),
                }
            })?;
            cgroup2_mount(&mountinfo).ok_or(InterceptError::NoCgroup2)?
        }
    };
    if !path.join("cgroup.procs").exists() {
        return Err(InterceptError::Cgroup {
            path,
            why: "not a cgroup v2 folder (it has no cgroup.procs)".into(),
        });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn finds_the_hybrid_mount() {
        assert_eq!(
            cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_the_unified_mount() {
        let text = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(text), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn none_without_cgroup2_and_escapes_are_undone() {
        assert_eq!(cgroup2_mount("1 1 0:1 / / rw - ext4 /dev/x rw\n"), None);
        let text = "9 1 0:9 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(text), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn a_plain_folder_is_not_a_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve(Some(dir.path())).unwrap_err().to_string();
        assert!(err.contains("cgroup.procs"), "{err}");
    }
}
