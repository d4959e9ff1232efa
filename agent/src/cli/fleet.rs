//! `agentwall fleet`: the fleet's policy signing key, and publishing a signed policy bundle
//! to etcd (see `crate::fleet`). Needs no daemon.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Subcommand;

use crate::{audit::keys::NodeKey, fleet};

#[derive(Debug, Subcommand)]
pub(super) enum FleetCommand {
    /// Make the Ed25519 key that signs policy bundles (PKCS#8, 0600) if KEY does not exist,
    /// and print its public key, which the nodes list under `fleet.policy_keys`.
    Keygen {
        /// The private key file; keep it off the nodes.
        #[arg(long)]
        key: PathBuf,
    },
    /// Check a policy directory, sign it as a bundle and put it in etcd, where every node
    /// that trusts the key puts it in force.
    Publish {
        /// The policy directory.
        #[arg(long)]
        policies: PathBuf,
        /// The signing key (`agentwall fleet keygen`).
        #[arg(long)]
        key: PathBuf,
        /// etcd client URLs (`http://HOST:PORT`), comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// The fleet's key prefix in etcd.
        #[arg(long, default_value = "/agentwall")]
        prefix: String,
        /// The bundle's version; it must be higher than the one in force on the nodes.
        /// Default: the current Unix time in milliseconds.
        #[arg(long)]
        version: Option<u64>,
    },
}

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn command(cmd: FleetCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        FleetCommand::Keygen { key } => {
            let existed = key.exists();
            let k = NodeKey::load_or_create(&key)?;
            println!(
                "{} {}; its public key (for fleet.policy_keys):\n{}",
                if existed { "key" } else { "made" },
                key.display(),
                k.public_hex()
            );
            Ok(ExitCode::SUCCESS)
        }
        FleetCommand::Publish {
            policies,
            key,
            etcd,
            prefix,
            version,
        } => {
            anyhow::ensure!(
                key.exists(),
                "{} does not exist: make it with `agentwall fleet keygen --key {}`",
                key.display(),
                key.display()
            );
            let k = NodeKey::load_or_create(&key)?;
            let version = match version {
                Some(v) => v,
                None => u64::try_from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_millis(),
                )
                .unwrap_or(u64::MAX),
            };
            anyhow::ensure!(
                version >= 1,
                "--version must be 1 or more: nodes put a bundle in force only if it is newer"
            );
            let payload = fleet::BundlePayload::of_dir(&policies, version)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| {
                    format!("{} is not a valid policy directory", policies.display())
                })?;
            let signed = serde_json::to_vec(&payload.sign(&k)?)?;
            anyhow::ensure!(
                signed.len() <= fleet::MAX_BUNDLE_BYTES,
                "the bundle is {} bytes, more than the {} etcd takes: shorten the policies",
                signed.len(),
                fleet::MAX_BUNDLE_BYTES
            );
            let at = fleet::bundle_key(&prefix);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut client = etcd_client::Client::connect(&etcd, None)
                    .await
                    .with_context(|| format!("connecting to etcd at {}", etcd.join(",")))?;
                client
                    .put(at.clone(), signed, None)
                    .await
                    .with_context(|| format!("putting {at}"))?;
                anyhow::Ok(())
            })?;
            println!(
                "published bundle version {version} ({} files) signed by {} at {at}",
                payload.files.len(),
                k.public_hex()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
