//! `cargo xtask demo`: a newcomer's first look. Starts a real MCP server (the official Python
//! SDK), the agent attached to a child cgroup of its own, and a real MCP client inside that
//! cgroup; then prints the trail the calls left and verifies it. Nothing outside the demo's
//! cgroup is intercepted, and its state lives in a temporary folder.
#![forbid(unsafe_code)]

use std::process::{Command, Stdio};

use mcptrail_tests::*;

fn main() {
    require_root();
    let work = tempfile::Builder::new()
        .prefix("mcptrail-demo-")
        .tempdir()
        .unwrap();
    let state = work.path().join("state");
    let port = free_port();
    println!("1. An MCP server (official Python SDK) on 127.0.0.1:{port}.");
    let _server = mcp_server(port, &[]);
    let cgroup = TestCgroup::new("demo");
    println!(
        "2. The agent, redirecting 127.0.0.1:{port} for processes in {}.",
        cgroup.path.display()
    );
    let mut agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);
    println!(
        "3. An MCP client in that cgroup: it lists tools, calls three, reads a resource, gets a prompt."
    );
    let out = cgroup
        .command(mcp_python().to_str().unwrap())
        .arg(fixture("mcp_client.py"))
        .arg(format!("http://127.0.0.1:{port}/mcp"))
        .args(["legacy", "--sampling"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the MCP client failed");
    println!(
        "   the client got: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert!(agent.stop().success(), "the agent did not stop cleanly");

    let bin = agent_bin();
    let run = |args: &[&str]| {
        let status = Command::new(&bin)
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "mcptrail {args:?} failed");
    };
    println!("\n4. The trail (mcptrail tail -n 100):\n");
    run(&["tail", "-n", "100"]);
    println!("\n5. Its integrity (mcptrail verify):\n");
    run(&["verify"]);
    println!(
        "\nOne record in full: {} --state-dir {} tail -n 1 --json\n(the demo's state is removed when it exits)",
        bin.display(),
        state.display()
    );
}
