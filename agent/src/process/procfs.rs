//! Pure parsers for the /proc files the identity is read from.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProcfsError {
    #[error("/proc/PID/stat is not in the kernel's format ({0}); is /proc a procfs?")]
    Stat(&'static str),
}

/// The fields of /proc/PID/stat that identity needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    pub ppid: u32,
    /// Start time in clock ticks after boot: with the pid, it names one process for good,
    /// which is what guards the identity cache against pid reuse.
    pub start_ticks: u64,
}

/// Parses /proc/PID/stat. The command name sits in parentheses and may itself hold spaces
/// and parentheses, so the fields after it are found from the last `)`.
pub fn parse_stat(text: &str) -> Result<Stat, ProcfsError> {
    let open = text.find('(').ok_or(ProcfsError::Stat("no '('"))?;
    let close = text.rfind(')').ok_or(ProcfsError::Stat("no ')'"))?;
    if close < open {
        return Err(ProcfsError::Stat("')' before '('"));
    }
    let comm = text[open + 1..close].to_owned();
    // Fields from 3 (state) on; ppid is field 4 and starttime field 22.
    let rest: Vec<&str> = text[close + 1..].split_ascii_whitespace().collect();
    let field = |n: usize| {
        rest.get(n - 3)
            .copied()
            .ok_or(ProcfsError::Stat("too few fields"))
    };
    let ppid = field(4)?
        .parse()
        .map_err(|_| ProcfsError::Stat("ppid is not a number"))?;
    let start_ticks = field(22)?
        .parse()
        .map_err(|_| ProcfsError::Stat("starttime is not a number"))?;
    Ok(Stat {
        comm,
        ppid,
        start_ticks,
    })
}

/// The cgroup v2 path in /proc/PID/cgroup (the `0::` line).
pub fn parse_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end().to_owned())
        .filter(|p| !p.is_empty())
}

/// Boot time (seconds since the epoch) from /proc/stat's `btime` line.
pub fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The allow-listed variables of /proc/PID/environ (NUL-separated `NAME=value`). Nothing
/// else is kept: names outside the list are skipped without their value being copied.
pub fn parse_environ(raw: &[u8], allow: &HashSet<String>) -> BTreeMap<String, String> {
    raw.split(|&b| b == 0)
        .filter_map(|entry| {
            let eq = entry.iter().position(|&b| b == b'=')?;
            let name = std::str::from_utf8(&entry[..eq]).ok()?;
            allow.contains(name).then(|| {
                (
                    name.to_owned(),
                    String::from_utf8_lossy(&entry[eq + 1..]).into_owned(),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_names() {
        let line = "4242 (we ird) (name)) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200";
        assert_eq!(
            parse_stat(line).unwrap(),
            Stat {
                comm: "we ird) (name)".into(),
                ppid: 17,
                start_ticks: 987654
            }
        );
        assert!(parse_stat("1 (x) S 0").is_err());
        assert!(parse_stat("garbage").is_err());
    }

    #[test]
    fn stat_of_this_process() {
        let text = std::fs::read_to_string("/proc/self/stat").unwrap();
        let stat = parse_stat(&text).unwrap();
        assert_eq!(stat.ppid, std::os::unix::process::parent_id());
        assert!(stat.start_ticks > 0);
    }

    #[test]
    fn cgroup_v2_line() {
        assert_eq!(
            parse_cgroup("12:pids:/x\n0::/system.slice/ci.service\n").as_deref(),
            Some("/system.slice/ci.service")
        );
        assert_eq!(parse_cgroup("12:pids:/x\n"), None);
    }

    #[test]
    fn btime() {
        assert_eq!(
            parse_btime("cpu  1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        assert!(parse_btime(&std::fs::read_to_string("/proc/stat").unwrap()).is_some());
    }

    #[test]
    fn environ_keeps_only_the_allowlist() {
        let allow: HashSet<String> = ["GITHUB_JOB".to_owned(), "EMPTY".to_owned()].into();
        let raw = b"SECRET=hunter2\0GITHUB_JOB=build\0EMPTY=\0GITHUB_JOB_X=no\0junk\0";
        let env = parse_environ(raw, &allow);
        assert_eq!(env.len(), 2);
        assert_eq!(env["GITHUB_JOB"], "build");
        assert_eq!(env["EMPTY"], "");
    }
}
