//! The task-scoped hooks' contract (BPF LSM): which cgroups are enforced, and where in the
//! running kernel's structures the programs find a socket's type, protocol, peer and cgroup.
//!
//! Cgroup hooks judge a socket by the cgroup it was created in; the LSM hooks judge the task
//! that acts, by its own cgroup and its ancestors, so that a socket created outside and used
//! inside (inherited, received over `SCM_RIGHTS`, taken with `pidfd_getfd`) is judged too.

/// Deepest cgroup level the LSM hooks look at for an enforced ancestor.
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// Member offsets (bytes) of kernel structures the LSM programs read, found by the daemon in
/// the kernel's BTF and set as a read-only global before the programs load. A program that
/// finds `valid == 0` judges nothing it would need them for and denies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `struct socket`: `sk` (pointer), `file` (pointer; none for the kernel's own sockets),
    /// `type` (short).
    pub socket_sk: u32,
    pub socket_file: u32,
    pub socket_type: u32,
    /// `struct sock`: `sk_protocol` (u16).
    pub sock_protocol: u32,
    /// `struct sock` → `__sk_common`: `skc_family` (u16), `skc_daddr` (be32), `skc_dport`
    /// (be16), `skc_v6_daddr` (16 bytes).
    pub sock_family: u32,
    pub sock_daddr: u32,
    pub sock_dport: u32,
    pub sock_v6_daddr: u32,
    /// `struct sock` → `sk_cgrp_data.cgroup` (pointer to the socket's cgroup).
    pub sock_cgroup: u32,
    /// `struct cgroup`: `kn` (pointer); `struct kernfs_node`: `id` (u64, the cgroup id).
    pub cgroup_kn: u32,
    pub kernfs_id: u32,
    /// `struct msghdr`: `msg_name` (pointer, NULL for a connected send).
    pub msghdr_name: u32,
    /// 1 once filled.
    pub valid: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<KernelLayout>() == 56);

/// Name of the read-only global that holds the [`KernelLayout`].
pub const LAYOUT_GLOBAL: &str = "AW_LAYOUT";
