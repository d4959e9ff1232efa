//! Daemon configuration: embedded defaults, an optional YAML file, command-line overrides.
//!
//! Size: the file, its overrides and every cross-section check, each with its error text;
//! about 160 lines are tests. Sections a module owns live there (`identity::config`).

use std::{
    fs,
    path::{Path, PathBuf},
};

use agentwall_common::maps;
use serde::Deserialize;

use crate::clock::duration_text;
pub use crate::identity::config::{BundleEntry, IdentityConfig};

pub use crate::defaults;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_norway::Error,
    },
    #[error("config {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Kernel map sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Cgroups that can be bound at once.
    pub max_bindings: u32,
    /// Prefix nodes in the rules trie, both generations together during a swap.
    pub max_rule_nodes: u32,
    /// Event ring buffer size in bytes: a power of two, at least one page.
    pub event_ring_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bindings: maps::DEFAULT_MAX_BINDINGS,
            max_rule_nodes: maps::DEFAULT_MAX_RULE_NODES,
            event_ring_bytes: maps::DEFAULT_EVENT_RING_BYTES,
        }
    }
}

/// Event budgets: how many verdict records each agent may write (see
/// `agentwall_common::budget`). Past its budget an agent's verdicts are still enforced and
/// counted, into one summary record per interval instead of one record each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Verdict records a second each cgroup may write, in bursts of up to `cgroup_burst`;
    /// 0 turns the budgets off (every verdict is recorded, as a flood may then overflow
    /// the kernel's ring for everyone).
    pub cgroup_rate: u32,
    pub cgroup_burst: u32,
    /// The same for all cgroups of one identity (policy) together; 0 for no such budget.
    pub identity_rate: u32,
    pub identity_burst: u32,
    /// How often the verdicts held back are written as summary records.
    #[serde(with = "duration_text")]
    pub summary_every: std::time::Duration,
    /// An agent past its budget raises an `event_flood` alert at most this often.
    #[serde(with = "duration_text")]
    pub flood_alert_every: std::time::Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            cgroup_rate: 200,
            cgroup_burst: 2000,
            identity_rate: 1000,
            identity_burst: 10_000,
            summary_every: std::time::Duration::from_secs(10),
            flood_alert_every: std::time::Duration::from_secs(300),
        }
    }
}

/// The highest event budget rate, in records a second.
const MAX_EVENT_RATE: u32 = 1_000_000;

/// What is wrong with the `events:` section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventsProblem {
    #[error(
        "{name}_rate {rate} is above {MAX_EVENT_RATE} records a second; use 0 to turn the budget off"
    )]
    RateTooHigh { name: &'static str, rate: u32 },
    #[error("{name}_burst must be at least 1 when {name}_rate is set")]
    NoBurst { name: &'static str },
    #[error("summary_every must be between 1s and 1h")]
    SummaryEvery,
    #[error("flood_alert_every must be above zero")]
    FloodAlertEvery,
}

impl EventsConfig {
    /// The budgets as the kernel programs read them.
    pub fn kernel(&self) -> agentwall_common::budget::BudgetConfig {
        use agentwall_common::budget::{BudgetConfig, Rate};
        BudgetConfig {
            cgroup: Rate::new(self.cgroup_rate, self.cgroup_burst),
            // An identity budget without a cgroup budget is never consulted.
            identity: Rate::new(self.identity_rate, self.identity_burst),
        }
    }

    fn check(&self) -> Result<(), EventsProblem> {
        for (name, rate, burst) in [
            ("cgroup", self.cgroup_rate, self.cgroup_burst),
            ("identity", self.identity_rate, self.identity_burst),
        ] {
            if rate > MAX_EVENT_RATE {
                return Err(EventsProblem::RateTooHigh { name, rate });
            }
            if rate > 0 && burst == 0 {
                return Err(EventsProblem::NoBurst { name });
            }
        }
        if self.summary_every < std::time::Duration::from_secs(1)
            || self.summary_every > std::time::Duration::from_secs(3600)
        {
            return Err(EventsProblem::SummaryEvery);
        }
        if self.flood_alert_every.is_zero() {
            return Err(EventsProblem::FloodAlertEvery);
        }
        Ok(())
    }
}

/// The daemon's configuration, as a file may give it; every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub policy_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    /// A group whose members may use the admin socket besides root.
    pub socket_group: Option<String>,
    /// The managed cgroup subtree, relative to the cgroup v2 mount.
    pub cgroup_root: Option<String>,
    /// Further cgroups (relative to the mount) to enforce, each with the policy to bind.
    #[serde(default)]
    pub enforce: Vec<EnforceEntry>,
    #[serde(default)]
    pub limits: Limits,
    pub log_format: Option<LogFormat>,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub enrollment: EnrollmentConfig,
    #[serde(default)]
    pub workload: WorkloadConfig,
    #[serde(default)]
    pub decision: DecisionConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub detect: crate::audit::detect::DetectConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub events: EventsConfig,
    #[serde(default)]
    pub exec: ExecConfig,
    #[serde(default)]
    pub names: NamesConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
    #[serde(default)]
    pub secrets: SecretsConfig,
}

/// The secret store (`crate::secrets`, docs/secrets.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// The master key file (64 hex digits a line, the current key first), outside the store;
    /// created (0600) on first use.
    pub key_file: PathBuf,
    /// The store's directory (default: `<state dir>/secrets`).
    pub dir: Option<PathBuf>,
    /// Databases whose credentials are issued per lease (`database/SERVICE`).
    pub databases: Vec<crate::secrets::postgres::DatabaseConfig>,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        Self {
            key_file: PathBuf::from(defaults::SECRETS_KEY),
            dir: None,
            databases: Vec::new(),
        }
    }
}

/// The fleet: revocations shared with the other nodes through etcd (`crate::fleet`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// The etcd cluster's client URLs (`http://10.0.0.5:2379`); no fleet when empty.
    pub etcd: Vec<String>,
    /// The key prefix of this fleet in etcd.
    pub prefix: String,
    /// This node's name in what it publishes (default: the host name).
    pub node: Option<String>,
    /// Files with the public keys (hex) whose signed policy bundles this node puts in force.
    /// With any, the policies come from the fleet's bundles, not the policy directory.
    pub policy_keys: Vec<PathBuf>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            etcd: Vec::new(),
            prefix: "/agentwall".into(),
            node: None,
            policy_keys: Vec::new(),
        }
    }
}

impl FleetConfig {
    /// This node's name: the configured one, else the host name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "unnamed".into())
        })
    }
}

/// Host names of the services catalog: how the daemon resolves them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamesConfig {
    /// DNS servers (address and port) to ask; the system's (`/etc/resolv.conf`) if empty.
    pub servers: Vec<std::net::SocketAddr>,
    /// The shortest time an answer is kept, whatever its TTL (a TTL of 0 would make the
    /// daemon ask without pause).
    #[serde(with = "duration_text")]
    pub min_ttl: std::time::Duration,
    /// An answer is asked again this long before it expires (or at half its TTL, if that is
    /// sooner), so that the next one is in the kernel in time.
    #[serde(with = "duration_text")]
    pub refresh_before: std::time::Duration,
}

impl Default for NamesConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            min_ttl: std::time::Duration::from_secs(5),
            refresh_before: std::time::Duration::from_secs(10),
        }
    }
}

/// `agentwall exec`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecConfig {
    /// The host uids a command that runs as root is mapped to (see `rootuid`).
    pub root_uids: crate::rootuid::RootUids,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of `GET /metrics` (for example `127.0.0.1:9469`); off when absent.
    pub listen: Option<std::net::SocketAddr>,
}

/// The audit log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Directory of the segments (default: `<state dir>/audit`).
    pub dir: Option<PathBuf>,
    /// File with the encryption key (64 hex digits), outside the log's directory; created on
    /// first start if missing. AGENTWALL_AUDIT_KEY, if set, is used instead.
    pub key_file: PathBuf,
    /// A segment is closed at this size or age.
    pub rotate_bytes: u64,
    #[serde(with = "duration_text")]
    pub rotate_age: std::time::Duration,
    /// How often the chain head is signed into a checkpoint.
    #[serde(with = "duration_text")]
    pub checkpoint_every: std::time::Duration,
    /// Also write every durable record as a JSON line on stdout (for log shippers).
    pub stdout: bool,
    /// Also forward every durable record to a syslog collector (RFC 5424 over TCP and TLS).
    pub syslog: Option<crate::audit::forward::SyslogConfig>,
    /// What new flows meet while the log cannot be written: `enforce` (the policy, as
    /// always) or `deny` (everything in enforced cgroups is denied until the log is back).
    pub when_down: WhenDown,
    /// Retention: the segments together stay under `retain_bytes` and under
    /// `retain_percent` of the audit file system; the oldest sealed ones go first (copied to
    /// `archive_dir` first, if set). `retain_age` (0: none) also removes older ones.
    pub retain_bytes: u64,
    pub retain_percent: u8,
    #[serde(with = "duration_text")]
    pub retain_age: std::time::Duration,
    pub archive_dir: Option<PathBuf>,
    /// An `audit_space_low` alert when the audit file system has less than this share free.
    pub space_warn_percent: u8,
}

impl AuditConfig {
    /// Retention as the writer applies it.
    pub fn retention(&self) -> crate::audit::retention::Retention {
        crate::audit::retention::Retention {
            max_bytes: self.retain_bytes,
            max_percent: self.retain_percent,
            max_age: self.retain_age,
            archive: self.archive_dir.clone(),
            warn_free_percent: self.space_warn_percent,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenDown {
    #[default]
    Enforce,
    Deny,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            dir: None,
            key_file: PathBuf::from(defaults::AUDIT_KEY),
            rotate_bytes: 64 << 20,
            rotate_age: std::time::Duration::from_secs(3600),
            checkpoint_every: std::time::Duration::from_secs(10),
            stdout: false,
            syslog: None,
            when_down: WhenDown::Enforce,
            retain_bytes: 1 << 30,
            retain_percent: 50,
            retain_age: std::time::Duration::ZERO,
            archive_dir: None,
            space_warn_percent: 20,
        }
    }
}

/// The enrollment socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrollmentConfig {
    pub socket: PathBuf,
    /// File mode of the socket, such as 0666 (YAML octal `0o666` or the string "0666").
    #[serde(deserialize_with = "octal_mode")]
    pub mode: u32,
    /// Owner and group of the socket file.
    pub owner: Option<String>,
    pub group: Option<String>,
}

impl Default for EnrollmentConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(defaults::ENROLL_SOCKET),
            mode: defaults::ENROLL_SOCKET_MODE,
            owner: None,
            group: None,
        }
    }
}

/// The SPIFFE Workload API socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadConfig {
    /// Off: no socket, and `agentwall exec --identity` is refused.
    pub enabled: bool,
    pub socket: PathBuf,
    /// File mode of the socket (0666: any process may ask; its cgroup decides the answer).
    #[serde(deserialize_with = "octal_mode")]
    pub mode: u32,
    pub owner: Option<String>,
    pub group: Option<String>,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: PathBuf::from(defaults::WORKLOAD_SOCKET),
            mode: defaults::WORKLOAD_SOCKET_MODE,
            owner: None,
            group: None,
        }
    }
}

/// The decision API (`crate::decision`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecisionConfig {
    /// Off: neither the socket nor the TCP address.
    pub enabled: bool,
    pub socket: PathBuf,
    /// File mode of the socket.
    #[serde(deserialize_with = "octal_mode")]
    pub mode: u32,
    pub owner: Option<String>,
    pub group: Option<String>,
    /// A TCP address to serve it on with mutual TLS too, such as `127.0.0.1:8443`; none by
    /// default.
    pub listen: Option<std::net::SocketAddr>,
}

impl Default for DecisionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: PathBuf::from(defaults::DECISION_SOCKET),
            mode: defaults::DECISION_SOCKET_MODE,
            owner: None,
            group: None,
            listen: None,
        }
    }
}

fn octal_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u32),
        Text(String),
    }
    let v = match Raw::deserialize(d)? {
        Raw::Number(n) => n,
        Raw::Text(t) => {
            let digits = t.trim().trim_start_matches("0o");
            u32::from_str_radix(digits, 8).map_err(|_| {
                serde::de::Error::custom(format!(
                    "{t:?} is not an octal file mode such as \"0660\""
                ))
            })?
        }
    };
    if v > 0o777 {
        return Err(serde::de::Error::custom(format!(
            "{v:o} is not a file mode (0 to 0777)"
        )));
    }
    Ok(v)
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnforceEntry {
    pub cgroup: String,
    pub policy: String,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub policy_dir: PathBuf,
    pub state_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub socket_group: Option<String>,
    pub cgroup_root: String,
    pub enforce: Vec<EnforceEntry>,
    pub limits: Limits,
    pub log_format: LogFormat,
    pub identity: IdentityConfig,
    pub enrollment: EnrollmentConfig,
    pub workload: WorkloadConfig,
    pub decision: DecisionConfig,
    pub audit: AuditConfig,
    pub detect: crate::audit::detect::DetectConfig,
    pub metrics: MetricsConfig,
    pub events: EventsConfig,
    pub exec: ExecConfig,
    pub names: NamesConfig,
    pub fleet: FleetConfig,
    pub secrets: SecretsConfig,
    /// For tests only: the wall clock time windows are judged by reads this at start and
    /// runs on from there (`agentwall run --test-wall-clock`).
    pub test_wall_clock: Option<jiff::Timestamp>,
}

/// Command-line overrides.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub policy_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub cgroup_root: Option<String>,
    pub log_format: Option<LogFormat>,
    pub enroll_socket: Option<PathBuf>,
    pub workload_socket: Option<PathBuf>,
    pub decision_socket: Option<PathBuf>,
    pub agent_dir: Option<PathBuf>,
    pub audit_dir: Option<PathBuf>,
    pub audit_key: Option<PathBuf>,
    pub test_wall_clock: Option<jiff::Timestamp>,
}

impl Config {
    /// The secret store's directory.
    pub fn secrets_dir(&self) -> PathBuf {
        self.secrets
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("secrets"))
    }

    /// The audit log's directory.
    pub fn audit_dir(&self) -> PathBuf {
        self.audit
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit"))
    }

    /// Reads the config file (the one given, or the default one if it exists) and applies the
    /// overrides.
    pub fn load(o: &Overrides) -> Result<Self, ConfigError> {
        let file = match &o.config {
            Some(path) => Self::read_file(path)?,
            None if Path::new(defaults::CONFIG_FILE).exists() => {
                Self::read_file(Path::new(defaults::CONFIG_FILE))?
            }
            None => FileConfig::default(),
        };
        let cfg = Self {
            policy_dir: pick(&o.policy_dir, file.policy_dir, defaults::POLICY_DIR),
            state_dir: pick(&o.state_dir, file.state_dir, defaults::STATE_DIR),
            pin_dir: pick(&o.pin_dir, file.pin_dir, defaults::PIN_DIR),
            socket: pick(&o.socket, file.socket, defaults::SOCKET),
            socket_group: file.socket_group,
            cgroup_root: o
                .cgroup_root
                .clone()
                .or(file.cgroup_root)
                .unwrap_or_else(|| defaults::CGROUP_ROOT.to_string()),
            enforce: file.enforce,
            limits: file.limits,
            log_format: o.log_format.or(file.log_format).unwrap_or_default(),
            identity: IdentityConfig {
                agent_dir: o.agent_dir.clone().unwrap_or(file.identity.agent_dir),
                ..file.identity
            },
            detect: file.detect,
            metrics: file.metrics,
            events: file.events,
            exec: file.exec,
            names: file.names,
            fleet: file.fleet,
            secrets: file.secrets,
            test_wall_clock: o.test_wall_clock,
            audit: AuditConfig {
                dir: o.audit_dir.clone().or(file.audit.dir),
                key_file: o.audit_key.clone().unwrap_or(file.audit.key_file),
                ..file.audit
            },
            enrollment: crate::config::EnrollmentConfig {
                socket: o.enroll_socket.clone().unwrap_or(file.enrollment.socket),
                ..file.enrollment
            },
            workload: WorkloadConfig {
                socket: o.workload_socket.clone().unwrap_or(file.workload.socket),
                ..file.workload
            },
            decision: DecisionConfig {
                socket: o.decision_socket.clone().unwrap_or(file.decision.socket),
                ..file.decision
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_norway::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.secrets.key_file == self.audit.key_file {
            return Err(ConfigError::Invalid {
                field: "secrets.key_file",
                message: "the secrets master key must be a file of its own, not the audit key \
                          (readers of the audit log hold that one)"
                    .into(),
            });
        }
        let mut services = std::collections::BTreeSet::new();
        for db in &self.secrets.databases {
            db.check().map_err(|message| ConfigError::Invalid {
                field: "secrets.databases",
                message,
            })?;
            if !services.insert(db.service.as_str()) {
                return Err(ConfigError::Invalid {
                    field: "secrets.databases",
                    message: format!("{} is listed twice", db.service),
                });
            }
        }
        for url in &self.fleet.etcd {
            let rest = url.strip_prefix("http://").unwrap_or_default();
            if rest.is_empty() || rest.contains('/') {
                return Err(ConfigError::Invalid {
                    field: "fleet.etcd",
                    message: format!(
                        "{url:?} is not an etcd client URL of the form http://HOST:PORT \
                         (TLS to etcd is not supported yet: reach etcd over a private network \
                         or a local TLS proxy)"
                    ),
                });
            }
        }
        if !self.fleet.policy_keys.is_empty() && self.fleet.etcd.is_empty() {
            return Err(ConfigError::Invalid {
                field: "fleet.policy_keys",
                message: "policy bundles come through etcd: name it under fleet.etcd".into(),
            });
        }
        let prefix = &self.fleet.prefix;
        if !prefix.starts_with('/') || prefix.trim_end_matches('/').is_empty() {
            return Err(ConfigError::Invalid {
                field: "fleet.prefix",
                message: format!("{prefix:?} must start with / and name more than the root"),
            });
        }
        if let Some(node) = &self.fleet.node
            && (node.is_empty() || node.len() > 255 || node.chars().any(char::is_control))
        {
            return Err(ConfigError::Invalid {
                field: "fleet.node",
                message: "must be 1 to 255 bytes without control characters".into(),
            });
        }
        let root = self.cgroup_root.trim_matches('/');
        if root.is_empty() {
            return Err(ConfigError::Invalid {
                field: "cgroup_root",
                message: "must name a cgroup below the cgroup v2 mount, not the root cgroup".into(),
            });
        }
        // Agents reach these sockets by the names the kernel's Unix rules hold: a relative
        // name would be resolved against each caller's directory, not the daemon's.
        for (field, path) in [
            ("socket", &self.socket),
            ("enrollment.socket", &self.enrollment.socket),
            ("workload.socket", &self.workload.socket),
            ("decision.socket", &self.decision.socket),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!("{} must be an absolute path", path.display()),
                });
            }
        }
        if let Err(e) = self.exec.root_uids.check() {
            return Err(ConfigError::Invalid {
                field: "exec.root_uids",
                message: e.to_string(),
            });
        }
        let l = &self.limits;
        if !l.event_ring_bytes.is_power_of_two() || l.event_ring_bytes < 4096 {
            return Err(ConfigError::Invalid {
                field: "limits.event_ring_bytes",
                message: format!(
                    "{} is not a power of two of at least 4096",
                    l.event_ring_bytes
                ),
            });
        }
        if l.max_rule_nodes < 2 || l.max_bindings < 1 {
            return Err(ConfigError::Invalid {
                field: "limits",
                message: "max_rule_nodes must be at least 2 and max_bindings at least 1".into(),
            });
        }
        let id = &self.identity;
        if let Err(e) = crate::identity::spiffe::SpiffeId::trust_domain_only(&id.trust_domain) {
            return Err(ConfigError::Invalid {
                field: "identity.trust_domain",
                message: e.to_string(),
            });
        }
        for b in &id.bundles {
            if let Err(e) = crate::identity::spiffe::SpiffeId::trust_domain_only(&b.trust_domain) {
                return Err(ConfigError::Invalid {
                    field: "identity.bundles.trust_domain",
                    message: e.to_string(),
                });
            }
        }
        let (lo, hi) = (
            crate::identity::svid::MIN_LIFETIME,
            crate::identity::svid::MAX_LIFETIME,
        );
        if id.svid_lifetime < lo || id.svid_lifetime > hi {
            return Err(ConfigError::Invalid {
                field: "identity.svid_lifetime",
                message: format!(
                    "{} is outside {} to {}",
                    humantime::format_duration(id.svid_lifetime),
                    humantime::format_duration(lo),
                    humantime::format_duration(hi)
                ),
            });
        }
        if id.renew_before >= id.svid_lifetime {
            return Err(ConfigError::Invalid {
                field: "identity.renew_before",
                message: "must be shorter than identity.svid_lifetime".into(),
            });
        }
        if id.token_lifetime.is_zero() || id.token_lifetime > std::time::Duration::from_secs(3600) {
            return Err(ConfigError::Invalid {
                field: "identity.token_lifetime",
                message: "must be between 1s and 1h".into(),
            });
        }
        if id.clock_skew > crate::identity::token::MAX_LEEWAY {
            return Err(ConfigError::Invalid {
                field: "identity.clock_skew",
                message: format!(
                    "must be at most {}: a larger one keeps expired certificates and tokens \
                     valid that long; fix the clocks (NTP) instead",
                    humantime::format_duration(crate::identity::token::MAX_LEEWAY)
                ),
            });
        }
        let audit_dir = self.audit_dir();
        if self.audit.key_file.parent() == Some(audit_dir.as_path())
            || self.audit.key_file.starts_with(&audit_dir)
        {
            return Err(ConfigError::Invalid {
                field: "audit.key_file",
                message: "the key must not be stored beside the log it protects; keep it \
                          outside the audit directory"
                    .into(),
            });
        }
        if let Some(s) = &self.audit.syslog {
            s.check().map_err(|e| ConfigError::Invalid {
                field: "audit.syslog",
                message: e.to_string(),
            })?;
        }
        if let Some(w) = &self.detect.webhook {
            w.check().map_err(|e| ConfigError::Invalid {
                field: "detect.webhook",
                message: e.to_string(),
            })?;
        }
        self.events.check().map_err(|e| ConfigError::Invalid {
            field: "events",
            message: e.to_string(),
        })?;
        let d = &self.detect;
        if d.burst_factor.is_nan()
            || d.burst_factor <= 1.0
            || d.denials == 0
            || d.denial_window.is_zero()
        {
            return Err(ConfigError::Invalid {
                field: "detect",
                message: "burst_factor must be above 1, denials at least 1 and denial_window \
                          above zero"
                    .into(),
            });
        }
        if self.audit.rotate_bytes < 4096 || self.audit.checkpoint_every.is_zero() {
            return Err(ConfigError::Invalid {
                field: "audit",
                message: "rotate_bytes must be at least 4096 and checkpoint_every above zero"
                    .into(),
            });
        }
        let a = &self.audit;
        if a.retain_bytes < a.rotate_bytes.saturating_mul(2)
            || !(1..=100).contains(&a.retain_percent)
            || a.space_warn_percent > 90
        {
            return Err(ConfigError::Invalid {
                field: "audit",
                message: format!(
                    "retain_bytes ({}) must be at least twice rotate_bytes ({}), retain_percent \
                     between 1 and 100, space_warn_percent at most 90",
                    a.retain_bytes, a.rotate_bytes
                ),
            });
        }
        if let Some(archive) = &a.archive_dir
            && (!archive.is_absolute() || archive.starts_with(&audit_dir))
        {
            return Err(ConfigError::Invalid {
                field: "audit.archive_dir",
                message: format!(
                    "{} must be an absolute path outside the audit directory",
                    archive.display()
                ),
            });
        }
        for e in &self.enforce {
            if e.cgroup.trim_matches('/').is_empty() {
                return Err(ConfigError::Invalid {
                    field: "enforce.cgroup",
                    message: "the root cgroup cannot be enforced: every process of the host \
                              lives there"
                        .into(),
                });
            }
        }
        Ok(())
    }
}

fn pick(flag: &Option<PathBuf>, file: Option<PathBuf>, default: &str) -> PathBuf {
    flag.clone()
        .or(file)
        .unwrap_or_else(|| PathBuf::from(default))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::svid::KeyAlgorithm;

    #[test]
    fn defaults_apply_without_file() {
        let o = Overrides {
            config: Some(PathBuf::from("/dev/null")),
            ..Default::default()
        };
        let c = Config::load(&o).unwrap();
        assert_eq!(c.pin_dir, Path::new(defaults::PIN_DIR));
        assert_eq!(c.cgroup_root, "agentwall");
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn unknown_field_is_named() {
        let dir = std::env::temp_dir().join(format!("aw-config-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.yaml");
        fs::write(&p, "pin_dir: /x\nsocket_gruop: admins\n").unwrap();
        let o = Overrides {
            config: Some(p),
            ..Default::default()
        };
        let e = Config::load(&o).unwrap_err().to_string();
        assert!(e.contains("socket_gruop") && e.contains("line 2"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }

    fn load_text(name: &str, text: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("aw-config-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.yaml");
        fs::write(&p, text).unwrap();
        let r = Config::load(&Overrides {
            config: Some(p),
            ..Default::default()
        });
        fs::remove_dir_all(dir).unwrap();
        r
    }

    #[test]
    fn the_secrets_key_is_not_the_audit_key() {
        let e = load_text(
            "secrets",
            "audit:\n  key_file: /etc/k\nsecrets:\n  key_file: /etc/k\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("secrets.key_file") && e.contains("not the audit key"),
            "{e}"
        );
        let c = load_text("secrets-ok", "secrets:\n  dir: /srv/s\n").unwrap();
        assert_eq!(c.secrets_dir(), Path::new("/srv/s"));
        assert_eq!(c.secrets.key_file, Path::new(defaults::SECRETS_KEY));
    }

    #[test]
    fn identity_and_enrollment_settings() {
        let c = load_text(
            "id",
            "identity:\n  trust_domain: example.org\n  svid_lifetime: 30m\n  bundles:\n    - trust_domain: spire.example\n      file: /etc/b.pem\nenrollment:\n  mode: \"0660\"\n  group: agents\n",
        )
        .unwrap();
        assert_eq!(c.identity.trust_domain, "example.org");
        assert_eq!(
            c.identity.svid_lifetime,
            std::time::Duration::from_secs(1800)
        );
        assert_eq!(
            c.identity.token_lifetime,
            std::time::Duration::from_secs(300)
        );
        assert_eq!(c.enrollment.mode, 0o660);
        assert_eq!(c.identity.bundles[0].trust_domain, "spire.example");
        assert_eq!(c.identity.key_algorithm, KeyAlgorithm::Ed25519);
        let p256 = load_text("p256", "identity:\n  key_algorithm: ecdsa-p256\n").unwrap();
        assert_eq!(p256.identity.key_algorithm, KeyAlgorithm::EcdsaP256);
        for (text, want) in [
            (
                "identity:\n  trust_domain: Example.org\n",
                "identity.trust_domain",
            ),
            (
                "identity:\n  svid_lifetime: 10s\n",
                "identity.svid_lifetime",
            ),
            ("identity:\n  svid_lifetime: soon\n", "not a duration"),
            ("identity:\n  renew_before: 2h\n", "identity.renew_before"),
            (
                "identity:\n  key_algorithm: rsa\n",
                "expected `ed25519` or `ecdsa-p256`",
            ),
            ("enrollment:\n  mode: \"0999\"\n", "octal file mode"),
            (
                "identity:\n  bundles:\n    - trust_domain: a/b\n      file: x\n",
                "identity.bundles",
            ),
        ] {
            let e = load_text("bad", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_example_config_parses_and_shows_the_defaults() {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agentwall.example.yaml");
        let from_example = Config::load(&Overrides {
            config: Some(example),
            ..Default::default()
        })
        .unwrap();
        let defaults = Config::load(&Overrides {
            config: Some(PathBuf::from("/dev/null")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(format!("{from_example:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn event_budgets_are_checked() {
        let off = load_text("events-off", "events:\n  cgroup_rate: 0\n").unwrap();
        assert_eq!(off.events.kernel().cgroup.interval_ns, 0);
        let on = load_text("events-on", "").unwrap();
        assert_eq!(on.events.kernel().cgroup.interval_ns, 5_000_000);
        for (text, want) in [
            ("events:\n  cgroup_rate: 2000000\n", "above 1000000"),
            (
                "events:\n  identity_burst: 0\n",
                "identity_burst must be at least 1",
            ),
            ("events:\n  summary_every: 100ms\n", "between 1s and 1h"),
            ("events:\n  flood_alert_every: 0s\n", "flood_alert_every"),
            ("events:\n  rate: 5\n", "unknown field `rate`"),
            (
                "socket: run/agentwall.sock\n",
                "socket: run/agentwall.sock must be an absolute path",
            ),
            (
                "enrollment:\n  socket: enroll.sock\n",
                "enrollment.socket: enroll.sock must be an absolute path",
            ),
            (
                "exec:\n  root_uids: { first: 1000, count: 10 }\n",
                "exec.root_uids: first 1000 is below 65536",
            ),
        ] {
            let e = load_text("events-bad", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn root_cgroup_is_refused() {
        let dir = std::env::temp_dir().join(format!("aw-config-root-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.yaml");
        fs::write(&p, "cgroup_root: /\n").unwrap();
        let o = Overrides {
            config: Some(p),
            ..Default::default()
        };
        assert!(
            Config::load(&o)
                .unwrap_err()
                .to_string()
                .contains("root cgroup")
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
