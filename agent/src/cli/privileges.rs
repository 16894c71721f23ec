//! What `mcptrail run` needs from the kernel, checked before anything is loaded, so that a
//! service started with too little says which capability is missing and why, instead of
//! failing half-way (or, worse, running with attribution quietly missing).
//!
//! The set was found by test (tests/tests/service.rs runs the agent under exactly the unit's
//! set as a non-root user, and, with this check skipped, without each one, to see what the
//! kernel refuses): no `CAP_SYS_ADMIN`.
#![forbid(unsafe_code)]

use std::collections::HashSet;

use caps::{CapSet, Capability};

/// Each capability the agent needs, and what for.
pub const NEEDED: &[(Capability, &str)] = &[
    (
        Capability::CAP_BPF,
        "to create the eBPF maps and load the programs",
    ),
    (
        Capability::CAP_PERFMON,
        "for the verifier to accept the programs (BPF_PROG_LOAD is refused without it)",
    ),
    (
        Capability::CAP_NET_ADMIN,
        "to attach the programs to the cgroup's socket hooks and mark the agent's own upstream sockets (SO_MARK)",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "to read other users' /proc/PID/exe and environ: the caller's executable and CI job",
    ),
    (
        Capability::CAP_DAC_READ_SEARCH,
        "to read root-only files: the policy, brokered secrets, token keys, client keys",
    ),
];

/// What the kernel also takes in place of a needed capability: `CAP_SYS_ADMIN` for BPF and
/// perfmon (kernels before 5.8 knew only it), `CAP_DAC_OVERRIDE` for reading any file. Root
/// in a container with a trimmed set may have these instead.
fn stands_in(needed: Capability) -> &'static [Capability] {
    match needed {
        Capability::CAP_BPF | Capability::CAP_PERFMON => &[Capability::CAP_SYS_ADMIN],
        Capability::CAP_DAC_READ_SEARCH => &[Capability::CAP_DAC_OVERRIDE],
        _ => &[],
    }
}

/// The needed capabilities not in `effective` (nor a stand-in), with why each is needed.
pub fn missing(effective: &HashSet<Capability>) -> Vec<(Capability, &'static str)> {
    NEEDED
        .iter()
        .filter(|(c, _)| {
            !effective.contains(c) && !stands_in(*c).iter().any(|s| effective.contains(s))
        })
        .copied()
        .collect()
}

/// Set to `1`, `run` skips the check: the tests use it to show what the kernel itself refuses
/// without each capability (the check would stop the agent before the kernel is asked).
pub const UNCHECKED_ENV: &str = "MCPTRAIL_UNCHECKED_CAPABILITIES";

/// Fails, naming each missing capability and the fix, unless this process has them all.
pub fn check() -> anyhow::Result<()> {
    if std::env::var_os(UNCHECKED_ENV).is_some_and(|v| v == "1") {
        tracing::warn!("{UNCHECKED_ENV}=1: the capability check is skipped");
        return Ok(());
    }
    let effective = caps::read(None, CapSet::Effective)
        .map_err(|e| anyhow::anyhow!("reading this process's capabilities: {e}"))?;
    let missing = missing(&effective);
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(c, why)| format!("{c} ({why})"))
        .collect();
    let all: Vec<String> = NEEDED.iter().map(|(c, _)| c.to_string()).collect();
    anyhow::bail!(
        "`mcptrail run` lacks {}. Run it as root, or give it exactly these capabilities, as the packaged unit does (mcptrail.service: AmbientCapabilities={})",
        list.join(", "),
        all.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_missing_capability_is_named_with_its_reason() {
        let all: HashSet<Capability> = NEEDED.iter().map(|(c, _)| *c).collect();
        assert!(missing(&all).is_empty());
        for (cap, _) in NEEDED {
            let mut less = all.clone();
            less.remove(cap);
            let m = missing(&less);
            assert_eq!(m.len(), 1);
            assert_eq!(m[0].0, *cap);
        }
        assert_eq!(missing(&HashSet::new()).len(), NEEDED.len());
    }

    #[test]
    fn what_the_kernel_takes_instead_counts() {
        let container_root: HashSet<Capability> = [
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_DAC_OVERRIDE,
        ]
        .into();
        assert!(missing(&container_root).is_empty());
        let no_admin: HashSet<Capability> =
            [Capability::CAP_SYS_PTRACE, Capability::CAP_DAC_OVERRIDE].into();
        let m: Vec<Capability> = missing(&no_admin).into_iter().map(|(c, _)| c).collect();
        assert_eq!(
            m,
            [
                Capability::CAP_BPF,
                Capability::CAP_PERFMON,
                Capability::CAP_NET_ADMIN
            ]
        );
    }

    #[test]
    fn the_packaged_unit_grants_exactly_the_needed_set() {
        let unit = include_str!("../../../packaging/mcptrail.service");
        let names: HashSet<String> = NEEDED.iter().map(|(c, _)| c.to_string()).collect();
        for key in ["AmbientCapabilities=", "CapabilityBoundingSet="] {
            let line = unit
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in the unit"));
            let granted: HashSet<String> = line.split_whitespace().map(str::to_owned).collect();
            assert_eq!(granted, names, "{key}");
        }
    }
}
