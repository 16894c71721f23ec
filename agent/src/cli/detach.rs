//! `mcptrail detach`: remove what a fail-closed agent pinned.
use std::path::Path;

use anyhow::bail;

use crate::control::{self, Request};
use crate::intercept::pins;

pub fn run(state_dir: &Path) -> anyhow::Result<()> {
    if control::request(state_dir, &Request::Status).is_ok() {
        bail!(
            "an agent is running with state directory {}: stop it first (its pins are its redirect)",
            state_dir.display()
        );
    }
    let dir = pins::instance_dir(state_dir);
    let n = pins::remove_instance(&dir)?;
    if n == 0 {
        println!("nothing pinned for {}", state_dir.display());
    } else {
        println!(
            "removed {n} pins from {}: intercepted traffic goes direct until an agent runs again",
            dir.display()
        );
    }
    Ok(())
}
