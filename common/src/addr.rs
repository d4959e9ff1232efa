//! The one address classifier.
//!
//! Every destination is held as 16 bytes in network order; an IPv4 address is held in its
//! IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), so that an AF_INET6 socket connecting to a
//! mapped address and an AF_INET socket connecting to the plain address produce the same key.
//!
//! [`classify`] folds every address that reaches this host's loopback into one canonical
//! address, [`LOOPBACK`]: all of 127.0.0.0/8, `::1`, and the unspecified addresses `0.0.0.0`
//! and `::` (a connect to them is routed to loopback, see `ip_route_connect` and
//! `ip6_datagram_connect` in the kernel). A rule about 127.0.0.1 therefore cannot be slipped
//! past through 127.0.0.2, `[::]` or `[::ffff:127.0.0.1]`. The kernel programs classify before
//! every lookup and the rule compiler classifies every rule, using this same function.

/// An address in the canonical 16-byte form (network order).
pub type Addr16 = [u8; 16];

/// The prefix that marks an IPv4-mapped IPv6 address.
const MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Number of leading bits of the mapped form that precede the IPv4 address.
pub const MAPPED_PREFIX_BITS: u32 = 96;

/// The single canonical form of every loopback destination: `::ffff:127.0.0.1`.
pub const LOOPBACK: Addr16 = from_v4([127, 0, 0, 1]);

/// An IPv4 address (network-order octets) in mapped form.
#[inline(always)]
pub const fn from_v4(o: [u8; 4]) -> Addr16 {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
    ]
}

/// The IPv4 octets of a mapped address, or `None` for a native IPv6 address.
#[inline(always)]
pub fn as_v4(a: &Addr16) -> Option<[u8; 4]> {
    let mut i = 0;
    while i < 12 {
        if a[i] != MAPPED_PREFIX[i] {
            return None;
        }
        i += 1;
    }
    Some([a[12], a[13], a[14], a[15]])
}

/// Whether a destination reaches this host's loopback (see the module comment).
#[inline(always)]
pub fn reaches_loopback(a: &Addr16) -> bool {
    if let Some(v4) = as_v4(a) {
        return v4[0] == 127 || v4 == [0, 0, 0, 0];
    }
    // `::` and `::1`: fifteen zero bytes, then 0 or 1.
    let mut i = 0;
    while i < 15 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    a[15] <= 1
}

/// The destination an address really reaches, in canonical form.
#[inline(always)]
pub fn classify(a: Addr16) -> Addr16 {
    if reaches_loopback(&a) { LOOPBACK } else { a }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;

    fn key(s: &str) -> Addr16 {
        match s.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v4) => from_v4(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    #[test]
    fn classification_table() {
        let loopback = "::ffff:127.0.0.1";
        let table: &[(&str, &str)] = &[
            // IPv4 loopback aliases and the unspecified address.
            ("127.0.0.1", loopback),
            ("127.0.0.2", loopback),
            ("127.255.255.254", loopback),
            ("127.1.2.3", loopback),
            ("0.0.0.0", loopback),
            // IPv6 loopback and unspecified.
            ("::1", loopback),
            ("::", loopback),
            // IPv4-mapped forms of all of the above.
            ("::ffff:127.0.0.1", loopback),
            ("::ffff:127.9.9.9", loopback),
            ("::ffff:0.0.0.0", loopback),
            // Ordinary addresses keep their identity, in mapped form for IPv4.
            ("10.1.2.3", "::ffff:10.1.2.3"),
            ("::ffff:10.1.2.3", "::ffff:10.1.2.3"),
            ("192.168.0.1", "::ffff:192.168.0.1"),
            ("126.255.255.255", "::ffff:126.255.255.255"),
            ("128.0.0.0", "::ffff:128.0.0.0"),
            ("2001:db8::1", "2001:db8::1"),
            ("fe80::1", "fe80::1"),
            // Near misses of the loopback forms are not loopback.
            ("::2", "::2"),
            ("::1:0", "::1:0"),
            ("1::1", "1::1"),
            ("::fffe:127.0.0.1", "::fffe:7f00:1"),
            // IPv4-compatible (deprecated) addresses are not routed as IPv4 by Linux.
            ("::127.0.0.1", "::7f00:1"),
            ("0.0.0.1", "::ffff:0.0.0.1"),
        ];
        for (input, want) in table {
            let got = Ipv6Addr::from(classify(key(input)));
            assert_eq!(got, want.parse::<Ipv6Addr>().unwrap(), "classify({input})");
        }
    }

    #[test]
    fn mapped_round_trip() {
        assert_eq!(as_v4(&from_v4([10, 0, 0, 1])), Some([10, 0, 0, 1]));
        assert_eq!(as_v4(&key("2001:db8::1")), None);
        assert_eq!(LOOPBACK, key("::ffff:127.0.0.1"));
    }
}
