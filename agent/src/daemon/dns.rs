//! Host names of the services catalog: the DNS service. It asks for each name the policy in
//! force uses, keeps each address until its answer's TTL runs out, and asks again before
//! then, so that the next answer is in the kernel before the last one expires.
//!
//! An address stays granted while any answer that named it is valid, and not a moment
//! longer: each answer compiles to rule ids whose kernel window closes at its expiry (see
//! `policy::compile::compile_resolved`). A name that cannot be resolved grants nothing once
//! its last answer expires: enforcement fails closed, and the failures are counted.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
};

use crate::{config::NamesConfig, policy::compile::Resolved};

#[derive(Debug, thiserror::Error)]
pub(crate) enum DnsError {
    #[error("cannot make a DNS resolver (from /etc/resolv.conf, unless names.servers is set): {0}")]
    System(String),
    #[error("resolving {name:?}: {message}")]
    Lookup { name: String, message: String },
    #[error(
        "{name:?} resolved to {addresses:?}, which no name may grant (this host, the link, a group address, or more than {MAX_ADDRESSES_PER_NAME} addresses); the rest of its answer is in force"
    )]
    Refused {
        name: String,
        addresses: Vec<IpAddr>,
        changed: bool,
    },
}

/// What is known of one name.
#[derive(Debug, Default, Clone)]
struct Entry {
    /// Address → when its latest answer expires (boot clock).
    addrs: BTreeMap<IpAddr, u64>,
    /// When to ask again (boot clock); 0: at once.
    refresh_at: u64,
}

/// The most addresses kept of one name: an answer that names more is cut (and the cut
/// counted), so that no DNS answer can outgrow the kernel's rule maps.
pub(crate) const MAX_ADDRESSES_PER_NAME: usize = 64;

pub(crate) struct Dns {
    /// Built on first use: a host without /etc/resolv.conf runs as long as no policy names a
    /// host.
    resolver: Mutex<Option<Result<TokioResolver, String>>>,
    cfg: NamesConfig,
    names: Mutex<BTreeMap<String, Entry>>,
}

/// Whether an answer's address may be granted: not this host (loopback, unspecified), not
/// the link (link-local, where cloud metadata services answer), not a group (multicast,
/// broadcast). A name that resolves there would grant what no policy named.
pub(crate) fn grantable(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    };
    match ip {
        IpAddr::V4(v) => {
            !(v.is_loopback()
                || v.is_unspecified()
                || v.is_link_local()
                || v.is_multicast()
                || v.is_broadcast())
        }
        IpAddr::V6(v) => {
            !(v.is_loopback()
                || v.is_unspecified()
                || v.is_unicast_link_local()
                || v.is_multicast())
        }
    }
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Dns {
    pub(crate) fn new(cfg: &NamesConfig) -> Self {
        Self {
            resolver: Mutex::new(None),
            cfg: cfg.clone(),
            names: Mutex::new(BTreeMap::new()),
        }
    }

    /// The resolver, built the first time it is needed.
    fn resolver(&self) -> Result<TokioResolver, DnsError> {
        let mut r = self
            .resolver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.get_or_insert_with(|| build(&self.cfg).map_err(|e| e.to_string()))
            .clone()
            .map_err(DnsError::System)
    }

    fn names(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps only `wanted` (the names the policy in force or about to be uses).
    pub(crate) fn retain(&self, wanted: &[String]) {
        self.names().retain(|n, _| wanted.contains(n));
    }

    /// Asks for `name` now and keeps the answer; whether the addresses or their expiries
    /// changed.
    pub(crate) async fn resolve(&self, name: &str) -> Result<bool, DnsError> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let lookup = match self.resolver() {
            Ok(r) => r.lookup_ip(fqdn.as_str()).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let now = crate::clock::boot_ns();
        let mut names = self.names();
        let entry = names.entry(name.to_string()).or_default();
        let answer = match lookup {
            Ok(l) => l,
            Err(e) => {
                // Asked again soon; what was known expires on its own.
                entry.refresh_at = now + secs(1);
                return Err(DnsError::Lookup {
                    name: name.to_string(),
                    message: e,
                });
            }
        };
        let ttl = answer
            .valid_until()
            .saturating_duration_since(Instant::now())
            .max(self.cfg.min_ttl);
        let until = now.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX));
        let mut changed = false;
        let mut refused = Vec::new();
        for ip in answer.iter() {
            if !grantable(ip) {
                refused.push(ip);
                continue;
            }
            if !entry.addrs.contains_key(&ip) && entry.addrs.len() >= MAX_ADDRESSES_PER_NAME {
                refused.push(ip);
                continue;
            }
            let e = entry.addrs.entry(ip).or_insert(0);
            if *e < until {
                *e = until;
                changed = true;
            }
        }
        let ahead = self.cfg.refresh_before.min(ttl / 2);
        entry.refresh_at = until.saturating_sub(u64::try_from(ahead.as_nanos()).unwrap_or(0));
        if refused.is_empty() {
            Ok(changed)
        } else {
            Err(DnsError::Refused {
                name: name.to_string(),
                addresses: refused,
                changed,
            })
        }
    }

    /// The names among `wanted` due to be asked again (never asked, or their refresh time
    /// passed).
    pub(crate) fn due(&self, wanted: &[String]) -> Vec<String> {
        let now = crate::clock::boot_ns();
        let names = self.names();
        wanted
            .iter()
            .filter(|n| names.get(*n).is_none_or(|e| e.refresh_at <= now))
            .cloned()
            .collect()
    }

    /// How long until the next refresh or expiry, at most `cap`.
    pub(crate) fn next_event(&self, cap: Duration) -> Duration {
        let now = crate::clock::boot_ns();
        let names = self.names();
        let next = names
            .values()
            .flat_map(|e| std::iter::once(e.refresh_at).chain(e.addrs.values().copied()))
            .filter(|t| *t > now)
            .min();
        next.map_or(cap, |t| Duration::from_nanos(t - now).min(cap))
    }

    /// The addresses in force: each name's unexpired ones with their expiries. Expired ones
    /// are forgotten; whether any were is returned too.
    pub(crate) fn resolved(&self) -> (Resolved, bool) {
        let now = crate::clock::boot_ns();
        let mut names = self.names();
        let mut expired = false;
        let mut out = Resolved::new();
        for (name, e) in names.iter_mut() {
            let before = e.addrs.len();
            e.addrs.retain(|_, until| *until > now);
            expired |= e.addrs.len() != before;
            out.insert(
                name.clone(),
                e.addrs.iter().map(|(ip, until)| (*ip, *until)).collect(),
            );
        }
        (out, expired)
    }
}

/// A resolver of `cfg`'s servers (the system's if none), without a cache of its own.
fn build(cfg: &NamesConfig) -> Result<TokioResolver, String> {
    let mut builder = if cfg.servers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| e.to_string())?
    } else {
        let servers = cfg
            .servers
            .iter()
            .map(|s| {
                let conn = |mut c: ConnectionConfig| {
                    c.port = s.port();
                    c
                };
                NameServerConfig::new(
                    s.ip(),
                    true,
                    vec![conn(ConnectionConfig::udp()), conn(ConnectionConfig::tcp())],
                )
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), servers),
            TokioRuntimeProvider::default(),
        )
    };
    let opts = builder.options_mut();
    // Every question goes to the servers: the answers' expiries are this service's.
    opts.cache_size = 0;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    builder.build().map_err(|e| e.to_string())
}

fn secs(n: u64) -> u64 {
    n * 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_elsewhere_are_granted() {
        for ok in ["10.1.2.3", "192.0.2.31", "2001:db8::1", "8.8.8.8"] {
            assert!(grantable(ok.parse().unwrap()), "{ok}");
        }
        for no in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "169.254.169.254",
            "fe80::1",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
        ] {
            assert!(!grantable(no.parse().unwrap()), "{no}");
        }
    }
}
