//! The loaded kernel programs and their maps.
//!
//! [`Enforcer`] owns the [`aya::Ebpf`] object. The daemon keeps it on one thread (see
//! [`actor`]) and other tasks send it typed commands; tests use it directly.
//!
//! Kernel maps (names in `agentwall_common::maps`):
//! - `AW_BINDINGS` cgroup id → [`Binding`]: the identity slot and flags of every enforced
//!   cgroup. No entry means deny.
//! - `AW_RULES` (slot, generation, destination prefix) → [`RuleSet`].
//! - `AW_INGRESS` (slot, generation, peer prefix) → [`RuleSet`] of local TCP ports.
//! - `AW_PEERS` (generation, callee slot, caller slot) → [`RuleSet`] of the callee's TCP
//!   ports, and `AW_CALLERS`, the enforced cgroup that sent each SYN
//!   (`agentwall_common::peers`).
//! - `AW_STATE` [0] → [`PolicyState`]: the active generation.
//! - `AW_COUNTERS` per-CPU counters (`agentwall_common::counters`).
//! - `AW_EVENTS` ring buffer of `agentwall_common::event::Event`.
//! - `AW_ENFORCED` cgroup id → 0: the cgroups whose tasks the task-scoped (BPF LSM) programs
//!   judge, with their descendants. A cgroup enters it before the cgroup programs attach.
//!
//! Size: [`Enforcer`] owns the aya object, so loading, pinning and every map operation go
//! through this one type; `actor`, `layout`, `unix` and `budgets` hold the rest.

pub mod actor;
pub mod budgets;
mod generation;
pub mod layout;
mod pins;
mod unix;
pub mod windows;

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    os::fd::AsFd as _,
    path::PathBuf,
    thread,
    time::Duration,
};

use agentwall_common::{
    binding::{Binding, flags},
    counters,
    maps::{self, programs},
    peers::PeerKey,
    rules::{Limit, RuleKey, RuleSet, WindowSpans},
    state::{BindingCacheEntry, DecisionCacheEntry, FlowCacheEntry, PolicyState},
    unix::UnixKey,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf, lpm_trie::LpmTrie},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, Lsm,
        ProgramError, links::FdLink,
    },
};
use serde::Serialize;

use self::generation::{next_generation, purge_keys, purge_trie, write_trie};
pub use self::pins::PinLayout;
use crate::{
    cgroup::{Cgroup, CgroupError},
    config::Limits,
    policy::Compiled,
};

/// The kernel object, compiled from `ebpf/` by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentwall"));

/// The kernel programs' object this binary loads.
pub fn kernel_object() -> &'static [u8] {
    OBJECT
}

/// How long a superseded rule generation stays in the trie after the flip: longer than any
/// program run that read the old generation number (they run under RCU, in microseconds).
const GENERATION_GRACE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("bpffs at {path}: {message}")]
    Bpffs { path: PathBuf, message: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinned map {path}: {message}")]
    PinnedMap { path: PathBuf, message: String },
    #[error("pin layout in {dir}: {message}")]
    PinLayout { dir: PathBuf, message: String },
    #[error(
        "loading the kernel programs: {0} (needs root, or CAP_BPF with CAP_NET_ADMIN, and a kernel with BPF and cgroup BPF enabled)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the kernel object has no {kind} named {name}: the build is inconsistent")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("kernel program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {name} to cgroup {cgroup}: {message}")]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        message: String,
    },
    #[error("map {map}: {op}: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "the policy needs {needed} rule nodes but the kernel map holds {capacity} with {in_use} in use; raise limits.max_rule_nodes"
    )]
    Capacity {
        needed: usize,
        in_use: usize,
        capacity: u32,
    },
    #[error(
        "the policy's agent: rules make {needed} (callee, caller) pairs but the kernel map holds {capacity} with {in_use} in use (two generations meet during a swap); fewer distinct callers per callee, or split the agents over hosts"
    )]
    PeersCapacity {
        needed: usize,
        in_use: usize,
        capacity: u32,
    },
    #[error("binding flags {0:#x} are not known to this version")]
    BadFlags(u32),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    NotPrivate(crate::state::StateError),
}

/// Whether the task-scoped programs (BPF LSM) are in force, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskHooks {
    Active,
    /// Sockets created outside an enforced cgroup and used inside are not judged.
    Missing(String),
}

/// Why the task-scoped programs cannot run here, if they cannot. The kernel lists its active
/// LSMs in securityfs, which is mounted first if it is not (as systemd does at boot).
fn task_hooks_unsupported() -> Option<String> {
    const SECURITYFS: &str = "/sys/kernel/security";
    const LSM_LIST: &str = "/sys/kernel/security/lsm";
    if !std::path::Path::new(LSM_LIST).exists() {
        if let Err(e) = nix::mount::mount(
            Some("securityfs"),
            SECURITYFS,
            Some("securityfs"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            None::<&str>,
        ) {
            return Some(format!(
                "securityfs is not mounted and mounting it at {SECURITYFS} failed ({e}): mount it to let agentwall find the BPF LSM"
            ));
        }
        tracing::info!(path = SECURITYFS, "mounted securityfs");
    }
    match fs::read_to_string(LSM_LIST) {
        Ok(list) if list.trim().split(',').any(|l| l == "bpf") => None,
        Ok(list) => Some(format!(
            "the BPF LSM is not active (active: {}); boot with `bpf` in lsm= (CONFIG_BPF_LSM=y)",
            list.trim()
        )),
        Err(e) => Some(format!("cannot read {LSM_LIST}: {e}")),
    }
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> EnforceError {
    move |source| EnforceError::Map { map, op, source }
}

/// Counter totals and the per-CPU event drops.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub totals: BTreeMap<&'static str, u64>,
    pub events_dropped_per_cpu: Vec<u64>,
}

/// The loaded programs and maps.
pub struct Enforcer {
    ebpf: Ebpf,
    layout: PinLayout,
    bindings: HashMap<MapData, u64, Binding>,
    rules: LpmTrie<MapData, RuleKey, RuleSet>,
    ingress: LpmTrie<MapData, RuleKey, RuleSet>,
    /// Callers admitted by who they are (`agent:` rules), by generation.
    peers: HashMap<MapData, PeerKey, RuleSet>,
    state: Array<MapData, PolicyState>,
    counters: PerCpuArray<MapData, u64>,
    enforced: HashMap<MapData, u64, u32>,
    generation: u32,
    /// The last generation number written to, in force or not: a write that failed is never
    /// written again under the same number, so that whatever its purge missed cannot come
    /// into force with a later policy.
    last_written: u32,
    /// Nodes in the rules trie, kept as they are written and purged: counting the trie's
    /// keys is a system call each, too slow for every status read and reload.
    rule_nodes: usize,
    max_rule_nodes: u32,
    /// Cgroups this instance attached to.
    attached: HashSet<u64>,
    task_hooks: TaskHooks,
    /// The Unix socket programs, or why they are missing.
    unix: Result<unix::UnixPrograms, unix::UnixUnavailable>,
    unix_rules: HashMap<MapData, UnixKey, u32>,
    /// Rate limits by (generation, rule id), and their buckets by (slot, bucket).
    limits: HashMap<MapData, u64, Limit>,
    rate_buckets: HashMap<MapData, u64, u64>,
    windows: HashMap<MapData, u64, WindowSpans>,
    /// The windows of the generation in force, written again as their spans pass.
    windows_in_force: Vec<crate::policy::compile::WindowEntry>,
    /// Which of them were open at the last look: a change bumps the epoch.
    windows_open: Vec<bool>,
    wall_clock: windows::WallClock,
    /// Until the daemon takes them ([`Self::take_budgets`]).
    budgets: Option<budgets::EventBudgets>,
    /// How long the last [`Self::apply`] took to put its generation in force (the write and
    /// the flip, before the grace and the removal of the old one).
    last_in_force_after: Option<Duration>,
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer")
            .field("pin_dir", &self.layout.root())
            .field("generation", &self.generation)
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl Enforcer {
    /// Loads the programs into the kernel, reusing the pinned maps of a previous daemon if
    /// any. Returns the event ring buffer separately: it is read by its own task.
    pub fn load(
        pin_dir: &std::path::Path,
        limits: &Limits,
    ) -> Result<(Self, RingBuf<MapData>), EnforceError> {
        let layout = PinLayout::new(pin_dir);
        layout.prepare()?;
        let found = pins::take_over(&layout)?;
        // The task-scoped programs need the kernel's structure layout; without it (or without
        // the BPF LSM) they are not loaded, and status says so.
        let kernel_layout = match task_hooks_unsupported() {
            Some(why) => Err(why),
            None => self::layout::from_kernel().map_err(|e| e.to_string()),
        };
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(layout.maps())
            .map_max_entries(maps::BINDINGS, limits.max_bindings)
            .map_max_entries(maps::ENFORCED, limits.max_bindings)
            .map_max_entries(maps::RULES, limits.max_rule_nodes)
            .map_max_entries(maps::EVENTS, limits.event_ring_bytes)
            .map_max_entries(
                maps::BUDGETS,
                limits.max_bindings.saturating_mul(4).saturating_add(1),
            );
        if let Ok(l) = &kernel_layout {
            loader.override_global(agentwall_common::lsm::LAYOUT_GLOBAL, l, true);
        }
        let mut ebpf = loader.load(OBJECT).map_err(EnforceError::Load)?;
        for name in programs::ALL {
            let prog = ebpf.program_mut(name).ok_or(EnforceError::Missing {
                kind: "program",
                name,
            })?;
            let r = match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::CgroupSkb(p) => p.load(),
                aya::programs::Program::CgroupSock(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                _ => {
                    return Err(EnforceError::Missing {
                        kind: "cgroup program",
                        name,
                    });
                }
            };
            r.map_err(|source| EnforceError::Program { name, source })?;
        }
        // Before any map is taken out of `ebpf`: the Unix programs use its maps.
        let unix = unix::check_context(std::path::Path::new(layout::VMLINUX_BTF))
            .and_then(|()| unix::UnixPrograms::load(&ebpf, OBJECT));
        if let Err(why) = &unix {
            tracing::warn!(
                reason = %why,
                "Unix socket enforcement is MISSING: connects and sends to Unix sockets from enforced cgroups are not judged"
            );
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or(EnforceError::Missing { kind: "map", name })
        };
        let bindings = HashMap::try_from(take(&mut ebpf, maps::BINDINGS)?)
            .map_err(map_err(maps::BINDINGS, "opening"))?;
        let rules = LpmTrie::try_from(take(&mut ebpf, maps::RULES)?)
            .map_err(map_err(maps::RULES, "opening"))?;
        let ingress = LpmTrie::try_from(take(&mut ebpf, maps::INGRESS)?)
            .map_err(map_err(maps::INGRESS, "opening"))?;
        let peers = HashMap::try_from(take(&mut ebpf, maps::PEERS)?)
            .map_err(map_err(maps::PEERS, "opening"))?;
        let state: Array<MapData, PolicyState> = Array::try_from(take(&mut ebpf, maps::STATE)?)
            .map_err(map_err(maps::STATE, "opening"))?;
        let enforced = HashMap::try_from(take(&mut ebpf, maps::ENFORCED)?)
            .map_err(map_err(maps::ENFORCED, "opening"))?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, maps::COUNTERS)?)
            .map_err(map_err(maps::COUNTERS, "opening"))?;
        let unix_rules = HashMap::try_from(take(&mut ebpf, maps::UNIX_RULES)?)
            .map_err(map_err(maps::UNIX_RULES, "opening"))?;
        let rate_limits = HashMap::try_from(take(&mut ebpf, maps::LIMITS)?)
            .map_err(map_err(maps::LIMITS, "opening"))?;
        let rate_buckets = HashMap::try_from(take(&mut ebpf, maps::RATE_BUCKETS)?)
            .map_err(map_err(maps::RATE_BUCKETS, "opening"))?;
        let window_spans = HashMap::try_from(take(&mut ebpf, maps::WINDOWS)?)
            .map_err(map_err(maps::WINDOWS, "opening"))?;
        let events = RingBuf::try_from(take(&mut ebpf, maps::EVENTS)?)
            .map_err(map_err(maps::EVENTS, "opening"))?;
        let budgets = budgets::EventBudgets::take(&mut ebpf)?;
        let generation = state
            .get(&0, 0)
            .map_err(map_err(maps::STATE, "reading"))?
            .generation;
        let max_rule_nodes = rules_capacity(&layout).unwrap_or(limits.max_rule_nodes);
        let mut enforcer = Self {
            ebpf,
            layout,
            bindings,
            rules,
            ingress,
            peers,
            state,
            counters,
            enforced,
            generation,
            last_written: generation,
            rule_nodes: 0,
            max_rule_nodes,
            attached: HashSet::new(),
            task_hooks: TaskHooks::Missing(String::new()),
            unix,
            unix_rules,
            limits: rate_limits,
            rate_buckets,
            windows: window_spans,
            windows_in_force: Vec::new(),
            windows_open: Vec::new(),
            wall_clock: windows::WallClock::default(),
            last_in_force_after: None,
            budgets: Some(budgets),
        };
        enforcer.task_hooks = match kernel_layout.and_then(|_| {
            enforcer.attach_task_hooks().map_err(|e| {
                format!(
                    "the kernel refused the BPF LSM programs ({})",
                    crate::error_chain(&e)
                )
            })
        }) {
            Ok(()) => TaskHooks::Active,
            Err(why) => {
                tracing::warn!(
                    reason = %why,
                    "task-scoped enforcement (BPF LSM) is MISSING: sockets created outside an enforced cgroup and used inside it are not judged"
                );
                TaskHooks::Missing(why)
            }
        };
        // A daemon that died while writing a generation leaves its partial nodes behind.
        enforcer.purge_inactive()?;
        // The programs run on the pinned maps now: they are of this layout.
        enforcer.layout.stamp()?;
        if let pins::Found::Layout(v) = found
            && v != pins::LAYOUT_VERSION
        {
            tracing::info!(
                from = v,
                to = pins::LAYOUT_VERSION,
                "took over the pins of an earlier agentwall"
            );
        }
        Ok((enforcer, events))
    }

    /// The event budget maps, once: the daemon sets the budgets before it attaches anything
    /// and reads the summaries on the event reader's thread. Left here, no budget applies.
    pub fn take_budgets(&mut self) -> Option<budgets::EventBudgets> {
        self.budgets.take()
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// Why the Unix socket programs are missing, if they are.
    pub fn unix_hooks_missing(&self) -> Option<&unix::UnixUnavailable> {
        self.unix.as_ref().err()
    }

    pub fn task_hooks(&self) -> &TaskHooks {
        &self.task_hooks
    }

    /// Loads and attaches the task-scoped programs for the whole host and pins their links;
    /// then unpins those of an earlier daemon, so that no moment is without them. They judge
    /// only tasks of the cgroups in `AW_ENFORCED`.
    fn attach_task_hooks(&mut self) -> Result<(), EnforceError> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| EnforceError::Attach {
            name: "task-scoped programs",
            cgroup: PathBuf::from("/"),
            message: format!("reading the kernel's BTF: {e}"),
        })?;
        let dir = self.layout.task_links();
        fs::create_dir_all(&dir).map_err(|source| EnforceError::Io {
            op: "creating",
            path: dir.clone(),
            source,
        })?;
        let old = pins::list(&dir);
        let seq = link_seq();
        for (name, hook) in programs::LSM {
            let prog: &mut Lsm = self
                .ebpf
                .program_mut(name)
                .ok_or(EnforceError::Missing {
                    kind: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| EnforceError::Program { name, source })?;
            prog.load(hook, &btf)
                .map_err(|source| EnforceError::Program { name, source })?;
            let attach_err = |e: &(dyn std::error::Error + 'static)| EnforceError::Attach {
                name,
                cgroup: PathBuf::from("/"),
                message: crate::error_chain(e),
            };
            let id = prog.attach().map_err(|e| attach_err(&e))?;
            let link: FdLink = prog.take_link(id).map_err(|e| attach_err(&e))?.into();
            let path = dir.join(format!("{name}-{seq}"));
            link.pin(&path).map_err(|e| attach_err(&e))?;
        }
        pins::release(old);
        Ok(())
    }

    /// The active rule generation (0: none yet).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Attaches every program to `cgroup` through bpf_link and pins the links; then unpins
    /// links left by an earlier daemon, so the cgroup is never without programs.
    pub fn attach(
        &mut self,
        cgroup: &Cgroup,
        mount: &std::path::Path,
    ) -> Result<u64, EnforceError> {
        cgroup.ensure_not_root(mount)?;
        let id = cgroup.id()?;
        if self.attached.contains(&id) {
            return Ok(id);
        }
        let fd = cgroup.open()?;
        let dir = self.layout.cgroup_links(id);
        fs::create_dir_all(&dir).map_err(|source| EnforceError::Io {
            op: "creating",
            path: dir.clone(),
            source,
        })?;
        let old: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(|source| EnforceError::Io {
                op: "listing",
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let seq = link_seq();
        // The task-scoped programs judge the cgroup's tasks from before its first socket
        // program is attached: a failure here attaches nothing.
        self.enforced
            .insert(id, 0, 0)
            .map_err(map_err(maps::ENFORCED, "adding the cgroup"))?;
        for name in programs::ALL {
            let link = self.attach_one(name, fd.as_fd(), cgroup)?;
            // bpffs refuses names with dots.
            let path = dir.join(format!("{name}-{seq}"));
            link.pin(&path).map_err(|e| EnforceError::Attach {
                name,
                cgroup: cgroup.path().to_path_buf(),
                message: format!(
                    "pinning the link at {}: {}",
                    path.display(),
                    crate::error_chain(&e)
                ),
            })?;
        }
        if let Ok(u) = &self.unix {
            let links = u
                .attach(fd.as_fd())
                .map_err(|(name, e)| EnforceError::Attach {
                    name,
                    cgroup: cgroup.path().to_path_buf(),
                    message: e.to_string(),
                })?;
            for (name, link) in links {
                let path = dir.join(format!("{name}-{seq}"));
                unix::pin(&link, &path).map_err(|e| EnforceError::Attach {
                    name,
                    cgroup: cgroup.path().to_path_buf(),
                    message: format!("pinning the link at {}: {e}", path.display()),
                })?;
            }
        }
        pins::release(old);
        self.attached.insert(id);
        tracing::debug!(cgroup = %cgroup.path().display(), id, "programs attached");
        Ok(id)
    }

    fn attach_one(
        &mut self,
        name: &'static str,
        fd: std::os::fd::BorrowedFd<'_>,
        cgroup: &Cgroup,
    ) -> Result<FdLink, EnforceError> {
        let attach_err = |e: &(dyn std::error::Error + 'static)| EnforceError::Attach {
            name,
            cgroup: cgroup.path().to_path_buf(),
            message: crate::error_chain(e),
        };
        let prog = self.ebpf.program_mut(name).ok_or(EnforceError::Missing {
            kind: "program",
            name,
        })?;
        // Cgroup links always attach in multi mode in the kernel; `Single` is the flag value
        // link_create accepts (see TOOLCHAIN.md).
        let mode = CgroupAttachMode::Single;
        let link: FdLink = match prog {
            aya::programs::Program::CgroupSockAddr(p) => {
                let p: &mut CgroupSockAddr = p;
                let id = p.attach(fd, mode).map_err(|e| attach_err(&e))?;
                p.take_link(id)
                    .map_err(|e| attach_err(&e))?
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| attach_err(&e))?
            }
            aya::programs::Program::CgroupSkb(p) => {
                let p: &mut CgroupSkb = p;
                let direction = if name == programs::INGRESS {
                    CgroupSkbAttachType::Ingress
                } else {
                    CgroupSkbAttachType::Egress
                };
                let id = p.attach(fd, direction, mode).map_err(|e| attach_err(&e))?;
                p.take_link(id)
                    .map_err(|e| attach_err(&e))?
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| attach_err(&e))?
            }
            aya::programs::Program::CgroupSock(p) => {
                let p: &mut CgroupSock = p;
                let id = p.attach(fd, mode).map_err(|e| attach_err(&e))?;
                p.take_link(id)
                    .map_err(|e| attach_err(&e))?
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| attach_err(&e))?
            }
            aya::programs::Program::SockOps(p) => {
                let p: &mut aya::programs::SockOps = p;
                let id = p.attach(fd, mode).map_err(|e| attach_err(&e))?;
                p.take_link(id)
                    .map_err(|e| attach_err(&e))?
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| attach_err(&e))?
            }
            _ => {
                return Err(EnforceError::Missing {
                    kind: "cgroup program",
                    name,
                });
            }
        };
        Ok(link)
    }

    /// Unpins the links of a cgroup, which detaches the programs from it.
    pub fn detach(&mut self, cgroup_id: u64) -> Result<(), EnforceError> {
        let dir = self.layout.cgroup_links(cgroup_id);
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                pins::unpin(&e.path()).map_err(|source| EnforceError::Io {
                    op: "unpinning",
                    path: e.path(),
                    source,
                })?;
            }
        }
        let _ = fs::remove_dir(&dir);
        match self.enforced.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(map_err(maps::ENFORCED, "removing the cgroup")(e)),
        }
        self.attached.remove(&cgroup_id);
        Ok(())
    }

    /// Writes `compiled` as a new generation, flips to it, then removes the old one. If
    /// writing fails the partial generation is removed and the old one stays in force.
    pub fn apply(&mut self, compiled: &Compiled) -> Result<u32, EnforceError> {
        let in_use = self.rule_nodes;
        let needed = compiled.nodes.len();
        if in_use + needed > self.max_rule_nodes as usize {
            return Err(EnforceError::Capacity {
                needed,
                in_use,
                capacity: self.max_rule_nodes,
            });
        }
        let peers_in_use = self.peers.keys().count();
        if peers_in_use + compiled.peers.len() > maps::DEFAULT_MAX_PEERS as usize {
            return Err(EnforceError::PeersCapacity {
                needed: compiled.peers.len(),
                in_use: peers_in_use,
                capacity: maps::DEFAULT_MAX_PEERS,
            });
        }
        let started = std::time::Instant::now();
        let next = next_generation(self.last_written, self.generation);
        self.last_written = next;
        let written = write_trie(&mut self.rules, &compiled.nodes, next)
            .map_err(map_err(maps::RULES, "inserting"))
            .and_then(|()| {
                write_trie(&mut self.ingress, &compiled.ingress, next)
                    .map_err(map_err(maps::INGRESS, "inserting"))
            });
        if let Err(e) = written {
            self.purge_generation(next);
            return Err(e);
        }
        self.rule_nodes += needed;
        for peer in &compiled.peers {
            let key = PeerKey {
                generation: next,
                callee_slot: peer.callee_slot,
                caller_slot: peer.caller_slot,
                _pad: 0,
            };
            if let Err(e) = self.peers.insert(key, peer.set, 0) {
                self.purge_generation(next);
                return Err(map_err(maps::PEERS, "inserting")(e));
            }
        }
        for entry in &compiled.unix {
            let Some(key) = UnixKey::from_policy_name(entry.slot, next, &entry.name) else {
                continue;
            };
            if let Err(e) = self.unix_rules.insert(key, entry.rule_id, 0) {
                self.purge_generation(next);
                return Err(map_err(maps::UNIX_RULES, "inserting")(e));
            }
        }
        if let Err(e) = self
            .write_limits(compiled, next)
            .and_then(|()| self.write_windows(&compiled.windows, next).map(|_| ()))
        {
            self.purge_generation(next);
            return Err(e);
        }
        let epoch = PolicyState::next_epoch(self.epoch());
        if let Err(e) = self.write_state(PolicyState {
            generation: next,
            epoch,
        }) {
            self.purge_generation(next);
            return Err(e);
        }
        self.generation = next;
        self.last_in_force_after = Some(started.elapsed());
        self.windows_in_force.clone_from(&compiled.windows);
        self.windows_open.clear();
        thread::sleep(GENERATION_GRACE);
        self.purge_inactive()?;
        self.purge_buckets(compiled)?;
        Ok(next)
    }

    /// How long the last [`Self::apply`] took to put its generation in force: the write of
    /// the new generation and the flip, before the grace and the removal of the old one.
    pub fn last_in_force_after(&self) -> Option<Duration> {
        self.last_in_force_after
    }

    /// Instructions the verifier went through for each loaded program (kernel 5.16 and later
    /// report it): how close each is to the verifier's limit of 1,000,000.
    pub fn verified_instructions(&self) -> Vec<(String, Option<u32>)> {
        self.ebpf
            .programs()
            .map(|(name, p)| {
                (
                    name.to_string(),
                    p.info().ok().and_then(|i| i.verified_instruction_count()),
                )
            })
            .collect()
    }

    /// Sets the wall clock that time windows are judged by (tests play a chosen time).
    pub fn set_wall_clock(&mut self, clock: windows::WallClock) {
        self.wall_clock = clock;
    }

    /// Writes the spans of `entries` for `generation` as of now; returns how long until the
    /// first of them starts or ends, when they are due again (`None` without windows).
    fn write_windows(
        &mut self,
        entries: &[crate::policy::compile::WindowEntry],
        generation: u32,
    ) -> Result<Option<std::time::Duration>, EnforceError> {
        let now = windows::Now::read(&self.wall_clock);
        let mut due: Option<std::time::Duration> = None;
        for w in entries {
            let (spans, edge) = windows::entry_spans(w, &now);
            self.windows
                .insert(Limit::key(generation, w.rule_id), spans, 0)
                .map_err(map_err(maps::WINDOWS, "writing"))?;
            if let Some(edge) = edge {
                due = Some(due.map_or(edge, |d| d.min(edge)));
            }
        }
        Ok(due)
    }

    /// Writes the spans of the windows in force again, and, when some window opened or closed
    /// since the last write, bumps the epoch so that open flows are judged by them again.
    /// Returns how long until the next edge (`None` without windows).
    pub fn refresh_windows(&mut self) -> Result<Option<std::time::Duration>, EnforceError> {
        if self.windows_in_force.is_empty() {
            return Ok(None);
        }
        let entries = std::mem::take(&mut self.windows_in_force);
        let r = self.write_windows(&entries, self.generation);
        self.windows_in_force = entries;
        // The epoch is bumped at an edge even if a write failed (the kernel's copies of the
        // spans still open and close on time; the flows they allowed expire at the span's
        // end in the flow cache).
        let now = crate::clock::boot_ns();
        let open: Vec<bool> = self
            .windows_in_force
            .iter()
            .map(|w| {
                self.windows
                    .get(&Limit::key(self.generation, w.rule_id), 0)
                    .is_ok_and(|s| s.open(now))
            })
            .collect();
        if open != self.windows_open {
            self.windows_open = open;
            self.bump_epoch()?;
        }
        let due = r?;
        Ok(due)
    }

    /// Writes the rate limits of `compiled` for `generation`, and makes each bucket they name
    /// that does not exist yet (full: a bucket a reload keeps keeps its state).
    fn write_limits(&mut self, compiled: &Compiled, generation: u32) -> Result<(), EnforceError> {
        /// `bpf_map_update_elem` flag: only create.
        const BPF_NOEXIST: u64 = 1;
        for l in &compiled.limits {
            self.limits
                .insert(Limit::key(generation, l.rule_id), l.limit, 0)
                .map_err(map_err(maps::LIMITS, "inserting"))?;
            match self
                .rate_buckets
                .insert(l.limit.bucket_key(l.slot), 0, BPF_NOEXIST)
            {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(map_err(maps::RATE_BUCKETS, "inserting")(e)),
            }
        }
        Ok(())
    }

    /// Removes the buckets no limit of `compiled` (now in force) names.
    fn purge_buckets(&mut self, compiled: &Compiled) -> Result<(), EnforceError> {
        let live: HashSet<u64> = compiled
            .limits
            .iter()
            .map(|l| l.limit.bucket_key(l.slot))
            .collect();
        purge_keys(&mut self.rate_buckets, maps::RATE_BUCKETS, |k| {
            !live.contains(k)
        })
    }

    fn epoch(&self) -> u32 {
        self.state.get(&0, 0).map(|s| s.epoch).unwrap_or_default()
    }

    /// Invalidates every cached flow verdict (`agentwall_common::state::FlowCacheEntry`).
    /// Called after a binding change is in place, so that a packet that sees the new epoch
    /// also sees the new binding.
    fn bump_epoch(&mut self) -> Result<(), EnforceError> {
        self.set_epoch(PolicyState::next_epoch(self.epoch()))
    }

    /// Sets the policy epoch, as a bump to it does (see [`Self::write_state`]): for the bumps
    /// themselves, and for tests of the epoch's wrap.
    pub fn set_epoch(&mut self, epoch: u32) -> Result<(), EnforceError> {
        self.write_state(PolicyState {
            generation: self.generation,
            epoch,
        })
    }

    /// Writes the policy state. Cache entries are trusted while their epoch is the current
    /// one, and the u32 epoch comes back to every value after 2^32 - 1 bumps: an entry that
    /// lived through a whole round would answer again for a state long gone. So the last epoch
    /// of a round is written between two emptyings of every cache, the second one after a
    /// program that read the old state has finished: every entry made before the last epoch
    /// is gone then, and those made under it are gone before it comes back (the epoch skips 0,
    /// which an entry emptied under a program's write may keep).
    fn write_state(&mut self, state: PolicyState) -> Result<(), EnforceError> {
        let last = state.epoch == u32::MAX;
        // The state is written even when emptying fails: the change that bumps the epoch is
        // in place, and cached verdicts must stop answering for it now (an entry living
        // through a round is the smaller risk). The failure is reported.
        let before = if last { self.empty_caches() } else { Ok(()) };
        self.state
            .set(0, state, 0)
            .map_err(map_err(maps::STATE, "writing the policy state"))?;
        if last {
            thread::sleep(GENERATION_GRACE);
            before.and(self.empty_caches())
        } else {
            Ok(())
        }
    }

    /// Empties every slot of the programs' per-CPU caches, on every CPU.
    fn empty_caches(&mut self) -> Result<(), EnforceError> {
        fn empty<T: aya::Pod + Default>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<(), EnforceError> {
            let map = ebpf
                .map_mut(name)
                .ok_or(EnforceError::Missing { kind: "map", name })?;
            let mut cache: PerCpuArray<&mut MapData, T> =
                PerCpuArray::try_from(map).map_err(map_err(name, "opening"))?;
            let cpus = aya::util::nr_cpus().map_err(|(_, source)| EnforceError::Io {
                op: "counting CPUs",
                path: PathBuf::from("/sys/devices/system/cpu/possible"),
                source,
            })?;
            for i in 0..cache.len() {
                let zeros = aya::maps::PerCpuValues::try_from(vec![T::default(); cpus]).map_err(
                    |source| EnforceError::Io {
                        op: "preparing",
                        path: PathBuf::from(name),
                        source,
                    },
                )?;
                cache.set(i, zeros, 0).map_err(map_err(name, "emptying"))?;
            }
            Ok(())
        }
        empty::<FlowCacheEntry>(&mut self.ebpf, maps::FLOW_CACHE)?;
        empty::<DecisionCacheEntry>(&mut self.ebpf, maps::DECISION_CACHE)?;
        empty::<BindingCacheEntry>(&mut self.ebpf, maps::BINDING_CACHE)?;
        Ok(())
    }

    /// Removes every rule node, Unix name, limit and window whose generation is not the active
    /// one.
    fn purge_inactive(&mut self) -> Result<(), EnforceError> {
        let active = self.generation;
        let stale = |g: u32| g != active;
        match purge_trie(&mut self.rules, maps::RULES, stale) {
            Ok(left) => self.rule_nodes = left,
            Err(e) => {
                self.rule_nodes = self.rules.keys().count();
                return Err(e);
            }
        }
        purge_trie(&mut self.ingress, maps::INGRESS, stale)?;
        purge_keys(&mut self.peers, maps::PEERS, |k| stale(k.generation))?;
        purge_keys(&mut self.unix_rules, maps::UNIX_RULES, |k| {
            stale(k.generation)
        })?;
        purge_keys(&mut self.limits, maps::LIMITS, |k| stale((*k >> 32) as u32))?;
        purge_keys(&mut self.windows, maps::WINDOWS, |k| {
            stale((*k >> 32) as u32)
        })
    }

    /// Removes what was written of `generation` (a write that failed half way); failures are
    /// left for the next purge of inactive generations.
    fn purge_generation(&mut self, generation: u32) {
        let of = |g: u32| g == generation;
        // Rare (a failed write): counted again whatever the purge did.
        let _ = purge_trie(&mut self.rules, maps::RULES, of);
        self.rule_nodes = self.rules.keys().count();
        let _ = purge_trie(&mut self.ingress, maps::INGRESS, of);
        let _ = purge_keys(&mut self.peers, maps::PEERS, |k| of(k.generation));
        let _ = purge_keys(&mut self.unix_rules, maps::UNIX_RULES, |k| of(k.generation));
        let _ = purge_keys(&mut self.limits, maps::LIMITS, |k| of((*k >> 32) as u32));
        let _ = purge_keys(&mut self.windows, maps::WINDOWS, |k| of((*k >> 32) as u32));
    }

    /// Binds a cgroup to a slot (or changes its binding).
    pub fn bind(&mut self, cgroup_id: u64, binding: Binding) -> Result<(), EnforceError> {
        if binding.flags & !flags::KNOWN != 0 {
            return Err(EnforceError::BadFlags(binding.flags));
        }
        self.bindings
            .insert(cgroup_id, binding, 0)
            .map_err(map_err(maps::BINDINGS, "binding"))?;
        self.bump_epoch()
    }

    /// Removes a binding: the cgroup, if still enforced, is then denied everything.
    pub fn unbind(&mut self, cgroup_id: u64) -> Result<(), EnforceError> {
        match self.bindings.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => self.bump_epoch(),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                self.bump_epoch()
            }
            Err(e) => Err(map_err(maps::BINDINGS, "unbinding")(e)),
        }
    }

    pub fn binding(&self, cgroup_id: u64) -> Result<Option<Binding>, EnforceError> {
        match self.bindings.get(&cgroup_id, 0) {
            Ok(b) => Ok(Some(b)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(maps::BINDINGS, "reading")(e)),
        }
    }

    pub fn bindings(&self) -> Vec<(u64, Binding)> {
        self.bindings.iter().filter_map(Result::ok).collect()
    }

    pub fn counters(&self) -> Result<Counters, EnforceError> {
        let mut out = Counters::default();
        for (i, name) in counters::NAMES.iter().enumerate() {
            let per_cpu = self
                .counters
                .get(&(i as u32), 0)
                .map_err(map_err(maps::COUNTERS, "reading"))?;
            out.totals.insert(name, per_cpu.iter().sum());
            if i as u32 == counters::EVENTS_DROPPED {
                out.events_dropped_per_cpu = per_cpu.iter().copied().collect();
            }
        }
        Ok(out)
    }

    /// Number of rule nodes in the trie.
    pub fn rule_nodes(&self) -> usize {
        self.rule_nodes
    }
}

/// The bindings a previous daemon left pinned under `pin_dir` (cgroup id, binding), read
/// without loading anything; none if there is no pinned bindings map.
pub fn pinned_bindings(pin_dir: &std::path::Path) -> Result<Vec<(u64, Binding)>, EnforceError> {
    let layout = PinLayout::new(pin_dir);
    let path = layout.maps().join(maps::BINDINGS);
    if !path.exists() {
        return Ok(Vec::new());
    }
    // Nothing is read from pins another user could have planted.
    for dir in [layout.root().to_path_buf(), layout.maps()] {
        crate::state::check_private_dir(&dir, "pin directory").map_err(EnforceError::NotPrivate)?;
    }
    pins::check_readable(&layout)?;
    pins::check_pinned_maps(&layout)?;
    let data = MapData::from_pin(&path).map_err(map_err(maps::BINDINGS, "opening the pin"))?;
    let map: HashMap<MapData, u64, Binding> = HashMap::try_from(aya::maps::Map::HashMap(data))
        .map_err(map_err(maps::BINDINGS, "opening the pin"))?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// A suffix that orders link pins: a new daemon's sort after an old one's.
fn link_seq() -> u128 {
    u128::from(crate::clock::boot_ns())
}

/// The capacity of an already pinned rules map, which may differ from the configured one.
fn rules_capacity(layout: &PinLayout) -> Option<u32> {
    aya::maps::MapInfo::from_pin(layout.maps().join(maps::RULES))
        .ok()
        .map(|i| i.max_entries())
}

/// Removes everything a daemon pinned under `pin_dir`: links (which detaches the programs)
/// and maps. Enforcement ends for every cgroup that relied on them.
pub fn teardown(pin_dir: &std::path::Path) -> Result<Vec<PathBuf>, EnforceError> {
    let layout = PinLayout::new(pin_dir);
    let mut removed = Vec::new();
    for dir in [layout.links(), layout.maps()] {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Ok(inner) = fs::read_dir(&p) {
                    for f in inner.flatten() {
                        pins::unpin(&f.path()).map_err(|source| EnforceError::Io {
                            op: "unpinning",
                            path: f.path(),
                            source,
                        })?;
                        removed.push(f.path());
                    }
                }
                let _ = fs::remove_dir(&p);
            } else {
                pins::unpin(&p).map_err(|source| EnforceError::Io {
                    op: "unpinning",
                    path: p.clone(),
                    source,
                })?;
                removed.push(p);
            }
        }
        let _ = fs::remove_dir(&dir);
    }
    layout.unstamp();
    let _ = fs::remove_dir(layout.root());
    Ok(removed)
}
