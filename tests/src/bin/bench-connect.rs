//! connect() cost with and without mcptrail's hook, measured in one run and reported as
//! ratios to the direct path.
//!
//! Run as root with `cargo xtask bench`. Two measurements:
//!
//! 1. The programs' own cost per run, from the kernel's BPF statistics
//!    (`kernel.bpf_stats_enabled`, switched on for the run and restored after): exact, and
//!    free of the noise of the TCP handshake.
//! 2. The connect() system call as a client sees it, against a loopback listener, in three
//!    cgroups measured in interleaved rounds so that drift hits all alike: `direct` (no
//!    program attached), `hook, not a target` (the agent attached, destination not a target:
//!    what every other connection on the host pays) and `hook, redirected` (origin capture,
//!    rewrite, sockops hand-over, handshake with the proxy). Only connect() is timed; sockets
//!    close with an RST (SO_LINGER 0) so TIME_WAIT cannot exhaust ports.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use mcptrail_tests::{Agent, TestCgroup, require_root};
use socket2::{Domain, Protocol, Socket, Type};

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    require_root();
    let rounds = env_or("BENCH_ROUNDS", 9);
    let per_round = env_or("BENCH_CONNECTS", 2000);

    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in server.incoming() {
            drop(conn);
        }
    });

    let stats_before = std::fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".into());
    std::fs::write(BPF_STATS, "1").expect("enabling kernel.bpf_stats_enabled");

    let work = tempfile::tempdir().unwrap();
    let direct_cg = TestCgroup::new("bench-direct");
    let other_cg = TestCgroup::new("bench-other");
    let redirect_cg = TestCgroup::new("bench-redirect");
    let other_agent = Agent::start(&work.path().join("a"), &other_cg, &["127.0.0.1:1".into()]);
    let redirect_agent = Agent::start(&work.path().join("b"), &redirect_cg, &[addr.to_string()]);

    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, cg) in [&direct_cg, &other_cg, &redirect_cg].iter().enumerate() {
            enter(&cg.path);
            samples[i].push(round(addr, per_round));
        }
    }
    enter(direct_cg.path.parent().unwrap());

    let per_run = |agent: &Agent| -> Vec<(String, u64, f64)> {
        let status = agent.status();
        status["programs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let runs = p["run_count"].as_u64().unwrap_or(0);
                let ns = p["run_time_ns"].as_u64().unwrap_or(0);
                let avg = if runs == 0 {
                    0.0
                } else {
                    ns as f64 / runs as f64
                };
                (p["name"].as_str().unwrap_or("?").to_owned(), runs, avg)
            })
            .collect()
    };
    let other_stats = per_run(&other_agent);
    let redirect_stats = per_run(&redirect_agent);
    let _ = std::fs::write(BPF_STATS, stats_before.trim());

    println!("mcptrail connect() benchmark: {rounds} interleaved rounds x {per_round} connects");
    println!();
    println!("Program cost per run (kernel BPF statistics):");
    println!(
        "{:<24} {:>22} {:>22}",
        "program", "not a target (ns)", "redirected (ns)"
    );
    for ((name, runs_o, avg_o), (_, runs_r, avg_r)) in other_stats.iter().zip(&redirect_stats) {
        if *runs_o + *runs_r == 0 {
            continue;
        }
        println!(
            "{name:<24} {:>12.0} ({runs_o:>7} runs) {:>9.0} ({runs_r:>7} runs)",
            avg_o, avg_r
        );
    }
    println!();
    println!("connect() latency, median of round medians:");
    println!(
        "{:<22} {:>9} {:>9} {:>8}",
        "set-up", "p50 (ns)", "p99 (ns)", "p50 ratio"
    );
    let summary: Vec<(u64, u64)> = samples.iter().map(|s| median_of(s)).collect();
    for (name, (p50, p99)) in ["direct", "hook, not a target", "hook, redirected"]
        .iter()
        .zip(&summary)
    {
        println!(
            "{name:<22} {p50:>9} {p99:>9} {:>8.2}x",
            *p50 as f64 / summary[0].0 as f64
        );
    }
}

/// Moves this whole process into a cgroup: sockets made afterwards belong to it.
fn enter(cgroup: &std::path::Path) {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .unwrap_or_else(|e| panic!("moving into {}: {e}", cgroup.display()));
}

/// One round: p50 and p99 of `n` connect() calls, in nanoseconds.
fn round(addr: SocketAddr, n: usize) -> (u64, u64) {
    let mut t: Vec<u64> = Vec::with_capacity(n);
    for _ in 0..n {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        sock.set_linger(Some(Duration::ZERO)).unwrap();
        let start = Instant::now();
        sock.connect(&addr.into()).unwrap();
        t.push(start.elapsed().as_nanos() as u64);
    }
    t.sort_unstable();
    (t[n / 2], t[n * 99 / 100])
}

fn median_of(rounds: &[(u64, u64)]) -> (u64, u64) {
    let mut p50: Vec<u64> = rounds.iter().map(|r| r.0).collect();
    let mut p99: Vec<u64> = rounds.iter().map(|r| r.1).collect();
    p50.sort_unstable();
    p99.sort_unstable();
    (p50[p50.len() / 2], p99[p99.len() / 2])
}
