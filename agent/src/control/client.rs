//! The CLI side of the admin socket: blocking, one request per connection.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use super::{Reply, Request};

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
}
