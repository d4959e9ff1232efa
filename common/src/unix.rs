//! Unix socket rules as the kernel holds them, and the event record that names the socket.
//!
//! A Unix socket address is a name, not a destination the network sees: a filesystem path
//! (`/run/dbus/system_bus_socket`) or an abstract name (`\0name`, written `@name`). The
//! `connect_unix` and `sendmsg_unix` hooks judge the name the caller passed, exactly as the
//! kernel reads it: a path ends at its first NUL, an abstract name spans the whole address
//! length, NULs included. Both the kernel and the daemon bring a name to the same key with
//! [`UnixKey::set_name`], so a rule matches exactly the bytes the kernel would resolve.

use crate::event::Event;

/// Size of `sun_path` in `struct sockaddr_un`.
pub const SUN_PATH_MAX: usize = 108;
/// Offset of `sun_path` in `struct sockaddr_un` (after `sun_family`).
pub const SUN_PATH_OFFSET: usize = 2;

/// Key of the Unix rules hash map: one allowed socket name of one identity slot and policy
/// generation. The value is the rule id (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixKey {
    pub slot: u32,
    pub generation: u32,
    /// Significant bytes of `path`; every byte after them is zero.
    pub len: u32,
    pub path: [u8; SUN_PATH_MAX],
}
const _: () = assert!(core::mem::size_of::<UnixKey>() == 12 + SUN_PATH_MAX);

impl Default for UnixKey {
    fn default() -> Self {
        Self {
            slot: 0,
            generation: 0,
            len: 0,
            path: [0; SUN_PATH_MAX],
        }
    }
}

impl UnixKey {
    /// Takes the first `raw_len` bytes of `path` as a `sun_path` the caller passed (the
    /// address length minus [`SUN_PATH_OFFSET`]) and keeps the bytes the kernel resolves: up
    /// to the first NUL for a filesystem path, all of them for an abstract name (first byte
    /// NUL). Zeroes the rest, so that equal names make equal keys.
    #[inline(always)]
    pub fn set_name(&mut self, raw_len: usize) {
        let raw_len = if raw_len > SUN_PATH_MAX {
            SUN_PATH_MAX
        } else {
            raw_len
        } as u64;
        // Only a path ends at a NUL: 1 for a path, 0 for an abstract name (or none).
        let first_nul = (self.path[0] as u64).wrapping_sub(1) >> 63;
        let is_path = 1 ^ first_nul;
        // Without branches: the kernel verifier walks each iteration once, whatever the
        // bytes (a branch per byte would make it explore every combination of outcomes).
        let mut ended: u64 = 0;
        let mut len: u64 = 0;
        let mut i = 0;
        while i < SUN_PATH_MAX {
            let b = self.path[i] as u64;
            // 1 from the first byte past the caller's length on.
            let past = raw_len.wrapping_sub(i as u64 + 1) >> 63;
            // 1 for a NUL that ends a path.
            let nul = (b.wrapping_sub(1) >> 63) & is_path;
            ended |= past | nul;
            let keep = 1 - ended;
            self.path[i] = (b * keep) as u8;
            len += keep;
            i += 1;
        }
        self.len = len as u32;
    }

    /// The key of a name as a policy writes it: a path, or `@name` for an abstract one.
    /// `None` if it does not fit in `sun_path`.
    pub fn from_policy_name(slot: u32, generation: u32, name: &str) -> Option<Self> {
        let mut key = Self {
            slot,
            generation,
            ..Self::default()
        };
        let bytes = name.as_bytes();
        let raw: &[u8] = match bytes.split_first() {
            Some((b'@', rest)) => {
                if rest.len() + 1 > SUN_PATH_MAX {
                    return None;
                }
                key.path[1..=rest.len()].copy_from_slice(rest);
                &key.path[..=rest.len()]
            }
            _ => {
                if bytes.len() > SUN_PATH_MAX || bytes.contains(&0) {
                    return None;
                }
                key.path[..bytes.len()].copy_from_slice(bytes);
                &key.path[..bytes.len()]
            }
        };
        let raw_len = raw.len();
        key.set_name(raw_len);
        Some(key)
    }

    /// The name as a policy would write it (`@` for an abstract one; other bytes that are
    /// not printable ASCII as `\xNN`).
    pub fn display(&self) -> DisplayName<'_> {
        DisplayName(&self.path[..(self.len as usize).min(SUN_PATH_MAX)])
    }
}

/// A socket name for messages and audit records.
#[derive(Debug)]
pub struct DisplayName<'a>(pub &'a [u8]);

impl core::fmt::Display for DisplayName<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (first, rest) = match self.0.split_first() {
            Some((0, rest)) => ("@", rest),
            _ => ("", self.0),
        };
        f.write_str(first)?;
        for &b in rest {
            if (0x20..0x7f).contains(&b) && b != b'\\' {
                core::fmt::Write::write_char(f, b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// The event of a Unix-socket verdict: the common record, then the name as the key holds it.
/// The common record's hook ([`crate::event::Hook::CONNECT_UNIX`] or
/// [`crate::event::Hook::SENDMSG_UNIX`]) says that the name follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixEvent {
    pub event: Event,
    /// Significant bytes of `path`.
    pub len: u32,
    pub _pad: u32,
    pub path: [u8; SUN_PATH_MAX],
    pub _pad2: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<UnixEvent>() == 96 + 8 + SUN_PATH_MAX + 4);
const _: () = assert!(core::mem::align_of::<UnixEvent>() == 8);

impl UnixEvent {
    /// The name carried after the common record of `bytes`, if `bytes` hold a whole one.
    pub fn name_from_bytes(bytes: &[u8]) -> Option<DisplayName<'_>> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        let len_at = core::mem::offset_of!(Self, len);
        let path_at = core::mem::offset_of!(Self, path);
        let mut len = [0u8; 4];
        len.copy_from_slice(&bytes[len_at..len_at + 4]);
        let len = (u32::from_ne_bytes(len) as usize).min(SUN_PATH_MAX);
        Some(DisplayName(&bytes[path_at..path_at + len]))
    }
}

/// Layout of the kernel's `struct bpf_sock_addr_kern` (include/linux/filter.h), the real
/// object behind a sock_addr program's context: the `uaddr` pointer and `uaddrlen`, the
/// caller's address as copied into the kernel and its length. Stable since Linux 6.7 (which
/// added `uaddrlen` and the Unix hooks); the daemon checks these offsets against the running
/// kernel's BTF before it loads the Unix programs.
pub mod kern {
    pub const UADDR_OFFSET: usize = 8;
    pub const UADDRLEN_OFFSET: usize = 32;
    /// Bytes the programs read from the start of the structure.
    pub const READ_SIZE: usize = 40;
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{format, string::ToString};

    use super::*;

    fn raw(bytes: &[u8]) -> UnixKey {
        let mut k = UnixKey::default();
        k.path[..bytes.len()].copy_from_slice(bytes);
        k.set_name(bytes.len());
        k
    }

    #[test]
    fn a_path_ends_at_its_first_nul_and_an_abstract_name_does_not() {
        let policy = UnixKey::from_policy_name(0, 0, "/run/x.sock").unwrap();
        assert_eq!(policy.len, 11);
        // What callers pass: with or without the terminating NUL, or with bytes after it.
        assert_eq!(raw(b"/run/x.sock"), policy);
        assert_eq!(raw(b"/run/x.sock\0"), policy);
        assert_eq!(raw(b"/run/x.sock\0junk"), policy);
        assert_ne!(raw(b"/run/x.sockX"), policy);
        let abs = UnixKey::from_policy_name(0, 0, "@bus").unwrap();
        assert_eq!(abs.len, 4);
        assert_eq!(raw(b"\0bus"), abs);
        // Abstract names are taken whole: a trailing NUL makes another name.
        assert_ne!(raw(b"\0bus\0"), abs);
        assert_eq!(raw(b"\0bus\0").len, 5);
        assert_eq!(raw(b"").len, 0);
        assert_eq!(abs.display().to_string(), "@bus");
        assert_eq!(raw(b"\0a\0b").display().to_string(), "@a\\x00b");
        assert_eq!(format!("{}", policy.display()), "/run/x.sock");
    }

    #[test]
    fn names_that_do_not_fit_are_refused() {
        let long = "/".repeat(SUN_PATH_MAX);
        assert!(UnixKey::from_policy_name(0, 0, &long).is_some());
        assert!(UnixKey::from_policy_name(0, 0, &format!("{long}x")).is_none());
        let abs = format!("@{}", "a".repeat(SUN_PATH_MAX - 1));
        assert!(UnixKey::from_policy_name(0, 0, &abs).is_some());
        assert!(UnixKey::from_policy_name(0, 0, &format!("{abs}a")).is_none());
        assert!(UnixKey::from_policy_name(0, 0, "/a\0b").is_none());
        // Longer than sun_path from the kernel side: cut at its size.
        let mut k = UnixKey {
            path: [b'a'; SUN_PATH_MAX],
            ..UnixKey::default()
        };
        k.set_name(500);
        assert_eq!(k.len as usize, SUN_PATH_MAX);
    }
}
