//! `agentwall identity`: issue, inspect and renew certificates, and ask the daemon about
//! certificates and tokens.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use super::SocketArg;
use crate::{
    config,
    control::{Request, client::Client},
};

#[derive(Debug, Args)]
pub(super) struct CaArgs {
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
pub(super) enum IdentityCommand {
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
        /// Print JSON: one document per line.
        #[arg(long)]
        json: bool,
    },
}

#[expect(clippy::print_stdout, reason = "CLI output")]
pub(super) fn command(cmd: IdentityCommand) -> anyhow::Result<ExitCode> {
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
            let lifetime = identity::parse_lifetime(&lifetime)?;
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
            println!("{}", Client::done(&socket.socket, &Request::Rotate)?);
        }
        IdentityCommand::Check { socket, file } => {
            let pem = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            print_checked(Client::check(&socket.socket, &Request::Check { pem })?)?;
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
            let req = Request::CheckToken { token, audience };
            print_checked(Client::check(&socket.socket, &req)?)?;
        }
        IdentityCommand::Jwks { socket } => {
            let jwks = Client::jwks(&socket.socket)?;
            println!("{}", serde_json::to_string_pretty(&jwks)?);
        }
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
                lifetime: identity::parse_lifetime(&lifetime)?,
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

/// A valid certificate or token in one line; an invalid one is an error that says why.
#[expect(clippy::print_stdout, reason = "CLI output")]
fn print_checked(c: crate::control::client::Checked) -> anyhow::Result<()> {
    if !c.valid {
        bail!("not valid: {}", c.message);
    }
    println!(
        "valid: {} serial {} until {}",
        c.spiffe_id.unwrap_or_default(),
        c.serial.unwrap_or_default(),
        c.not_after.unwrap_or_default()
    );
    Ok(())
}
