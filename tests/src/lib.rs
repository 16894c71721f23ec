//! Helpers for mcptrail's integration tests: real cgroups, a real agent process, real servers
//! and clients. The tests run as root and fail, never skip, when something cannot be set up.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read as _, Seek as _, SeekFrom};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use mcptrail::audit::Record;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Fails the test at once, with the reason, unless it runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads eBPF programs and makes cgroups: run it as root (cargo xtask test)"
    );
}

/// The agent binary: $MCPTRAIL_BIN (set by `cargo xtask test`), or the one cargo built next to
/// this test binary.
pub fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MCPTRAIL_BIN") {
        return bin.into();
    }
    // Test binaries live in target/<profile>/deps, other binaries in target/<profile>.
    let exe = std::env::current_exe().expect("current_exe");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("mcptrail"))
        .collect();
    candidates
        .iter()
        .find(|b| b.exists())
        .unwrap_or_else(|| {
            panic!("mcptrail is not built next to {} (looked at {candidates:?}): build it first; cargo xtask test does", exe.display())
        })
        .clone()
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

/// Waits until something accepts on `addr`.
pub fn wait_listening(addr: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child cgroup of the host's cgroup v2 hierarchy, removed on drop (its processes killed).
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let root = mcptrail::intercept::cgroup::cgroup2_mount(&mountinfo)
            .expect("no cgroup v2 hierarchy is mounted; these tests need one");
        let path = root.join(format!("mcptrail-test-{}-{name}", std::process::id()));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        TestCgroup { path }
    }

    /// Runs a program inside this cgroup: a shell moves itself in, then execs the program, so
    /// the returned pid is the program's own.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(self.path.join("cgroup.procs"))
            .arg(program);
        cmd
    }
}

impl TestCgroup {
    /// A cgroup below this one (named like a container scope, say); drop it before its parent.
    pub fn child(&self, name: &str) -> TestCgroup {
        let path = self.path.join(name);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        TestCgroup { path }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            let me = std::process::id() as i32;
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                if pid == me {
                    // A benchmark that moved itself in leaves for the parent, instead of
                    // killing itself (it used to end with status 137 after its report).
                    if let Some(parent) = self.path.parent() {
                        let _ = std::fs::write(parent.join("cgroup.procs"), me.to_string());
                    }
                    continue;
                }
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs a command to its end with stdout and stderr captured; returns its pid (the one the
/// trail names) and its output.
pub fn output_with_pid(cmd: &mut Command) -> (u32, Output) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let pid = child.id();
    (pid, child.wait_with_output().expect("waiting for a child"))
}

/// A child process killed on drop.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real HTTP server (Python's http.server) serving `dir` on 127.0.0.1:`port`.
pub fn http_server(dir: &Path, port: u16) -> Reaped {
    http_server_on(dir, "127.0.0.1", port, None)
}

/// A real HTTP server on `bind`:`port`, inside network namespace `netns` if given.
pub fn http_server_on(dir: &Path, bind: &str, port: u16, netns: Option<&Netns>) -> Reaped {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name, "python3"]);
            c
        }
        None => Command::new("python3"),
    };
    let child = cmd
        .args(["-m", "http.server", "--bind", bind])
        .arg(port.to_string())
        .arg("--directory")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting python3 -m http.server");
    let server = Reaped(child);
    let addr = if bind.contains(':') {
        format!("[{bind}]:{port}")
    } else {
        format!("{bind}:{port}")
    };
    match netns {
        // Reachable from here only once the veth link is up; the caller checks that.
        Some(ns) => ns.wait_listening(&addr),
        None => wait_listening(&addr, Duration::from_secs(10)),
    }
    server
}

/// The Python that has the official MCP SDK (`mcp`), installed by `cargo xtask setup` into
/// its own virtual environment; $MCPTRAIL_PYTHON overrides it.
pub fn mcp_python() -> PathBuf {
    let python = std::env::var_os("MCPTRAIL_PYTHON").map_or_else(
        || {
            let home = std::env::var_os("HOME").expect("HOME is set");
            Path::new(&home).join(".local/share/mcptrail/venv/bin/python")
        },
        PathBuf::from,
    );
    assert!(
        python.exists(),
        "{} is missing: `cargo xtask setup` installs the MCP SDK there",
        python.display()
    );
    python
}

/// The tests crate's folder (tests/ in the clone, the one holding `fixtures/`); every fixture
/// lookup goes through it. In order:
///
/// 1. `$MCPTRAIL_TESTS_DIR`, which xtask sets for the programs it starts (`cargo xtask demo`
///    and `bench`, and the demo `cargo xtask test` runs). When set it must hold `fixtures/`.
/// 2. The run-time `$CARGO_MANIFEST_DIR`, if it holds `fixtures/`: `cargo test` sets it to
///    this crate's folder in the clone being tested, right even when a shared target
///    directory (CI: a fresh clone each time, one CARGO_TARGET_DIR) holds a binary compiled
///    in another clone. Under `cargo run` of another package it names that package (`cargo
///    xtask` is `cargo run --package xtask`, and xtask's children inherit its environment),
///    which has no `fixtures/`: skipped.
/// 3. The compile-time `CARGO_MANIFEST_DIR`, if it holds `fixtures/`: a program started
///    directly, in the clone it was built in.
pub fn tests_dir() -> PathBuf {
    fn has_fixtures(dir: &Path) -> bool {
        dir.join("fixtures").is_dir()
    }
    if let Some(dir) = std::env::var_os("MCPTRAIL_TESTS_DIR") {
        let dir = PathBuf::from(dir);
        assert!(
            has_fixtures(&dir),
            "MCPTRAIL_TESTS_DIR={} has no fixtures/ folder: it should name the tests/ folder of the clone",
            dir.display()
        );
        return dir;
    }
    let candidates: Vec<PathBuf> = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(env!("CARGO_MANIFEST_DIR"))])
        .collect();
    match candidates.iter().find(|dir| has_fixtures(dir)) {
        Some(dir) => dir.clone(),
        None => panic!(
            "the tests' fixtures/ folder is in none of {candidates:?}: set MCPTRAIL_TESTS_DIR to the tests/ folder of the clone, or start this through cargo test or cargo xtask"
        ),
    }
}

/// A file in tests/fixtures (see `tests_dir` for where that is).
pub fn fixture(name: &str) -> PathBuf {
    let path = tests_dir().join("fixtures").join(name);
    assert!(path.exists(), "the fixture {} is missing", path.display());
    path
}

/// Starts a server and waits until something accepts on `addr`. Its stderr goes to an
/// anonymous temporary file, read only when the server does not come up: quiet when all is
/// well, and when it exits first or nothing listens within `within`, the failure quotes what
/// it printed (a missing file, a Python traceback, a port in use).
fn start_server(cmd: &mut Command, what: &str, addr: &str, within: Duration) -> Reaped {
    let mut log = tempfile::tempfile().expect("a temporary file for a server's stderr");
    let child_stderr = log.try_clone().expect("duplicating a file descriptor");
    let child = cmd
        .stderr(Stdio::from(child_stderr))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what} ({cmd:?}): {e}"));
    let mut server = Reaped(child);
    let mut printed = || {
        let mut bytes = Vec::new();
        let _ = log.seek(SeekFrom::Start(0));
        let _ = log.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let deadline = Instant::now() + within;
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = server.0.try_wait().expect("polling a child") {
            panic!(
                "nothing listens on {addr}: {what} exited with {status}; its stderr:\n{}",
                printed()
            );
        }
        if Instant::now() >= deadline {
            let _ = server.0.kill();
            let _ = server.0.wait();
            panic!(
                "nothing listens on {addr}: {what} did not listen within {within:?}; its stderr:\n{}",
                printed()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// A plain JSON-RPC echo server (tests/fixtures/jsonrpc_echo.py) on 127.0.0.1:`port`.
pub fn jsonrpc_echo(port: u16) -> Reaped {
    let child = Command::new("python3")
        .arg(fixture("jsonrpc_echo.py"))
        .arg(port.to_string())
        .spawn()
        .expect("starting the JSON-RPC echo server");
    let server = Reaped(child);
    wait_listening(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
    server
}

/// The official SDK's client (tests/fixtures/mcp_client.py) against 127.0.0.1:`port`/mcp, run
/// in `cgroup` to its end; fails the test with its stderr if it fails.
pub fn sdk_client(cgroup: &TestCgroup, port: u16) {
    let out = cgroup
        .command(mcp_python().to_str().unwrap())
        .arg(fixture("mcp_client.py"))
        .arg(format!("http://127.0.0.1:{port}/mcp"))
        .output()
        .expect("starting the SDK client");
    assert!(
        out.status.success(),
        "the SDK client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The official SDK's MCP server (tests/fixtures/mcp_server.py) on 127.0.0.1:`port`.
/// Its stderr is quoted if it does not come up (see `start_server`).
pub fn mcp_server(port: u16, extra: &[&str]) -> Reaped {
    start_server(
        Command::new(mcp_python())
            .arg(fixture("mcp_server.py"))
            .arg(port.to_string())
            .args(extra)
            .stdout(Stdio::null()),
        "the MCP server (tests/fixtures/mcp_server.py)",
        &format!("127.0.0.1:{port}"),
        Duration::from_secs(20),
    )
}

/// A CA, and a certificate for `localhost` and 127.0.0.1 signed by it, as PEM files: a
/// gateway for the TLS tests.
pub struct TestPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPki {
    pub fn new(dir: &Path) -> TestPki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mcptrail test gateway CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        leaf.subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let leaf = leaf.signed_by(&key, &ca).unwrap();
        let p = TestPki {
            ca: dir.join("gateway-ca.pem"),
            cert: dir.join("gateway.pem"),
            key: dir.join("gateway.key"),
        };
        std::fs::write(&p.ca, ca.pem()).unwrap();
        std::fs::write(&p.cert, leaf.pem()).unwrap();
        std::fs::write(&p.key, key.serialize_pem()).unwrap();
        p
    }
}

/// The official SDK's MCP server over HTTPS (uvicorn), with the test gateway's certificate.
pub fn https_mcp_server(port: u16, pki: &TestPki) -> Reaped {
    mcp_server(
        port,
        &[
            "--certfile",
            pki.cert.to_str().unwrap(),
            "--keyfile",
            pki.key.to_str().unwrap(),
        ],
    )
}

/// The agent's host CA (`mcptrail ca export`), written into `dir`.
pub fn export_host_ca(state_dir: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("host-ca.pem");
    let r = mcptrail(state_dir, &["ca", "export", "--out", out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    out
}

/// The TypeScript MCP SDK's node_modules, installed by `cargo xtask setup`: for NODE_PATH.
pub fn ts_sdk_modules() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let dir = PathBuf::from(home).join(".local/share/mcptrail/node/node_modules");
    assert!(
        dir.join("@modelcontextprotocol/sdk").exists(),
        "the TypeScript MCP SDK is not in {}: run `cargo xtask setup`",
        dir.display()
    );
    dir
}

/// The test client in tests/fixtures/tcp_client.py.
pub fn tcp_client() -> PathBuf {
    fixture("tcp_client.py")
}

/// Runs `ip` with the arguments, failing the test with its error.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to the host by a veth pair: a "remote" host for the tests.
/// Host side `10.T.0.1/30`, namespace side `10.T.0.2/30`, with T unique per namespace of
/// this test process. Removed on drop.
pub struct Netns {
    pub name: String,
    host_if: String,
    pub host_addr: String,
    pub ns_addr: String,
}

impl Netns {
    pub fn new(tag: &str, octet: u8) -> Netns {
        let id = std::process::id() % 10_000;
        let name = format!("mct-{id}-{tag}");
        let host_if = format!("mcth{id}{octet}");
        let ns_if = format!("mctn{id}{octet}");
        let host_addr = format!("10.{octet}.0.1");
        let ns_addr = format!("10.{octet}.0.2");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name,
            host_if,
            host_addr,
            ns_addr,
        };
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_addr),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ns.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.ns_addr),
            "dev",
            &ns_if,
        ]);
        ns.exec_ok(&["ip", "link", "set", &ns_if, "up"]);
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    fn exec_ok(&self, argv: &[&str]) {
        let out = self.command(argv[0]).args(&argv[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "in {}: {}: {}",
            self.name,
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until something listens on `addr` inside the namespace.
    pub fn wait_listening(&self, addr: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (host, port) = addr.rsplit_once(':').unwrap();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        loop {
            let ok = self
                .command("python3")
                .args([
                    "-c",
                    "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close()",
                    host,
                    port,
                ])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on {addr} in {}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A running `mcptrail run`, stopped with SIGTERM on drop.
pub struct Agent {
    child: Option<Child>,
    pub state_dir: PathBuf,
    pub listen_port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts the agent and waits until it says it is ready. Fails the test with the agent's
    /// own output if it exits first (for example because its eBPF programs did not load).
    pub fn start(state_dir: &Path, cgroup: &TestCgroup, targets: &[String]) -> Agent {
        Self::start_with(state_dir, cgroup, targets, &[], false)
    }

    /// Like `start`, with extra `run` arguments, and optionally with the agent itself moved
    /// into the cgroup it watches (to exercise the loop guards).
    pub fn start_with(
        state_dir: &Path,
        cgroup: &TestCgroup,
        targets: &[String],
        extra: &[&str],
        inside: bool,
    ) -> Agent {
        Self::start_logging(state_dir, cgroup, targets, extra, inside, "info")
    }

    /// Like `start_with`, logging at `level` (`debug` to see everything the agent says).
    pub fn start_logging(
        state_dir: &Path,
        cgroup: &TestCgroup,
        targets: &[String],
        extra: &[&str],
        inside: bool,
        level: &str,
    ) -> Agent {
        Self::start_env(state_dir, cgroup, targets, extra, inside, level, &[], &[])
    }

    /// Like `start_logging`, with more environment variables for the agent, and started
    /// through `wrapper` (a program and its arguments, `setpriv ...`) when one is given.
    #[allow(clippy::too_many_arguments)]
    pub fn start_env(
        state_dir: &Path,
        cgroup: &TestCgroup,
        targets: &[String],
        extra: &[&str],
        inside: bool,
        level: &str,
        env: &[(&str, &str)],
        wrapper: &[String],
    ) -> Agent {
        let listen_port = match extra.iter().position(|a| *a == "--listen-port") {
            Some(i) => extra[i + 1].parse().expect("--listen-port takes a number"),
            None => free_port(),
        };
        let bin = agent_bin();
        let mut cmd = if inside {
            cgroup.command(bin.to_str().expect("UTF-8 path"))
        } else if let Some((program, args)) = wrapper.split_first() {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(&bin);
            cmd
        } else {
            Command::new(&bin)
        };
        cmd.arg("--state-dir")
            .arg(state_dir)
            .arg("run")
            .arg("--cgroup")
            .arg(&cgroup.path)
            .arg("--shutdown-grace")
            .arg("2");
        for t in targets {
            cmd.arg("--target").arg(t);
        }
        if !extra.contains(&"--listen-port") {
            cmd.arg("--listen-port").arg(listen_port.to_string());
        }
        // Agents run side by side in the tests: none takes the default metrics port unless
        // the test asks for metrics (a flag, or its configuration file).
        if !extra.contains(&"--metrics-listen") && !extra.contains(&"--config") {
            cmd.args(["--metrics-listen", ""]);
        }
        cmd.args(extra);
        let mut child = cmd
            .env("MCPTRAIL_LOG", level)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the agent");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("mcptrail ready") {
                        let _ = ready_tx.send(());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let mut agent = Agent {
            child: Some(child),
            state_dir: state_dir.to_path_buf(),
            listen_port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ready_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                return agent;
            }
            if let Some(status) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "the agent exited with {status} before it was ready:\n{}",
                    agent.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not get ready within 30 s:\n{}",
                agent.log()
            );
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid() as i32), sig).expect("signalling the agent");
    }

    /// `mcptrail status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(agent_bin())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["status", "--json"])
            .output()
            .expect("running mcptrail status");
        assert!(
            out.status.success(),
            "mcptrail status failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).expect("status prints JSON")
    }

    /// Kills the agent with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agent already stopped");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the agent with SIGTERM and waits for it; returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("signalling the agent");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the agent ignored SIGTERM for 15 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `mcptrail --state-dir STATE ARGS...` to its end.
pub fn mcptrail(state_dir: &Path, args: &[&str]) -> Output {
    Command::new(agent_bin())
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running mcptrail {args:?}: {e}"))
}

/// Fails the test, with the report, unless `mcptrail verify` says the trail is whole.
pub fn assert_verifies(state_dir: &Path) {
    let out = mcptrail(state_dir, &["verify"]);
    assert!(
        out.status.success(),
        "the trail does not verify:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Runs `mcptrail tail` with the given extra arguments.
pub fn tail(state_dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["tail"];
    all.extend_from_slice(args);
    mcptrail(state_dir, &all)
}

/// Every record in the trail, parsed from `tail --json`.
pub fn records(state_dir: &Path) -> Vec<Record> {
    let out = tail(state_dir, &["--json", "-n", "1000000"]);
    assert!(
        out.status.success(),
        "mcptrail tail failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("tail prints UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad record line {l}: {e}")))
        .collect()
}

/// Polls the trail until a record matches, failing after `within`.
pub fn wait_for_record(
    state_dir: &Path,
    within: Duration,
    what: &str,
    pred: impl Fn(&Record) -> bool,
) -> Record {
    let deadline = Instant::now() + within;
    loop {
        let all = records(state_dir);
        if let Some(r) = all.iter().find(|r| pred(r)) {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no record {what} within {within:?}; the trail has:\n{all:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `mcp` records of one calling process, in trail order.
pub fn mcp_records(state_dir: &Path, pid: u32) -> Vec<mcptrail::audit::record::McpEvent> {
    records(state_dir)
        .into_iter()
        .filter_map(|r| match r.event {
            mcptrail::audit::Event::Mcp(e) if e.process.pid == pid => Some(*e),
            _ => None,
        })
        .collect()
}

/// Waits until `pid` has at least `n` MCP records, and returns them.
pub fn wait_mcp_records(
    state_dir: &Path,
    pid: u32,
    n: usize,
) -> Vec<mcptrail::audit::record::McpEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let recs = mcp_records(state_dir, pid);
        if recs.len() >= n || Instant::now() > deadline {
            assert!(recs.len() >= n, "{recs:#?}");
            return recs;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every file below `dir`, for searching a state directory byte by byte.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("reading a folder").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Whether `needle` occurs in `hay`.
pub fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Service tokens for the identity tests: real keys (test-only, in tests/fixtures/keys), real
/// signatures, JWK sets as an issuer would publish them.
pub mod tokens {
    use base64::Engine;
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    fn pem(name: &str) -> Vec<u8> {
        std::fs::read(super::fixture(&format!("keys/{name}.pem"))).expect("test key")
    }

    fn encoding_key(name: &str, alg: Algorithm) -> EncodingKey {
        let pem = pem(name);
        match alg {
            Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            other => panic!("no test key for {other:?}"),
        }
        .expect("test key loads")
    }

    /// A JWT signed with the named test key.
    pub fn sign(key: &str, alg: Algorithm, kid: &str, claims: &serde_json::Value) -> String {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &encoding_key(key, alg)).expect("signing")
    }

    /// The public JWK of a test key.
    pub fn jwk(key: &str, alg: Algorithm, kid: &str) -> serde_json::Value {
        if alg == Algorithm::EdDSA {
            let pem = String::from_utf8(pem(key)).unwrap();
            let sk = ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).expect("ed25519 key");
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sk.verifying_key().to_bytes());
            return serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"});
        }
        let mut jwk = Jwk::from_encoding_key(&encoding_key(key, alg), alg).expect("jwk");
        jwk.common.key_id = Some(kid.to_owned());
        serde_json::to_value(jwk).unwrap()
    }

    pub fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }
}
