//! Command-line interface.

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};

use crate::{
    cgroup::{self, Cgroup},
    config::{self, Config, LogFormat, Overrides},
    control::{Health, Reply, Request, Status, client::Client},
    daemon, enforce, exec, logging, policy, probe,
};

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
    Run(RunArgs),
    /// Run a command in a new enforced cgroup, under a named policy or under the identity of a
    /// certificate (it enrolls from inside the cgroup before the command starts); exits with
    /// the command's code.
    Exec {
        #[command(flatten)]
        socket: SocketArg,
        /// Run the command as this user (name or uid).
        #[arg(long)]
        user: Option<String>,
        /// Policy the command runs under.
        #[arg(long, conflicts_with_all = ["cert", "key", "bundle", "self_enroll"], required_unless_present_any = ["cert", "self_enroll"])]
        policy: Option<String>,
        /// The command enrolls itself (AGENTWALL_ENROLL_SOCKET, AGENTWALL_BUNDLE); everything
        /// is denied until it has.
        #[arg(long, conflicts_with_all = ["cert", "key", "bundle"])]
        self_enroll: bool,
        /// X509-SVID (PEM) the command enrolls with; its identity's policy applies.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Private key of --cert (PEM).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Further CA certificates the command should trust (PEM), added to the local CA's.
        #[arg(long, requires = "cert")]
        bundle: Option<PathBuf>,
        /// Keep a JWT-SVID for this audience (repeatable) fresh in the file AGENTWALL_TOKEN names.
        #[arg(long, requires = "cert")]
        audience: Vec<String>,
        /// Pass descriptors 3 .. 3+N to the command (systemd's convention); every other
        /// inherited descriptor is closed, so that no socket made outside the cgroup reaches it.
        #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=65536))]
        preserve_fds: u32,
        /// A command that runs as root keeps root's capabilities and the host's cgroup and
        /// mount namespaces. Without it, it is confined: it cannot leave its cgroup, see
        /// agentwall's state, pins and audit log, write the cgroup file system, mount, load
        /// BPF, open packet or raw sockets or ptrace (docs/threat-model.md).
        #[arg(long)]
        keep_privileges: bool,
        /// The command and its arguments (after `--`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required = true,
            value_name = "CMD"
        )]
        command: Vec<OsString>,
    },
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
    Policy(PolicyCommand),
    /// Identities: issue, inspect, list what was issued.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// The audit log: verify it, read it, make a key.
    #[command(subcommand)]
    Audit(AuditCommand),
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
        #[arg(long)]
        json: bool,
    },
    #[command(name = probe::PROBE_COMMAND, hide = true)]
    ProbeConnect { addr: String, unix: Option<String> },
    #[command(name = exec::ENROLL_EXEC, hide = true)]
    EnrollExec {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        dir: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy directory and show what it compiles to.
    Check {
        /// Policy directory.
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
struct AuditKeyArgs {
    /// Audit key file (64 hex digits per line: the current key, then retired ones); default:
    /// AGENTWALL_AUDIT_KEY. Repeatable.
    #[arg(long = "key")]
    keys: Vec<PathBuf>,
}

impl AuditKeyArgs {
    fn keyring(&self) -> anyhow::Result<crate::audit::keys::Keyring> {
        use crate::audit::keys::AuditKey;
        if self.keys.is_empty() {
            return Ok(crate::audit::keys::Keyring::new(vec![
                AuditKey::from_file_or_env(None)?,
            ]));
        }
        Ok(crate::audit::keys::Keyring::from_files(&self.keys)?)
    }
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check a log: every record in its place, decrypting, chained; every checkpoint signed by
    /// the node and matching; nothing truncated past an exported checkpoint. Names the first
    /// bad record and exits non-zero.
    Verify {
        /// Audit directory.
        dir: PathBuf,
        #[command(flatten)]
        keys: AuditKeyArgs,
        /// Without the audit key: check order, segment links, the chain against every signed
        /// checkpoint and truncation, decrypting nothing (for an auditor who may not read the
        /// records). A modified record is then named by the first checkpoint after it.
        #[arg(long, conflicts_with = "keys")]
        integrity_only: bool,
        /// The node's public key: hex, or a file holding it.
        #[arg(long)]
        node_key: String,
        /// Checkpoints exported off the host (checkpoints.jsonl copies); repeatable.
        #[arg(long = "checkpoints")]
        checkpoints: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print the last records as JSON lines (decrypted); --follow waits for new ones.
    Tail {
        dir: PathBuf,
        #[command(flatten)]
        keys: AuditKeyArgs,
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        #[arg(long)]
        follow: bool,
    },
    /// Print the records that match every filter given, as JSON lines.
    Query {
        dir: PathBuf,
        #[command(flatten)]
        keys: AuditKeyArgs,
        #[command(flatten)]
        filter: AuditFilter,
    },
    /// Print a new random audit key (64 hex digits) to keep outside the log's directory.
    Keygen,
    /// Rotate the audit key: the running daemon writes a fresh key first into its key file
    /// (older keys stay below it, to read older segments) and uses it from the next record on,
    /// in a new segment. With --key-file, only that file is rotated (for a stopped daemon: it
    /// writes under the new key from its next start).
    RotateKey {
        #[command(flatten)]
        socket: SocketArg,
        /// Rotate this key file directly instead of asking the daemon.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

/// Filters of `audit query`; a record is printed when it matches every one given.
#[derive(Debug, Args)]
struct AuditFilter {
    /// SPIFFE ID (of a verdict of an enrolled cgroup, an enrollment, a revocation, a token)
    /// or policy name (of a verdict).
    #[arg(long)]
    identity: Option<String>,
    /// allow or deny.
    #[arg(long)]
    verdict: Option<String>,
    /// Rule (file:line) or rule id.
    #[arg(long)]
    rule: Option<String>,
    /// Record kind: verdict, alert, enrolled, revoked, policy_loaded, events_lost, ...
    #[arg(long)]
    kind: Option<String>,
    /// From this time on (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Up to this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
}

#[derive(Debug, Args)]
struct CaArgs {
    /// State directory holding the local CA and the issuance log.
    #[arg(long, default_value = config::defaults::STATE_DIR)]
    state_dir: PathBuf,
    /// Trust domain of the local CA.
    #[arg(long, default_value = config::defaults::TRUST_DOMAIN)]
    trust_domain: String,
    /// Key type of the certificate issued (and of the CA, if this creates it); as the
    /// daemon's `identity.key_algorithm`. Default: ed25519; `identity renew` keeps the key
    /// type of the certificate it renews.
    #[arg(long, value_enum)]
    key_algorithm: Option<crate::identity::svid::KeyAlgorithm>,
}

impl CaArgs {
    /// Issues from this CA into `out` (see `identity::issue_into`), with keys of the type
    /// asked for, else of type `default`.
    fn issue_into(
        &self,
        req: &crate::identity::svid::LeafRequest,
        default: crate::identity::svid::KeyAlgorithm,
        requester: &str,
        out: &std::path::Path,
    ) -> Result<crate::identity::svid::Issued, crate::identity::IdentityError> {
        crate::identity::issue_into(
            &self.state_dir,
            (&self.trust_domain, self.key_algorithm.unwrap_or(default)),
            req,
            requester,
            out,
        )
    }
}

#[derive(Debug, Subcommand)]
enum IdentityCommand {
    /// Issue an X509-SVID from the local CA into a directory (svid.pem, svid.key, bundle.pem).
    Issue {
        #[command(flatten)]
        ca: CaArgs,
        /// SPIFFE ID, or its path in the trust domain (agent/<name>/<env>[/<version>]).
        #[arg(long)]
        id: String,
        /// Lifetime, such as 1h or 15m (1 minute to 24 hours).
        #[arg(long, default_value = "1h")]
        lifetime: String,
        /// A capability the certificate carries (repeatable); capabilities only narrow policy.
        #[arg(long = "cap")]
        caps: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Show an X509-SVID and check it against the local CA.
    Inspect {
        #[command(flatten)]
        ca: CaArgs,
        /// PEM file.
        file: PathBuf,
    },
    /// Renew now the certificates of every agent launched with `agentwall exec --cert`.
    Rotate {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Ask the daemon whether a certificate is valid here now (trust bundles, SPIFFE rules,
    /// revocation list); exits non-zero if not.
    Check {
        #[command(flatten)]
        socket: SocketArg,
        /// PEM file (leaf first).
        file: PathBuf,
    },
    /// Get a JWT-SVID (short-lived bearer token) for the identity of a certificate, from the
    /// enrollment socket; prints the token.
    Token {
        /// Enrollment socket of the daemon.
        #[arg(long, env = "AGENTWALL_ENROLL_SOCKET", default_value = config::defaults::ENROLL_SOCKET)]
        enroll_socket: PathBuf,
        #[arg(long, env = "AGENTWALL_SVID")]
        cert: PathBuf,
        #[arg(long, env = "AGENTWALL_SVID_KEY")]
        key: PathBuf,
        /// CA bundle to check the daemon with (the local CA's certificate).
        #[arg(long, env = "AGENTWALL_BUNDLE")]
        bundle: PathBuf,
        /// Who the token is for (repeatable).
        #[arg(long, required = true)]
        audience: Vec<String>,
    },
    /// Ask the daemon whether a JWT-SVID is valid for an audience (signature, expiry,
    /// revocation); exits non-zero if not.
    CheckToken {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(long)]
        audience: String,
        /// The token, or `-` to read it from stdin.
        token: String,
    },
    /// Print the JWKS that verifies this node's JWT-SVIDs.
    Jwks {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Issue a new certificate for the identity (and capabilities) of an existing one, from the
    /// local CA, into a directory.
    Renew {
        #[command(flatten)]
        ca: CaArgs,
        /// The certificate to renew (PEM).
        #[arg(long)]
        cert: PathBuf,
        #[arg(long, default_value = "1h")]
        lifetime: String,
        /// Output directory (svid.pem, svid.key, bundle.pem).
        #[arg(long)]
        out: PathBuf,
    },
    /// List every certificate ever issued.
    Log {
        #[command(flatten)]
        ca: CaArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Config file (default: /etc/agentwall/agentwall.yaml if it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Policy directory.
    #[arg(long)]
    policies: Option<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Managed cgroup subtree, relative to the cgroup v2 mount.
    #[arg(long)]
    cgroup_root: Option<String>,
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Enrollment socket (agents prove their identity here).
    #[arg(long)]
    enroll_socket: Option<PathBuf>,
    /// Directory of the files of agents launched with `exec --cert`.
    #[arg(long)]
    agent_dir: Option<PathBuf>,
    /// Audit log directory (default: <state dir>/audit).
    #[arg(long)]
    audit_dir: Option<PathBuf>,
    /// Audit key file (64 hex digits; created if missing), outside the audit directory.
    #[arg(long)]
    audit_key: Option<PathBuf>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
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

#[expect(clippy::print_stdout, reason = "CLI output")]
fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(a) => {
            let overrides = Overrides {
                config: a.config,
                policy_dir: a.policies,
                state_dir: a.state_dir,
                pin_dir: a.pin_dir,
                socket: a.socket,
                cgroup_root: a.cgroup_root,
                log_format: a.log_format,
                enroll_socket: a.enroll_socket,
                agent_dir: a.agent_dir,
                audit_dir: a.audit_dir,
                audit_key: a.audit_key,
            };
            let cfg = Config::load(&overrides)?;
            logging::init(cfg.log_format, "info");
            // Revocations are handled by the admin thread and enrollments by their own pool:
            // the runtime's threads do background work (the end of a revocation, renewals,
            // the collector) and keep the default slice, so they do not cut into the agents'.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(daemon::run(cfg)).context("cannot enforce")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec {
            socket,
            user,
            policy,
            self_enroll,
            cert,
            key,
            bundle,
            audience,
            preserve_fds,
            keep_privileges,
            command,
        } => {
            logging::init(LogFormat::Text, "warn");
            let under = match (policy, cert, key) {
                (Some(p), _, _) => exec::Under::Policy(p),
                _ if self_enroll => exec::Under::SelfEnroll,
                (None, Some(cert), Some(key)) => exec::Under::Identity {
                    cert,
                    key,
                    bundle,
                    audience,
                },
                _ => bail!("give --policy NAME, or --cert FILE and --key FILE"),
            };
            Ok(code(exec::run(
                &socket.socket,
                user.as_deref(),
                &under,
                &command,
                exec::Options {
                    preserve_fds,
                    keep_privileges,
                },
            )?))
        }
        Command::EnrollExec {
            socket,
            dir,
            command,
        } => {
            logging::init(LogFormat::Text, "warn");
            Ok(code(exec::enroll_exec(&socket, &dir, &command)))
        }
        Command::Revoke {
            socket,
            target,
            reason,
            list,
            json,
        } => {
            if list {
                let Reply::Revocations { entries } =
                    Client::call(&socket.socket, &Request::Revocations)?
                else {
                    bail!("unexpected answer from the daemon");
                };
                for e in entries {
                    if json {
                        let mut v = serde_json::to_value(&e)?;
                        v["covers"] = e.target.covers().into();
                        println!("{v}");
                    } else {
                        println!(
                            "{} {} by {}: {} (covers {})",
                            e.at,
                            e.target,
                            e.by,
                            e.reason,
                            e.target.covers()
                        );
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let (Some(target), Some(reason)) = (target, reason) else {
                bail!("give what to revoke (a SPIFFE ID or a serial) and --reason TEXT, or --list");
            };
            match Client::call(&socket.socket, &Request::Revoke { target, reason })? {
                Reply::Revoked {
                    target,
                    new,
                    cgroups,
                    sockets_destroyed,
                    not_persisted,
                } => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"target": target, "new": new, "cgroups": cgroups,
                                "sockets_destroyed": sockets_destroyed, "not_persisted": not_persisted})
                        );
                    } else {
                        println!(
                            "revoked {target}{}: {} cgroups denied everything, {sockets_destroyed} sockets destroyed",
                            if new { "" } else { " (already revoked)" },
                            cgroups.len()
                        );
                    }
                    if let Some(e) = not_persisted {
                        bail!(
                            "the revocation holds now but is NOT saved yet: {e}; the daemon tries \
                             again every half second (its log says when it is durable); a \
                             restart before then would lose it"
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
        Command::Status {
            socket,
            json,
            check,
        } => {
            let Reply::Status(s) = Client::call(&socket.socket, &Request::Status)? else {
                bail!("unexpected answer from the daemon");
            };
            if check {
                return Ok(match &s.health {
                    Health::Healthy { probe_at } => {
                        println!("healthy: enforcing (probe denied at {probe_at})");
                        ExitCode::SUCCESS
                    }
                    Health::Starting => {
                        println!("starting: not enforcing yet");
                        ExitCode::FAILURE
                    }
                    Health::Failed { reason } => {
                        println!("failed: {reason}");
                        ExitCode::FAILURE
                    }
                });
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { socket } => match Client::call(&socket.socket, &Request::Reload)? {
            Reply::Reloaded {
                generation,
                policies,
                rule_nodes,
            } => {
                println!(
                    "reloaded: generation {generation}, {policies} policies, {rule_nodes} rule nodes"
                );
                Ok(ExitCode::SUCCESS)
            }
            other => bail!("unexpected answer from the daemon: {other:?}"),
        },
        Command::Quarantine {
            socket,
            cgroup,
            lift,
        } => {
            match Client::call(&socket.socket, &Request::Quarantine { cgroup, lift })? {
                Reply::Done { message } => println!("{message}"),
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::EnforceSelf { socket } => {
            match Client::call(&socket.socket, &Request::EnforceSelf)? {
                Reply::Done { message } => println!("{message}"),
                Reply::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Events { socket, json } => {
            let mut c = Client::connect(&socket.socket)?;
            c.send(&Request::Events)?;
            let _subscribed = c.recv()?;
            loop {
                match c.recv()? {
                    Reply::Event(e) if json => println!("{}", serde_json::to_string(&e)?),
                    Reply::Event(e) => println!(
                        "{} {:5} {:11} {}[{}] -> {}:{} {} {} {} {}",
                        e.time,
                        e.verdict,
                        e.hook,
                        e.comm,
                        e.tgid,
                        e.dst.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                        e.port,
                        e.protocol,
                        e.reason,
                        e.policy.as_deref().unwrap_or("-"),
                        e.rule.as_deref().unwrap_or("-"),
                    ),
                    Reply::Lagged { missed } => {
                        println!("# {missed} events missed: reading too slowly")
                    }
                    other => bail!("unexpected answer from the daemon: {other:?}"),
                }
            }
        }
        Command::Policy(PolicyCommand::Check { dir }) => {
            let set = policy::load_dir(&dir)?;
            let mut next = 0;
            let slots: std::collections::HashMap<String, u32> = set
                .policies
                .iter()
                .map(|p| {
                    next += 1;
                    (p.name.clone(), next)
                })
                .collect();
            let compiled = policy::compile(&set, |n| slots.get(n).copied().unwrap_or(0))
                .map_err(|problems| policy::PolicyError { problems })?;
            for p in &set.policies {
                let identity = p.identity.as_deref().map_or(String::new(), |id| {
                    format!(
                        ", identity {id}{}",
                        if p.attest.is_empty() {
                            ""
                        } else {
                            " (with attestation selectors)"
                        }
                    )
                });
                println!(
                    "policy {} ({}) at {}: {}{identity}",
                    p.name,
                    p.mode,
                    p.source,
                    count(p.egress.len(), "egress rule")
                );
            }
            println!(
                "{}, {}, {}: OK",
                count_plural(set.policies.len(), "policy", "policies"),
                count(compiled.rules.len(), "rule"),
                count(compiled.nodes.len(), "kernel rule node")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Teardown {
            pin_dir,
            cgroup_root,
            kill,
            socket,
        } => {
            if std::os::unix::net::UnixStream::connect(&socket.socket).is_ok() {
                bail!(
                    "the daemon is running (its socket {} answers); stop it first",
                    socket.socket.display()
                );
            }
            let mount = cgroup::cgroup2_mount()?;
            let root = Cgroup::under(&mount, &cgroup_root)?;
            root.ensure_not_root(&mount)?;
            if root.exists() && root.populated()? {
                if !kill {
                    bail!(
                        "{} still holds processes, which would run unenforced after teardown; \
                         stop them or pass --kill",
                        root.path().display()
                    );
                }
                root.kill_all()?;
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while root.populated()? {
                    if std::time::Instant::now() > deadline {
                        bail!(
                            "processes in {} did not die within 10 s",
                            root.path().display()
                        );
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            let removed = enforce::teardown(&pin_dir)?;
            root.remove_tree()?;
            println!(
                "removed {} pins under {} and the cgroup subtree {}",
                removed.len(),
                pin_dir.display(),
                root.path().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Identity(cmd) => identity_command(cmd),
        Command::Audit(cmd) => audit_command(cmd),
        Command::ProbeConnect { addr, unix } => Ok(code(probe::child_main(&addr, unix.as_deref()))),
    }
}

#[expect(clippy::print_stdout, reason = "CLI output")]
fn identity_command(cmd: IdentityCommand) -> anyhow::Result<ExitCode> {
    use crate::identity::{
        self,
        svid::{KeyAlgorithm, LeafRequest},
        verify,
    };
    match cmd {
        IdentityCommand::Issue {
            ca,
            id,
            lifetime,
            caps,
            out,
        } => {
            let id = identity::parse_id(&id, &ca.trust_domain)?;
            let lifetime = identity::parse_lifetime(&lifetime).map_err(anyhow::Error::msg)?;
            let requester = format!("uid {} (agentwall identity issue)", nix::unistd::getuid());
            let req = LeafRequest {
                id,
                lifetime,
                capabilities: caps,
            };
            let issued = ca.issue_into(&req, KeyAlgorithm::default(), &requester, &out)?;
            println!(
                "issued {} serial {} valid until {} into {}",
                issued.id,
                issued.serial,
                humantime::format_rfc3339_seconds(issued.not_after),
                out.display()
            );
        }
        IdentityCommand::Inspect { ca, file } => {
            let pem =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
                rustls_pki_types::pem::PemObject::pem_slice_iter(&pem)
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("{} is not a PEM certificate file", file.display()))?;
            if chain.is_empty() {
                bail!("{} holds no PEM certificate", file.display());
            }
            let mut bundles = verify::TrustBundles::default();
            let ca_cert = identity::ca_dir(&ca.state_dir).join("ca.crt");
            if let Ok(ca_pem) = std::fs::read(&ca_cert) {
                for der in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca_pem) {
                    bundles.add(
                        &ca.trust_domain,
                        der.with_context(|| format!("reading {}", ca_cert.display()))?,
                    )?;
                }
            }
            let v = verify::Verifier::new(bundles, verify::DEFAULT_SKEW);
            match v.verify_client(&chain, std::time::SystemTime::now()) {
                Ok(s) => {
                    println!("SPIFFE ID:    {}", s.id);
                    println!("serial:       {}", s.serial);
                    println!(
                        "key:          {}",
                        KeyAlgorithm::of_certificate(&chain[0]).map_or("other", KeyAlgorithm::name)
                    );
                    println!(
                        "valid:        {} .. {}",
                        humantime::format_rfc3339_seconds(s.not_before),
                        humantime::format_rfc3339_seconds(s.not_after)
                    );
                    println!(
                        "capabilities: {}",
                        if s.capabilities.is_empty() {
                            "-".to_string()
                        } else {
                            s.capabilities.join(" ")
                        }
                    );
                    println!(
                        "verdict:      valid, issued by the local CA of {}",
                        ca.trust_domain
                    );
                }
                Err(e) => bail!("{} is not a valid X509-SVID here: {e}", file.display()),
            }
        }
        IdentityCommand::Rotate { socket } => {
            match Client::call(&socket.socket, &Request::Rotate)? {
                Reply::Done { message } => println!("{message}"),
                Reply::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
        IdentityCommand::Check { socket, file } => {
            let pem = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            match Client::call(&socket.socket, &Request::Check { pem })? {
                Reply::Checked {
                    valid: true,
                    spiffe_id,
                    serial,
                    not_after,
                    ..
                } => println!(
                    "valid: {} serial {} until {}",
                    spiffe_id.unwrap_or_default(),
                    serial.unwrap_or_default(),
                    not_after.unwrap_or_default()
                ),
                Reply::Checked { message, .. } => bail!("not valid: {message}"),
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
        IdentityCommand::Token {
            enroll_socket,
            cert,
            key,
            bundle,
            audience,
        } => {
            let read =
                |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let (token, expires_at) = identity::enroll::token(
                &enroll_socket,
                &read(&cert)?,
                &read(&key)?,
                &read(&bundle)?,
                &audience,
            )?;
            tracing::info!(%expires_at, "token issued");
            println!("{token}");
        }
        IdentityCommand::CheckToken {
            socket,
            audience,
            token,
        } => {
            let token = if token == "-" {
                let mut t = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)?;
                t
            } else {
                token
            };
            match Client::call(&socket.socket, &Request::CheckToken { token, audience })? {
                Reply::Checked {
                    valid: true,
                    spiffe_id,
                    serial,
                    not_after,
                    ..
                } => println!(
                    "valid: {} serial {} until {}",
                    spiffe_id.unwrap_or_default(),
                    serial.unwrap_or_default(),
                    not_after.unwrap_or_default()
                ),
                Reply::Checked { message, .. } => bail!("not valid: {message}"),
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
        IdentityCommand::Jwks { socket } => match Client::call(&socket.socket, &Request::Jwks)? {
            Reply::Jwks { jwks } => println!("{}", serde_json::to_string_pretty(&jwks)?),
            other => bail!("unexpected answer from the daemon: {other:?}"),
        },
        IdentityCommand::Renew {
            ca,
            cert,
            lifetime,
            out,
        } => {
            let pem =
                std::fs::read(&cert).with_context(|| format!("reading {}", cert.display()))?;
            let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
                rustls_pki_types::pem::PemObject::pem_slice_iter(&pem)
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("{} is not a PEM certificate file", cert.display()))?;
            let mut bundles = verify::TrustBundles::default();
            let ca_cert = identity::ca_dir(&ca.state_dir).join("ca.crt");
            let ca_pem = std::fs::read(&ca_cert)
                .with_context(|| format!("reading the local CA {}", ca_cert.display()))?;
            for der in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca_pem) {
                bundles.add(&ca.trust_domain, der?)?;
            }
            // Only a certificate this CA issued, still within its life, is renewed: renewal
            // must not revive what expired or create identities.
            let old = verify::Verifier::new(bundles, std::time::Duration::ZERO)
                .verify_client(&chain, std::time::SystemTime::now())
                .with_context(|| format!("{} cannot be renewed here", cert.display()))?;
            let revoked = identity::revoke::RevocationList::load(
                &identity::revoke::RevocationList::path(&ca.state_dir),
            )?;
            if let Some(r) = revoked.find(&old.id.to_string(), &old.serial) {
                bail!("{} was revoked at {}: {}", r.target, r.at, r.reason);
            }
            let req = LeafRequest {
                id: old.id,
                lifetime: identity::parse_lifetime(&lifetime).map_err(anyhow::Error::msg)?,
                capabilities: old.capabilities,
            };
            let requester = format!(
                "uid {} (agentwall identity renew of serial {})",
                nix::unistd::getuid(),
                old.serial
            );
            // The renewed certificate keeps its key type unless told otherwise.
            let keys = KeyAlgorithm::of_certificate(&chain[0]).unwrap_or_default();
            let issued = ca.issue_into(&req, keys, &requester, &out)?;
            println!(
                "renewed {} serial {} -> {} valid until {} into {}",
                issued.id,
                old.serial,
                issued.serial,
                humantime::format_rfc3339_seconds(issued.not_after),
                out.display()
            );
        }
        IdentityCommand::Log { ca, json } => {
            let (entries, torn) = identity::log::read(&identity::log_path(&ca.state_dir))?;
            for e in &entries {
                if json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    println!(
                        "{} {} {} until {} sha256:{} by {}",
                        e.issued_at, e.serial, e.spiffe_id, e.not_after, e.sha256, e.requester
                    );
                }
            }
            if let Some(t) = torn {
                tracing::warn!("{t}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether a decrypted record matches the query's filters.
/// `audit query`'s filters, times parsed.
struct RecordFilter {
    f: AuditFilter,
    since: Option<std::time::SystemTime>,
    until: Option<std::time::SystemTime>,
}

impl RecordFilter {
    fn new(f: AuditFilter) -> anyhow::Result<Self> {
        let time = |t: Option<&String>| {
            t.map(|t| {
                humantime::parse_rfc3339_weak(t)
                    .map_err(|e| anyhow::anyhow!("{t:?} is not an RFC 3339 time: {e}"))
            })
            .transpose()
        };
        Ok(Self {
            since: time(f.since.as_ref())?,
            until: time(f.until.as_ref())?,
            f,
        })
    }

    fn matches(&self, rec: &serde_json::Value) -> bool {
        let field = |k: &str| rec.get(k).and_then(serde_json::Value::as_str);
        let has = |keys: &[&str], want: &str| keys.iter().any(|k| field(k) == Some(want));
        let f = &self.f;
        if f.identity
            .as_deref()
            .is_some_and(|i| !has(&["spiffe_id", "target", "policy"], i))
        {
            return false;
        }
        if f.verdict.as_deref().is_some_and(|v| !has(&["verdict"], v)) {
            return false;
        }
        if f.kind.as_deref().is_some_and(|k| !has(&["kind"], k)) {
            return false;
        }
        if let Some(r) = &f.rule {
            let id_matches = rec
                .get("rule_id")
                .and_then(serde_json::Value::as_u64)
                .is_some_and(|id| id.to_string() == *r);
            if !id_matches && !has(&["rule"], r) {
                return false;
            }
        }
        let time = field("time").and_then(|t| humantime::parse_rfc3339_weak(t).ok());
        if self.since.is_some_and(|s| time.is_none_or(|t| t < s)) {
            return false;
        }
        if self.until.is_some_and(|u| time.is_none_or(|t| t > u)) {
            return false;
        }
        true
    }
}

/// A record body as JSON (compact verdicts decoded); one that cannot be read is shown as
/// such, with its bytes, rather than skipped.
fn record_value(body: &[u8]) -> serde_json::Value {
    crate::audit::record::json(body)
        .and_then(|j| serde_json::from_slice(&j).map_err(|e| e.to_string()))
        .unwrap_or_else(
            |e| serde_json::json!({"undecodable": String::from_utf8_lossy(body), "error": e}),
        )
}

#[expect(clippy::print_stdout, reason = "CLI output")]
fn audit_command(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    use crate::audit::{keys::AuditKey, verify};
    let print_record = |seq: u64, body: &[u8]| {
        let rec = record_value(body);
        println!("{}", serde_json::json!({"seq": seq, "record": rec}));
    };
    match cmd {
        AuditCommand::Keygen => println!("{}", AuditKey::generate_hex()?),
        AuditCommand::RotateKey { socket, key_file } => {
            if let Some(path) = key_file {
                let key = crate::audit::keys::rotate_key_file(&path)?;
                println!(
                    "{}: new key {} first, older keys kept below it; a daemon using this file \
                     writes under the new key from its next start",
                    path.display(),
                    crate::audit::hex(&key.id())
                );
                return Ok(ExitCode::SUCCESS);
            }
            match Client::call(&socket.socket, &Request::RotateAuditKey)? {
                Reply::Done { message } => println!("{message}"),
                Reply::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
        AuditCommand::Verify {
            dir,
            keys,
            integrity_only,
            node_key,
            checkpoints,
            json,
        } => {
            let public = if std::path::Path::new(&node_key).exists() {
                std::fs::read_to_string(&node_key)
                    .with_context(|| format!("reading {node_key}"))?
                    .trim()
                    .to_string()
            } else {
                node_key
            };
            let keyring = if integrity_only {
                None
            } else {
                Some(keys.keyring()?)
            };
            match verify::verify(&dir, keyring.as_ref(), &public, &checkpoints) {
                Ok(s) => {
                    if json {
                        println!("{}", serde_json::to_string(&s)?);
                    } else {
                        println!(
                            "OK: {} records ({} to {}) in {} segments, chain head {}, {} checkpoints (last at record {})",
                            s.records,
                            s.first_seq,
                            s.last_seq,
                            s.segments,
                            s.chain_head,
                            s.checkpoints,
                            s.last_checkpoint_seq
                        );
                        if let Some(at) = &s.history_anchor {
                            println!(
                                "the kept history starts at record {}: records 1 to {} were removed by retention (signed anchor of {at}; archived segments put back beside these verify the whole)",
                                s.first_seq,
                                s.first_seq - 1
                            );
                        }
                        if integrity_only {
                            println!(
                                "integrity only: nothing decrypted; records up to {} are sealed by a signed checkpoint{}",
                                s.last_checkpoint_seq,
                                if s.last_seq > s.last_checkpoint_seq {
                                    format!(
                                        ", records {} to {} by none yet",
                                        s.last_checkpoint_seq + 1,
                                        s.last_seq
                                    )
                                } else {
                                    String::new()
                                }
                            );
                        }
                    }
                }
                Err(verify::VerifyError::Bad { seq, reason }) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"ok": false, "first_bad_seq": seq, "reason": reason})
                        );
                    }
                    bail!("verification FAILED at record {seq}: {reason}");
                }
                Err(e) => bail!("{e}"),
            }
        }
        AuditCommand::Tail {
            dir,
            keys,
            lines,
            follow,
        } => {
            let keyring = keys.keyring()?;
            let mut last: std::collections::VecDeque<(u64, Vec<u8>)> =
                std::collections::VecDeque::new();
            let (summary, _) = verify::walk(&dir, &keyring, &Default::default(), |seq, body| {
                if last.len() == lines {
                    last.pop_front();
                }
                last.push_back((seq, body.to_vec()));
            })?;
            for (seq, body) in &last {
                print_record(*seq, body);
            }
            let mut seen = summary.last_seq;
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            loop {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let (s, _) = verify::walk(&dir, &keyring, &Default::default(), |seq, body| {
                    if seq > seen {
                        print_record(seq, body);
                    }
                })?;
                seen = s.last_seq;
            }
        }
        AuditCommand::Query { dir, keys, filter } => {
            let keyring = keys.keyring()?;
            let filter = RecordFilter::new(filter)?;
            verify::walk(&dir, &keyring, &Default::default(), |seq, body| {
                let rec = record_value(body);
                if filter.matches(&rec) {
                    println!("{}", serde_json::json!({"seq": seq, "record": rec}));
                }
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `1 rule`, `2 rules`.
fn count(n: impl TryInto<u64>, one: &str) -> String {
    count_plural(n, one, &format!("{one}s"))
}

fn count_plural(n: impl TryInto<u64>, one: &str, many: &str) -> String {
    let n: u64 = n.try_into().unwrap_or(u64::MAX);
    format!("{n} {}", if n == 1 { one } else { many })
}

#[expect(clippy::print_stdout, reason = "CLI output")]
fn print_status(s: &Status) {
    println!("agentwall {}: {}", s.version, s.health);
    for m in &s.protections.missing {
        println!("  MISSING: {m}");
    }
    println!(
        "policy generation {} ({}) from {}",
        s.generation,
        count(s.rule_nodes, "rule node"),
        s.policy_dir
    );
    for p in &s.policies {
        println!(
            "  policy {:<24} slot {:<4} {}, {}",
            p.name,
            p.slot,
            p.mode,
            count(p.rules, "rule")
        );
    }
    println!("cgroups under {}:", s.cgroup_root);
    for c in &s.cgroups {
        println!(
            "  {} id {} policy {} ({}{}{}{})",
            c.path,
            c.id,
            c.policy.as_deref().unwrap_or("-"),
            c.kind,
            if c.leased { ", running" } else { "" },
            if c.quarantined { ", QUARANTINED" } else { "" },
            if c.revoked { ", REVOKED" } else { "" }
        );
        if let Some(id) = &c.spiffe_id {
            println!(
                "      identity {id} serial {} until {}",
                c.serial.as_deref().unwrap_or("-"),
                c.expires_at.as_deref().unwrap_or("-")
            );
        }
    }
    let counters: Vec<String> = s
        .kernel_counters
        .totals
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("kernel counters: {}", counters.join(" "));
    if !s.daemon_errors.is_empty() {
        let errors: Vec<String> = s
            .daemon_errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("daemon errors: {}", errors.join(" "));
    }
    let a = &s.audit;
    println!(
        "audit {}: {} durable (last {}, checkpoint {}){}; {}; {}",
        a.dir,
        count(a.committed, "record"),
        a.last_seq,
        a.last_checkpoint_seq,
        if a.failing { ", FAILING" } else { "" },
        count(a.write_errors, "write error"),
        count(a.alerts, "alert"),
    );
    let l = &a.event_to_durable;
    if l.count > 0 {
        println!(
            "  kernel event to durable record: p50 {} us, p99 {} us, max {} us over {}",
            l.p50_us,
            l.p99_us,
            l.max_us,
            count(l.count, "event")
        );
    }
    for (name, k) in &a.sinks {
        println!(
            "  sink {name}: {} sent, {} dropped, {}{}{}",
            k.sent,
            k.dropped,
            count(k.errors, "error"),
            if k.connected { ", connected" } else { "" },
            k.last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_are_singular_for_one() {
        assert_eq!(super::count(1u64, "rule"), "1 rule");
        assert_eq!(super::count(0u64, "rule"), "0 rules");
        assert_eq!(
            super::count_plural(2u64, "policy", "policies"),
            "2 policies"
        );
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
