//! Where things live unless told otherwise. Documented in README.md.

pub const CONFIG_FILE: &str = "/etc/agentwall/agentwall.yaml";
pub const POLICY_DIR: &str = "/etc/agentwall/policies";
pub const STATE_DIR: &str = "/var/lib/agentwall";
pub const PIN_DIR: &str = "/sys/fs/bpf/agentwall";
pub const SOCKET: &str = "/run/agentwall/admin.sock";
pub const ENROLL_SOCKET: &str = "/run/agentwall/enroll.sock";
/// Any local process may try to enroll: the certificate and the selectors decide.
pub const ENROLL_SOCKET_MODE: u32 = 0o666;
/// The SPIFFE Workload API (`SPIFFE_ENDPOINT_SOCKET` of agents launched with
/// `agentwall exec --identity`).
pub const WORKLOAD_SOCKET: &str = "/run/agentwall/workload.sock";
/// Any local process may ask: the kernel's account of its cgroup decides what it gets.
pub const WORKLOAD_SOCKET_MODE: u32 = 0o666;
/// The decision API (callees and gateways ask whether a caller may act).
pub const DECISION_SOCKET: &str = "/run/agentwall/decision.sock";
/// Any local process may ask; the answers name rules, not secrets.
pub const DECISION_SOCKET_MODE: u32 = 0o666;
/// Where `agentwall exec --cert` puts the files of the agents it launches.
pub const AGENT_DIR: &str = "/run/agentwall/agents";
/// The audit key, away from the state directory that holds the log.
pub const AUDIT_KEY: &str = "/etc/agentwall/audit.key";
/// The secret store's master key (created on first use).
pub const SECRETS_KEY: &str = "/etc/agentwall/secrets.key";
pub const CGROUP_ROOT: &str = "agentwall";
/// Trust domain of the embedded CA.
pub const TRUST_DOMAIN: &str = "agentwall.local";
