//! The issuance log: one JSON line per certificate ever issued (which identities existed),
//! appended with O_APPEND and made durable before the certificate is handed out.

use std::{
    fs,
    io::{BufRead as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::svid::Issued;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: not an issuance record ({message})")]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub issued_at: String,
    pub serial: String,
    pub spiffe_id: String,
    pub not_before: String,
    pub not_after: String,
    pub sha256: String,
    /// Who asked: a user, or a process and its cgroup.
    pub requester: String,
}

impl Entry {
    pub fn of(issued: &Issued, requester: &str, at: std::time::SystemTime) -> Self {
        let t = |t| humantime::format_rfc3339_seconds(t).to_string();
        Self {
            issued_at: t(at),
            serial: issued.serial.clone(),
            spiffe_id: issued.id.to_string(),
            not_before: t(issued.not_before),
            not_after: t(issued.not_after),
            sha256: issued.sha256.clone(),
            requester: requester.to_string(),
        }
    }
}

/// Appends `entry` to the log at `path` and syncs it.
pub fn append(path: &Path, entry: &Entry) -> Result<(), LogError> {
    let io = |op| {
        move |source| LogError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
    }
    let mut line = serde_json::to_vec(entry).map_err(|e| io("encoding for")(e.into()))?;
    line.push(b'\n');
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io("opening"))?;
    // One write of a whole line with O_APPEND: concurrent writers do not interleave lines.
    f.write_all(&line).map_err(io("appending to"))?;
    f.sync_data().map_err(io("syncing"))
}

/// Every entry of the log. A last line without its newline (a write cut short by a crash)
/// is reported in the second value and skipped; any other bad line is an error.
pub fn read(path: &Path) -> Result<(Vec<Entry>, Option<String>), LogError> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(source) => {
            return Err(LogError::Io {
                op: "opening",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    let mut reader = std::io::BufReader::new(f);
    let mut n = 0;
    loop {
        let mut line = String::new();
        let got = reader.read_line(&mut line).map_err(|source| LogError::Io {
            op: "reading",
            path: path.to_path_buf(),
            source,
        })?;
        if got == 0 {
            return Ok((out, None));
        }
        n += 1;
        if !line.ends_with('\n') {
            return Ok((
                out,
                Some(format!(
                    "{}:{n}: incomplete last record ignored",
                    path.display()
                )),
            ));
        }
        let e = serde_json::from_str(line.trim_end()).map_err(|e| LogError::Corrupt {
            path: path.to_path_buf(),
            line: n,
            message: e.to_string(),
        })?;
        out.push(e);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::identity::{
        spiffe::SpiffeId,
        svid::{DEFAULT_LIFETIME, LeafRequest, LocalCa},
    };

    #[test]
    fn appends_reads_back_and_survives_a_torn_tail() {
        let dir = std::env::temp_dir().join(format!("aw-log-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("issuance.log");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ca = LocalCa::create("example.org", now).unwrap();
        let id = SpiffeId::workload("spiffe://example.org/agent/a/prod").unwrap();
        let issued = ca
            .issue(
                &LeafRequest {
                    id,
                    lifetime: DEFAULT_LIFETIME,
                    capabilities: vec![],
                },
                now,
            )
            .unwrap();
        append(&path, &Entry::of(&issued, "uid 0", now)).unwrap();
        append(&path, &Entry::of(&issued, "uid 0", now)).unwrap();
        let (entries, torn) = read(&path).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].serial, issued.serial);
        assert_eq!(entries[0].spiffe_id, "spiffe://example.org/agent/a/prod");
        assert!(torn.is_none());
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"issued_at\":").unwrap();
        let (entries, torn) = read(&path).unwrap();
        assert_eq!(entries.len(), 2);
        assert!(torn.unwrap().contains(":3: incomplete"));
        fs::write(&path, "not json\n").unwrap();
        assert!(matches!(
            read(&path),
            Err(LogError::Corrupt { line: 1, .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
