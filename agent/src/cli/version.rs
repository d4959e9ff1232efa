//! `agentwall version`, shell completions and man pages, all from the one command-line
//! definition (clap), so that none of them can drift from it.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::CommandFactory as _;
use serde::Serialize;

/// What a binary was built from.
#[derive(Debug, Serialize)]
pub(super) struct Build {
    version: &'static str,
    /// The commit, when the build was made by `cargo xtask build` (which sets
    /// `AGENTWALL_BUILD_COMMIT`).
    commit: Option<&'static str>,
    target: String,
    profile: &'static str,
    /// SHA-256 of the kernel programs' object embedded in the binary: what a daemon of this
    /// binary loads into the kernel.
    kernel_programs: String,
    crypto: &'static str,
}

impl Build {
    pub(super) fn current() -> Self {
        let digest =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, crate::enforce::kernel_object());
        Self {
            version: env!("CARGO_PKG_VERSION"),
            commit: option_env!("AGENTWALL_BUILD_COMMIT").filter(|c| !c.is_empty()),
            target: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            kernel_programs: format!("sha256:{}", crate::audit::hex(digest.as_ref())),
            crypto: "aws-lc-rs",
        }
    }

    /// The text of `--version` and `agentwall version`.
    pub(super) fn long(&self) -> String {
        format!(
            "{}\ncommit:          {}\ntarget:          {} ({})\nkernel programs: {}\ncrypto:          {}",
            self.version,
            self.commit
                .unwrap_or("unknown (built without `cargo xtask build`)"),
            self.target,
            self.profile,
            self.kernel_programs,
            self.crypto,
        )
    }
}

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn print(json: bool) -> anyhow::Result<ExitCode> {
    let b = Build::current();
    if json {
        println!("{}", serde_json::to_string(&b)?);
    } else {
        println!("agentwall {}", b.long());
    }
    Ok(ExitCode::SUCCESS)
}

/// Shells with completion scripts.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(super) enum Shell {
    Bash,
    Zsh,
    Fish,
}

pub(super) fn completions(shell: Shell) -> anyhow::Result<ExitCode> {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut super::Cli::command(), "agentwall", &mut script);
    match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
        // A reader that stopped early (`| head`) wanted no more.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing the completion script")
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Writes `agentwall.1` and `agentwall-CMD.1` (`agentwall-CMD-SUB.1`…) for every command
/// that is not hidden.
#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn man_pages(dir: &Path) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    let mut written = Vec::new();
    let mut cmd = super::Cli::command().version(env!("CARGO_PKG_VERSION"));
    cmd.build();
    write_pages(&cmd, "agentwall", dir, &mut written)?;
    for p in &written {
        println!("{}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn write_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let page = cmd.clone().name(name.to_string());
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
