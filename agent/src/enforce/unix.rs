//! Loading and attaching the Unix socket programs (`cgroup/connect_unix`,
//! `cgroup/sendmsg_unix`, Linux >= 6.7), which aya 0.14 cannot: it knows neither attach
//! type, and the kernel fixes a program's attach type when it is loaded.
//!
//! The object is parsed a second time with aya-obj (aya's own parser), its map references
//! are resolved to the maps aya already created (so these programs share every map with the
//! others), and the two programs are loaded with `BPF_PROG_LOAD` and attached to a cgroup
//! with `BPF_LINK_CREATE`, both through the bpf(2) system call. Their links are pinned
//! beside the other programs' links, so detaching a cgroup and replacing an earlier daemon's
//! links work the same for all of them.

use std::{
    collections::HashSet,
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use agentwall_common::maps::programs;
use aya::{Ebpf, maps::Map};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type};

/// Verifier log kept for a refusal.
const LOG_SIZE: usize = 1 << 20;

/// The loaded Unix programs: name, `bpf_attach_type`, program fd.
#[derive(Debug)]
pub(super) struct UnixPrograms {
    progs: Vec<(&'static str, u32, OwnedFd)>,
}

fn map_fd(map: &Map) -> Option<RawFd> {
    let data = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::RingBuf(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

fn bpf_raw(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised `bpf_attr` with the fields of `cmd` set, and every
    // pointer it holds outlives the call; the size passed is its own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A bpf(2) command that returns a new fd.
fn bpf_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<OwnedFd> {
    let r = bpf_raw(cmd, attr)?;
    let fd = RawFd::try_from(r).map_err(|_| std::io::Error::other("bpf(2) returned no fd"))?;
    // SAFETY: a new fd that this process owns (the commands given here return one).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: `bpf_attr` is a C union of integers and arrays; all zeros is its documented
    // initial state.
    unsafe { std::mem::zeroed() }
}

/// Why the Unix socket programs are not in force; said in status.
#[derive(Debug, thiserror::Error)]
pub enum UnixUnavailable {
    #[error(transparent)]
    Layout(#[from] super::layout::LayoutError),
    #[error(
        "struct bpf_sock_addr_kern has {member} at offset {got}, not {want} as this build reads it"
    )]
    Offset {
        member: &'static str,
        got: u32,
        want: usize,
    },
    #[error("parsing: {0}")]
    Parse(String),
    #[error("the object has no program {0}")]
    NoProgram(&'static str),
    #[error("the object has no function for {0}")]
    NoFunction(&'static str),
    #[error("relocating {what}: {message}")]
    Relocate { what: &'static str, message: String },
    #[error("loading {name}: {error}")]
    Load {
        name: &'static str,
        error: LoadError,
    },
}

/// Why the kernel refused one Unix program.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("attach type {0} is not a Unix one")]
    AttachType(u32),
    #[error("{error}; the verifier said: {log}")]
    Refused {
        error: std::io::Error,
        /// The last lines of the verifier's log, joined by ` | `.
        log: String,
    },
}

/// Checks that the kernel's `struct bpf_sock_addr_kern` has `uaddr` and `uaddrlen` where the
/// Unix programs read them (`agentwall_common::unix::kern`).
pub(super) fn check_context(btf: &std::path::Path) -> Result<(), UnixUnavailable> {
    use agentwall_common::unix::kern;
    let members = ["uaddr", "uaddrlen"];
    let got = super::layout::member_offsets(btf, "bpf_sock_addr_kern", members)?;
    for ((member, got), want) in members
        .into_iter()
        .zip(got)
        .zip([kern::UADDR_OFFSET, kern::UADDRLEN_OFFSET])
    {
        if got as usize != want {
            return Err(UnixUnavailable::Offset { member, got, want });
        }
    }
    Ok(())
}

impl UnixPrograms {
    /// Loads both programs from `object`, with the maps of `ebpf` (loaded from the same
    /// object, before any of its maps is taken out). The error says why, for status.
    pub(super) fn load(ebpf: &Ebpf, object: &[u8]) -> Result<Self, UnixUnavailable> {
        let mut obj =
            aya_obj::Object::parse(object).map_err(|e| UnixUnavailable::Parse(e.to_string()))?;
        // As aya does: a relocation into any section holding functions is a call.
        let text_sections: HashSet<usize> =
            obj.functions.keys().map(|(section, _)| *section).collect();
        let mut keep = HashSet::new();
        for (name, _) in programs::UNIX {
            let p = obj
                .programs
                .get(name)
                .ok_or(UnixUnavailable::NoProgram(name))?;
            keep.insert(p.section_index);
        }
        // Only these programs and the shared functions they may call are relocated here.
        let text: HashSet<usize> = obj
            .functions
            .values()
            .filter(|f| f.name.is_empty() || !obj.programs.contains_key(&f.name))
            .map(|f| f.section_index.0)
            .collect();
        obj.functions
            .retain(|(section, _), _| keep.contains(section) || text.contains(section));
        obj.programs
            .retain(|name, _| programs::UNIX.iter().any(|(n, _)| n == name));
        let fds: Vec<(String, RawFd)> = ebpf
            .maps()
            .filter_map(|(name, m)| map_fd(m).map(|fd| (name.to_string(), fd)))
            .collect();
        let maps = fds
            .iter()
            .filter_map(|(name, fd)| obj.maps.get(name).map(|m| (name.as_str(), *fd, m)))
            .collect::<Vec<_>>();
        let mut relocated = obj.clone();
        relocated
            .relocate_maps(maps.into_iter(), &text_sections)
            .map_err(|e| UnixUnavailable::Relocate {
                what: "maps",
                message: e.to_string(),
            })?;
        relocated
            .relocate_calls(&text_sections)
            .map_err(|e| UnixUnavailable::Relocate {
                what: "calls",
                message: e.to_string(),
            })?;
        let mut progs = Vec::new();
        for (name, attach_type) in programs::UNIX {
            let p = &relocated.programs[name];
            let f = relocated
                .functions
                .get(&p.function_key())
                .ok_or(UnixUnavailable::NoFunction(name))?;
            let fd = prog_load(name, attach_type, &f.instructions, &p.license)
                .map_err(|error| UnixUnavailable::Load { name, error })?;
            progs.push((name, attach_type, fd));
        }
        Ok(Self { progs })
    }

    /// Attaches both programs to the cgroup `cgroup_fd`; returns each program's name and
    /// link, for the caller to pin.
    pub(super) fn attach(
        &self,
        cgroup_fd: BorrowedFd<'_>,
    ) -> Result<Vec<(&'static str, OwnedFd)>, (&'static str, std::io::Error)> {
        let mut links = Vec::new();
        for (name, attach_type, prog) in &self.progs {
            let mut attr = zeroed_attr();
            attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
            attr.link_create.__bindgen_anon_2.target_fd = cgroup_fd.as_raw_fd() as u32;
            attr.link_create.attach_type = *attach_type;
            let link = bpf_fd(bpf_cmd::BPF_LINK_CREATE, &mut attr).map_err(|e| (*name, e))?;
            links.push((*name, link));
        }
        Ok(links)
    }
}

/// Pins a link (`BPF_OBJ_PIN`) at `path` on bpffs.
pub(super) fn pin(link: &OwnedFd, path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a NUL in the pin path"))?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    attr.__bindgen_anon_4.bpf_fd = link.as_raw_fd() as u32;
    bpf_raw(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(drop)
}

fn prog_load(
    name: &str,
    attach_type: u32,
    insns: &[aya_obj::generated::bpf_insn],
    license: &CString,
) -> Result<OwnedFd, LoadError> {
    let expected = match attach_type {
        49 => bpf_attach_type::BPF_CGROUP_UNIX_CONNECT,
        50 => bpf_attach_type::BPF_CGROUP_UNIX_SENDMSG,
        other => return Err(LoadError::AttachType(other)),
    };
    let mut prog_name = [0 as libc::c_char; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    // Without a log first; on a refusal, again with one, for the message.
    let attempt = |log: Option<&mut [u8]>| {
        let mut attr = zeroed_attr();
        // SAFETY: writing integers and pointers to `insns`, `license` and `log`, which
        // outlive the call, into the union's prog_load member.
        unsafe {
            let a = &mut attr.__bindgen_anon_3;
            a.prog_type = bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR as u32;
            a.expected_attach_type = expected as u32;
            a.insn_cnt = insns.len() as u32;
            a.insns = insns.as_ptr() as u64;
            a.license = license.as_ptr() as u64;
            a.prog_name = prog_name;
            if let Some(log) = log {
                a.log_level = 1;
                a.log_size = log.len() as u32;
                a.log_buf = log.as_mut_ptr() as u64;
            }
        }
        bpf_fd(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    let first = match attempt(None) {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    let mut log = vec![0u8; LOG_SIZE];
    let _ = attempt(Some(&mut log));
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    let mut tail: Vec<&str> = text.lines().rev().take(6).collect();
    tail.reverse();
    Err(LoadError::Refused {
        error: first,
        log: tail.join(" | "),
    })
}
