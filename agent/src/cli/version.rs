//! `agentwall version`, shell completions and man pages, all from the one command-line
//! definition (clap), so that none of them can drift from it.

use std::{path::Path, process::ExitCode};

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
///
/// Often run as root (packaging, installing), so nobody else may steer the writes: the
/// directory must be the caller's and writable by no one else, and each page is written
/// through a descriptor of it into a new file (`O_EXCL|O_NOFOLLOW`) renamed into place, so
/// that no link, FIFO or hard link already there is ever written through. The directory's
/// own path is the caller's to trust, as they gave it.
#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn man_pages(dir: &Path) -> anyhow::Result<ExitCode> {
    use nix::{fcntl::OFlag, sys::stat::Mode};
    // Without a trailing slash, which would make O_NOFOLLOW follow a link after all.
    let dir: std::path::PathBuf = dir.components().collect();
    std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
    let fd = nix::fcntl::open(
        &dir,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {} (a directory, not a link)", dir.display()))?;
    let st = nix::sys::stat::fstat(&fd).with_context(|| format!("inspecting {}", dir.display()))?;
    if st.st_uid != nix::unistd::geteuid().as_raw() || st.st_mode & 0o022 != 0 {
        anyhow::bail!(
            "{} is another user's or may be written by other users: write the man pages into a \
             directory of your own that only you can write",
            dir.display()
        );
    }
    let mut cmd = super::Cli::command().version(env!("CARGO_PKG_VERSION"));
    cmd.build();
    let mut pages = Vec::new();
    collect_pages(&cmd, "agentwall", &mut pages)?;
    for (name, text) in pages {
        let tmp = format!(".{name}.{}.tmp", std::process::id());
        let file = nix::fcntl::openat(
            &fd,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .with_context(|| format!("creating {}", dir.join(&tmp).display()))?;
        std::io::Write::write_all(&mut std::fs::File::from(file), &text)
            .with_context(|| format!("writing {}", dir.join(&tmp).display()))?;
        nix::fcntl::renameat(&fd, tmp.as_str(), &fd, name.as_str())
            .with_context(|| format!("renaming into {}", dir.join(&name).display()))?;
        println!("{}", dir.join(&name).display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The man page of `cmd` (named `name`) and of each of its visible subcommands.
fn collect_pages(
    cmd: &clap::Command,
    name: &str,
    pages: &mut Vec<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let mut text = Vec::new();
    clap_mangen::Man::new(cmd.clone().name(name.to_string()))
        .render(&mut text)
        .with_context(|| format!("rendering the man page of {name}"))?;
    pages.push((format!("{name}.1"), text));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        collect_pages(sub, &format!("{name}-{}", sub.get_name()), pages)?;
    }
    Ok(())
}
