//! Cgroup bindings: which identity slot a cgroup's processes act as, and in what state.

use crate::event::Reason;

/// Value of the bindings map, keyed by cgroup id (`u64`, the cgroup directory's inode number).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// Identity slot whose rules apply. Slot 0 has no rules by construction.
    pub slot: u32,
    /// [`flags`] bits.
    pub flags: u32,
    /// `CLOCK_BOOTTIME` nanoseconds at which the binding dies (its certificate's expiry), or 0
    /// for none. Checked in the kernel, so it holds while the daemon is down.
    pub expires_boot_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Binding>() == 16);

/// Bits of [`Binding::flags`].
pub mod flags {
    /// Deny every flow of the cgroup, open ones included (quarantine).
    pub const DENY_ALL: u32 = 1 << 0;
    /// Audit mode: a flow that policy would deny is logged as such and let through.
    pub const AUDIT: u32 = 1 << 1;
    /// The identity was revoked: deny everything, even in audit mode.
    pub const REVOKED: u32 = 1 << 2;
    /// The audit log is down and the configured rule is to deny everything meanwhile.
    pub const AUDIT_HOLD: u32 = 1 << 3;
    /// All bits this version knows; the daemon refuses to write others.
    pub const KNOWN: u32 = DENY_ALL | AUDIT | REVOKED | AUDIT_HOLD;
}

impl Binding {
    /// The slot whose rules decide, or the reason that denies before any rule is consulted.
    #[inline(always)]
    pub fn admit(&self, now_boot_ns: u64) -> Result<u32, Reason> {
        if self.flags & flags::REVOKED != 0 {
            return Err(Reason::REVOKED);
        }
        if self.flags & flags::DENY_ALL != 0 {
            return Err(Reason::DENY_ALL);
        }
        if self.flags & flags::AUDIT_HOLD != 0 {
            return Err(Reason::AUDIT_DOWN);
        }
        // Unknown bits mean a newer writer; do not guess what they meant.
        if self.flags & !flags::KNOWN != 0 {
            return Err(Reason::BAD_BINDING);
        }
        if self.expires_boot_ns != 0 && now_boot_ns >= self.expires_boot_ns {
            return Err(Reason::EXPIRED);
        }
        Ok(self.slot)
    }

    /// Whether a policy denial should be logged and let through.
    #[inline(always)]
    pub fn audit_only(&self) -> bool {
        self.flags & flags::AUDIT != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admit_checks_flags_then_expiry() {
        let b = |flags, expires_boot_ns| Binding {
            slot: 7,
            flags,
            expires_boot_ns,
        };
        assert_eq!(b(0, 0).admit(u64::MAX), Ok(7));
        assert_eq!(b(0, 100).admit(99), Ok(7));
        assert_eq!(b(0, 100).admit(100), Err(Reason::EXPIRED));
        assert_eq!(b(flags::DENY_ALL, 0).admit(0), Err(Reason::DENY_ALL));
        assert_eq!(
            b(flags::REVOKED | flags::DENY_ALL, 0).admit(0),
            Err(Reason::REVOKED)
        );
        assert_eq!(
            b(flags::AUDIT | flags::REVOKED, 0).admit(0),
            Err(Reason::REVOKED)
        );
        assert_eq!(b(1 << 31, 0).admit(0), Err(Reason::BAD_BINDING));
        assert_eq!(b(flags::AUDIT_HOLD, 0).admit(0), Err(Reason::AUDIT_DOWN));
        assert_eq!(
            b(flags::AUDIT_HOLD | flags::AUDIT, 0).admit(0),
            Err(Reason::AUDIT_DOWN)
        );
        assert_eq!(b(flags::AUDIT, 0).admit(0), Ok(7));
        assert!(b(flags::AUDIT, 0).audit_only());
    }
}
