//! Durability under fire: concurrent real MCP clients, the agent killed with SIGKILL in the
//! middle (fail closed, so nothing goes around it), then restarted. Every call a client saw
//! answered must be in the trail, request and answer, and the trail must verify: over plain
//! HTTP with sync durability, and over terminated TLS in both durability modes (a SIGKILL is
//! not a host crash: buffered records are in the log before the client's last byte).
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mcptrail::audit::Event;
use mcptrail::audit::record::Direction;
use mcptrail_tests::*;

const CLIENTS: usize = 4;

#[test]
fn every_call_a_client_completed_survives_a_sigkill() {
    sigkill_under_load("sigkill", false, "sync");
}

#[test]
fn every_call_over_tls_survives_a_sigkill_in_both_durability_modes() {
    sigkill_under_load("sigkill-tls-sync", true, "sync");
    sigkill_under_load("sigkill-tls-buffered", true, "buffered");
}

fn sigkill_under_load(label: &str, tls: bool, durability: &str) {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let pki = TestPki::new(work.path());
    let _server = if tls {
        https_mcp_server(port, &pki)
    } else {
        mcp_server(port, &[])
    };
    let cgroup = TestCgroup::new(label);
    let state = work.path().join("state");
    let guard = state.clone();
    let _pins = scopeguard(move || {
        let _ = Command::new(agent_bin())
            .arg("--state-dir")
            .arg(&guard)
            .arg("detach")
            .output();
    });
    let target = [format!("127.0.0.1:{port}")];
    let listen = free_port().to_string();
    let args = [
        "--fail-mode",
        "closed",
        "--listen-port",
        &listen,
        "--durability",
        durability,
        "--upstream-ca",
        pki.ca.to_str().unwrap(),
    ];
    let mut agent = Agent::start_with(&state, &cgroup, &target, &args, false);
    let host_ca = export_host_ca(&state, work.path());
    let url = if tls {
        format!("https://localhost:{port}/mcp")
    } else {
        format!("http://127.0.0.1:{port}/mcp")
    };

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let mut child = cgroup
            .command(mcp_python().to_str().unwrap())
            .env("SSL_CERT_FILE", &host_ca)
            .arg(fixture("mcp_load_client.py"))
            .arg(&url)
            .arg(format!("c{c}"))
            .arg("100000")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let reader =
            std::thread::spawn(move || out.lines().map_while(Result::ok).collect::<Vec<_>>());
        clients.push((Reaped(child), reader));
    }
    // Let them get going, then kill the agent mid-flight.
    let start = Instant::now();
    while records(&state).len() < 200 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the clients made no progress:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.kill9();
    let mut completed = HashSet::new();
    for (mut child, reader) in clients {
        // Fail closed: the clients' next calls are refused, and they stop.
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.0.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "a client kept going after the agent died"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        completed.extend(reader.join().unwrap());
    }
    assert!(
        completed.len() >= 20,
        "too few calls completed to mean anything: {}",
        completed.len()
    );

    // The restarted agent adopts the pins; the trail is read and verified as it is.
    let mut again = Agent::start_with(&state, &cgroup, &target, &args, false);
    let stopped = again.stop();
    assert!(stopped.success(), "{stopped}:\n{}", again.log());
    let answered: HashSet<String> = records(&state)
        .into_iter()
        .filter_map(|r| match r.event {
            Event::Mcp(e) if e.direction == Direction::ServerToClient => e
                .result
                .as_ref()
                .and_then(|res| res["content"][0]["text"].as_str().map(str::to_owned)),
            _ => None,
        })
        .collect();
    let missing: Vec<&String> = completed
        .iter()
        .filter(|t| !answered.contains(*t))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} completed calls have no answer in the trail: {missing:?}",
        missing.len(),
        completed.len()
    );
    assert_verifies(&state);
    if tls {
        assert!(
            records(&state).iter().any(|r| matches!(&r.event,
                Event::Mcp(e) if e.connection.tls.as_ref().is_some_and(|t| t.mode == "terminate"))),
            "the calls went over terminated TLS"
        );
    }
    println!(
        "{label}: {} calls completed before the SIGKILL; all {} are in the trail",
        completed.len(),
        completed.len()
    );
}

/// Runs `f` on drop.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
