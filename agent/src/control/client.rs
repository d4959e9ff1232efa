//! The CLI side of the admin socket: blocking, one request per connection.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use super::{Reply, Request, Status};
use crate::{events::EventRecord, identity::revoke::Revocation};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the agentwall daemon at {path}: {source} (is `agentwall run` running, and are you root or in its admin group?)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent something this CLI cannot read: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the daemon closed the connection without answering")]
    Closed,
    #[error("{0}")]
    Daemon(String),
    #[error(
        "the daemon answered {got} where this CLI expected {wanted}: are the CLI and the daemon the same version?"
    )]
    Unexpected { wanted: &'static str, got: String },
}

pub use crate::daemon::{Checked, ExecReady, Reloaded, Revoked};

/// One item of the event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Streamed {
    Event(Box<EventRecord>),
    /// Events lost because this subscriber read too slowly.
    Lagged(u64),
}

/// The name of a reply's kind, for an error that says what came instead.
fn kind_of(r: &Reply) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_else(|| "an unknown reply".into())
}

/// The lease of an exec cgroup: the daemon removes the cgroup once this is dropped (the
/// connection closes) and no process is left in it.
#[derive(Debug)]
pub struct Lease {
    _connection: Client,
}

/// An open connection to the daemon.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// A connection made elsewhere and handed over (a descriptor passed to this process).
    pub fn from_stream(s: UnixStream) -> Result<Self, ClientError> {
        Ok(Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        Ok(())
    }

    /// The next reply; a daemon-side error becomes [`ClientError::Daemon`].
    pub fn recv(&mut self) -> Result<Reply, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        match serde_json::from_str(&line)? {
            Reply::Error { message } => Err(ClientError::Daemon(message)),
            r => Ok(r),
        }
    }

    /// One request, one reply.
    pub fn call(path: &Path, req: &Request) -> Result<Reply, ClientError> {
        let mut c = Self::connect(path)?;
        c.send(req)?;
        c.recv()
    }

    /// One request, and the reply `pick` takes; any other is [`ClientError::Unexpected`].
    fn expect<T>(
        path: &Path,
        req: &Request,
        wanted: &'static str,
        pick: impl FnOnce(Reply) -> Result<T, Box<Reply>>,
    ) -> Result<T, ClientError> {
        pick(Self::call(path, req)?).map_err(|r| ClientError::Unexpected {
            wanted,
            got: kind_of(&r),
        })
    }

    /// Asks for a cgroup for `agentwall exec`, under `policy` or (none) for an agent that
    /// enrolls; `audience` names the JWT-SVID audiences kept in its files. The cgroup is
    /// leased for as long as the returned connection stays open.
    pub fn exec_begin(
        path: &Path,
        policy: Option<String>,
        audience: Vec<String>,
        identity: Option<String>,
        secrets: Option<crate::daemon::ExecSecrets>,
    ) -> Result<(ExecReady, Lease), ClientError> {
        let mut c = Self::connect(path)?;
        c.send(&Request::ExecBegin {
            policy,
            audience,
            identity,
            secrets,
        })?;
        match c.recv()? {
            Reply::ExecReady {
                cgroup,
                cgroup_id,
                enroll,
                workload,
                protect,
                secrets_dir,
            } => Ok((
                ExecReady {
                    cgroup,
                    cgroup_id,
                    enroll,
                    workload,
                    protect,
                    secrets_dir,
                },
                Lease { _connection: c },
            )),
            r => Err(ClientError::Unexpected {
                wanted: "an exec cgroup",
                got: kind_of(&r),
            }),
        }
    }

    pub fn status(path: &Path) -> Result<Status, ClientError> {
        Self::expect(path, &Request::Status, "a status", |r| match r {
            Reply::Status(s) => Ok(*s),
            r => Err(Box::new(r)),
        })
    }

    pub fn reload(path: &Path) -> Result<Reloaded, ClientError> {
        Self::expect(path, &Request::Reload, "a reload's result", |r| match r {
            Reply::Reloaded {
                generation,
                policies,
                rule_nodes,
            } => Ok(Reloaded {
                generation,
                policies,
                rule_nodes,
            }),
            r => Err(Box::new(r)),
        })
    }

    /// A request answered with a message of what was done (quarantine, enforce-self, key
    /// rotations).
    pub fn done(path: &Path, req: &Request) -> Result<String, ClientError> {
        Self::expect(path, req, "a message of what was done", |r| match r {
            Reply::Done { message } => Ok(message),
            r => Err(Box::new(r)),
        })
    }

    /// Stores a secret's value as its next version; returns that version.
    pub fn secret_put(path: &Path, secret: String, value: &[u8]) -> Result<u32, ClientError> {
        use base64::Engine as _;
        let req = Request::SecretPut {
            path: secret,
            value: super::SecretText(base64::engine::general_purpose::STANDARD.encode(value)),
        };
        Self::expect(path, &req, "a secret's new version", |r| match r {
            Reply::SecretStored { version, .. } => Ok(version),
            r => Err(Box::new(r)),
        })
    }

    /// A secret's value (decoded) and its version.
    pub fn secret_get(
        path: &Path,
        secret: String,
        version: Option<u32>,
    ) -> Result<(u32, zeroize::Zeroizing<Vec<u8>>), ClientError> {
        use base64::Engine as _;
        let req = Request::SecretGet {
            path: secret,
            version,
        };
        let (version, text) = Self::expect(path, &req, "a secret", |r| match r {
            Reply::Secret { version, value, .. } => Ok((version, value)),
            r => Err(Box::new(r)),
        })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&text.0)
            .map_err(|e| ClientError::Daemon(format!("the secret's value is not base64: {e}")))?;
        Ok((version, zeroize::Zeroizing::new(bytes)))
    }

    pub fn secret_list(
        path: &Path,
        prefix: String,
    ) -> Result<Vec<crate::secrets::SecretInfo>, ClientError> {
        Self::expect(
            path,
            &Request::SecretList { prefix },
            "secrets",
            |r| match r {
                Reply::Secrets { entries } => Ok(entries),
                r => Err(Box::new(r)),
            },
        )
    }

    pub fn secret_leases(path: &Path) -> Result<Vec<crate::secrets::lease::Lease>, ClientError> {
        Self::expect(path, &Request::SecretLeases, "secret leases", |r| match r {
            Reply::SecretLeases { leases } => Ok(leases),
            r => Err(Box::new(r)),
        })
    }

    pub fn revoke(path: &Path, target: String, reason: String) -> Result<Revoked, ClientError> {
        let req = Request::Revoke { target, reason };
        Self::expect(path, &req, "a revocation's result", |r| match r {
            Reply::Revoked {
                target,
                new,
                cgroups,
                sockets_destroyed,
                not_persisted,
            } => Ok(Revoked {
                target,
                new,
                cgroups,
                sockets_destroyed,
                not_persisted,
            }),
            r => Err(Box::new(r)),
        })
    }

    pub fn revocations(path: &Path) -> Result<Vec<Revocation>, ClientError> {
        Self::expect(
            path,
            &Request::Revocations,
            "the revocation list",
            |r| match r {
                Reply::Revocations { entries } => Ok(entries),
                r => Err(Box::new(r)),
            },
        )
    }

    pub fn jwks(path: &Path) -> Result<serde_json::Value, ClientError> {
        Self::expect(path, &Request::Jwks, "a JWKS", |r| match r {
            Reply::Jwks { jwks } => Ok(jwks),
            r => Err(Box::new(r)),
        })
    }

    /// A certificate or token check (`Request::Check`, `Request::CheckToken`).
    pub fn check(path: &Path, req: &Request) -> Result<Checked, ClientError> {
        Self::expect(path, req, "a check's result", |r| match r {
            Reply::Checked {
                valid,
                spiffe_id,
                serial,
                not_after,
                message,
            } => Ok(Checked {
                valid,
                spiffe_id,
                serial,
                not_after,
                message,
            }),
            r => Err(Box::new(r)),
        })
    }

    /// Subscribes to the verdict stream.
    pub fn events(path: &Path) -> Result<Self, ClientError> {
        let mut c = Self::connect(path)?;
        c.send(&Request::Events)?;
        c.recv()?;
        Ok(c)
    }

    /// The next item of a stream [`Client::events`] opened.
    pub fn next_event(&mut self) -> Result<Streamed, ClientError> {
        match self.recv()? {
            Reply::Event(e) => Ok(Streamed::Event(e)),
            Reply::Lagged { missed } => Ok(Streamed::Lagged(missed)),
            r => Err(ClientError::Unexpected {
                wanted: "an event",
                got: kind_of(&r),
            }),
        }
    }
}
