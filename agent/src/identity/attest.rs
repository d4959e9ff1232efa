//! Who is on the other end of an enrollment socket, by the kernel's account, and whether that
//! matches the selectors a policy declares for the identity it claims.
//!
//! The peer is taken from SO_PEERPIDFD (Linux 6.5), a handle on the very process that called
//! connect(2) which cannot be confused with a later process of the same pid, or from
//! SO_PEERCRED where the kernel has no pidfd. Uid and gid are those the kernel recorded at
//! connect time. What is read from /proc (executable, cgroup) is read while the pidfd proves the
//! process is alive, so a pid reused after the peer exited is detected.

use std::{
    fs,
    io::Read as _,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use crate::policy::Attest;

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("cannot read the peer's credentials: {0}")]
    Cred(#[source] std::io::Error),
    #[error("the enrolling process (pid {0}) exited before it could be attested")]
    Gone(i32),
    #[error("reading {path} of the enrolling process: {source}")]
    Proc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the enrolling process has no cgroup v2 membership in {0}")]
    NoCgroup(PathBuf),
}

/// How the peer was identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Pidfd,
    Peercred,
}

/// The enrolling process.
#[derive(Debug)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Executable, as /proc/PID/exe links it.
    pub exe: PathBuf,
    /// Cgroup path from the cgroup v2 root, starting with `/`.
    pub cgroup: String,
    /// The id of that cgroup, when the caller named the cgroup by the id the kernel gave for
    /// the process (see [`Peer::of_socket`]); `None` when the path came from /proc.
    pub cgroup_id: Option<u64>,
    pub source: Source,
    /// Kept open while attestation runs: the executable is hashed through it.
    pidfd: Option<OwnedFd>,
}

/// SO_PEERPIDFD of a connected Unix socket: `Ok(None)` on a kernel without the option
/// (before 6.5) only. Any other failure (the peer exited and was reaped, say) is an error:
/// the pid SO_PEERCRED still reports may be another process's by now.
fn peer_pidfd(sock: RawFd) -> std::io::Result<Option<OwnedFd>> {
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `fd` and its size into `len`.
    let r = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOPROTOOPT) => Ok(None),
            _ => Err(e),
        };
    }
    if fd < 0 {
        return Err(std::io::Error::other("SO_PEERPIDFD gave no descriptor"));
    }
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// `struct pidfd_info` of include/uapi/linux/pidfd.h, its first published size (64 bytes).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}
const _: () = assert!(size_of::<PidfdInfo>() == 64);

/// `PIDFD_GET_INFO`: `_IOWR(PIDFS_IOCTL_MAGIC = 0xFF, 11, struct pidfd_info)` (Linux 6.13).
const PIDFD_GET_INFO: libc::c_ulong =
    (3 << 30) | ((size_of::<PidfdInfo>() as libc::c_ulong) << 16) | (0xFF << 8) | 11;
/// `PIDFD_INFO_PID` of the returned mask.
const PIDFD_INFO_PID: u64 = 1;
/// `PIDFD_INFO_CGROUPID`: requested, and set in the returned mask when `cgroupid` holds the
/// id of the process's cgroup v2.
const PIDFD_INFO_CGROUPID: u64 = 1 << 2;

/// The pid a pidfd refers to (one ioctl, Linux 6.13, else /proc/self/fdinfo) and, from the
/// ioctl, the id of its cgroup; `None` once the process is gone.
fn pidfd_info(fd: &OwnedFd) -> Option<(i32, Option<u64>)> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_CGROUPID,
        ..PidfdInfo::default()
    };
    // SAFETY: PIDFD_GET_INFO writes at most size_of::<PidfdInfo>() bytes (encoded in the
    // request number) into `info`, which lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), PIDFD_GET_INFO, &raw mut info) };
    if r == 0 && info.mask & PIDFD_INFO_PID != 0 {
        let cgroup_id = (info.mask & PIDFD_INFO_CGROUPID != 0).then_some(info.cgroupid);
        return i32::try_from(info.pid)
            .ok()
            .filter(|p| *p > 0)
            .map(|p| (p, cgroup_id));
    }
    // ESRCH: the process is gone. Anything else (ENOTTY before Linux 6.13): ask /proc.
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return None;
    }
    let info = read_small(Path::new(&format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))).ok()?;
    let pid: i32 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()?;
    (pid > 0).then_some((pid, None))
}

/// Whether the process of a pidfd is still alive (signal 0 through the pidfd). Only ESRCH
/// says it is gone: EPERM (a daemon without CAP_KILL asking about another user's process, as
/// under the systemd unit) says it is there.
fn pidfd_alive(fd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 only checks that the target exists.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn proc_err(path: PathBuf) -> impl FnOnce(std::io::Error) -> AttestError {
    move |source| AttestError::Proc { path, source }
}

/// A small /proc file, read with as few system calls as it takes (no size probe, which
/// /proc files do not answer anyway).
fn read_small(path: &Path) -> std::io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = f.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            return Err(std::io::Error::other("longer than 1 MiB"));
        }
    }
    String::from_utf8(buf).map_err(std::io::Error::other)
}

/// The cgroup v2 path of `pid` (the `0::` line).
pub(crate) fn cgroup_of(pid: i32) -> Result<String, AttestError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = read_small(&path).map_err(proc_err(path.clone()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end().to_string())
        .ok_or(AttestError::NoCgroup(path))
}

impl Peer {
    /// Identifies the peer of a connected Unix stream socket.
    ///
    /// `known` may name the cgroup of an id (path from the cgroup v2 root): a caller that has
    /// seen the cgroup before and checked that the path still has that id. With it, a peer
    /// the kernel reports by cgroup id (pidfd, Linux 6.13) is placed without reading
    /// /proc/PID/cgroup; anything else reads it.
    pub fn of_socket(
        sock: RawFd,
        cred_pid: Option<i32>,
        uid: u32,
        gid: u32,
        known: &dyn Fn(u64) -> Option<String>,
    ) -> Result<Self, AttestError> {
        let pidfd = peer_pidfd(sock).map_err(|_| AttestError::Gone(cred_pid.unwrap_or(0)))?;
        let (pid, kernel_cgroup, source) = match (&pidfd, cred_pid) {
            (Some(fd), _) => {
                let (pid, cgroup_id) =
                    pidfd_info(fd).ok_or(AttestError::Gone(cred_pid.unwrap_or(0)))?;
                (pid, cgroup_id, Source::Pidfd)
            }
            (None, Some(pid)) => (pid, None, Source::Peercred),
            (None, None) => {
                return Err(AttestError::Cred(std::io::Error::other(
                    "the kernel reported no peer process",
                )));
            }
        };
        let exe_link = PathBuf::from(format!("/proc/{pid}/exe"));
        let exe = fs::read_link(&exe_link).map_err(proc_err(exe_link))?;
        let named = kernel_cgroup.and_then(|id| Some((known(id)?, id)));
        let (cgroup, cgroup_id) = match named {
            Some((path, id)) => (path, Some(id)),
            None => (cgroup_of(pid)?, None),
        };
        let peer = Self {
            pid,
            uid,
            gid,
            exe,
            cgroup,
            cgroup_id,
            source,
            pidfd,
        };
        peer.still_there()?;
        Ok(peer)
    }

    /// Fails if the process exited since it was read (its pid could now be another's).
    pub fn still_there(&self) -> Result<(), AttestError> {
        // A pidfd names one process for good: alive means the pid is still that process.
        let alive = match &self.pidfd {
            Some(fd) => pidfd_alive(fd),
            None => Path::new(&format!("/proc/{}", self.pid)).exists(),
        };
        if alive {
            Ok(())
        } else {
            Err(AttestError::Gone(self.pid))
        }
    }

    /// The id of the cgroup the process is in now, by the kernel's account (the pidfd,
    /// Linux 6.13); elsewhere the inode of its cgroup directory under `mount`, read from
    /// /proc while the process is proved alive. Fails once the process exited.
    pub fn cgroup_id_now(&self, mount: &Path) -> Result<u64, AttestError> {
        if let Some(fd) = &self.pidfd {
            match pidfd_info(fd) {
                None => return Err(AttestError::Gone(self.pid)),
                Some((_, Some(id))) => return Ok(id),
                Some((_, None)) => {}
            }
        }
        let rel = cgroup_of(self.pid)?;
        let dir = mount.join(rel.trim_start_matches('/'));
        let id = std::os::unix::fs::MetadataExt::ino(
            &fs::metadata(&dir).map_err(proc_err(dir.clone()))?,
        );
        self.still_there()?;
        Ok(id)
    }

    /// SHA-256 of the running executable, lower-case hex. Read through /proc/PID/exe, which
    /// opens the file the process runs even if its path was replaced since.
    pub fn exe_sha256(&self) -> Result<String, AttestError> {
        let path = PathBuf::from(format!("/proc/{}/exe", self.pid));
        let mut f = fs::File::open(&path).map_err(proc_err(path.clone()))?;
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(proc_err(path.clone()))?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        self.still_there()?;
        Ok(ctx
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// The systemd unit whose cgroup holds the process, as a policy names it: the deepest
    /// `*.service` or `*.scope` segment of its cgroup path; for a unit of a user's own
    /// manager (below `user@UID.service`), that manager's unit and the unit, joined by `/`
    /// (`user@1000.service/reader.service`), so that a user cannot pass for a system unit by
    /// giving a unit of their own its name (`systemd-run --user --unit=reader`).
    pub fn systemd_unit(&self) -> Option<String> {
        let is_unit = |s: &&str| s.ends_with(".service") || s.ends_with(".scope");
        let unit = self.cgroup.split('/').rev().find(is_unit)?;
        let manager = self
            .cgroup
            .split('/')
            .find(|s| s.starts_with("user@") && s.ends_with(".service"));
        Some(match manager {
            Some(m) if m != unit => format!("{m}/{unit}"),
            _ => unit.to_string(),
        })
    }
}

/// Checks every selector of `want` against the peer. The error names each mismatch.
pub fn check(want: &Attest, peer: &Peer) -> Result<(), Mismatch> {
    let mut wrong = Vec::new();
    if !want.uid.is_empty() && !want.uid.contains(&peer.uid) {
        wrong.push(format!("uid {} is not one of {:?}", peer.uid, want.uid));
    }
    if !want.gid.is_empty() && !want.gid.contains(&peer.gid) {
        wrong.push(format!("gid {} is not one of {:?}", peer.gid, want.gid));
    }
    if let Some(exe) = &want.exe
        && *exe != peer.exe
    {
        wrong.push(format!(
            "executable {} is not {}",
            peer.exe.display(),
            exe.display()
        ));
    }
    if let Some(p) = &want.cgroup {
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        let ok = glob::Pattern::new(p).is_ok_and(|pat| pat.matches_with(&peer.cgroup, opts));
        if !ok {
            wrong.push(format!("cgroup {} does not match {p}", peer.cgroup));
        }
    }
    if let Some(u) = &want.systemd_unit {
        let got = peer.systemd_unit();
        if got.as_deref() != Some(u.as_str()) {
            wrong.push(format!(
                "systemd unit {} is not {u}",
                got.as_deref().unwrap_or("(none)")
            ));
        }
    }
    // Hashing reads the whole executable: only when everything cheaper matched.
    if wrong.is_empty()
        && let Some(h) = &want.sha256
    {
        match peer.exe_sha256() {
            Ok(got) if got == *h => {}
            Ok(got) => wrong.push(format!(
                "executable {} has SHA-256 {got}, not {h}",
                peer.exe.display()
            )),
            Err(e) => wrong.push(e.to_string()),
        }
    }
    if wrong.is_empty() {
        peer.still_there()
            .map_err(|e| Mismatch(vec![e.to_string()]))
    } else {
        Err(Mismatch(wrong))
    }
}

/// Selectors that did not match.
#[derive(Debug, thiserror::Error)]
#[error("attestation failed: {}", .0.join("; "))]
pub struct Mismatch(pub Vec<String>);

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Peer {
        Peer {
            pid: std::process::id() as i32,
            uid: 1000,
            gid: 100,
            exe: PathBuf::from("/usr/bin/agent"),
            cgroup: "/system.slice/reader.service".into(),
            cgroup_id: None,
            source: Source::Peercred,
            pidfd: None,
        }
    }

    fn ok_unit(u: &str) -> Attest {
        Attest {
            systemd_unit: Some(u.into()),
            ..Attest::default()
        }
    }

    #[test]
    fn selectors_match_and_name_mismatches() {
        let p = me();
        assert!(check(&Attest::default(), &p).is_ok());
        let ok = Attest {
            uid: vec![0, 1000],
            gid: vec![100],
            exe: Some("/usr/bin/agent".into()),
            cgroup: Some("/system.slice/*.service".into()),
            systemd_unit: Some("reader.service".into()),
            sha256: None,
        };
        assert!(check(&ok, &p).is_ok());
        let bad = Attest {
            uid: vec![0],
            exe: Some("/usr/bin/other".into()),
            cgroup: Some("/agentwall/*".into()),
            systemd_unit: Some("writer.service".into()),
            ..Attest::default()
        };
        let e = check(&bad, &p).unwrap_err().to_string();
        for w in [
            "uid 1000 is not one of [0]",
            "executable /usr/bin/agent is not /usr/bin/other",
            "cgroup /system.slice/reader.service does not match /agentwall/*",
            "systemd unit reader.service is not writer.service",
        ] {
            assert!(e.contains(w), "{w} missing in {e}");
        }
        // A user's own manager's unit of the same name is not the system unit.
        let mut user = me();
        user.cgroup =
            "/user.slice/user-1000.slice/user@1000.service/app.slice/reader.service".into();
        let e = check(&ok_unit("reader.service"), &user)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("systemd unit user@1000.service/reader.service is not reader.service"),
            "{e}"
        );
        assert!(check(&ok_unit("user@1000.service/reader.service"), &user).is_ok());
        // The user manager itself is a system unit.
        user.cgroup = "/user.slice/user-1000.slice/user@1000.service/init.scope".into();
        assert!(check(&ok_unit("user@1000.service/init.scope"), &user).is_ok());
        user.cgroup = "/user.slice/user-1000.slice/user@1000.service".into();
        assert!(check(&ok_unit("user@1000.service"), &user).is_ok());
        // `*` stays within one segment, `**` crosses them.
        let deep = Attest {
            cgroup: Some("/*".into()),
            ..Attest::default()
        };
        assert!(check(&deep, &p).is_err());
        let deeper = Attest {
            cgroup: Some("/**".into()),
            ..Attest::default()
        };
        assert!(check(&deeper, &p).is_ok());
    }

    #[test]
    fn this_process_can_be_read() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let cred =
            nix::sys::socket::getsockopt(&a, nix::sys::socket::sockopt::PeerCredentials).unwrap();
        let of = |known: &dyn Fn(u64) -> Option<String>| {
            Peer::of_socket(
                a.as_raw_fd(),
                Some(cred.pid()),
                cred.uid(),
                cred.gid(),
                known,
            )
            .unwrap()
        };
        let p = of(&|_| None);
        assert_eq!(p.pid, std::process::id() as i32);
        assert_eq!(p.exe, std::env::current_exe().unwrap());
        assert!(p.cgroup.starts_with('/'));
        assert_eq!(p.cgroup_id, None, "read from /proc");
        assert_eq!(p.exe_sha256().unwrap().len(), 64);
        // Where the kernel reports the cgroup id (Linux 6.13), a caller that can name it is
        // asked, with the id of the process's own cgroup.
        let asked = std::cell::Cell::new(None);
        let named = of(&|id| {
            asked.set(Some(id));
            Some("/named/by/caller".into())
        });
        if p.source == Source::Pidfd && asked.get().is_some() {
            let mount = crate::cgroup::cgroup2_mount().unwrap();
            let own = crate::cgroup::Cgroup::under(&mount, p.cgroup.trim_start_matches('/'))
                .unwrap()
                .id()
                .unwrap();
            assert_eq!(asked.get(), Some(own));
            assert_eq!(named.cgroup, "/named/by/caller");
            assert_eq!(named.cgroup_id, Some(own));
        } else {
            assert_eq!(named.cgroup, p.cgroup);
        }
    }

    #[test]
    fn a_pidfd_names_its_process_until_it_is_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // SAFETY: pidfd_open returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: the descriptor was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        assert_eq!(pidfd_info(&fd).map(|(p, _)| p), Some(pid));
        assert!(pidfd_alive(&fd));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(pidfd_info(&fd), None);
        assert!(!pidfd_alive(&fd));
    }
}
