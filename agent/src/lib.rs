//! agentwall: host enforcement agent for zero-trust AI agent networks.
//!
//! The daemon loads kernel programs (`ebpf/`) that allow only the egress a cgroup's policy
//! grants; this crate is the daemon and its CLI, one module per concern.

pub mod agentdir;
pub mod audit;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod decision;
pub mod defaults;
pub mod enforce;
pub mod events;
pub mod exec;
pub mod fleet;
pub mod identity;
pub mod journal;
#[cfg(test)]
mod layering;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod policy;
pub mod probe;
pub mod rootuid;
pub mod sched;
pub mod secrets;
pub mod sockdiag;
pub mod spawn;
pub mod spiffe;
pub mod state;
pub mod supervise;
pub mod unixsock;
pub mod verdict;
pub mod workload;

/// An error and its causes on one line, each text once (messages often repeat their cause).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        let s = cause.to_string();
        if !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
        next = cause.source();
    }
    out
}
