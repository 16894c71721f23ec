//! Helpers for mcptrail's integration tests: real cgroups, a real agent process, real servers
//! and clients. The tests run as root and fail, never skip, when something cannot be set up.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
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
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .join("mcptrail");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo xtask test does)",
        bin.display()
    );
    bin
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

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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
    let child = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .arg("--directory")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting python3 -m http.server");
    let server = Reaped(child);
    wait_listening(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
    server
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
        let listen_port = free_port();
        let mut cmd = Command::new(agent_bin());
        cmd.arg("--state-dir")
            .arg(state_dir)
            .arg("run")
            .arg("--listen-port")
            .arg(listen_port.to_string())
            .arg("--cgroup")
            .arg(&cgroup.path)
            .arg("--shutdown-grace")
            .arg("2");
        for t in targets {
            cmd.arg("--target").arg(t);
        }
        let mut child = cmd
            .env("MCPTRAIL_LOG", "info")
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

/// Runs `mcptrail tail` with the given extra arguments.
pub fn tail(state_dir: &Path, args: &[&str]) -> Output {
    Command::new(agent_bin())
        .arg("--state-dir")
        .arg(state_dir)
        .arg("tail")
        .args(args)
        .output()
        .expect("running mcptrail tail")
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
