//! The release package (`cargo xtask dist`): its binary needs only what `Depends` names; it
//! installs into a scratch root with its maintainer scripts (the service user, the unit
//! enabled), upgrades keeping the configuration and the trail, removes and purges cleanly
//! (the trail stays unless told); the installed binary runs from there; the unit passes
//! `systemd-analyze verify` and is scored by `systemd-analyze security`.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mcptrail_tests::*;

/// The `.deb` that `cargo xtask test` built with `cargo xtask dist` before the tests.
fn deb() -> PathBuf {
    let path = std::env::var_os("MCPTRAIL_DEB").map(PathBuf::from).expect(
        "MCPTRAIL_DEB is not set: run the tests with `cargo xtask test`, or build the package with `cargo xtask dist` and point MCPTRAIL_DEB at it",
    );
    assert!(
        path.exists(),
        "MCPTRAIL_DEB={} does not exist",
        path.display()
    );
    path
}

fn ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package names in a Depends field (`libc6 (>= 2.34), passwd` → {libc6, passwd}).
fn depends(control: &str) -> BTreeSet<String> {
    let line = control
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends:"))
        .expect("the package has a Depends field");
    line.split(',')
        .map(|d| d.split_whitespace().next().unwrap().to_owned())
        .collect()
}

/// The package that owns a library, as dpkg knows the file: the path ldd printed, its real
/// path, or either with or without `/usr` (merged-/usr hosts list files under both).
fn owner(path: &Path) -> Option<String> {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut candidates = vec![path.to_path_buf(), real.clone()];
    for p in [path, real.as_path()] {
        match p.strip_prefix("/usr") {
            Ok(rest) => candidates.push(Path::new("/").join(rest)),
            Err(_) => candidates.push(Path::new("/usr").join(p.strip_prefix("/").unwrap())),
        }
    }
    candidates.into_iter().find_map(|c| {
        let out = Command::new("dpkg").arg("-S").arg(&c).output().ok()?;
        out.status.success().then(|| {
            let owner = String::from_utf8_lossy(&out.stdout);
            owner.split(':').next().unwrap().trim().to_owned()
        })
    })
}

#[test]
fn the_binary_links_only_what_depends_names() {
    let deb = deb();
    let control = text(&ok(Command::new("dpkg-deb").arg("--field").arg(&deb)));
    let wanted = depends(&control);
    let dir = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir.path()));
    let bin = dir.path().join("usr/bin/mcptrail");
    let ldd = text(&ok(Command::new("ldd").arg(&bin)));
    let mut libs = 0;
    for line in ldd.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, or the loader's own path.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if !path.starts_with('/') {
            assert!(
                line.contains("linux-vdso"),
                "a library ldd cannot find: {line}"
            );
            continue;
        }
        let package = owner(Path::new(path))
            .unwrap_or_else(|| panic!("no installed package owns {path} (ldd: {line})"));
        assert!(
            wanted.contains(&package),
            "{path} comes from {package}, which Depends ({wanted:?}) does not name"
        );
        libs += 1;
    }
    assert!(libs >= 3, "{ldd}");
    // The eBPF object is inside: the binary loads its programs with nothing beside it.
    let strings = std::fs::read(&bin).unwrap();
    assert!(contains_bytes(&strings, b"mcptrail_connect4"));
}

/// An empty root for dpkg: its database and the account files useradd writes.
fn scratch_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in ["var/lib/dpkg/updates", "var/lib/dpkg/info", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(root.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
    std::fs::write(root.join("etc/gshadow"), "root:*::\n").unwrap();
    root
}

/// dpkg on the scratch root; maintainer scripts run on this host with DPKG_ROOT set.
fn dpkg(root: &Path, args: &[&str], deb: Option<&Path>) -> Output {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--no-triggers",
        ])
        .args(["--log=/dev/null"])
        .args(args);
    if let Some(deb) = deb {
        cmd.arg(deb);
    }
    ok(&mut cmd)
}

#[test]
fn the_package_installs_upgrades_and_purges_in_a_scratch_root() {
    require_root();
    let deb = deb();
    let dir = tempfile::tempdir().unwrap();
    let root = scratch_root(dir.path());
    dpkg(&root, &["--install"], Some(&deb));

    // The files, the service user, the unit enabled for multi-user.target.
    let bin = root.join("usr/bin/mcptrail");
    for f in [
        "lib/systemd/system/mcptrail.service",
        "usr/lib/tmpfiles.d/mcptrail.conf",
        "etc/mcptrail/mcptrail.toml",
        "usr/share/doc/mcptrail/README.md",
    ] {
        assert!(root.join(f).exists(), "{f} is not installed");
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("mcptrail:"))
        .unwrap_or_else(|| panic!("no mcptrail user in {passwd}"));
    assert!(
        user.ends_with(":/var/lib/mcptrail:/usr/sbin/nologin"),
        "{user}"
    );
    let wants = root.join("etc/systemd/system/multi-user.target.wants/mcptrail.service");
    assert!(
        std::fs::symlink_metadata(&wants).is_ok(),
        "the unit is not enabled ({} missing)",
        wants.display()
    );

    // The installed binary runs from there, and checks the installed configuration.
    let version = text(&ok(Command::new(&bin).arg("--version")));
    assert!(version.starts_with("mcptrail "), "{version}");
    let config = root.join("etc/mcptrail/mcptrail.toml");
    let check = text(&ok(Command::new(&bin)
        .args(["config", "check"])
        .arg(&config)));
    assert!(check.contains(": OK"), "{check}");

    // The unit: systemd-analyze verifies it (pointed at the installed binary) and scores it.
    let unit_text = std::fs::read_to_string(root.join("lib/systemd/system/mcptrail.service"))
        .unwrap()
        .replace("/usr/bin/mcptrail", bin.to_str().unwrap());
    let unit = dir.path().join("mcptrail.service");
    std::fs::write(&unit, unit_text).unwrap();
    let verify = ok(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(
        verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = ok(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--root={}", root.display()))
        .arg("mcptrail.service"));
    let score_line = text(&security)
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .expect("a score")
        .to_owned();
    let score: f64 = score_line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{score_line}"));
    // README quotes this score: keep them equal.
    let readme = std::fs::read_to_string(tests_dir().join("../README.md")).unwrap();
    assert!(
        readme.contains(&format!("exposure level {score:.1}")),
        "README does not quote the unit's score ({score_line})"
    );

    // A trail and a changed configuration survive an upgrade (the same package again).
    let state = root.join("var/lib/mcptrail");
    std::fs::create_dir_all(state.join("trail")).unwrap();
    std::fs::write(state.join("trail/CURRENT"), "evidence").unwrap();
    let mut edited = std::fs::read_to_string(&config).unwrap();
    edited.push_str("\n# edited by the operator\n");
    std::fs::write(&config, &edited).unwrap();
    // An operator disabled the unit: the upgrade leaves it disabled.
    ok(Command::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .args(["disable", "mcptrail.service"]));
    assert!(std::fs::symlink_metadata(&wants).is_err());
    dpkg(&root, &["--install", "--force-confold"], Some(&deb));
    assert!(
        std::fs::symlink_metadata(&wants).is_err(),
        "the upgrade enabled a unit the operator disabled"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert_eq!(
        std::fs::read_to_string(state.join("trail/CURRENT")).unwrap(),
        "evidence"
    );

    // Remove keeps the configuration; purge asks nothing, removes it, keeps the trail.
    dpkg(&root, &["--remove", "mcptrail"], None);
    assert!(!bin.exists());
    assert!(config.exists());
    let purge = dpkg(&root, &["--purge", "mcptrail"], None);
    assert!(!config.exists());
    assert!(std::fs::symlink_metadata(&wants).is_err());
    assert_eq!(
        std::fs::read_to_string(state.join("trail/CURRENT")).unwrap(),
        "evidence"
    );
    assert!(
        String::from_utf8_lossy(&purge.stderr).contains("stay in /var/lib/mcptrail"),
        "{}",
        String::from_utf8_lossy(&purge.stderr)
    );

    // Told to, purge removes the trail and the user too.
    dpkg(&root, &["--install"], Some(&deb));
    let mut cmd = Command::new("dpkg");
    cmd.env("MCPTRAIL_PURGE_TRAIL", "yes");
    ok(cmd
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--no-triggers",
        ])
        .args(["--log=/dev/null", "--purge", "mcptrail"]));
    assert!(!state.exists());
    assert!(
        !std::fs::read_to_string(root.join("etc/passwd"))
            .unwrap()
            .contains("mcptrail:")
    );
}
