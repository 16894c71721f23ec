//! `cargo xtask dist`: the release `.deb` and tarball, in `TARGET/dist/`.
//!
//! The package is assembled here and built by `dpkg-deb` (rather than cargo-deb, which would
//! be one more tool to build on every fresh machine): the release binary with its eBPF object
//! embedded, the unit, the tmpfiles entry for the fail-closed pins, the default configuration
//! (a conffile), the README, and the maintainer scripts in packaging/deb. `Depends` comes from
//! `dpkg-shlibdeps` on the binary itself, so it names every shared library the binary links.
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::{cargo, output, run_checked, target_dir, workspace_root};

/// What `dist` made.
pub struct Dist {
    pub deb: PathBuf,
    pub tarball: PathBuf,
}

/// Files of the package: (source in the repository, path in the package, mode).
const FILES: &[(&str, &str, u32)] = &[
    (
        "packaging/mcptrail.service",
        "lib/systemd/system/mcptrail.service",
        0o644,
    ),
    (
        "packaging/mcptrail.tmpfiles",
        "usr/lib/tmpfiles.d/mcptrail.conf",
        0o644,
    ),
    (
        "packaging/mcptrail.toml",
        "etc/mcptrail/mcptrail.toml",
        0o644,
    ),
    ("README.md", "usr/share/doc/mcptrail/README.md", 0o644),
    (
        "ARCHITECTURE.md",
        "usr/share/doc/mcptrail/ARCHITECTURE.md",
        0o644,
    ),
];

const SCRIPTS: &[&str] = &["postinst", "prerm", "postrm"];

fn version() -> anyhow::Result<String> {
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml"))?;
    manifest
        .lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .context("no version in [workspace.package] of Cargo.toml")
}

fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The `Depends` of the binary at `bin`, as dpkg-shlibdeps works it out.
fn shlib_depends(bin: &Path, scratch: &Path) -> anyhow::Result<String> {
    let dir = scratch.join("shlibdeps");
    std::fs::create_dir_all(dir.join("debian"))?;
    std::fs::write(
        dir.join("debian/control"),
        "Source: mcptrail\nMaintainer: mcptrail <mcptrail@localhost>\n\nPackage: mcptrail\nArchitecture: any\n",
    )?;
    let line = output(
        Command::new("dpkg-shlibdeps")
            .current_dir(&dir)
            .arg("-O")
            .arg(format!("-e{}", bin.display())),
    )
    .context("dpkg-shlibdeps (Debian's dpkg-dev; `cargo xtask setup` installs it)")?;
    line.strip_prefix("shlibs:Depends=")
        .map(str::to_owned)
        .with_context(|| format!("dpkg-shlibdeps printed {line:?}"))
}

pub fn run() -> anyhow::Result<Dist> {
    run_checked(cargo().args([
        "build",
        "--release",
        "--package",
        "mcptrail",
        "--bin",
        "mcptrail",
    ]))?;
    let version = version()?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let out = target_dir().join("dist");
    let name = format!("mcptrail_{version}_{arch}");
    let stage = out.join("stage").join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let root = workspace_root();
    let bin = stage.join("usr/bin/mcptrail");
    copy(&target_dir().join("release/mcptrail"), &bin, 0o755)?;
    // The debug info is most of the file; the symbols stay, for backtraces.
    run_checked(Command::new("strip").arg("--strip-debug").arg(&bin))?;
    for (from, to, mode) in FILES {
        copy(&root.join(from), &stage.join(to), *mode)?;
    }
    std::fs::write(
        stage.join("usr/share/doc/mcptrail/copyright"),
        "mcptrail\nLicense: Apache-2.0\nOn Debian systems the license is in /usr/share/common-licenses/Apache-2.0.\n",
    )?;
    let debian = stage.join("DEBIAN");
    for script in SCRIPTS {
        copy(
            &root.join("packaging/deb").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    std::fs::write(debian.join("conffiles"), "/etc/mcptrail/mcptrail.toml\n")?;
    let depends = shlib_depends(&bin, &out)?;
    let size_kib = output(
        Command::new("du")
            .args(["-sk", "--exclude=DEBIAN"])
            .arg(&stage),
    )?
    .split_whitespace()
    .next()
    .unwrap_or("0")
    .to_owned();
    std::fs::write(
        debian.join("control"),
        format!(
            "Package: mcptrail\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: mcptrail <mcptrail@localhost>\n\
             Section: admin\n\
             Priority: optional\n\
             Installed-Size: {size_kib}\n\
             Depends: {depends}, passwd\n\
             Recommends: systemd, ca-certificates\n\
             Homepage: https://github.com/mcptrail/mcptrail\n\
             Description: audit MCP traffic on this host\n \
             An eBPF program on the cgroup connect hooks redirects connections to MCP\n \
             gateways into a local proxy that ties every call to its process and service\n \
             token, applies the policy, and appends hash-chained, signed records to a\n \
             local RocksDB trail. No client is reconfigured.\n"
        ),
    )?;
    let deb = out.join(format!("{name}.deb"));
    run_checked(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;

    // The tarball: the same files, flat, for hosts without dpkg.
    let tar_name = format!("mcptrail-{version}-{arch}");
    let tar_stage = out.join("stage").join(&tar_name);
    if tar_stage.exists() {
        std::fs::remove_dir_all(&tar_stage)?;
    }
    copy(&bin, &tar_stage.join("mcptrail"), 0o755)?;
    for (from, _, mode) in FILES {
        let file = Path::new(from).file_name().expect("a file name");
        copy(&root.join(from), &tar_stage.join(file), *mode)?;
    }
    let tarball = out.join(format!("{tar_name}.tar.gz"));
    run_checked(
        Command::new("tar")
            .args(["--owner=root", "--group=root", "-czf"])
            .arg(&tarball)
            .arg("-C")
            .arg(out.join("stage"))
            .arg(&tar_name),
    )?;
    eprintln!("xtask dist: {} and {}", deb.display(), tarball.display());
    Ok(Dist { deb, tarball })
}
