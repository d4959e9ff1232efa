//! `agentwall secret`: the daemon's secret store, on the admin socket (root or its group).

use std::{io::Read as _, io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Subcommand;

use super::SocketArg;
use crate::control::{Request, client::Client};

#[derive(Debug, Subcommand)]
pub(super) enum SecretCommand {
    /// Store a secret as the next version of PATH. The value is read from standard input (or
    /// --file), never from the command line, where other users could see it.
    Put {
        #[command(flatten)]
        socket: SocketArg,
        /// The secret's path (`agent/NAME/KEY`: segments of letters, digits, `.`, `_`, `-`).
        path: String,
        /// Read the value from this file instead of standard input.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Print a secret's value (the newest version, or --version N) on standard output.
    Get {
        #[command(flatten)]
        socket: SocketArg,
        path: String,
        #[arg(long)]
        version: Option<u32>,
    },
    /// List the secrets (paths, versions, when updated), never their values.
    List {
        #[command(flatten)]
        socket: SocketArg,
        /// Only paths starting with this.
        #[arg(default_value = "")]
        prefix: String,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret with every version.
    Rm {
        #[command(flatten)]
        socket: SocketArg,
        path: String,
    },
    /// A fresh master key for the store; every secret is rewrapped under it (the retired keys
    /// stay in the key file, below the new one).
    RotateKey {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// The leases agents hold on secrets: who, which path and version, until when.
    Leases {
        #[command(flatten)]
        socket: SocketArg,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
}

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn command(cmd: SecretCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SecretCommand::Put { socket, path, file } => {
            let mut value = zeroize::Zeroizing::new(Vec::new());
            match &file {
                Some(f) => {
                    *value =
                        std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                }
                None => {
                    std::io::stdin()
                        .read_to_end(&mut value)
                        .context("reading the value from standard input")?;
                }
            }
            let version = Client::secret_put(&socket.socket, path.clone(), &value)?;
            println!("stored {path} version {version}");
        }
        SecretCommand::Get {
            socket,
            path,
            version,
        } => {
            let (_, value) = Client::secret_get(&socket.socket, path, version)?;
            let mut out = std::io::stdout().lock();
            out.write_all(&value)
                .and_then(|()| out.flush())
                .context("writing the value")?;
        }
        SecretCommand::List {
            socket,
            prefix,
            json,
        } => {
            let entries = Client::secret_list(&socket.socket, prefix)?;
            for e in &entries {
                if json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    let versions: Vec<String> = e.versions.iter().map(u32::to_string).collect();
                    println!(
                        "{}  versions {}  updated {}",
                        e.path,
                        versions.join(","),
                        e.updated
                    );
                }
            }
        }
        SecretCommand::Rm { socket, path } => {
            println!(
                "{}",
                Client::done(&socket.socket, &Request::SecretRemove { path })?
            );
        }
        SecretCommand::Leases { socket, json } => {
            for l in Client::secret_leases(&socket.socket)? {
                if json {
                    println!("{}", serde_json::to_string(&l)?);
                } else {
                    println!(
                        "{}  {}  {} version {}  until {}",
                        l.id,
                        l.identity,
                        l.path,
                        l.version,
                        l.expires_text()
                    );
                }
            }
        }
        SecretCommand::RotateKey { socket } => {
            println!(
                "{}",
                Client::done(&socket.socket, &Request::SecretRotateKey)?
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
