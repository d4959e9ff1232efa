//! Names and default sizes of the kernel maps. The kernel programs declare maps under these
//! exact names; the daemon looks them up through these constants only.

/// `HashMap<u64 cgroup id, Binding>`, allocated without preallocation so that an update
/// replaces an entry under RCU and a reader never sees a torn value.
pub const BINDINGS: &str = "AW_BINDINGS";
/// `LpmTrie<RuleKey, RuleSet>`.
pub const RULES: &str = "AW_RULES";
/// `LpmTrie<RuleKey, RuleSet>` of ingress rules: (slot, generation, peer address prefix) →
/// the local TCP ports that peer may connect to. A slot whose policy judges ingress has a
/// node at prefix length 0 (empty unless a rule covers every address); a slot without any
/// node does not judge ingress.
pub const INGRESS: &str = "AW_INGRESS";
/// Default capacity of the ingress trie: two generations of 32,768 nodes.
pub const DEFAULT_MAX_INGRESS_NODES: u32 = 65_536;
/// `HashMap<u64 socket cookie, u64>`: the TCP sockets of enforced cgroups the kernel opened
/// passively (accepted from a listener), from establishment to close (`aw_sockops`), with the
/// slot of the caller admitted by an `agent:` rule (0 if none was, see [`crate::peers`]). Only these send
/// replies under the ingress rules.
pub const PASSIVE: &str = "AW_PASSIVE";
/// Default capacity of the passive sockets map; past it a new one is not tracked (its
/// replies are denied, and counted).
pub const DEFAULT_MAX_PASSIVE: u32 = 65_536;
/// `LruHashMap<peers::FlowKey, peers::Caller>`: which enforced cgroup sent the SYN of a TCP
/// connection, for the callee's ingress (see [`crate::peers`]).
pub const CALLERS: &str = "AW_CALLERS";
pub const DEFAULT_MAX_CALLERS: u32 = 65_536;
/// `HashMap<peers::PeerKey, rules::RuleSet>`: which callers' policies may connect to which
/// local ports of a callee's, by the callers' `agent:` rules.
pub const PEERS: &str = "AW_PEERS";
/// Default capacity: two generations of 8,192 (callee, caller) pairs.
pub const DEFAULT_MAX_PEERS: u32 = 16_384;
/// `HashMap<UnixKey, u32 rule id>`: the Unix socket names each slot may reach.
pub const UNIX_RULES: &str = "AW_UNIX";
/// `Array<PolicyState>` of one entry.
pub const STATE: &str = "AW_STATE";
/// `PerCpuArray<u64>` indexed by [`crate::counters`].
pub const COUNTERS: &str = "AW_COUNTERS";
/// `RingBuf` of [`crate::event::Event`].
pub const EVENTS: &str = "AW_EVENTS";

/// `HashMap<u64 cgroup id, u32>`: the cgroups whose tasks the LSM hooks judge (with their
/// descendants). The daemon adds a cgroup before it attaches the cgroup programs to it.
pub const ENFORCED: &str = "AW_ENFORCED";

/// Event budgets (`crate::budget`), pinned, so that the programs a stopped or crashed daemon
/// left attached keep to them and the next daemon reads what they counted: the configuration
/// (`Array<BudgetConfig>` of one entry), the buckets (`LruHashMap<u64, Bucket>`, keyed by
/// `budget::cgroup_key`, `budget::identity_key` or `budget::UNBOUND_KEY`) and the summaries
/// of the verdicts held back (`LruHashMap<SummaryKey, Summary>`), which the daemon takes.
pub const BUDGET_CONFIG: &str = "AW_BUDGET_CFG";
pub const BUDGETS: &str = "AW_BUDGETS";
pub const SUMMARIES: &str = "AW_SUMMARIES";
/// `HashMap<SummaryKey, Summary>`, not preallocated: the allowed flows held back, never
/// evicted (when full, a verdict is recorded instead).
pub const ALLOWED_SUMMARIES: &str = "AW_ALLOWED_SUMMARIES";

/// Rate limits of rules (`HashMap<u64, rules::Limit>`, keyed by `Limit::key` of the
/// generation and rule id) and their buckets (`HashMap<u64, u64>`: `Limit::bucket_key` of the
/// identity slot → the bucket's theoretical arrival time, boot clock). The daemon writes the
/// limits with each generation and makes each bucket before the generation is in force;
/// the buckets are pinned, so that a restarted daemon does not refill them.
pub const LIMITS: &str = "AW_LIMITS";
pub const RATE_BUCKETS: &str = "AW_RATE_BUCKETS";
/// Time windows of rules (`HashMap<u64, rules::WindowSpans>`, keyed like the limits): the
/// daemon writes them with each generation and again as spans pass.
pub const WINDOWS: &str = "AW_WINDOWS";
/// Default capacity of the windows map: two generations of 32,768 windowed rules.
pub const DEFAULT_MAX_WINDOWS: u32 = 65_536;
/// Default capacity of the limits map: two generations of 32,768 rate-limited rules.
pub const DEFAULT_MAX_LIMITS: u32 = 65_536;
/// Default capacity of the rate buckets map: one per rate-limited rule (they live across
/// generations while their rule does).
pub const DEFAULT_MAX_RATE_BUCKETS: u32 = 32_768;

/// Per-CPU caches of the programs, not pinned (each loaded object has its own): flow
/// verdicts, decisions and binding copies (`crate::state`). The daemon only empties them.
pub const FLOW_CACHE: &str = "AW_FLOWS";
pub const DECISION_CACHE: &str = "AW_DECISIONS";
pub const BINDING_CACHE: &str = "AW_BINDING_COPIES";

/// Default capacity of the bindings map.
pub const DEFAULT_MAX_BINDINGS: u32 = 65_536;
/// Default capacity of the rules trie: room for two generations of 131,072 prefix nodes.
pub const DEFAULT_MAX_RULE_NODES: u32 = 262_144;
/// Default capacity of the Unix rules map: room for two generations of 8,192 names.
pub const DEFAULT_MAX_UNIX_RULES: u32 = 16_384;
/// Default capacity of the summaries map: distinct (cgroup, destination, verdict) held back
/// between two reads by the daemon. Beyond it the oldest go (their counts stay in the
/// cgroup's bucket, so the totals still add up).
pub const DEFAULT_MAX_SUMMARIES: u32 = 16_384;
/// Default capacity of the allowed flows held back between two reads by the daemon.
pub const DEFAULT_MAX_ALLOWED_SUMMARIES: u32 = 4_096;
/// Default size of the event ring buffer in bytes (a power of two, a multiple of the page size).
pub const DEFAULT_EVENT_RING_BYTES: u32 = 1 << 22;

/// Names of the kernel programs, as the daemon loads and pins them.
pub mod programs {
    pub const CONNECT4: &str = "aw_connect4";
    pub const CONNECT6: &str = "aw_connect6";
    pub const SENDMSG4: &str = "aw_sendmsg4";
    pub const SENDMSG6: &str = "aw_sendmsg6";
    pub const EGRESS: &str = "aw_egress";
    pub const INGRESS: &str = "aw_ingress";
    pub const SOCK_OPS: &str = "aw_sockops";
    pub const SOCK_CREATE: &str = "aw_sock_create";
    pub const ALL: [&str; 8] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        EGRESS,
        INGRESS,
        SOCK_OPS,
        SOCK_CREATE,
    ];
    /// The Unix socket programs (kernel >= 6.7). aya 0.14 knows neither attach type, so the
    /// daemon loads and attaches these itself; their ELF sections name an attach type aya
    /// knows only so that aya parses the object (it never loads them). Program name and
    /// `bpf_attach_type` (`BPF_CGROUP_UNIX_CONNECT`, `BPF_CGROUP_UNIX_SENDMSG`).
    pub const CONNECT_UNIX: &str = "aw_connect_unix";
    pub const SENDMSG_UNIX: &str = "aw_sendmsg_unix";
    pub const UNIX: [(&str, u32); 2] = [(CONNECT_UNIX, 49), (SENDMSG_UNIX, 50)];
    /// Task-scoped programs (BPF LSM), attached once for the whole host; each judges only
    /// tasks of enforced cgroups. Program name and the LSM hook it attaches to.
    pub const LSM_CONNECT: &str = "aw_lsm_connect";
    pub const LSM_SENDMSG: &str = "aw_lsm_sendmsg";
    pub const LSM: [(&str, &str); 2] = [
        (LSM_CONNECT, "socket_connect"),
        (LSM_SENDMSG, "socket_sendmsg"),
    ];
}
