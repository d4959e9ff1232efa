//! Runs a command under the sandbox of a systemd unit's `[Service]` section, applied by hand:
//! systemd is not PID 1 on the test machines, so `systemd-run` cannot start the daemon.
//!
//! `aw-unit-sandbox --unit FILE --cgroup DIR --pins DIR --rw DIR [--ro DIR]... -- CMD ARGS...`
//!
//! Every key of the section is either applied here or named as one that does not confine
//! (how the service starts, stops and is supervised); any other key fails the run, so that a
//! setting added to the unit is never silently left out of the tests. The unit's own
//! directories (state, runtime, configuration), the agents' cgroup and the pin directory are
//! the test's: `--rw`, `--cgroup` and `--pins` name them, and they are the only places where
//! the command may write. The one ExecStartPre the unit may have, making the pin directory,
//! is run as systemd would, before the sandbox. `--ro` keeps a further directory of the test's visible (files that
//! a real installation would keep under /etc).
//!
//! What is applied, in order: a mount namespace of its own (ProtectSystem=strict,
//! ReadWritePaths, ProtectHome, PrivateTmp, PrivateDevices, ProtectKernelTunables,
//! ProtectProc, ProcSubset), the resource limits and umask, the capability bounding set and
//! no_new_privs, and a seccomp filter built from systemd's own system-call groups
//! (`systemd-analyze syscall-filter`) with the argument checks of RestrictAddressFamilies,
//! RestrictNamespaces, MemoryDenyWriteExecute, LockPersonality, RestrictRealtime and
//! RestrictSUIDSGID. DevicePolicy= is met by the private /dev holding only the basic nodes.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs,
    os::{fd::AsRawFd as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

mod filter;
mod mounts;

use seccompiler::{SeccompAction, SeccompFilter, TargetArch};

type Result<T> = std::result::Result<T, String>;

/// Keys that say how the service is started, stopped, supervised and given its directories.
const NOT_CONFINING: &[&str] = &[
    "Type",
    "NotifyAccess",
    "ExecStart",
    "ExecReload",
    "Restart",
    "RestartSec",
    "KillMode",
    "Delegate",
    "RuntimeDirectory",
    "RuntimeDirectoryMode",
    "RuntimeDirectoryPreserve",
    "StateDirectory",
    "StateDirectoryMode",
    "ConfigurationDirectory",
    "ConfigurationDirectoryMode",
    // Loosens: no task limit on the unit (the sandbox sets none).
    "TasksMax",
    // Met by the private /dev (PrivateDevices=yes), which holds only the basic nodes.
    "DevicePolicy",
];

#[expect(clippy::print_stderr, reason = "a command-line tool")]
fn main() -> ExitCode {
    match run() {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("aw-unit-sandbox: {e}");
            ExitCode::from(125)
        }
    }
}

enum Never {}

struct Args {
    unit: PathBuf,
    cgroup: PathBuf,
    pins: PathBuf,
    rw: Vec<PathBuf>,
    ro: Vec<PathBuf>,
    cmd: Vec<String>,
}

fn args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut unit, mut cgroup, mut pins, mut rw, mut ro) =
        (None, None, None, Vec::new(), Vec::new());
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--unit" => unit = Some(PathBuf::from(value()?)),
            "--cgroup" => cgroup = Some(PathBuf::from(value()?)),
            "--pins" => pins = Some(PathBuf::from(value()?)),
            "--rw" => rw.push(PathBuf::from(value()?)),
            "--ro" => ro.push(PathBuf::from(value()?)),
            "--" => break,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let cmd: Vec<String> = it.collect();
    if cmd.is_empty() {
        return Err("no command after --".into());
    }
    Ok(Args {
        unit: unit.ok_or("--unit is required")?,
        cgroup: cgroup.ok_or("--cgroup is required")?,
        pins: pins.ok_or("--pins is required")?,
        rw,
        ro,
        cmd,
    })
}

/// The `[Service]` section: each key with its values in order (a key may repeat).
fn service_section(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut in_service = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.trim().to_string())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    out
}

fn run() -> Result<Never> {
    let a = args()?;
    let text = fs::read_to_string(&a.unit).map_err(|e| format!("{}: {e}", a.unit.display()))?;
    let unit = service_section(&text);
    let mut applied = BTreeSet::new();
    let mut get = |k: &str| -> Vec<String> {
        applied.insert(k.to_string());
        unit.get(k).cloned().unwrap_or_default()
    };
    let yes = |v: Vec<String>| v.last().is_some_and(|v| v == "yes" || v == "true");

    // The binary is opened before the mounts hide its directory (a fresh clone in /tmp).
    let exe = mounts::open_path(Path::new(&a.cmd[0]), libc::O_PATH | libc::O_CLOEXEC)?;

    // Mounts.
    let strict = get("ProtectSystem").last().map(String::as_str) == Some("strict");
    let rw_paths = get("ReadWritePaths");
    let protect_home = get("ProtectHome").last().cloned();
    let private_tmp = yes(get("PrivateTmp"));
    let private_devices = yes(get("PrivateDevices"));
    let tunables = yes(get("ProtectKernelTunables"));
    let protect_proc = get("ProtectProc").last().cloned();
    let proc_subset = get("ProcSubset").last().cloned();
    for k in ["PrivateMounts", "ProtectControlGroups"] {
        get(k);
    }
    if !strict || !tunables {
        return Err(
            "this harness knows ProtectSystem=strict with ProtectKernelTunables=yes".into(),
        );
    }
    // ExecStartPre: only the pin directory's making, run outside the sandbox as `+` says.
    for pre in get("ExecStartPre") {
        let words: Vec<&str> = pre.split_whitespace().collect();
        match words.as_slice() {
            ["+/usr/bin/mkdir", "-p", "-m", "0700", dir] if dir.starts_with("/sys/fs/bpf/") => {
                // `mkdir -p -m`: the mode is that of a directory it makes; one already there
                // is left as it is.
                if !a.pins.exists() {
                    fs::create_dir_all(&a.pins)
                        .map_err(|e| format!("{}: {e}", a.pins.display()))?;
                    fs::set_permissions(&a.pins, fs::Permissions::from_mode(0o700))
                        .map_err(|e| format!("{}: {e}", a.pins.display()))?;
                }
            }
            _ => return Err(format!("ExecStartPre={pre}: not known to this harness")),
        }
    }
    // ReadWritePaths of the unit: its pin directory and the agents' cgroup are the test's.
    let mut writable: Vec<PathBuf> = Vec::new();
    for p in rw_paths.iter().flat_map(|l| l.split_whitespace()) {
        let p = p.trim_start_matches('-');
        if p.starts_with("/sys/fs/cgroup/") {
            if !writable.contains(&a.cgroup) {
                writable.push(a.cgroup.clone());
            }
        } else if p == "/sys/fs/bpf" {
            // systemd keeps the stricter of two entries for one path: ProtectKernelTunables'
            // read-only /sys/fs/bpf wins, and the daemon could pin nothing.
            return Err(
                "ReadWritePaths=/sys/fs/bpf is dropped by systemd under ProtectKernelTunables \
                 (the read-only entry for the same path wins): name a directory below it"
                    .into(),
            );
        } else if p.starts_with("/sys/fs/bpf/") {
            writable.push(a.pins.clone());
        } else {
            return Err(format!(
                "ReadWritePaths={p}: no stand-in for it in the tests"
            ));
        }
    }
    writable.extend(a.rw.iter().cloned());
    // systemd makes the unit's cgroup before it starts the service; so does this.
    fs::create_dir_all(&a.cgroup).map_err(|e| format!("{}: {e}", a.cgroup.display()))?;
    mounts::mount_namespace(
        &writable,
        &a.ro,
        protect_home.as_deref(),
        private_tmp,
        private_devices,
        protect_proc.as_deref(),
        proc_subset.as_deref(),
    )?;

    // Limits and umask.
    for (key, res) in [
        ("LimitMEMLOCK", libc::RLIMIT_MEMLOCK),
        ("LimitNOFILE", libc::RLIMIT_NOFILE),
    ] {
        if let Some(v) = get(key).last() {
            let n = if v == "infinity" {
                libc::RLIM_INFINITY
            } else {
                v.parse().map_err(|_| format!("{key}={v}"))?
            };
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: a valid rlimit for a valid resource.
            if unsafe { libc::setrlimit(res, &lim) } != 0 {
                let e = std::io::Error::last_os_error();
                // A runner without CAP_SYS_RESOURCE in its own bounding set (these test
                // machines) cannot raise a hard limit; systemd, as PID 1, can. The daemon then
                // runs with the runner's limit, which is stricter.
                if e.raw_os_error() != Some(libc::EPERM) {
                    return Err(format!("{key}: {e}"));
                }
            }
        }
    }
    if let Some(m) = get("UMask").last() {
        let m = u32::from_str_radix(m, 8).map_err(|_| format!("UMask={m}"))?;
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(m) };
    }

    // Capabilities.
    let keep: BTreeSet<String> = get("CapabilityBoundingSet")
        .iter()
        .flat_map(|l| l.split_whitespace().map(str::to_string))
        .collect();
    if get("AmbientCapabilities").iter().any(|v| !v.is_empty()) {
        return Err("AmbientCapabilities with values: not known to this harness".into());
    }
    if !get("SecureBits").is_empty() {
        return Err("SecureBits: not known to this harness".into());
    }
    let last_cap = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    for cap in 0..=last_cap {
        let name = filter::CAP_NAMES.get(cap as usize).copied().unwrap_or("");
        if !keep.contains(name) {
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                return Err(format!(
                    "dropping {name}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if yes(get("NoNewPrivileges")) {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
        }
    }

    // System calls.
    let filter = filter::Filter {
        allow: get("SystemCallFilter"),
        families: get("RestrictAddressFamilies"),
        namespaces: get("RestrictNamespaces"),
        mdwe: yes(get("MemoryDenyWriteExecute")),
        personality: yes(get("LockPersonality")),
        realtime: yes(get("RestrictRealtime")),
        suid: yes(get("RestrictSUIDSGID")),
        native: get("SystemCallArchitectures").last().map(String::as_str) == Some("native"),
        errno: get("SystemCallErrorNumber").last().cloned(),
    };
    // Applied by the filter's absence of their system calls (@clock, @module, syslog,
    // sethostname are outside @system-service) and by the mounts above.
    for k in [
        "ProtectClock",
        "ProtectHostname",
        "ProtectKernelLogs",
        "ProtectKernelModules",
    ] {
        if !yes(get(k)) {
            return Err(format!("{k} is not yes: not known to this harness"));
        }
    }
    let unknown: Vec<&String> = unit
        .keys()
        .filter(|k| !applied.contains(*k) && !NOT_CONFINING.contains(&k.as_str()))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "the unit sets {unknown:?}, which this harness does not apply: teach it"
        ));
    }
    let program = filter.compile()?;
    seccompiler::apply_filter(&program).map_err(|e| format!("seccomp: {e}"))?;
    if !filter.namespaces.is_empty() {
        // Installed last, so that its answer for clone3 (ENOSYS, as systemd gives) is the one
        // the kernel returns; through prctl, which the first filter allows.
        let clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            TargetArch::x86_64,
        )
        .map_err(|e| e.to_string())?;
        let prog: seccompiler::BpfProgram = clone3
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())?;
        let fprog = libc::sock_fprog {
            len: u16::try_from(prog.len()).map_err(|_| "filter too long")?,
            filter: prog.as_ptr().cast_mut().cast(),
        };
        // SAFETY: a valid program (seccompiler's sock_filter is the kernel's layout) that
        // outlives the call; the kernel copies it.
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog,
                0,
                0,
            )
        };
        mounts::check(r.into(), "the clone3 filter")?;
    }

    let argv: Vec<CString> = a
        .cmd
        .iter()
        .map(|s| CString::new(s.as_str()).map_err(|_| "NUL in an argument".to_string()))
        .collect::<Result<_>>()?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut s = k.into_encoded_bytes();
            s.push(b'=');
            s.extend(v.into_encoded_bytes());
            CString::new(s).ok()
        })
        .collect();
    let mut env_p: Vec<*const libc::c_char> = env.iter().map(|c| c.as_ptr()).collect();
    env_p.push(std::ptr::null());
    // SAFETY: NUL-terminated arrays of valid C strings that outlive the call.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            exe.as_raw_fd(),
            c"".as_ptr(),
            argv_p.as_ptr(),
            env_p.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    Err(format!(
        "exec {}: {}",
        a.cmd[0],
        std::io::Error::last_os_error()
    ))
}
