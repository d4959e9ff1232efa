//! The mount namespace of the sandbox.

use std::{
    ffi::CString,
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use crate::Result;

pub(crate) fn open_path(p: &Path, flags: i32) -> Result<OwnedFd> {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| "NUL in a path")?;
    // SAFETY: a valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(format!(
            "{}: {}",
            p.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a descriptor just opened and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| "NUL in a path".to_string())
}

pub(crate) fn check(r: libc::c_long, what: &str) -> Result<()> {
    if r < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// A detached copy of the mount tree at `p` (writable as the original is).
fn clone_tree(p: &Path) -> Result<OwnedFd> {
    let c = cstr(p)?;
    // SAFETY: a valid C string; the result is a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    check(fd, &format!("open_tree {}", p.display()))?;
    // SAFETY: a descriptor just made and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn attach(tree: &OwnedFd, at: &Path) -> Result<()> {
    let c = cstr(at)?;
    // SAFETY: a valid descriptor and C strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    check(r, &format!("move_mount to {}", at.display()))
}

fn set_rdonly(at: &Path, tree: Option<&OwnedFd>, recursive: bool) -> Result<()> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let c = cstr(at)?;
    let (dirfd, path, mut flags) = match tree {
        Some(t) => (
            t.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
        ),
        None => (libc::AT_FDCWD, c.as_ptr(), 0),
    };
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: a valid attribute struct and C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path,
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(r, &format!("read-only {}", at.display()))
}

fn mount(src: &str, at: &Path, fstype: &str, flags: libc::c_ulong, data: &str) -> Result<()> {
    let (s, t, f, d) = (
        CString::new(src).map_err(|e| e.to_string())?,
        cstr(at)?,
        CString::new(fstype).map_err(|e| e.to_string())?,
        CString::new(data).map_err(|e| e.to_string())?,
    );
    // SAFETY: valid C strings.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    check(r.into(), &format!("mount {fstype} on {}", at.display()))
}

pub(crate) fn mount_namespace(
    writable: &[PathBuf],
    readable: &[PathBuf],
    protect_home: Option<&str>,
    private_tmp: bool,
    private_devices: bool,
    protect_proc: Option<&str>,
    proc_subset: Option<&str>,
) -> Result<()> {
    // systemd mounts the bpffs at boot, in the host's namespace; the daemon outside a
    // sandbox would. Pins made in a namespace of its own would be seen by no one else.
    let bpf = Path::new("/sys/fs/bpf");
    if nix::sys::statfs::statfs(bpf).map(|s| s.filesystem_type())
        != Ok(nix::sys::statfs::BPF_FS_MAGIC)
    {
        // As the daemon mounts it (mode 1777). systemd's boot mount is 0700, which only hides
        // more from agents; the tests' expectations are those of the daemon's own mount.
        mount("bpf", bpf, "bpf", 0, "")?;
    }
    // So does it securityfs, where the daemon looks for the BPF LSM.
    let sec = Path::new("/sys/kernel/security");
    if fs::read_dir(sec)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
    {
        let _ = mount("securityfs", sec, "securityfs", 0, "");
    }
    // SAFETY: unshare with a flag.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    check(r.into(), "unshare(CLONE_NEWNS)")?;
    mount(
        "none",
        Path::new("/"),
        "",
        libc::MS_REC | libc::MS_PRIVATE,
        "",
    )?;
    // Copies taken before anything is hidden or made read-only.
    let rw: Vec<(PathBuf, OwnedFd)> = writable
        .iter()
        .map(|p| clone_tree(p).map(|t| (p.clone(), t)))
        .collect::<Result<_>>()?;
    let ro: Vec<(PathBuf, OwnedFd)> = readable
        .iter()
        .map(|p| clone_tree(p).map(|t| (p.clone(), t)))
        .collect::<Result<_>>()?;
    // ProtectSystem=strict and ProtectKernelTunables=yes: everything read-only, /sys too.
    set_rdonly(Path::new("/"), None, true)?;
    match protect_home {
        Some("yes") => {
            for d in ["/home", "/root", "/run/user"] {
                if Path::new(d).is_dir() {
                    mount("tmpfs", Path::new(d), "tmpfs", libc::MS_RDONLY, "mode=000")?;
                }
            }
        }
        None | Some("no") => {}
        Some(other) => return Err(format!("ProtectHome={other}: not known to this harness")),
    }
    if private_tmp {
        for d in ["/tmp", "/var/tmp"] {
            mount(
                "tmpfs",
                Path::new(d),
                "tmpfs",
                libc::MS_NOSUID | libc::MS_NODEV,
                "mode=1777",
            )?;
        }
    }
    if private_devices {
        let dev = Path::new("/dev");
        mount(
            "tmpfs",
            dev,
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "mode=755",
        )?;
        for (name, major, minor) in [
            ("null", 1, 3),
            ("zero", 1, 5),
            ("full", 1, 7),
            ("random", 1, 8),
            ("urandom", 1, 9),
            ("tty", 5, 0),
        ] {
            let c = cstr(&dev.join(name))?;
            // SAFETY: a valid C string.
            let r = unsafe {
                libc::mknod(
                    c.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(major, minor),
                )
            };
            check(r.into(), &format!("mknod /dev/{name}"))?;
            // SAFETY: as above.
            unsafe { libc::chmod(c.as_ptr(), 0o666) };
        }
        for d in ["pts", "shm", "mqueue"] {
            fs::create_dir(dev.join(d)).map_err(|e| format!("/dev/{d}: {e}"))?;
        }
        mount(
            "tmpfs",
            &dev.join("shm"),
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        )?;
        for (link, to) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            std::os::unix::fs::symlink(to, dev.join(link)).map_err(|e| e.to_string())?;
        }
        set_rdonly(dev, None, false)?;
    }
    let mut proc_opts = Vec::new();
    match protect_proc {
        None | Some("default") => {}
        Some(v @ ("invisible" | "noaccess" | "ptraceable")) => {
            proc_opts.push(format!("hidepid={v}"))
        }
        Some(other) => return Err(format!("ProtectProc={other}: not known to this harness")),
    }
    match proc_subset {
        None | Some("all") => {}
        Some("pid") => proc_opts.push("subset=pid".into()),
        Some(other) => return Err(format!("ProcSubset={other}: not known to this harness")),
    }
    mount(
        "proc",
        Path::new("/proc"),
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        &proc_opts.join(","),
    )?;
    for (p, tree) in &ro {
        fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
        set_rdonly(p, Some(tree), true)?;
        attach(tree, p)?;
    }
    for (p, tree) in &rw {
        // The mount point exists (a directory made in a private /tmp, or the original).
        let _ = fs::create_dir_all(p);
        attach(tree, p)?;
    }
    Ok(())
}
