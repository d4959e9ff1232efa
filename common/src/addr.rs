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

/// An address as four native-endian words over its 16 network-order bytes (word `i` holds
/// bytes `4i..4i+4`), the form the kernel programs compute with: whole-word loads, compares
/// and stores instead of byte loops, and the layout of the `user_ip6` field of a socket
/// address context. The constants below are built from bytes, so the comparisons hold on
/// either byte order.
pub type Quads = [u32; 4];

/// The word that makes an address IPv4-mapped (bytes 8..12 of `::ffff:0:0`).
const MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// The first octet of an IPv4 address within its word.
const FIRST_OCTET: u32 = u32::from_ne_bytes([0xff, 0, 0, 0]);
/// 127 as the first octet.
const OCTET_127: u32 = u32::from_ne_bytes([127, 0, 0, 0]);
/// The last word of `::1`.
const ONE_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

/// The word form of an address.
#[inline(always)]
pub const fn to_quads(a: &Addr16) -> Quads {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// The byte form of an address in word form.
#[inline(always)]
pub const fn from_quads(q: Quads) -> Addr16 {
    let (a, b, c, d) = (
        q[0].to_ne_bytes(),
        q[1].to_ne_bytes(),
        q[2].to_ne_bytes(),
        q[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The mapped form of an IPv4 address given as the native-endian word over its network-order
/// octets (as in `user_ip4`).
#[inline(always)]
pub const fn quads_from_v4(ip: u32) -> Quads {
    [0, 0, MAPPED_WORD, ip]
}

/// Whether a destination in word form reaches this host's loopback (see the module comment).
#[inline(always)]
pub const fn quads_reach_loopback(q: &Quads) -> bool {
    if q[0] != 0 || q[1] != 0 {
        return false;
    }
    if q[2] == MAPPED_WORD {
        // 127.0.0.0/8 and 0.0.0.0.
        return q[3] & FIRST_OCTET == OCTET_127 || q[3] == 0;
    }
    // `::` and `::1`.
    q[2] == 0 && (q[3] == 0 || q[3] == ONE_LAST)
}

/// The destination an address in word form really reaches, in canonical word form.
#[inline(always)]
pub const fn classify_quads(q: Quads) -> Quads {
    if quads_reach_loopback(&q) {
        to_quads(&LOOPBACK)
    } else {
        q
    }
}

/// Whether a destination reaches this host's loopback (see the module comment).
#[inline(always)]
pub const fn reaches_loopback(a: &Addr16) -> bool {
    quads_reach_loopback(&to_quads(a))
}

/// The destination an address really reaches, in canonical form: the one classifier, over
/// the word form that the kernel programs use directly.
#[inline(always)]
pub const fn classify(a: Addr16) -> Addr16 {
    from_quads(classify_quads(to_quads(&a)))
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
    fn word_form_agrees_with_bytes() {
        // Every byte position with a few values, on top of the table's addresses: the word
        // classifier and the byte form must agree, and the conversions must round-trip.
        let mut inputs = named_inputs();
        for pos in 0..16 {
            for v in [0u8, 1, 0x7f, 0xff] {
                for base in [[0u8; 16], LOOPBACK, from_v4([10, 1, 2, 3])] {
                    let mut a = base;
                    a[pos] = v;
                    inputs.push(a);
                }
            }
        }
        for a in inputs {
            let q = to_quads(&a);
            assert_eq!(from_quads(q), a);
            assert_eq!(from_quads(classify_quads(q)), classify(a));
            let v4 = as_v4(&a);
            let by_bytes = match v4 {
                Some(o) => o[0] == 127 || o == [0, 0, 0, 0],
                None => a[..15].iter().all(|b| *b == 0) && a[15] <= 1,
            };
            assert_eq!(reaches_loopback(&a), by_bytes, "{a:?}");
            if let Some(o) = v4 {
                assert_eq!(quads_from_v4(u32::from_ne_bytes(o)), q);
            }
        }
    }

    fn named_inputs() -> std::vec::Vec<Addr16> {
        [
            "127.0.0.1",
            "0.0.0.0",
            "::",
            "::1",
            "::2",
            "1::1",
            "::ffff:127.9.9.9",
            "::127.0.0.1",
        ]
        .iter()
        .map(|s| key(s))
        .collect()
    }

    #[test]
    fn mapped_round_trip() {
        assert_eq!(as_v4(&from_v4([10, 0, 0, 1])), Some([10, 0, 0, 1]));
        assert_eq!(as_v4(&key("2001:db8::1")), None);
        assert_eq!(LOOPBACK, key("::ffff:127.0.0.1"));
    }
}
