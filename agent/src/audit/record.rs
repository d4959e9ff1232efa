//! Record bodies. Most records are JSON objects (`{"time", "kind", ...}`); kernel verdicts,
//! the bulk of a busy log, are stored in a compact binary form instead, about a third of
//! their JSON size, which every reader turns back into exactly the JSON the daemon would have
//! written ([`json`]). Smaller records are cheaper to write, to keep and to verify: the chain
//! hashes every stored byte.
//!
//! Compact verdict, version 1 (integers little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | `0x01` (a JSON body starts with `{`) |
//! | 8 | time, microseconds since the Unix epoch |
//! | 5 | hook, verdict, reason, IP protocol, address family (kernel codes) |
//! | 1 | flags: 1 destination present, 2 it is IPv6, 4 the given destination differs, 8 it is IPv6, 16 rule, 32 policy, 64 SPIFFE ID, 128 Unix socket name |
//! | 8, 4, 4 | cgroup id, pid, tgid |
//! | 2, 4, 4, 4 | port, rule id, slot, policy generation |
//! | 1 + n | command name |
//! | 4 or 16 | destination as judged, if present |
//! | 4 or 16 | destination as given, if it differs |
//! | 2 + n each | rule (`file:line`), policy name, SPIFFE ID, Unix socket name, those the flags name |

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agentwall_common::event::{Event, Hook, Reason, Verdict};

use crate::verdict::{self as events, EventRecord};

/// First byte of a compact verdict record.
pub const VERDICT_V1: u8 = 0x01;

const F_DST: u8 = 1;
const F_DST6: u8 = 2;
const F_GIVEN: u8 = 4;
const F_GIVEN6: u8 = 8;
const F_RULE: u8 = 16;
const F_POLICY: u8 = 32;
const F_SPIFFE: u8 = 64;
const F_UNIX: u8 = 128;

/// The compact body of the verdict `rec`, decoded from the kernel event `raw` at `at` (the
/// same instant `rec.time` names).
pub fn verdict(raw: &Event, rec: &EventRecord, at: SystemTime) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    b.push(VERDICT_V1);
    let micros = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    b.extend_from_slice(&micros.to_le_bytes());
    b.extend_from_slice(&[
        raw.hook.0,
        raw.verdict.0,
        raw.reason.0,
        raw.proto,
        raw.family,
    ]);
    let is6 = |a: &IpAddr| a.is_ipv6();
    let mut flags = 0;
    if let Some(d) = &rec.dst {
        flags |= F_DST | if is6(d) { F_DST6 } else { 0 };
    }
    let given = rec.dst_given.filter(|g| Some(*g) != rec.dst);
    if let Some(g) = &given {
        flags |= F_GIVEN | if is6(g) { F_GIVEN6 } else { 0 };
    }
    for (f, s) in [
        (F_RULE, &rec.rule),
        (F_POLICY, &rec.policy),
        (F_SPIFFE, &rec.spiffe_id),
        (F_UNIX, &rec.unix),
    ] {
        if s.is_some() {
            flags |= f;
        }
    }
    b.push(flags);
    b.extend_from_slice(&rec.cgroup_id.to_le_bytes());
    b.extend_from_slice(&rec.pid.to_le_bytes());
    b.extend_from_slice(&rec.tgid.to_le_bytes());
    b.extend_from_slice(&rec.port.to_le_bytes());
    b.extend_from_slice(&rec.rule_id.to_le_bytes());
    b.extend_from_slice(&rec.slot.to_le_bytes());
    b.extend_from_slice(&rec.generation.to_le_bytes());
    // A command name is at most 16 bytes in the kernel; its lossy UTF-8 form at most 48.
    let comm = prefix(&rec.comm, 255);
    b.push(comm.len() as u8);
    b.extend_from_slice(comm);
    for a in rec.dst.iter().chain(given.iter()) {
        match a {
            IpAddr::V4(v4) => b.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => b.extend_from_slice(&v6.octets()),
        }
    }
    for s in [&rec.rule, &rec.policy, &rec.spiffe_id, &rec.unix]
        .into_iter()
        .flatten()
    {
        let s = prefix(s, usize::from(u16::MAX));
        b.extend_from_slice(&(s.len() as u16).to_le_bytes());
        b.extend_from_slice(s);
    }
    b
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary (names
/// are far shorter; this only keeps an absurd one decodable).
fn prefix(s: &str, max: usize) -> &[u8] {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s.as_bytes()[..n]
}

/// The JSON of a record body: JSON bodies as they are, compact ones decoded.
pub fn json(body: &[u8]) -> Result<Cow<'_, [u8]>, DecodeError> {
    match body.first() {
        Some(&VERDICT_V1) => {
            let rec = decode_verdict(body)?;
            super::schema::encode_record(&super::schema::AuditRecord::Verdict(Box::new(rec)))
                .map(Cow::Owned)
                .ok_or(DecodeError::Encode)
        }
        _ => Ok(Cow::Borrowed(body)),
    }
}

/// Why a record body cannot be read back as JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a compact verdict")]
    NotCompact,
    #[error("a compact verdict cut short at byte {0}")]
    CutShort(usize),
    #[error("a {0} that is not UTF-8")]
    NotUtf8(&'static str),
    #[error("{0} bytes after the end of a compact verdict")]
    Trailing(usize),
    #[error("cannot encode a verdict as JSON")]
    Encode,
}

/// The verdict of a compact body.
pub fn decode_verdict(body: &[u8]) -> Result<EventRecord, DecodeError> {
    let mut r = Reader { b: body, at: 0 };
    if r.u8()? != VERDICT_V1 {
        return Err(DecodeError::NotCompact);
    }
    let micros = r.u64()?;
    let [hook, verdict, reason, proto, family] = r.array::<5>()?;
    let flags = r.u8()?;
    let cgroup_id = r.u64()?;
    let pid = r.u32()?;
    let tgid = r.u32()?;
    let port = r.u16()?;
    let rule_id = r.u32()?;
    let slot = r.u32()?;
    let generation = r.u32()?;
    let comm_len = usize::from(r.u8()?);
    let comm = String::from_utf8(r.take(comm_len)?.to_vec())
        .map_err(|_| DecodeError::NotUtf8("command name"))?;
    let mut addr = |present: u8, v6: u8| -> Result<Option<IpAddr>, DecodeError> {
        if flags & present == 0 {
            return Ok(None);
        }
        Ok(Some(if flags & v6 != 0 {
            IpAddr::V6(Ipv6Addr::from(r.array::<16>()?))
        } else {
            IpAddr::V4(Ipv4Addr::from(r.array::<4>()?))
        }))
    };
    let dst = addr(F_DST, F_DST6)?;
    let dst_given = addr(F_GIVEN, F_GIVEN6)?.or(dst);
    let mut text = |flag: u8| -> Result<Option<String>, DecodeError> {
        if flags & flag == 0 {
            return Ok(None);
        }
        let len = usize::from(r.u16()?);
        String::from_utf8(r.take(len)?.to_vec())
            .map(Some)
            .map_err(|_| DecodeError::NotUtf8("name"))
    };
    let rule = text(F_RULE)?;
    let policy = text(F_POLICY)?;
    let spiffe_id = text(F_SPIFFE)?;
    let unix = text(F_UNIX)?;
    if r.at != body.len() {
        return Err(DecodeError::Trailing(body.len() - r.at));
    }
    let at = UNIX_EPOCH + Duration::from_micros(micros);
    Ok(EventRecord {
        time: humantime::format_rfc3339_micros(at).to_string(),
        hook: events::code_name(Hook(hook).name(), hook),
        verdict: events::code_name(Verdict(verdict).name(), verdict),
        reason: events::code_name(Reason(reason).name(), reason),
        cgroup_id,
        pid,
        tgid,
        comm,
        protocol: events::proto_name(proto),
        family: events::family_name(family),
        dst,
        dst_given,
        unix,
        port,
        rule_id,
        rule,
        policy,
        spiffe_id,
        slot,
        generation,
    })
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let s = self
            .b
            .get(self.at..self.at.saturating_add(n))
            .ok_or(DecodeError::CutShort(self.at))?;
        self.at += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use agentwall_common::{addr, rules::proto};

    use super::*;
    use crate::verdict::Resolve;

    struct Names(bool);
    impl Resolve for Names {
        fn policy(&self, slot: u32) -> Option<String> {
            (self.0 && slot != 0).then(|| format!("policy-{slot}"))
        }
        fn rule(&self, generation: u32, rule_id: u32) -> Option<String> {
            self.0
                .then(|| format!("policies/p{generation}.yaml:{rule_id}"))
        }
        fn identity(&self, cgroup_id: u64) -> Option<String> {
            (self.0 && cgroup_id.is_multiple_of(2))
                .then(|| format!("spiffe://example.org/agent/a{cgroup_id}/prod"))
        }
    }

    fn event(hook: Hook, reason: Reason, dst: addr::Addr16, given: addr::Addr16) -> Event {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"python3");
        Event {
            ts_boot_ns: 0,
            cgroup_id: 4242,
            pid_tgid: (77u64 << 32) | 78,
            addr: dst,
            orig_addr: given,
            rule_id: 9,
            slot: 2,
            generation: 5,
            port: 5432,
            hook,
            proto: proto::TCP,
            verdict: Verdict::ALLOW,
            reason,
            sock_type: 1,
            family: 2,
            _pad: [0; 4],
            comm,
        }
    }

    /// Every compact verdict reads back as exactly the JSON the daemon would have written.
    #[test]
    fn compact_verdicts_read_back_as_the_same_json() {
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        let mut odd = event(Hook(99), Reason(200), addr::LOOPBACK, addr::LOOPBACK);
        odd.comm = [0xff; 16];
        odd.verdict = Verdict(7);
        odd.proto = 250;
        odd.family = 33;
        let mut empty = event(Hook::EGRESS, Reason::RULE, v6, v6);
        empty.comm = [0; 16];
        empty.pid_tgid = 0;
        let events = [
            event(
                Hook::CONNECT4,
                Reason::RULE,
                addr::from_v4([10, 20, 1, 7]),
                addr::from_v4([10, 20, 1, 7]),
            ),
            // 0.0.0.0 judged as loopback: the given destination differs.
            event(
                Hook::CONNECT4,
                Reason::RULE,
                addr::LOOPBACK,
                addr::from_v4([0, 0, 0, 0]),
            ),
            event(Hook::CONNECT6, Reason::RULE, v6, addr::LOOPBACK),
            event(Hook::SOCK_CREATE, Reason::RULE, [0; 16], [0; 16]),
            event(Hook::SENDMSG4, Reason::UNPARSED, [0; 16], [0; 16]),
            odd,
            empty,
        ];
        let at = UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456);
        for (i, e) in events.iter().enumerate() {
            for names in [Names(true), Names(false)] {
                let mut e = *e;
                e.cgroup_id += i as u64;
                let rec = EventRecord::decode_at(&e, &names, at);
                let body = verdict(&e, &rec, at);
                assert_eq!(decode_verdict(&body).unwrap(), rec, "event {i}");
                let want = super::super::schema::encode_record(
                    &super::super::schema::AuditRecord::Verdict(Box::new(rec.clone())),
                )
                .unwrap();
                assert_eq!(json(&body).unwrap().as_ref(), want.as_slice(), "event {i}");
                assert!(
                    body.len() * 2 < want.len(),
                    "{} vs {}",
                    body.len(),
                    want.len()
                );
                // Cut anywhere or extended, it is refused, never misread.
                for cut in 0..body.len() {
                    assert!(decode_verdict(&body[..cut]).is_err(), "event {i} cut {cut}");
                }
                let mut long = body.clone();
                long.push(0);
                assert!(matches!(
                    decode_verdict(&long).unwrap_err(),
                    DecodeError::Trailing(_)
                ));
            }
        }
    }

    #[test]
    fn an_absurdly_long_name_is_cut_on_a_character_boundary() {
        let e = event(Hook::CONNECT4, Reason::RULE, addr::LOOPBACK, addr::LOOPBACK);
        let at = UNIX_EPOCH + Duration::from_secs(1);
        let mut rec = EventRecord::decode_at(&e, &Names(true), at);
        rec.rule = Some("é".repeat(40_000));
        rec.comm = "ü".repeat(200);
        let back = decode_verdict(&verdict(&e, &rec, at)).unwrap();
        assert_eq!(back.rule.unwrap().len(), 65_534);
        assert_eq!(back.comm.len(), 254);
    }

    #[test]
    fn json_bodies_pass_through() {
        let body = br#"{"time":"T","kind":"health"}"#;
        assert!(matches!(json(body).unwrap(), Cow::Borrowed(b) if b == body));
        assert!(json(&[VERDICT_V1, 1, 2]).is_err());
    }
}
