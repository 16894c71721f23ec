//! The trail as an operator uses it: the agent writes and signs it, `verify` checks it with
//! the local key or an exported one, and an edit made straight in RocksDB is caught.
use std::os::unix::fs::MetadataExt;
use std::process::{Output, Stdio};
use std::time::Duration;

use mcptrail::audit::Event;
use mcptrail_tests::*;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_agent_signs_its_trail_and_verify_catches_an_edit() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = work.path().join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("index.html"), "hi").unwrap();
    let port = free_port();
    let _server = http_server(&site, port);
    let cgroup = TestCgroup::new("trail");
    let state = work.path().join("state");
    let mut agent = Agent::start(&state, &cgroup, &[format!("127.0.0.1:{port}")]);
    for _ in 0..3 {
        let ok = cgroup
            .command("curl")
            .args(["-sS", "--fail", "-o", "/dev/null"])
            .arg(format!("http://127.0.0.1:{port}/index.html"))
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
    }
    wait_for_record(
        &state,
        Duration::from_secs(10),
        "of three connections",
        |_| {
            records(&state)
                .iter()
                .filter(|r| matches!(r.event, Event::Connection(_)))
                .count()
                == 3
        },
    );
    assert!(agent.stop().success());

    // Root only: the state directory, the key folder and the key.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("keys")), 0o700);
    assert_eq!(mode(&state.join("keys/checkpoint.ed25519")), 0o600);

    // The stop signs a final checkpoint: the whole trail is covered.
    let out = mcptrail(&state, &["verify"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    // agent_start, then an `http` and a `connection` record per curl, then agent_stop.
    let n = records(&state).len();
    assert_eq!(n, 8);
    assert!(
        said.starts_with(&format!("OK: {n} records (1..{n})")),
        "{said}"
    );
    assert!(
        said.contains(&format!("newest covers record {n}; 0 newer records")),
        "{said}"
    );

    // With an exported key, and against a stranger's key.
    let pubkey = work.path().join("trail.pub");
    let out = mcptrail(
        &state,
        &["key", "export", "--out", pubkey.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = mcptrail(&state, &["verify", "--pubkey", pubkey.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let stranger = work.path().join("stranger.pub");
    std::fs::write(
        &stranger,
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c\n",
    )
    .unwrap();
    let out = mcptrail(&state, &["verify", "--pubkey", stranger.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not genuine"), "{}", text(&out));

    // An edit made straight in RocksDB.
    {
        let path = state.join("trail");
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &path).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, cfs).unwrap();
        let cf = db.cf_handle("records").unwrap();
        let key = 3u64.to_be_bytes();
        let bytes = db.get_cf(&cf, key).unwrap().unwrap();
        let edited = String::from_utf8(bytes).unwrap().replace("curl", "cur1");
        db.put_cf(&cf, key, edited).unwrap();
    }
    let out = mcptrail(&state, &["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("BROKEN: the trail breaks at record 3"),
        "{said}"
    );
    assert!(said.contains("changed after it was written"), "{said}");
}

#[test]
fn retention_cuts_at_a_checkpoint_and_the_rest_still_verifies() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let site = work.path().join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("index.html"), "hi").unwrap();
    let port = free_port();
    let _server = http_server(&site, port);
    let cgroup = TestCgroup::new("retain");
    let state = work.path().join("state");
    let target = [format!("127.0.0.1:{port}")];
    let mut agent = Agent::start_with(
        &state,
        &cgroup,
        &target,
        &["--checkpoint-every", "2"],
        false,
    );
    for _ in 0..6 {
        let ok = cgroup
            .command("curl")
            .args(["-sS", "--fail", "-o", "/dev/null"])
            .arg(format!("http://127.0.0.1:{port}/index.html"))
            .status()
            .unwrap();
        assert!(ok.success());
    }
    assert!(agent.stop().success());
    let before = records(&state).len();
    assert!(before >= 14, "{before}");

    // Restarted over a size limit it cannot meet: the oldest quarter goes at once.
    let mut again = Agent::start_with(&state, &cgroup, &target, &["--retain-mb", "0"], false);
    std::thread::sleep(Duration::from_millis(300));
    let log = again.log();
    assert!(again.stop().success());
    let after = records(&state);
    // The second run added its start and stop; retention took the oldest records.
    assert!(
        after.len() < before + 2,
        "nothing was removed: {} records\n{log}",
        after.len()
    );
    let first = after[0].seq;
    assert!(first > 1);
    let out = mcptrail(&state, &["verify"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!(
            "records up to {} were removed by retention",
            first - 1
        )),
        "{said}"
    );
}
