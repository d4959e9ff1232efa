//! Where the task-scoped programs find what they read in kernel structures: member offsets
//! looked up in the running kernel's BTF (`/sys/kernel/btf/vmlinux`), so that one build
//! reads the right bytes on every kernel. The programs get them as a read-only global.

use std::path::Path;

use agentwall_common::lsm::KernelLayout;
use btf_rs::{Btf, Type};

/// The kernel's own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading the kernel's BTF at {path}: {message}")]
    Btf { path: String, message: String },
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(&'static str),
    #[error("the kernel's BTF has no member {member} in struct {ty}")]
    NoMember {
        ty: &'static str,
        member: &'static str,
    },
    #[error("struct {ty} member {member} is a bit field or not byte aligned")]
    Unaligned {
        ty: &'static str,
        member: &'static str,
    },
    #[error("offset {offset} of {ty}.{member} does not fit")]
    TooFar {
        ty: &'static str,
        member: &'static str,
        offset: u64,
    },
}

/// Reads the layout from the kernel's BTF.
pub fn from_kernel() -> Result<KernelLayout, LayoutError> {
    from_file(Path::new(VMLINUX_BTF))
}

pub fn from_file(path: &Path) -> Result<KernelLayout, LayoutError> {
    let btf = Btf::from_file(path).map_err(|e| LayoutError::Btf {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let r = Resolver { btf: &btf };
    let sock_common = r.offset("sock", &["__sk_common"])?;
    let common = |member| -> Result<u32, LayoutError> {
        Ok(sock_common + r.offset("sock_common", &[member])?)
    };
    Ok(KernelLayout {
        socket_sk: r.offset("socket", &["sk"])?,
        socket_file: r.offset("socket", &["file"])?,
        socket_type: r.offset("socket", &["type"])?,
        sock_protocol: r.offset("sock", &["sk_protocol"])?,
        sock_family: common("skc_family")?,
        sock_daddr: common("skc_daddr")?,
        sock_dport: common("skc_dport")?,
        sock_v6_daddr: common("skc_v6_daddr")?,
        sock_cgroup: r.offset("sock", &["sk_cgrp_data", "cgroup"])?,
        cgroup_kn: r.offset("cgroup", &["kn"])?,
        kernfs_id: r.offset("kernfs_node", &["id"])?,
        msghdr_name: r.offset("msghdr", &["msg_name"])?,
        valid: 1,
        _pad: 0,
    })
}

/// Byte offsets of `members` of struct `ty` in the kernel's BTF at `path`.
pub fn member_offsets<const N: usize>(
    path: &Path,
    ty: &'static str,
    members: [&'static str; N],
) -> Result<[u32; N], LayoutError> {
    let btf = Btf::from_file(path).map_err(|e| LayoutError::Btf {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let r = Resolver { btf: &btf };
    let mut out = [0; N];
    for (o, m) in out.iter_mut().zip(members) {
        *o = r.offset(ty, &[m])?;
    }
    Ok(out)
}

struct Resolver<'a> {
    btf: &'a Btf,
}

impl Resolver<'_> {
    /// Byte offset of the member path `path` (each step a member of the previous one's
    /// struct) in struct `ty`, looking through anonymous structs and unions on the way.
    fn offset(&self, ty: &'static str, path: &[&'static str]) -> Result<u32, LayoutError> {
        let mut current = self
            .btf
            .resolve_types_by_name(ty)
            .ok()
            .and_then(|types| {
                types.into_iter().find(|t| {
                    matches!(t, Type::Struct(s) if !s.members.is_empty())
                        || matches!(t, Type::Union(_))
                })
            })
            .ok_or(LayoutError::NoStruct(ty))?;
        let mut bits: u64 = 0;
        for member in path {
            let (off, next) = self
                .find(&current, member)
                .ok_or(LayoutError::NoMember { ty, member })?;
            bits += off;
            current = next;
        }
        let member = path.last().copied().unwrap_or_default();
        if !bits.is_multiple_of(8) {
            return Err(LayoutError::Unaligned { ty, member });
        }
        u32::try_from(bits / 8).map_err(|_| LayoutError::TooFar {
            ty,
            member,
            offset: bits / 8,
        })
    }

    /// Bit offset and type of member `name` of the struct or union `t`, searching anonymous
    /// members depth first.
    fn find(&self, t: &Type, name: &str) -> Option<(u64, Type)> {
        let s = match t {
            Type::Struct(s) | Type::Union(s) => s,
            _ => return None,
        };
        for m in &s.members {
            if m.bitfield_size().is_some_and(|b| b != 0) {
                // Bit fields are never what the programs read; skip them.
                if self.btf.resolve_name(m).ok().as_deref() == Some(name) {
                    return None;
                }
                continue;
            }
            let ty = self.strip(self.btf.resolve_chained_type(m).ok()?);
            let member_name = self.btf.resolve_name(m).unwrap_or_default();
            if member_name == name {
                return Some((u64::from(m.bit_offset()), ty));
            }
            if member_name.is_empty()
                && let Some((off, found)) = self.find(&ty, name)
            {
                return Some((u64::from(m.bit_offset()) + off, found));
            }
        }
        None
    }

    /// The type behind typedefs and qualifiers.
    fn strip(&self, mut t: Type) -> Type {
        for _ in 0..16 {
            match &t {
                Type::Typedef(_)
                | Type::Volatile(_)
                | Type::Const(_)
                | Type::Restrict(_)
                | Type::TypeTag(_) => match t.as_btf_type().and_then(|b| {
                    b.get_type_id()
                        .and_then(|id| self.btf.resolve_type_by_id(id).ok())
                }) {
                    Some(next) => t = next,
                    None => return t,
                },
                _ => return t,
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of the machine the tests run on: every member found, each where the
    /// kernel's headers put it on x86-64 (stable across the kernels of the last years; a
    /// difference here names the member to check).
    #[test]
    fn the_running_kernel_has_every_member() {
        if !Path::new(VMLINUX_BTF).exists() {
            return;
        }
        let l = from_kernel().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.valid, 1);
        assert_eq!(l.socket_type, 4, "socket.type follows the 4-byte state");
        assert_eq!(l.socket_sk, 24);
        assert_eq!(l.socket_file, 16);
        assert_eq!(l.sock_daddr, 0, "skc_daddr opens sock_common");
        assert_eq!(l.sock_dport, 12);
        assert_eq!(l.sock_family, 16);
        assert_eq!(l.sock_v6_daddr, 56);
        assert_eq!(l.msghdr_name, 0);
        assert!(l.sock_protocol > 56 && l.sock_cgroup > 56, "{l:?}");
    }

    #[test]
    fn a_missing_member_is_named() {
        if !Path::new(VMLINUX_BTF).exists() {
            return;
        }
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        let r = Resolver { btf: &btf };
        let e = r.offset("socket", &["no_such_member"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the kernel's BTF has no member no_such_member in struct socket"
        );
        assert!(matches!(
            r.offset("no_such_struct_here", &["x"]),
            Err(LayoutError::NoStruct(_))
        ));
    }
}
