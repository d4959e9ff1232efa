//! The previous release's daemon, built from its commit, for the upgrade tests: a new
//! daemon must take over the pins that one leaves (`tests/tests/upgrade.rs`).
//!
//! The source comes from this repository's history (`git archive`), so a clone needs the
//! commit; the build has a target directory of its own, so that it never replaces this
//! tree's binaries. A build already made of the same commit is kept.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{root, status, step};

/// The release before this one: its version, and the commit it was built from.
pub(crate) const RELEASE: (&str, &str) = ("0.1.0", "b78790f91287e8eeb7261ec4f99176119b82ba37");

/// Builds (or finds) the previous release's `agentwall`; returns its path.
pub(crate) fn build() -> anyhow::Result<PathBuf> {
    let (version, commit) = RELEASE;
    let root = root();
    let out = root.join("target/previous-release");
    let bin = out.join(format!("agentwall-{version}"));
    let stamp = out.join(format!("agentwall-{version}.commit"));
    if bin.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == commit) {
        return Ok(bin);
    }
    step(&format!(
        "build the previous release's daemon ({version}, {}) for the upgrade tests",
        &commit[..12]
    ));
    let known = Command::new("git")
        .current_dir(&root)
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .status()
        .context("starting git")?;
    if !known.success() {
        bail!(
            "commit {commit} (agentwall {version}) is not in this clone: the upgrade tests build \
             the previous release from it (fetch the full history: `git fetch --unshallow`)"
        );
    }
    let src = out.join("src");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).with_context(|| format!("making {}", src.display()))?;
    let mut c = Command::new("sh");
    c.current_dir(&root).arg("-c").arg(format!(
        "git archive --format=tar {commit} | tar -x -C '{}'",
        src.display()
    ));
    status(c).context("unpacking the previous release's source")?;
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(&src)
        .args(["build", "--locked", "-p", "agentwall", "--bin", "agentwall"])
        .arg("--target-dir")
        .arg(out.join("target"));
    status(c).context("building the previous release")?;
    fs::copy(out.join("target/debug/agentwall"), &bin)
        .with_context(|| format!("copying the previous release's binary to {}", bin.display()))?;
    fs::write(&stamp, commit).with_context(|| format!("writing {}", stamp.display()))?;
    let _ = fs::remove_dir_all(&src);
    Ok(bin)
}
