//! The walking skeleton, end to end and as root: a real client in its own child cgroup
//! connects to a target, the eBPF hook redirects it through the agent's proxy to a real HTTP
//! server, the bytes arrive intact, and the trail names the client's pid and executable.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

use mcptrail::audit::Event;
use mcptrail::audit::record::Status;
use mcptrail_tests::*;

const WAIT: Duration = Duration::from_secs(10);

fn curl_path() -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", "command -v curl"])
        .output()
        .expect("looking up curl");
    let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        !path.is_empty(),
        "curl is not installed (cargo xtask setup installs it)"
    );
    std::fs::canonicalize(path).unwrap().display().to_string()
}

#[test]
fn curl_in_the_cgroup_is_redirected_relayed_and_recorded() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = work.path().join("site");
    std::fs::create_dir(&site).unwrap();
    // Big enough to take many reads and writes through the relay.
    let body: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(site.join("blob.bin"), &body).unwrap();
    let port = free_port();
    let _server = http_server(&site, port);

    let cgroup = TestCgroup::new("curl");
    let state = work.path().join("state");
    let mut agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);

    let out_file = work.path().join("got.bin");
    let (pid, out) = output_with_pid(
        cgroup
            .command("curl")
            .args(["-sS", "--fail", "-o"])
            .arg(&out_file)
            .arg(format!("http://127.0.0.1:{port}/blob.bin")),
    );
    assert!(
        out.status.success(),
        "curl failed: {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    assert!(
        std::fs::read(&out_file).unwrap() == body,
        "the body changed on the way"
    );

    let rec = wait_for_record(
        &state,
        WAIT,
        "for curl's connection",
        |r| matches!(&r.event, Event::Connection(c) if c.process.pid == pid),
    );
    let Event::Connection(c) = rec.event else {
        unreachable!()
    };
    assert_eq!(c.process.comm, "curl");
    assert_eq!(c.process.exe.as_deref(), Some(curl_path().as_str()));
    assert!(
        c.process
            .cmdline
            .unwrap()
            .iter()
            .any(|a| a.ends_with("/blob.bin"))
    );
    assert_eq!(c.connection.original_dst, format!("127.0.0.1:{port}"));
    assert_eq!(
        c.connection.proxy,
        format!("127.0.0.1:{}", agent.listen_port)
    );
    assert_eq!(c.outcome.status, Status::Closed);
    assert!(
        c.bytes.resp > body.len() as u64,
        "response bytes: {}",
        c.bytes.resp
    );
    assert!(c.bytes.req > 0);
    assert_eq!(c.process.uid, 0);

    // A connection from outside the cgroup goes straight to the server: the hook is scoped to
    // the cgroup it is attached to.
    let mut direct = TcpStream::connect(("127.0.0.1", port)).unwrap();
    direct
        .write_all(b"GET /blob.bin HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reply = Vec::new();
    direct.read_to_end(&mut reply).unwrap();
    assert!(reply.starts_with(b"HTTP/1.0 200"));

    assert!(agent.stop().success(), "agent log:\n{}", agent.log());
    let stop = wait_for_record(&state, WAIT, "of the agent stop", |r| {
        matches!(r.event, Event::AgentStop(_))
    });
    let Event::AgentStop(stop) = stop.event else {
        unreachable!()
    };
    assert_eq!(stop.counters["redirected"], 1, "{:?}", stop.counters);
    assert_eq!(stop.counters["established"], 1, "{:?}", stop.counters);
    let connections = records(&state)
        .into_iter()
        .filter(|r| matches!(r.event, Event::Connection(_)))
        .count();
    assert_eq!(
        connections, 1,
        "only curl's connection went through the proxy"
    );
}

#[test]
fn a_connection_straight_to_the_proxy_is_refused_and_recorded() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let cgroup = TestCgroup::new("refuse");
    let state = work.path().join("state");
    let target_port = free_port();
    let agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{target_port}")]);

    let mut sock = TcpStream::connect(("127.0.0.1", agent.listen_port)).unwrap();
    let local = sock.local_addr().unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let _ = sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = [0u8; 64];
    // Closed (EOF) or reset: either way, nothing is relayed.
    match sock.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("the proxy answered {n} bytes to a connection it should refuse"),
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::WouldBlock,
            "the proxy kept the connection open"
        ),
    }

    let rec = wait_for_record(
        &state,
        WAIT,
        "of the refusal",
        |r| matches!(&r.event, Event::Refused(e) if e.client == local.to_string()),
    );
    let Event::Refused(e) = rec.event else {
        unreachable!()
    };
    assert!(e.reason.contains("no redirect origin"), "{}", e.reason);
    assert_eq!(e.proxy, format!("127.0.0.1:{}", agent.listen_port));
}

#[test]
fn tail_follow_shows_new_records_as_they_are_written() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = work.path().join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("index.html"), "hello").unwrap();
    let port = free_port();
    let _server = http_server(&site, port);
    let cgroup = TestCgroup::new("follow");
    let state = work.path().join("state");
    let agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);

    let mut follower = Reaped(
        std::process::Command::new(agent_bin())
            .arg("--state-dir")
            .arg(&state)
            .args(["tail", "-f", "-n", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = follower.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // Let the follower open the trail before the record exists.
    std::thread::sleep(Duration::from_millis(300));

    let status = cgroup
        .command("curl")
        .args(["-sS", "--fail", "-o", "/dev/null"])
        .arg(format!("http://127.0.0.1:{port}/index.html"))
        .status()
        .unwrap();
    assert!(status.success(), "agent log:\n{}", agent.log());

    // The GET is recorded as an `http` record when its response ends, the connection when it
    // closes: both must show up while tail follows.
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while !(seen.iter().any(|l: &String| l.contains(" http curl["))
        && seen.iter().any(|l| l.contains(" connection curl[")))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "tail -f printed only {seen:#?}; agent log:\n{}",
                agent.log()
            ),
        }
    }
    let http = seen.iter().find(|l| l.contains(" http curl[")).unwrap();
    assert!(
        http.contains(&format!("-> 127.0.0.1:{port} GET /index.html status=200")),
        "{http}"
    );
}
