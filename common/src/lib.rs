//! The contract between agentwall's kernel programs (`ebpf/`) and its daemon (`agent/`).
//!
//! Everything here is `#[repr(C)]` with fixed-width fields and explicit padding, and every
//! size is asserted at compile time, because the kernel and userspace read the same bytes.
//! Codes read back from the kernel (hooks, verdicts, reasons) are `u8` newtypes with named
//! constants rather than enums: an unknown value from a map must not be undefined behaviour.
#![no_std]
// The kernel build (nightly, bpfel-unknown-none) writes one atomic instruction in assembly
// (`state::begin_write`): the BPF target offers no compare-and-swap in `core`.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

pub mod addr;
pub mod binding;
pub mod budget;
pub mod counters;
pub mod event;
pub mod lsm;
pub mod maps;
pub mod peers;
pub mod rules;
pub mod state;
pub mod unix;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type below is `#[repr(C)]`, `Copy`, made only of integers and byte arrays,
    // and has no implicit padding (the size asserts beside each type prove it), so every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for crate::binding::Binding {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::rules::RuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::rules::RuleSet {}
    // SAFETY: `repr(C)` integers (a `Rate` is two u64) without padding.
    unsafe impl aya::Pod for crate::rules::Limit {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::rules::WindowSpans {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::state::PolicyState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::lsm::KernelLayout {}
    // SAFETY: as above (the daemon only writes zeroed ones, to empty the caches).
    unsafe impl aya::Pod for crate::state::FlowCacheEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::state::DecisionCacheEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::state::BindingCacheEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::unix::UnixKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::budget::BudgetConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::budget::Bucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::budget::SummaryKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::budget::Summary {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::peers::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::peers::Caller {}
    // SAFETY: as above.
    unsafe impl aya::Pod for crate::peers::PeerKey {}
}
