//! Command-line interface: one module per verb group, each a thin layer over the daemon's
//! typed admin client (`control::client::Client`) or the library it drives.

mod admin;
mod audit;
mod exec;
mod fleet;
mod identity;
mod launch;
mod policy;
mod run;
mod secret;
mod version;

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use crate::config;

#[derive(Debug, Parser)]
#[command(
    name = "agentwall",
    version,
    about = "Zero-trust egress enforcement for AI agent processes, in the kernel."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct SocketArg {
    /// Admin socket of the daemon.
    #[arg(long, env = "AGENTWALL_SOCKET", default_value = config::defaults::SOCKET)]
    socket: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: load the kernel programs, enforce the policies, serve the admin socket.
    Run(run::RunArgs),
    /// Run a command in a new enforced cgroup, under a named policy or under the identity of a
    /// certificate (it enrolls from inside the cgroup before the command starts); exits with
    /// the command's code.
    Exec(exec::ExecArgs),
    /// Launch an agent from its description (a YAML file): under its identity, which the
    /// daemon issues and renews, with the credentials of its databases and its secrets as
    /// files only it reads. `agentwall exec --identity ... --secret ...`, in one file.
    Launch(launch::LaunchArgs),
    /// Show the daemon's health, policies, cgroups and counters.
    Status {
        #[command(flatten)]
        socket: SocketArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Print only the health, and exit 1 unless the daemon is healthy (enforcing, its
        /// probe denied): for readiness and liveness probes.
        #[arg(long, conflicts_with = "json")]
        check: bool,
    },
    /// Reload the policy directory; on any error the policy in force stays.
    Reload {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Deny every flow of a bound cgroup, open ones included (or lift that with --lift).
    Quarantine {
        #[command(flatten)]
        socket: SocketArg,
        /// Cgroup path (relative to the cgroup v2 mount, or absolute) or `id:N`.
        cgroup: String,
        #[arg(long)]
        lift: bool,
    },
    /// Enforce this command's own cgroup, listed under `enforce:` in the daemon's
    /// configuration, before anything else runs in it: `ExecStartPre=+agentwall enforce-self`
    /// in a systemd unit, so that every run of the unit (a new cgroup each) is enforced from
    /// its first connect. Fails (and so fails the unit) when the daemon cannot enforce it.
    EnforceSelf {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Stream verdicts as they happen.
    Events {
        #[command(flatten)]
        socket: SocketArg,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Policy tools.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Identities: issue, inspect, list what was issued.
    #[command(subcommand)]
    Identity(identity::IdentityCommand),
    /// The audit log: verify it, read it, make a key.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// The fleet: make the policy signing key, publish a signed policy bundle to etcd.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// Secrets: put, get, list, remove; rotate the store's master key.
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Remove agentwall from the kernel: unpin links (detaching the programs) and maps, and
    /// remove the managed cgroup subtree. Enforcement ends.
    Teardown {
        #[arg(long, default_value = config::defaults::PIN_DIR)]
        pin_dir: PathBuf,
        /// Managed cgroup subtree, relative to the cgroup v2 mount.
        #[arg(long, default_value = config::defaults::CGROUP_ROOT)]
        cgroup_root: String,
        /// Kill processes still in the managed subtree instead of refusing.
        #[arg(long)]
        kill: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Revoke a SPIFFE ID or certificate serial: its cgroups are denied everything at once,
    /// their open sockets destroyed, and enrolling with it refused; the list survives restarts.
    Revoke {
        #[command(flatten)]
        socket: SocketArg,
        /// spiffe://... or a certificate serial (hex).
        #[arg(required_unless_present = "list")]
        target: Option<String>,
        /// Why (recorded with the revocation).
        #[arg(long, required_unless_present = "list")]
        reason: Option<String>,
        /// Show the revocation list instead.
        #[arg(long, conflicts_with_all = ["target", "reason"])]
        list: bool,
        /// Print JSON: one document per line.
        #[arg(long)]
        json: bool,
    },
    /// Print the version and what this binary was built from.
    Version {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh or fish) on standard output.
    Completions {
        #[arg(value_enum)]
        shell: version::Shell,
    },
    /// Write the man pages (agentwall.1 and one per command) into a directory.
    Man {
        /// Directory to write them into; made if missing.
        dir: PathBuf,
    },
    #[command(name = crate::probe::PROBE_COMMAND, hide = true)]
    ProbeConnect { addr: String, unix: Option<String> },
    #[command(name = crate::exec::ENROLL_EXEC, hide = true)]
    EnrollExec {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        dir: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<OsString>,
    },
}

pub fn main() -> ExitCode {
    use clap::{CommandFactory as _, FromArgMatches as _};
    // `--version` says what `agentwall version` says.
    let matches = Cli::command()
        .long_version(version::Build::current().long())
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            #[expect(clippy::print_stderr, reason = "the CLI's one line of error")]
            {
                eprintln!("agentwall: {}", crate::error_chain(e.as_ref()));
            }
            ExitCode::FAILURE
        }
    }
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(1))
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(a) => run::run(a),
        Command::Exec(a) => exec::exec(a),
        Command::Launch(a) => launch::launch(a),
        Command::EnrollExec {
            socket,
            dir,
            command,
        } => exec::enroll_exec(&socket, &dir, &command),
        Command::Revoke {
            socket,
            target,
            reason,
            list,
            json,
        } => admin::revoke(&socket.socket, target, reason, list, json),
        Command::Status {
            socket,
            json,
            check,
        } => admin::status(&socket.socket, json, check),
        Command::Reload { socket } => admin::reload(&socket.socket),
        Command::Quarantine {
            socket,
            cgroup,
            lift,
        } => admin::quarantine(&socket.socket, cgroup, lift),
        Command::EnforceSelf { socket } => admin::enforce_self(&socket.socket),
        Command::Events { socket, json } => admin::events(&socket.socket, json),
        Command::Policy(cmd) => policy::command(cmd),
        Command::Teardown {
            pin_dir,
            cgroup_root,
            kill,
            socket,
        } => run::teardown(&pin_dir, &cgroup_root, kill, &socket.socket),
        Command::Identity(cmd) => identity::command(cmd),
        Command::Audit(cmd) => audit::command(cmd),
        Command::Fleet(cmd) => fleet::command(cmd),
        Command::Secret(cmd) => secret::command(cmd),
        Command::Version { json } => version::print(json),
        Command::Completions { shell } => version::completions(shell),
        Command::Man { dir } => version::man_pages(&dir),
        Command::ProbeConnect { addr, unix } => {
            Ok(code(crate::probe::child_main(&addr, unix.as_deref())))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_are_singular_for_one() {
        assert_eq!(super::admin::count(1u64, "rule"), "1 rule");
        assert_eq!(super::admin::count(0u64, "rule"), "0 rules");
        assert_eq!(
            super::admin::count_plural(2u64, "policy", "policies"),
            "2 policies"
        );
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
