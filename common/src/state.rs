//! Global policy state, read by every decision.

/// The single entry of the state array. Rules are keyed by generation; the daemon writes a
/// complete new generation, then flips `generation` with one map update, so a decision sees
/// the old rules or the new ones and never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Active rule generation. 0 means no policy was ever loaded: everything is denied.
    pub generation: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyState>() == 8);
