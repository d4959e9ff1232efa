//! Starting a program inside a cgroup, with no window in which it runs outside it.
//!
//! `clone3(CLONE_INTO_CGROUP)` (Linux 5.7) creates the child directly in the target cgroup,
//! so the child's first instruction already runs under the cgroup's programs, and every socket
//! it ever creates belongs to that cgroup. Where clone3 answers ENOSYS (systemd's
//! `RestrictNamespaces=` filter gives that answer, as it cannot read clone3's flags), the child
//! is made with clone and moves itself into the cgroup as its first act, before it creates
//! anything or runs a line of the command. Between clone and exec the child runs only raw
//! system calls: the parent is multi-threaded, so nothing that allocates or takes a lock is
//! safe there (and glibc's setuid wrappers would try to signal threads that the child does not
//! have).
//!
//! Size: the code between clone and exec must be raw system calls that allocate nothing. It
//! stays in one file so that this rule can be checked by reading one file.

use std::{
    ffi::{CString, OsStr, OsString},
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::{OsStrExt as _, OsStringExt as _},
    },
    path::PathBuf,
};

use nix::{
    errno::Errno,
    sys::wait::{WaitStatus, waitpid},
    unistd::{Pid, User, pipe2},
};

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0}: command not found (searched PATH)")]
    NotFound(String),
    #[error("{0:?} contains a NUL byte")]
    Nul(OsString),
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("looking up user {user:?}: {errno}")]
    UserLookup { user: String, errno: Errno },
    #[error(
        "clone3 into the cgroup failed: {0} (needs Linux 5.7 or later and write access to the cgroup)"
    )]
    Clone(Errno),
    #[error("creating a pipe: {0}")]
    Pipe(Errno),
    #[error("in the child, {stage} failed: {errno}")]
    Child { stage: &'static str, errno: Errno },
    #[error("a confined root command cannot be mapped to host uid 0")]
    RootMappedToRoot,
    #[error("writing the user namespace's {map}: {source}")]
    UserMap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The user to run as.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub name: String,
    pub home: PathBuf,
}

impl RunAs {
    /// Resolves a user name or numeric uid.
    pub fn lookup(user: &str) -> Result<Self, SpawnError> {
        let found = if let Ok(uid) = user.parse::<u32>() {
            User::from_uid(uid.into())
        } else {
            User::from_name(user)
        };
        let u = found
            .map_err(|errno| SpawnError::UserLookup {
                user: user.into(),
                errno,
            })?
            .ok_or_else(|| SpawnError::UnknownUser(user.into()))?;
        let cname =
            CString::new(u.name.clone()).map_err(|_| SpawnError::UnknownUser(user.into()))?;
        let groups =
            nix::unistd::getgrouplist(&cname, u.gid).map_err(|errno| SpawnError::UserLookup {
                user: user.into(),
                errno,
            })?;
        Ok(Self {
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            groups: groups.into_iter().map(|g| g.as_raw()).collect(),
            name: u.name,
            home: u.dir,
        })
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Command {
    pub program: OsString,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub user: Option<RunAs>,
    /// Descriptors 3 .. 3 + N pass to the program (systemd's `--preserve-fds`); every other
    /// descriptor above 2 is closed at exec, so that nothing the launcher inherited (a socket
    /// made outside the cgroup, above all) reaches the program.
    pub preserve_fds: u32,
    /// Confines a program that runs as root (see [`Confinement`]).
    pub confine: Option<Confinement>,
}

/// What keeps a program that runs as root inside the wall, without kernel hooks of its own:
///
/// - a user namespace in which it is root, mapped to a host uid and gid of its own
///   (`root_maps_to`): on the host it owns nothing and holds no capability, so it cannot
///   signal or trace the daemon or anyone else, nor open or change a file that needs root.
///   That uid creates the namespace, so the namespace's owner is that uid too: what the kernel
///   counts per user of a namespace and its owners (inotify instances and watches, message
///   queue bytes, user namespaces) is charged to it, not to root;
/// - a cgroup namespace rooted at its cgroup (a move to any cgroup outside it is refused);
/// - a mount namespace in which the daemon's directories and key are covered by empty
///   read-only file systems and the cgroup file system is read-only;
/// - none of the capabilities of [`DROPPED_CAPS`] even inside its namespaces (no mounts or
///   namespaces, no BPF, no packet or raw sockets, no ptrace...), with `no_new_privs` so that
///   no set-user-ID program gives them back.
#[derive(Debug, Clone)]
pub struct Confinement {
    pub hide_dirs: Vec<PathBuf>,
    pub hide_files: Vec<PathBuf>,
    pub read_only: Vec<PathBuf>,
    /// The host uid (and gid of the same number) root inside is; never 0.
    pub root_maps_to: u32,
}

/// Capabilities a confined root program loses (numbers of linux/capability.h): the rest
/// (file ownership and permissions, setuid, kill...) are a root program's ordinary business
/// inside its namespaces and reach nothing outside them. CAP_SYS_RESOURCE goes because it
/// would let the program raise its namespace's user-namespace limit again.
pub const DROPPED_CAPS: [(u32, &str); 22] = [
    (2, "CAP_DAC_READ_SEARCH"),
    (8, "CAP_SETPCAP"),
    (9, "CAP_LINUX_IMMUTABLE"),
    (12, "CAP_NET_ADMIN"),
    (13, "CAP_NET_RAW"),
    (16, "CAP_SYS_MODULE"),
    (17, "CAP_SYS_RAWIO"),
    (19, "CAP_SYS_PTRACE"),
    (20, "CAP_SYS_PACCT"),
    (21, "CAP_SYS_ADMIN"),
    (22, "CAP_SYS_BOOT"),
    (24, "CAP_SYS_RESOURCE"),
    (25, "CAP_SYS_TIME"),
    (27, "CAP_MKNOD"),
    (30, "CAP_AUDIT_CONTROL"),
    (31, "CAP_SETFCAP"),
    (32, "CAP_MAC_OVERRIDE"),
    (33, "CAP_MAC_ADMIN"),
    (34, "CAP_SYSLOG"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
    (40, "CAP_CHECKPOINT_RESTORE"),
];

impl Command {
    /// `program` with `args`, in the current environment.
    pub fn new(
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        Self {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: std::env::vars_os().collect(),
            user: None,
            preserve_fds: 0,
            confine: None,
        }
    }

    pub fn set_env(&mut self, key: &str, value: impl Into<OsString>) {
        let key = OsString::from(key);
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
    }
}

/// Finds `program` on PATH unless it contains a slash.
fn resolve(program: &OsStr, env: &[(OsString, OsString)]) -> Result<PathBuf, SpawnError> {
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| {
            OsString::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        });
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok()
            && candidate.is_file()
        {
            return Ok(candidate);
        }
    }
    Err(SpawnError::NotFound(program.to_string_lossy().into_owned()))
}

fn cstring(s: &OsStr) -> Result<CString, SpawnError> {
    CString::new(s.as_bytes()).map_err(|_| SpawnError::Nul(s.to_os_string()))
}

/// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2), see include/uapi/linux/sched.h.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Stages reported from the child through the pipe.
const STAGES: [&str; 19] = [
    "setgroups",
    "setresgid",
    "setresuid",
    "execve",
    "close_range (marking inherited descriptors close-on-exec; needs Linux 5.11)",
    "clearing close-on-exec on a preserved descriptor",
    "unshare of the mount and cgroup namespaces (root's confinement)",
    "making the mounts private (root's confinement)",
    "covering a daemon directory or file (root's confinement)",
    "making the cgroup file system read-only (root's confinement)",
    "dropping capabilities (root's confinement)",
    "setting no_new_privs (root's confinement)",
    "waiting for the user namespace's uid map (root's confinement)",
    "limiting the user namespaces below its own to none (root's confinement)",
    "setsid (root's confinement)",
    "unshare of a user namespace as the mapped uid (root's confinement; user namespaces may be turned off: see sysctl user.max_user_namespaces, or run the command as another user)",
    "telling the launcher the user namespace is there (root's confinement)",
    "keeping capabilities across the change to the mapped uid (root's confinement)",
    "joining the cgroup (clone3 was refused, so the child moves itself)",
];

/// The confinement in the form the child uses: C strings made before the clone.
struct ChildConfinement {
    hide_dirs: Vec<CString>,
    hide_files: Vec<CString>,
    read_only: Vec<CString>,
}

impl ChildConfinement {
    fn of(c: &Confinement) -> Result<Self, SpawnError> {
        let all = |v: &[PathBuf]| -> Result<Vec<CString>, SpawnError> {
            v.iter().map(|p| cstring(p.as_os_str())).collect()
        };
        if c.root_maps_to == 0 {
            return Err(SpawnError::RootMappedToRoot);
        }
        Ok(Self {
            hide_dirs: all(&c.hide_dirs)?,
            hide_files: all(&c.hide_files)?,
            read_only: all(&c.read_only)?,
        })
    }
}

/// `close_range` flag (include/uapi/linux/close_range.h): mark close-on-exec, do not close.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// A started program: its pid, to wait for it, and a pidfd, to signal it (a pidfd never
/// reaches another process, even once this one is reaped and its pid reused).
#[derive(Debug)]
pub struct Child {
    pub pid: Pid,
    pub pidfd: OwnedFd,
}

/// The confined child's two pipes with the launcher (read and write ends).
#[derive(Clone, Copy)]
struct Handshake {
    ready: (i32, i32),
    go: (i32, i32),
}

/// Starts `cmd` inside the cgroup open at `cgroup`; returns the child once it has executed
/// the program.
pub fn spawn_in_cgroup(cmd: &Command, cgroup: BorrowedFd<'_>) -> Result<Child, SpawnError> {
    let mut env = cmd.env.clone();
    if let Some(u) = &cmd.user {
        for (k, v) in [("USER", u.name.as_str()), ("LOGNAME", u.name.as_str())] {
            env.retain(|(key, _)| key != k);
            env.push((k.into(), v.into()));
        }
        env.retain(|(key, _)| key != "HOME");
        env.push(("HOME".into(), u.home.clone().into_os_string()));
    }
    let path = cstring(resolve(&cmd.program, &env)?.as_os_str())?;
    let mut argv = vec![cstring(&cmd.program)?];
    for a in &cmd.args {
        argv.push(cstring(a)?);
    }
    let envp: Vec<CString> = env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone().into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).map_err(|e| SpawnError::Nul(OsString::from_vec(e.into_vec())))
        })
        .collect::<Result<_, _>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let confine = cmd.confine.as_ref().map(ChildConfinement::of).transpose()?;
    // A confined command first becomes its mapped uid and gid on the host, with no group but
    // its own (the launcher's supplementary groups, root's among them, would otherwise stay
    // with it), then root of the user namespace it creates as that uid.
    let (groups, ids): (Vec<libc::gid_t>, _) = if let Some(c) = &cmd.confine {
        (vec![c.root_maps_to], Some((c.root_maps_to, c.root_maps_to)))
    } else {
        (
            cmd.user
                .as_ref()
                .map(|u| u.groups.clone())
                .unwrap_or_default(),
            cmd.user.as_ref().map(|u| (u.uid, u.gid)),
        )
    };

    let (rd, wr) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(SpawnError::Pipe)?;
    // A confined child says on `ready` that its user namespace is there, then waits on `go`
    // until the launcher has written the namespace's uid and gid maps.
    let (ready_rd, ready_wr) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(SpawnError::Pipe)?;
    let (go_rd, go_wr) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(SpawnError::Pipe)?;
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP | libc::CLONE_PIDFD as u64,
        pidfd: (&raw mut pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..Default::default()
    };
    let wr_fd = wr.as_raw_fd();
    let handshake = Handshake {
        ready: (ready_rd.as_raw_fd(), ready_wr.as_raw_fd()),
        go: (go_rd.as_raw_fd(), go_wr.as_raw_fd()),
    };
    // SAFETY: clone3 with a valid, fully initialised clone_args of the size passed; without
    // CLONE_VM the child gets a copy of this address space, like fork.
    let mut ret =
        unsafe { libc::syscall(libc::SYS_clone3, &raw const args, size_of::<CloneArgs>()) };
    let mut join = None;
    if ret < 0 && Errno::last() == Errno::ENOSYS {
        join = Some(cgroup.as_raw_fd());
        // SAFETY: clone as fork (no CLONE_VM, no new stack); the kernel writes the pidfd to
        // `pidfd` (x86_64 and aarch64 argument order: flags, stack, parent_tid, child_tid, tls).
        ret = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_PIDFD | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                &raw mut pidfd,
                0usize,
                0usize,
            )
        };
    }
    if ret == 0 {
        // Child. Only raw system calls from here on.
        // SAFETY: every pointer refers to memory prepared above and copied into the child.
        unsafe {
            if let Some(fd) = join {
                join_cgroup(fd, wr_fd);
            }
            child(
                wr_fd,
                handshake,
                cmd.preserve_fds,
                &groups,
                ids,
                confine.as_ref(),
                (path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()),
            )
        }
    }
    if ret < 0 {
        return Err(SpawnError::Clone(Errno::last()));
    }
    let pid = Pid::from_raw(ret as i32);
    if pidfd < 0 {
        // clone's arguments in another order (s390x): no pidfd came back.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(pid, None);
        return Err(SpawnError::Clone(Errno::EINVAL));
    }
    // SAFETY: the clone succeeded, so the kernel wrote a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop(wr);
    drop(ready_wr);
    drop(go_rd);
    if let Some(c) = &cmd.confine {
        // Nothing on `ready` (end of file): the child failed before its user namespace was
        // there, and says why on the other pipe.
        let mut b = [0u8; 1];
        let ready = loop {
            match nix::unistd::read(&ready_rd, &mut b) {
                Err(Errno::EINTR) => {}
                r => break r == Ok(1),
            }
        };
        if ready && let Err(e) = write_maps(pid, c.root_maps_to) {
            // Without the go-ahead the child ends before it runs anything.
            drop(go_wr);
            let _ = waitpid(pid, None);
            return Err(e);
        }
        // Ignored: a child that is gone already reports its failure on the other pipe.
        let _ = nix::unistd::write(&go_wr, &[1]);
    }
    drop(go_wr);
    let mut buf = [0u8; 5];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(&rd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    if got == 0 {
        return Ok(Child { pid, pidfd });
    }
    // The child reported a failure and exits; reap it.
    let _ = waitpid(pid, None);
    let stage = STAGES.get(usize::from(buf[0])).copied().unwrap_or("setup");
    let errno = Errno::from_raw(i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]));
    Err(SpawnError::Child { stage, errno })
}

/// Maps root of the child's user namespace to `host` (uid and gid).
fn write_maps(pid: Pid, host: u32) -> Result<(), SpawnError> {
    let line = format!("0 {host} 1\n");
    for map in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{map}"), &line)
            .map_err(|source| SpawnError::UserMap { map, source })?;
    }
    Ok(())
}

/// The child side: confine and drop privileges if asked, reset signal handling, exec.
///
/// A confined child makes its mount and cgroup namespaces as host root, becomes its mapped
/// uid on the host, and only then creates its user namespace: that uid owns the namespace.
///
/// # Safety
/// Must run in a freshly cloned child; all pointers must be valid NUL-terminated strings and
/// NULL-terminated arrays.
unsafe fn child(
    wr: i32,
    hs: Handshake,
    preserve_fds: u32,
    groups: &[libc::gid_t],
    ids: Option<(u32, u32)>,
    confine: Option<&ChildConfinement>,
    (path, argv, envp): (
        *const libc::c_char,
        *const *const libc::c_char,
        *const *const libc::c_char,
    ),
) -> ! {
    let fail = |stage: u8| die(wr, stage);
    // SAFETY: raw system calls with valid arguments; see the module comment for why not the
    // libc wrappers for the credential changes.
    unsafe {
        // The launcher may ignore SIGINT and SIGQUIT while it waits; ignored signals survive
        // exec, so restore the defaults and an empty mask.
        for sig in [
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGPIPE,
        ] {
            libc::signal(sig, libc::SIG_DFL);
        }
        let empty: libc::sigset_t = std::mem::zeroed();
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &raw const empty,
            std::ptr::null_mut::<libc::sigset_t>(),
            8,
        );
        libc::close(hs.ready.0);
        libc::close(hs.go.1);
        if let Some(c) = confine {
            // A session of its own, without the launcher's controlling terminal: on it the
            // command could push input into the operator's shell (TIOCSTI) or take the
            // foreground and read what is typed next.
            if libc::setsid() < 0 {
                fail(14);
            }
            // Made as host root: the mount namespace belongs to the host's user namespace,
            // so nothing inside can unmount or change what covers the daemon's files.
            confine_mounts(c, wr);
        }
        // Root's capabilities stay permitted across the uid change, so that the namespace
        // below is made with CAP_SYS_ADMIN: hosts that forbid unprivileged users to make user
        // namespaces (Debian's kernel.unprivileged_userns_clone=0, Ubuntu's AppArmor
        // restriction) still let it be made, by the mapped uid.
        if confine.is_some() && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            fail(17);
        }
        if let Some((uid, gid)) = ids {
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                fail(0);
            }
            if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                fail(1);
            }
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                fail(2);
            }
        }
        if confine.is_some() {
            // Created by the mapped uid, which owns it: the kernel charges what it counts per
            // user of a namespace to its owner in the namespace above, here that uid (made
            // by root, the namespace would spend root's inotify instances and the like).
            set_effective(&[CAP_SYS_ADMIN], wr);
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                fail(15);
            }
            // The launcher writes this namespace's maps, then says so.
            let one = 1u8;
            if libc::write(hs.ready.1, (&raw const one).cast(), 1) != 1 {
                fail(16);
            }
            let mut b = 0u8;
            loop {
                let n = libc::read(hs.go.0, (&raw mut b).cast(), 1);
                if n == 1 {
                    break;
                }
                if n < 0 && Errno::last() == Errno::EINTR {
                    continue;
                }
                fail(12);
            }
            // No user namespace below this one: with one, a process without capabilities gets
            // them all again over namespaces of its own.
            let fd = libc::open(
                c"/proc/sys/user/max_user_namespaces".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd < 0 || libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
                fail(13);
            }
            libc::close(fd);
            drop_privileges(wr);
        }
        libc::close(hs.ready.1);
        libc::close(hs.go.0);
        // Everything above 2 and the preserved range closes at exec (marked rather than closed
        // now: the pipe that reports a failure must stay open until then).
        let first = 3u32.saturating_add(preserve_fds);
        if libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
            fail(4);
        }
        for fd in 3..first {
            if libc::fcntl(fd as i32, libc::F_SETFD, 0) != 0 {
                fail(5);
            }
        }
        libc::execve(path, argv, envp);
        fail(3)
    }
}

/// Moves the calling child into the cgroup open at `cgroup` ("0" in `cgroup.procs` names the
/// writer), or ends it.
///
/// # Safety
/// Must run in a freshly cloned child, before anything else.
unsafe fn join_cgroup(cgroup: i32, wr: i32) {
    // SAFETY: raw system calls on a descriptor and static strings.
    unsafe {
        let fd = libc::openat(
            cgroup,
            c"cgroup.procs".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd < 0 || libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
            die(wr, 18);
        }
        libc::close(fd);
    }
}

/// Reports the failed `stage` and the last errno on the pipe `wr`, and ends the child.
fn die(wr: i32, stage: u8) -> ! {
    let e = Errno::last_raw().to_ne_bytes();
    let msg = [stage, e[0], e[1], e[2], e[3]];
    // SAFETY: writing a stack buffer to our pipe, then leaving without running atexit
    // handlers or destructors of the parent's copied state.
    unsafe {
        libc::write(wr, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// The namespaces and mounts of [`Confinement`], in the child as host root.
///
/// # Safety
/// Only in the cloned child: raw system calls on memory prepared before the clone.
unsafe fn confine_mounts(c: &ChildConfinement, wr: i32) {
    let fail = |stage: u8| die(wr, stage);
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: raw system calls with NUL-terminated strings made before the clone.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP) != 0 {
            fail(6);
        }
        // Nothing mounted here reaches the host's namespace.
        if libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            none.cast(),
        ) != 0
        {
            fail(7);
        }
        let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        // A path that is not there (inside a directory covered before it, say) needs nothing.
        let missing = || Errno::last() == Errno::ENOENT;
        for d in &c.hide_dirs {
            let r = libc::mount(
                c"agentwall-hidden".as_ptr(),
                d.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                c"size=4k,nr_inodes=1,mode=0555".as_ptr().cast(),
            );
            if r != 0 && !missing() {
                fail(8);
            }
        }
        for f in &c.hide_files {
            let r = libc::mount(
                c"/dev/null".as_ptr(),
                f.as_ptr(),
                none,
                libc::MS_BIND,
                none.cast(),
            );
            if r != 0 && !missing() {
                fail(8);
            }
        }
        for m in &c.read_only {
            if libc::mount(
                m.as_ptr(),
                m.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REC,
                none.cast(),
            ) != 0
                && !missing()
            {
                fail(9);
            }
            let r = libc::mount(
                none,
                m.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REMOUNT | flags,
                none.cast(),
            );
            if r != 0 && !missing() {
                fail(9);
            }
        }
    }
}

/// The capabilities and `no_new_privs` of [`Confinement`], after the user change.
///
/// # Safety
/// Only in the cloned child.
unsafe fn drop_privileges(wr: i32) {
    let fail = |stage: u8| die(wr, stage);
    // SAFETY: prctl and capget/capset with valid arguments and buffers of the kernel's size.
    unsafe {
        for (cap, _) in DROPPED_CAPS {
            // EINVAL: a capability this kernel does not know, so nobody holds it.
            if libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) != 0
                && Errno::last() != Errno::EINVAL
            {
                fail(10);
            }
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            fail(10);
        }
        // The sets held now lose them too, and nothing is inheritable.
        let mut head = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        if libc::syscall(libc::SYS_capget, &raw mut head, data.as_mut_ptr()) != 0 {
            fail(10);
        }
        for (cap, _) in DROPPED_CAPS {
            let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
            data[word].effective &= !bit;
            data[word].permitted &= !bit;
        }
        for d in &mut data {
            d.inheritable = 0;
        }
        if libc::syscall(libc::SYS_capset, &raw mut head, data.as_ptr()) != 0 {
            fail(10);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(11);
        }
    }
}

/// CAP_SYS_ADMIN of linux/capability.h.
const CAP_SYS_ADMIN: u32 = 21;

/// Makes `caps` (held in the permitted set) the only effective capabilities.
///
/// # Safety
/// Only in the cloned child.
unsafe fn set_effective(caps: &[u32], wr: i32) {
    let mut head = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget and capset with buffers of the kernel's size for version 3.
    unsafe {
        if libc::syscall(libc::SYS_capget, &raw mut head, data.as_mut_ptr()) != 0 {
            die(wr, 17);
        }
        for d in &mut data {
            d.effective = 0;
        }
        for cap in caps {
            data[(cap / 32) as usize].effective |= 1 << (cap % 32);
        }
        if libc::syscall(libc::SYS_capset, &raw mut head, data.as_ptr()) != 0 {
            die(wr, 17);
        }
    }
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The exit code a shell would report for a wait status.
pub fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => 1,
    }
}

/// Waits for `pid` to end, retrying on EINTR and skipping stop/continue reports.
pub fn wait(pid: Pid) -> Result<WaitStatus, Errno> {
    loop {
        match waitpid(pid, None) {
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return Ok(s),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}
