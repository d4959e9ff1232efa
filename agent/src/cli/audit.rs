//! `agentwall audit`: verify and read the audit log, make and rotate keys.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use super::SocketArg;
use crate::control::{Request, client::Client};

#[derive(Debug, Args)]
pub(super) struct AuditKeyArgs {
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
pub(super) enum AuditCommand {
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
        /// Print JSON: one document per line.
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
pub(super) struct AuditFilter {
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
        .map_err(|e| e.to_string())
        .and_then(|j| serde_json::from_slice(&j).map_err(|e| e.to_string()))
        .unwrap_or_else(
            |e| serde_json::json!({"undecodable": String::from_utf8_lossy(body), "error": e}),
        )
}

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn command(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
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
            println!(
                "{}",
                Client::done(&socket.socket, &Request::RotateAuditKey)?
            );
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
