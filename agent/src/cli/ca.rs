//! `mcptrail ca`: the host CA that TLS termination shows clients leaves from.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use crate::policy::Policy;
use crate::proxy::tls::ca::{self, HostCa};

/// Where Debian-family hosts keep local CAs for `update-ca-certificates`.
pub const SYSTEM_CA_DIR: &str = "/usr/local/share/ca-certificates";
/// The bundle `update-ca-certificates` writes (what OpenSSL, curl, Go and rustls-native read).
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the host CA's certificate (PEM), or write it to a file. Made on first use.
    Export {
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Trust the host CA on this host: add it to the system store (update-ca-certificates)
    /// and print the variables for runtimes that do not read that store (root).
    Install,
    /// Take the host CA, and every retired one, out of the system store (root).
    Uninstall,
    /// Make a new host CA (with the name constraints of --policy, if given); the old one
    /// stays trusted where it is installed until `ca uninstall`. Restart the agent after.
    Rotate {
        /// The policy whose `[tls] ca_name_constraints` the new CA carries.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
    },
}

pub fn installed_name(pem: &str) -> String {
    use sha2::Digest as _;
    format!(
        "mcptrail-{}.crt",
        &hex::encode(sha2::Sha256::digest(pem.as_bytes()))[..16]
    )
}

fn update_store() -> anyhow::Result<()> {
    // Without --fresh: only what changed under /usr/local/share/ca-certificates is touched.
    let status = Command::new("update-ca-certificates")
        .stdout(std::process::Stdio::null())
        .status()
        .context("running update-ca-certificates (install the ca-certificates package)")?;
    if !status.success() {
        bail!("update-ca-certificates failed with {status}");
    }
    Ok(())
}

pub fn run(state_dir: &Path, args: CaArgs) -> anyhow::Result<()> {
    match args.command {
        CaCommand::Export { out } => {
            let ca = HostCa::load(state_dir, &[])?;
            match out {
                Some(path) => std::fs::write(&path, ca.pem())
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{}", ca.pem()),
            }
            Ok(())
        }
        CaCommand::Install => {
            let ca = HostCa::load(state_dir, &[])?;
            let path = Path::new(SYSTEM_CA_DIR).join(installed_name(ca.pem()));
            std::fs::create_dir_all(SYSTEM_CA_DIR)
                .with_context(|| format!("making {SYSTEM_CA_DIR}"))?;
            std::fs::write(&path, ca.pem())
                .with_context(|| format!("writing {}", path.display()))?;
            update_store()?;
            println!(
                "installed {} in the system store ({SYSTEM_BUNDLE})",
                path.display()
            );
            println!("for runtimes that do not read it, set in their environment:");
            println!("  NODE_EXTRA_CA_CERTS={}      # Node.js", path.display());
            println!("  REQUESTS_CA_BUNDLE={SYSTEM_BUNDLE}   # Python requests");
            println!("  SSL_CERT_FILE={SYSTEM_BUNDLE}        # Python httpx (the MCP SDK), Ruby");
            println!(
                "  keytool -importcert -noprompt -cacerts -storepass changeit -alias mcptrail -file {}   # Java",
                path.display()
            );
            Ok(())
        }
        CaCommand::Uninstall => {
            let mut removed = 0;
            for (_, pem) in ca::all_ca_pems(state_dir) {
                let path = Path::new(SYSTEM_CA_DIR).join(installed_name(&pem));
                if path.exists() {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                    removed += 1;
                }
            }
            update_store()?;
            println!("removed {removed} mcptrail CA certificate(s) from the system store");
            Ok(())
        }
        CaCommand::Rotate { policy } => {
            let constraints = match policy {
                Some(p) => Policy::load(&p)?.tls.ca_name_constraints,
                None => Vec::new(),
            };
            let kept = HostCa::rotate(state_dir, &constraints)?;
            println!(
                "made a new host CA; the old certificate is kept in {} and stays trusted where it is installed until `mcptrail ca uninstall`. Run `mcptrail ca install` for the new one, then restart the agent.",
                kept.display()
            );
            Ok(())
        }
    }
}
