//! A full disk under the trail, for real: the state directory on a small tmpfs that the test
//! fills while the agent runs. With `--on-audit-failure block` calls get a clear error and
//! nothing reaches the gateway unaudited; with `pass` they go through and every lost record
//! is counted.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use mcptrail_tests::*;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(path: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path)
    }

    /// Writes zeros until the file system refuses more.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

fn client(cgroup: &TestCgroup, port: u16) -> std::process::Output {
    let (_, out) = output_with_pid(
        cgroup
            .command(mcp_python().to_str().unwrap())
            .arg(fixture("mcp_client.py"))
            .arg(format!("http://127.0.0.1:{port}/mcp")),
    );
    out
}

/// Runs the scenario; returns the client's run on the full disk, the agent's status then, and
/// whether a client got through again once the disk had room (within a few tries).
fn run(mode: &str, label: &str) -> (std::process::Output, serde_json::Value, bool) {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = mcp_server(port, &[]);
    let cgroup = TestCgroup::new(label);
    let disk = Tmpfs::new(work.path().join("disk"), "32m");
    let state: &Path = &disk.0.join("state");
    let agent = Agent::start_with(
        state,
        &cgroup,
        &[format!("127.0.0.1:{port}")],
        &["--on-audit-failure", mode],
        false,
    );
    let before = client(&cgroup, port);
    assert!(
        before.status.success(),
        "{}",
        String::from_utf8_lossy(&before.stderr)
    );
    disk.fill();
    let after = client(&cgroup, port);
    let status = agent.status();
    // Room again: the store reopens on its next write, and calls flow (and are recorded).
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    let recovered = (0..5).any(|_| {
        let ok = client(&cgroup, port).status.success();
        if !ok {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        ok
    });
    drop(agent);
    if recovered {
        assert_verifies(state);
    }
    (after, status, recovered)
}

#[test]
fn a_full_disk_blocks_calls_with_a_clear_error() {
    let (after, status, recovered) = run("block", "disk-block");
    assert!(
        recovered,
        "calls stayed blocked after the disk had room again"
    );
    assert!(!after.status.success(), "a call went through unaudited");
    let said = String::from_utf8_lossy(&after.stderr);
    assert!(said.contains("audit trail cannot be written"), "{said}");
    assert!(
        status["proxy_counters"]["blocked_by_audit_failure"]
            .as_u64()
            .unwrap()
            >= 1,
        "{status:#}"
    );
}

#[test]
fn a_full_disk_lets_calls_pass_and_counts_the_losses() {
    let (after, status, recovered) = run("pass", "disk-pass");
    assert!(recovered);
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    assert!(
        status["proxy_counters"]["audit_losses"].as_u64().unwrap() >= 1,
        "{status:#}"
    );
    assert_eq!(status["proxy_counters"]["blocked_by_audit_failure"], 0);
}
