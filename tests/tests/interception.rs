//! Interception on a real host, as root: IPv6 and v4-mapped destinations, wildcard and
//! host-name targets, getpeername, every loop guard, foreign network namespaces, a remote
//! gateway behind a veth pair, target reload, status, and a crashed agent. Each test makes its
//! own child cgroup (and namespaces) and cleans up.
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use mcptrail::audit::Event;
use mcptrail::audit::record::{ConnectionEvent, Status};
use mcptrail_tests::*;
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(10);

/// Connects, sends a byte, and prints how many bytes came back before the connection ended
/// (a reset counts as none).
const REFUSED_PROBE: &str = "
import socket, sys
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), 5)
try:
    s.sendall(b'x')
    print(len(s.recv(10)))
except ConnectionResetError:
    print(0)
";

/// A folder served by the test HTTP servers.
fn site() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "hello from the gateway\n").unwrap();
    dir
}

/// Runs tests/fixtures/tcp_client.py (in the cgroup when given) and parses its JSON line.
fn client(cmd: Command, args: &[&str]) -> (u32, serde_json::Value) {
    let mut cmd = cmd;
    let (pid, out) = output_with_pid(cmd.arg(tcp_client()).args(args));
    assert!(
        out.status.success(),
        "client {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    (pid, serde_json::from_str(line.trim()).unwrap())
}

fn python_in(cgroup: &TestCgroup) -> Command {
    cgroup.command("python3")
}

fn connection_of(state: &std::path::Path, pid: u32) -> ConnectionEvent {
    let rec = wait_for_record(
        state,
        WAIT,
        &format!("for pid {pid}"),
        |r| matches!(&r.event, Event::Connection(c) if c.process.pid == pid),
    );
    match rec.event {
        Event::Connection(c) => *c,
        _ => unreachable!(),
    }
}

fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status["kernel_counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {status:#}"))
}

#[test]
fn ipv6_and_v4_mapped_destinations_are_redirected_and_getpeername_shows_the_gateway() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = site();
    let port = free_port();
    let _v4 = http_server(site.path(), port);
    let _v6 = http_server_on(site.path(), "::1", port, None);
    let cgroup = TestCgroup::new("v6");
    let state = work.path().join("state");
    let agent = Agent::start(
        &state,
        &cgroup,
        &[format!("[::1]:{port}"), format!("127.0.0.1:{port}")],
    );

    // Native IPv6.
    let (pid6, out6) = client(
        python_in(&cgroup),
        &["::1", &port.to_string(), "--family", "6"],
    );
    assert_eq!(out6["status_line"], "HTTP/1.0 200 OK");
    assert_eq!(
        out6["peer"],
        serde_json::json!(["::1", port]),
        "getpeername must show the gateway"
    );
    let c6 = connection_of(&state, pid6);
    assert_eq!(c6.connection.original_dst, format!("[::1]:{port}"));
    assert_eq!(c6.connection.proxy, format!("[::1]:{}", agent.listen_port));
    assert_eq!(
        c6.connection.target.as_deref(),
        Some(format!("[::1]:{port}").as_str())
    );
    assert_eq!(c6.outcome.status, Status::Closed);

    // IPv4 through a dual-stack IPv6 socket: the connect6 hook sees ::ffff:127.0.0.1.
    let (pidm, outm) = client(
        python_in(&cgroup),
        &["::ffff:127.0.0.1", &port.to_string(), "--family", "6"],
    );
    assert_eq!(outm["status_line"], "HTTP/1.0 200 OK");
    assert_eq!(outm["peer"], serde_json::json!(["::ffff:127.0.0.1", port]));
    let cm = connection_of(&state, pidm);
    assert_eq!(cm.connection.original_dst, format!("127.0.0.1:{port}"));
    assert_eq!(
        cm.connection.proxy,
        format!("127.0.0.1:{}", agent.listen_port)
    );

    // Plain IPv4: getpeername4.
    let (pid4, out4) = client(python_in(&cgroup), &["127.0.0.1", &port.to_string()]);
    assert_eq!(out4["peer"], serde_json::json!(["127.0.0.1", port]));
    connection_of(&state, pid4);

    let status = agent.status();
    assert_eq!(counter(&status, "redirected"), 3);
    assert_eq!(counter(&status, "established"), 3);
    assert!(counter(&status, "peername_rewritten") >= 3);
}

#[test]
fn wildcard_and_host_name_targets() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = site();
    let (p1, p2) = (free_port(), free_port());
    let _s1 = http_server(site.path(), p1);
    let _s2 = http_server(site.path(), p2);
    let cgroup = TestCgroup::new("names");
    let state = work.path().join("state");
    let _agent = Agent::start(
        &state,
        &cgroup,
        &[format!("*:{p1}"), format!("localhost:{p2}")],
    );

    let (a, _) = client(python_in(&cgroup), &["127.0.0.1", &p1.to_string()]);
    assert_eq!(
        connection_of(&state, a).connection.target.as_deref(),
        Some(format!("*:{p1}").as_str())
    );
    let (b, _) = client(python_in(&cgroup), &["127.0.0.1", &p2.to_string()]);
    assert_eq!(
        connection_of(&state, b).connection.target.as_deref(),
        Some(format!("localhost:{p2}").as_str())
    );
}

#[test]
fn loop_guards_hold_together() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = site();
    let port = free_port();
    let _server = http_server(site.path(), port);
    let cgroup = TestCgroup::new("loops");
    let state = work.path().join("state");
    // The agent runs inside the cgroup it watches, so its own upstream connections pass
    // through the hook; and its own port is a target too.
    let listen = free_port();
    let mark = "0x1234";
    let agent = Agent::start_with(
        &state,
        &cgroup,
        &[format!("*:{port}"), format!("127.0.0.1:{listen}")],
        &[
            "--listen-port",
            &listen.to_string(),
            "--upstream-mark",
            mark,
        ],
        true,
    );
    assert_eq!(
        agent.listen_port, listen,
        "the helper's port is overridden by ours"
    );

    // A normal client: redirected, and the agent's upstream connect is skipped by tgid.
    let (pid, out) = client(python_in(&cgroup), &["127.0.0.1", &port.to_string()]);
    assert_eq!(out["status_line"], "HTTP/1.0 200 OK");
    connection_of(&state, pid);

    // A socket carrying the agent's mark is never redirected: it reaches the server itself.
    let (_, marked) = client(
        python_in(&cgroup),
        &["127.0.0.1", &port.to_string(), "--mark", mark],
    );
    assert_eq!(marked["status_line"], "HTTP/1.0 200 OK");

    // Targeting the proxy's own port does not loop: the hook leaves it alone, and the proxy
    // refuses a connection that has no origin.
    let out = cgroup
        .command("python3")
        .args(["-c", REFUSED_PROBE, &listen.to_string()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
    wait_for_record(&state, WAIT, "refusing the self-target", |r| {
        matches!(&r.event, Event::Refused(_))
    });

    let status = agent.status();
    assert_eq!(counter(&status, "redirected"), 1, "{status:#}");
    assert!(counter(&status, "skipped_self") >= 1, "{status:#}");
    assert_eq!(counter(&status, "skipped_mark"), 1, "{status:#}");
    assert_eq!(counter(&status, "skipped_proxy_dst"), 1, "{status:#}");
    assert_eq!(status["proxy_counters"]["origin_misses"], 1, "{status:#}");
}

#[test]
fn remote_gateway_in_a_namespace_and_foreign_namespaces_are_left_alone() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = site();
    let gw = Netns::new("gw", 231);
    let port = free_port();
    let _server = http_server_on(site.path(), &gw.ns_addr, port, Some(&gw));
    let cgroup = TestCgroup::new("netns");
    let state = work.path().join("state");
    let target = format!("{}:{port}", gw.ns_addr);
    let agent = Agent::start(&state, &cgroup, std::slice::from_ref(&target));

    // From the host namespace, across the veth: redirected, relayed, recorded.
    let (pid, out) = client(python_in(&cgroup), &[&gw.ns_addr, &port.to_string()]);
    assert_eq!(out["status_line"], "HTTP/1.0 200 OK");
    assert_eq!(out["peer"], serde_json::json!([gw.ns_addr, port]));
    let c = connection_of(&state, pid);
    assert_eq!(c.connection.original_dst, target);

    // The same address:port from inside another namespace (the gateway's own), by a process
    // in the watched cgroup: not the proxy's namespace, so left alone.
    // (Into the cgroup first: `ip netns exec` mounts the namespace's own /sys.)
    let mut in_ns = cgroup.command("ip");
    in_ns.args(["netns", "exec", &gw.name, "python3"]);
    let (_, local) = client(in_ns, &[&gw.ns_addr, &port.to_string()]);
    assert_eq!(local["status_line"], "HTTP/1.0 200 OK");

    let status = agent.status();
    assert_eq!(counter(&status, "redirected"), 1, "{status:#}");
    assert_eq!(counter(&status, "skipped_other_netns"), 1, "{status:#}");
}

#[test]
fn sighup_reloads_targets_without_dropping_connections() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = site();
    let (a, b) = (free_port(), free_port());
    let _sa = http_server(site.path(), a);
    let _sb = http_server(site.path(), b);
    let cgroup = TestCgroup::new("reload");
    let state = work.path().join("state");
    let file = work.path().join("targets");
    std::fs::write(&file, format!("# gateways\n127.0.0.1:{a}\n")).unwrap();
    let agent = Agent::start_with(
        &state,
        &cgroup,
        &[],
        &["--targets-file", file.to_str().unwrap()],
        false,
    );

    // Hold a connection to A open through the proxy.
    let mut held = python_in(&cgroup)
        .arg(tcp_client())
        .args(["127.0.0.1", &a.to_string(), "--hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut held_out = BufReader::new(held.stdout.take().unwrap());
    let mut first = String::new();
    held_out.read_line(&mut first).unwrap();
    assert!(first.contains("\"connected\": true"), "{first}");

    // B is not a target yet.
    let (pb, _) = client(python_in(&cgroup), &["127.0.0.1", &b.to_string()]);
    // Swap A for B and reload.
    std::fs::write(&file, format!("127.0.0.1:{b}\n")).unwrap();
    agent.signal(Signal::SIGHUP);
    let change = wait_for_record(&state, WAIT, "of the target change", |r| {
        matches!(r.event, Event::TargetsChanged(_))
    });
    let Event::TargetsChanged(change) = change.event else {
        unreachable!()
    };
    assert_eq!((change.added, change.removed), (1, 1));
    assert_eq!(change.entries, [format!("127.0.0.1:{b}")]);

    let (pb2, _) = client(python_in(&cgroup), &["127.0.0.1", &b.to_string()]);
    connection_of(&state, pb2);
    // The held connection to A still works after A stopped being a target.
    held.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut second = String::new();
    held_out.read_line(&mut second).unwrap();
    assert!(second.contains("200 OK"), "{second}");
    assert!(held.wait().unwrap().success());
    let records = records(&state);
    let pids: Vec<u32> = records
        .iter()
        .filter_map(|r| match &r.event {
            Event::Connection(c) => Some(c.process.pid),
            _ => None,
        })
        .collect();
    assert!(
        pids.contains(&held.id()),
        "held connection recorded: {pids:?}"
    );
    assert!(
        !pids.contains(&pb),
        "B was not a target before the reload: {pids:?}"
    );

    // A bad file keeps the targets in force.
    std::fs::write(&file, "not a target\n").unwrap();
    agent.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    let status = agent.status();
    assert_eq!(
        status["targets"][0]["entry"],
        format!("127.0.0.1:{b}"),
        "{status:#}"
    );
}

#[test]
fn status_lists_programs_targets_and_connections_that_bypass_the_proxy() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = site();
    let port = free_port();
    let _server = http_server(site.path(), port);
    let cgroup = TestCgroup::new("status");
    let state = work.path().join("state");

    // A connection opened before the agent starts.
    let mut early = python_in(&cgroup)
        .arg(tcp_client())
        .args(["127.0.0.1", &port.to_string(), "--hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(early.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let early_local: serde_json::Value = serde_json::from_str(line.trim()).unwrap();

    let agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);
    let status = agent.status();
    let programs: Vec<&str> = status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for p in [
        "mcptrail_sockops",
        "mcptrail_connect4",
        "mcptrail_connect6",
        "mcptrail_getpeername4",
        "mcptrail_getpeername6",
    ] {
        assert!(programs.contains(&p), "{p} missing from {programs:?}");
    }
    assert_eq!(status["targets"][0]["entry"], format!("127.0.0.1:{port}"));
    assert_eq!(status["cgroup"], cgroup.path.display().to_string());
    let bypassing = status["bypassing"].as_array().unwrap();
    let want = format!("127.0.0.1:{}", early_local["local"][1]);
    assert!(
        bypassing.iter().any(|b| b["local"] == want.as_str()),
        "{want} not in {bypassing:#?}"
    );

    // The human form says the same.
    let text = Command::new(agent_bin())
        .arg("--state-dir")
        .arg(&state)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("bypass the proxy"), "{text}");
    assert!(text.contains("mcptrail_connect6"), "{text}");
    early.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(early.wait().unwrap().success());
}

#[test]
fn after_kill_9_traffic_goes_direct_and_the_next_start_records_the_gap() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = site();
    let port = free_port();
    let _server = http_server(site.path(), port);
    let cgroup = TestCgroup::new("kill9");
    let state = work.path().join("state");
    let target = [format!("127.0.0.1:{port}")];
    let mut agent = Agent::start(&state, &cgroup, &target);
    let (p1, _) = client(python_in(&cgroup), &["127.0.0.1", &port.to_string()]);
    connection_of(&state, p1);
    agent.kill9();

    // Fail open: the links died with the agent, so clients reach the gateway directly.
    let (p2, out) = client(python_in(&cgroup), &["127.0.0.1", &port.to_string()]);
    assert_eq!(out["status_line"], "HTTP/1.0 200 OK");

    let _again = Agent::start(&state, &cgroup, &target);
    let start = records(&state)
        .into_iter()
        .rev()
        .find_map(|r| match r.event {
            Event::AgentStart(s) => Some(s),
            _ => None,
        })
        .unwrap();
    let gap = start
        .previous_run
        .expect("the restart notes the previous run");
    assert!(!gap.ended_cleanly, "{gap:?}");
    assert!(gap.last_record_time.is_some());
    assert!(
        !records(&state)
            .iter()
            .any(|r| matches!(&r.event, Event::Connection(c) if c.process.pid == p2))
    );
}

/// Removes a fail-closed agent's pins even when the test fails half-way.
struct PinGuard(std::path::PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = Command::new(agent_bin())
            .arg("--state-dir")
            .arg(&self.0)
            .arg("detach")
            .output();
    }
}

fn curl_in(cgroup: &TestCgroup, port: u16) -> (u32, std::process::ExitStatus) {
    let child = cgroup
        .command("curl")
        .args(["-sS", "--fail", "-o", "/dev/null", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/index.html"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    (pid, out.status)
}

#[test]
fn fail_closed_refuses_calls_while_the_agent_is_down_and_a_restart_adopts_the_pins() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = site();
    let port = free_port();
    let _server = http_server(site.path(), port);
    let cgroup = TestCgroup::new("closed");
    let state = work.path().join("state");
    let _pins = PinGuard(state.clone());
    let listen = free_port().to_string();
    let target = [format!("127.0.0.1:{port}")];
    let args = ["--fail-mode", "closed", "--listen-port", &listen];

    let mut agent = Agent::start_with(&state, &cgroup, &target, &args, false);
    let (p1, ok) = curl_in(&cgroup, port);
    assert!(ok.success(), "agent log:\n{}", agent.log());
    connection_of(&state, p1);
    let status = agent.status();
    assert_eq!(status["fail_mode"], "closed");
    let pin_dir = std::path::PathBuf::from(status["pin_dir"].as_str().unwrap());
    assert!(pin_dir.exists(), "{status:#}");

    // Crash: the pinned redirect stays, nobody listens, so the call is refused (curl exit 7:
    // could not connect) instead of reaching the gateway unaudited.
    agent.kill9();
    let (_, down) = curl_in(&cgroup, port);
    assert_eq!(
        down.code(),
        Some(7),
        "a call went through while the agent was down"
    );

    // A restart adopts the pinned programs and maps, and traffic flows, audited, again.
    let mut again = Agent::start_with(&state, &cgroup, &target, &args, false);
    let status = again.status();
    assert_eq!(status["adopted_pinned_programs"], true, "{status:#}");
    assert_eq!(status["programs"].as_array().unwrap().len(), 5);
    let (p2, ok) = curl_in(&cgroup, port);
    assert!(ok.success(), "agent log:\n{}", again.log());
    connection_of(&state, p2);
    assert!(agent_starts_noting_a_gap(&state));

    // A clean stop keeps the pins too; `detach` removes them and traffic goes direct.
    assert!(again.stop().success());
    let (_, down) = curl_in(&cgroup, port);
    assert_eq!(down.code(), Some(7));
    let out = Command::new(agent_bin())
        .arg("--state-dir")
        .arg(&state)
        .arg("detach")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pin_dir.exists());
    let (_, direct) = curl_in(&cgroup, port);
    assert!(
        direct.success(),
        "after detach the gateway is reached directly"
    );
}

fn agent_starts_noting_a_gap(state: &std::path::Path) -> bool {
    records(state).iter().any(|r| {
        matches!(&r.event, Event::AgentStart(s)
            if s.previous_run.as_ref().is_some_and(|p| !p.ended_cleanly))
    })
}

#[test]
fn two_agents_on_one_cgroup_coexist() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = site();
    let (a, b) = (free_port(), free_port());
    let _sa = http_server(site.path(), a);
    let _sb = http_server(site.path(), b);
    let cgroup = TestCgroup::new("coexist");
    let (state_a, state_b) = (work.path().join("a"), work.path().join("b"));
    let _agent_a = Agent::start(&state_a, &cgroup, &[format!("127.0.0.1:{a}")]);
    let _agent_b = Agent::start(&state_b, &cgroup, &[format!("127.0.0.1:{b}")]);

    // Each agent's programs run beside the other's; each redirects only its own target.
    let (pa, _) = client(python_in(&cgroup), &["127.0.0.1", &a.to_string()]);
    let (pb, _) = client(python_in(&cgroup), &["127.0.0.1", &b.to_string()]);
    connection_of(&state_a, pa);
    connection_of(&state_b, pb);
    let in_a = |pid| {
        records(&state_a)
            .iter()
            .any(|r| matches!(&r.event, Event::Connection(c) if c.process.pid == pid))
    };
    assert!(!in_a(pb), "agent A recorded B's connection");
}
