//! The seccomp filter of the sandbox, from systemd's own system-call groups.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    process::Command,
};

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use crate::Result;

pub(crate) struct Filter {
    pub(crate) allow: Vec<String>,
    pub(crate) families: Vec<String>,
    pub(crate) namespaces: Vec<String>,
    pub(crate) mdwe: bool,
    pub(crate) personality: bool,
    pub(crate) realtime: bool,
    pub(crate) suid: bool,
    pub(crate) native: bool,
    /// SystemCallErrorNumber= (its last value), or none: the process is killed, as systemd
    /// does without one.
    pub(crate) errno: Option<String>,
}

/// System-call numbers of this machine, from the kernel's own header.
fn syscall_numbers() -> Result<HashMap<String, i64>> {
    let header = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";
    let text = fs::read_to_string(header).map_err(|e| format!("{header}: {e}"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("#define __NR_")?;
            let (name, nr) = rest.split_once(' ')?;
            Some((name.to_string(), nr.trim().parse().ok()?))
        })
        .collect())
}

/// The system calls of a systemd group (`@name`), its nested groups expanded.
fn group(name: &str, seen: &mut BTreeSet<String>) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    if !seen.insert(name.to_string()) {
        return Ok(out);
    }
    let o = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", name])
        .output()
        .map_err(|e| format!("systemd-analyze: {e}"))?;
    if !o.status.success() {
        return Err(format!("systemd-analyze syscall-filter {name} failed"));
    }
    for line in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
        let w = line.trim();
        if w.is_empty() || w.starts_with('#') {
            continue;
        }
        if w.starts_with('@') {
            out.extend(group(w, seen)?);
        } else {
            out.insert(w.to_string());
        }
    }
    Ok(out)
}

fn names(item: &str, seen: &mut BTreeSet<String>) -> Result<BTreeSet<String>> {
    if item.starts_with('@') {
        group(item, seen)
    } else {
        Ok(BTreeSet::from([item.to_string()]))
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| e.to_string())
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule> {
    SeccompRule::new(conds).map_err(|e| e.to_string())
}

impl Filter {
    /// The allow list systemd would build: its first line allows, `~` lines remove, later
    /// lines add again; @default is always allowed.
    fn allowed(&self) -> Result<BTreeSet<String>> {
        let mut set = group("@default", &mut BTreeSet::new())?;
        for (i, line) in self.allow.iter().enumerate() {
            let (deny, items) = match line.strip_prefix('~') {
                Some(rest) => (true, rest),
                None => (false, line.as_str()),
            };
            if i == 0 && deny {
                return Err("a deny-list SystemCallFilter: not known to this harness".into());
            }
            for item in items.split_whitespace() {
                let n = names(item, &mut BTreeSet::new())?;
                if deny {
                    set.retain(|s| !n.contains(s));
                } else {
                    set.extend(n);
                }
            }
        }
        Ok(set)
    }

    pub(crate) fn compile(&self) -> Result<seccompiler::BpfProgram> {
        if !self.native {
            return Err("SystemCallArchitectures is not native: not known to this harness".into());
        }
        if self.allow.is_empty() {
            return Err("no SystemCallFilter: not known to this harness".into());
        }
        let numbers = syscall_numbers()?;
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for name in self.allowed()? {
            if let Some(nr) = numbers.get(&name) {
                rules.insert(*nr, Vec::new());
            }
        }
        let nr = |n: &str| -> Result<i64> {
            numbers
                .get(n)
                .copied()
                .ok_or(format!("no system call {n} here"))
        };
        // Only where the allow list lets the call through at all.
        let mut narrow = |name: &str, alternatives: Vec<SeccompRule>| -> Result<()> {
            let n = nr(name)?;
            if let Some(r) = rules.get_mut(&n) {
                if alternatives.is_empty() {
                    rules.remove(&n);
                } else if r.is_empty() {
                    *r = alternatives;
                } else {
                    return Err(format!("{name} narrowed twice: not known to this harness"));
                }
            }
            Ok(())
        };
        if let Some(line) = self.families.last() {
            let mut alts = Vec::new();
            for fam in line.split_whitespace() {
                let v = match fam {
                    "AF_UNIX" => libc::AF_UNIX,
                    "AF_INET" => libc::AF_INET,
                    "AF_INET6" => libc::AF_INET6,
                    "AF_NETLINK" => libc::AF_NETLINK,
                    "AF_PACKET" => libc::AF_PACKET,
                    other => return Err(format!("RestrictAddressFamilies {other}: teach me")),
                };
                alts.push(rule(vec![cond(0, SeccompCmpOp::Eq, v as u64)?])?);
            }
            narrow("socket", alts)?;
        }
        if let Some(line) = self.namespaces.last() {
            let Some(denied) = line.strip_prefix('~') else {
                return Err("RestrictNamespaces without ~: not known to this harness".into());
            };
            let mut mask = 0u64;
            for ns in denied.split_whitespace() {
                mask |= match ns {
                    "user" => libc::CLONE_NEWUSER,
                    "pid" => libc::CLONE_NEWPID,
                    "ipc" => libc::CLONE_NEWIPC,
                    "uts" => libc::CLONE_NEWUTS,
                    "cgroup" => libc::CLONE_NEWCGROUP,
                    "mnt" => libc::CLONE_NEWNS,
                    "net" => libc::CLONE_NEWNET,
                    other => return Err(format!("RestrictNamespaces {other}: teach me")),
                } as u64;
            }
            let none_of = |arg| -> Result<Vec<SeccompRule>> {
                Ok(vec![rule(vec![cond(
                    arg,
                    SeccompCmpOp::MaskedEq(mask),
                    0,
                )?])?])
            };
            narrow("unshare", none_of(0)?)?;
            narrow("clone", none_of(0)?)?;
            // setns with 0 joins whatever the descriptor is: refused, as systemd does.
            narrow(
                "setns",
                vec![rule(vec![
                    cond(1, SeccompCmpOp::MaskedEq(mask), 0)?,
                    cond(1, SeccompCmpOp::Ne, 0)?,
                ])?],
            )?;
            // Its flags are in memory the filter cannot read: refused, and ENOSYS (the
            // second filter) sends libc to clone.
            narrow("clone3", Vec::new())?;
        }
        if self.mdwe {
            let wx = (libc::PROT_WRITE | libc::PROT_EXEC) as u64;
            narrow(
                "mmap",
                vec![
                    rule(vec![cond(2, SeccompCmpOp::MaskedEq(wx), 0)?])?,
                    rule(vec![cond(
                        2,
                        SeccompCmpOp::MaskedEq(wx),
                        libc::PROT_WRITE as u64,
                    )?])?,
                    rule(vec![cond(
                        2,
                        SeccompCmpOp::MaskedEq(wx),
                        libc::PROT_EXEC as u64,
                    )?])?,
                ],
            )?;
            let no_exec = |arg| -> Result<Vec<SeccompRule>> {
                Ok(vec![rule(vec![cond(
                    arg,
                    SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
                    0,
                )?])?])
            };
            narrow("mprotect", no_exec(2)?)?;
            narrow("pkey_mprotect", no_exec(2)?)?;
            narrow(
                "shmat",
                vec![rule(vec![cond(
                    2,
                    SeccompCmpOp::MaskedEq(libc::SHM_EXEC as u64),
                    0,
                )?])?],
            )?;
        }
        if self.personality {
            narrow(
                "personality",
                vec![
                    rule(vec![cond(0, SeccompCmpOp::Eq, 0)?])?,
                    rule(vec![cond(0, SeccompCmpOp::Eq, 0xffff_ffff)?])?,
                ],
            )?;
        }
        if self.realtime {
            let mut alts = Vec::new();
            for p in [libc::SCHED_OTHER, libc::SCHED_BATCH, libc::SCHED_IDLE] {
                alts.push(rule(vec![cond(1, SeccompCmpOp::Eq, p as u64)?])?);
            }
            narrow("sched_setscheduler", alts)?;
        }
        if self.suid {
            let s = u64::from(libc::S_ISUID | libc::S_ISGID);
            let plain = |arg| cond(arg, SeccompCmpOp::MaskedEq(s), 0);
            let no_create = |arg| cond(arg, SeccompCmpOp::MaskedEq(libc::O_CREAT as u64), 0);
            narrow("chmod", vec![rule(vec![plain(1)?])?])?;
            narrow("fchmod", vec![rule(vec![plain(1)?])?])?;
            narrow("fchmodat", vec![rule(vec![plain(2)?])?])?;
            narrow("creat", vec![rule(vec![plain(1)?])?])?;
            narrow(
                "open",
                vec![rule(vec![no_create(1)?])?, rule(vec![plain(2)?])?],
            )?;
            narrow(
                "openat",
                vec![rule(vec![no_create(2)?])?, rule(vec![plain(3)?])?],
            )?;
        }
        let filter = SeccompFilter::new(
            rules,
            match self.errno.as_deref() {
                None => SeccompAction::KillProcess,
                Some("EPERM") => SeccompAction::Errno(libc::EPERM as u32),
                Some("EACCES") => SeccompAction::Errno(libc::EACCES as u32),
                Some("ENOSYS") => SeccompAction::Errno(libc::ENOSYS as u32),
                Some(other) => {
                    return Err(format!("SystemCallErrorNumber={other}: teach me"));
                }
            },
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(|e| e.to_string())?;
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())
    }
}

/// Capability names by number (linux/capability.h).
pub(crate) const CAP_NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];
