//! The loaded kernel programs and their maps.
//!
//! [`Enforcer`] owns the [`aya::Ebpf`] object. The daemon keeps it on one thread (see
//! [`actor`]) and other tasks send it typed commands; tests use it directly.
//!
//! Kernel maps (names in `agentwall_common::maps`):
//! - `AW_BINDINGS` cgroup id → [`Binding`]: the identity slot and flags of every enforced
//!   cgroup. No entry means deny.
//! - `AW_RULES` (slot, generation, destination prefix) → [`RuleSet`].
//! - `AW_STATE` [0] → [`PolicyState`]: the active generation.
//! - `AW_COUNTERS` per-CPU counters (`agentwall_common::counters`).
//! - `AW_EVENTS` ring buffer of `agentwall_common::event::Event`.

pub mod actor;
mod pins;

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
    rules::{RuleKey, RuleSet},
    state::PolicyState,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, ProgramError,
        links::{FdLink, PinnedLink},
    },
};
use serde::Serialize;

pub use self::pins::PinLayout;
use crate::{
    cgroup::{Cgroup, CgroupError},
    config::Limits,
    policy::Compiled,
};

/// The kernel object, compiled from `ebpf/` by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentwall"));

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
    #[error("binding flags {0:#x} are not known to this version")]
    BadFlags(u32),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
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
    state: Array<MapData, PolicyState>,
    counters: PerCpuArray<MapData, u64>,
    generation: u32,
    max_rule_nodes: u32,
    /// Cgroups this instance attached to.
    attached: HashSet<u64>,
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
        pins::check_pinned_maps(&layout)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(layout.maps())
            .map_max_entries(maps::BINDINGS, limits.max_bindings)
            .map_max_entries(maps::RULES, limits.max_rule_nodes)
            .map_max_entries(maps::EVENTS, limits.event_ring_bytes)
            .load(OBJECT)
            .map_err(EnforceError::Load)?;
        for name in programs::ALL {
            let prog = ebpf.program_mut(name).ok_or(EnforceError::Missing {
                kind: "program",
                name,
            })?;
            let r = match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::CgroupSkb(p) => p.load(),
                aya::programs::Program::CgroupSock(p) => p.load(),
                _ => {
                    return Err(EnforceError::Missing {
                        kind: "cgroup program",
                        name,
                    });
                }
            };
            r.map_err(|source| EnforceError::Program { name, source })?;
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or(EnforceError::Missing { kind: "map", name })
        };
        let bindings = HashMap::try_from(take(&mut ebpf, maps::BINDINGS)?)
            .map_err(map_err(maps::BINDINGS, "opening"))?;
        let rules = LpmTrie::try_from(take(&mut ebpf, maps::RULES)?)
            .map_err(map_err(maps::RULES, "opening"))?;
        let state: Array<MapData, PolicyState> = Array::try_from(take(&mut ebpf, maps::STATE)?)
            .map_err(map_err(maps::STATE, "opening"))?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, maps::COUNTERS)?)
            .map_err(map_err(maps::COUNTERS, "opening"))?;
        let events = RingBuf::try_from(take(&mut ebpf, maps::EVENTS)?)
            .map_err(map_err(maps::EVENTS, "opening"))?;
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
            state,
            counters,
            generation,
            max_rule_nodes,
            attached: HashSet::new(),
        };
        // A daemon that died while writing a generation leaves its partial nodes behind.
        enforcer.purge_inactive()?;
        Ok((enforcer, events))
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
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
        let seq = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(|t| t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128)
            .unwrap_or_default();
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
        for path in old {
            match PinnedLink::from_pin(&path) {
                // Dropping the unpinned link releases it, which detaches the old program.
                Ok(link) => drop(link.unpin()),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot open an old link pin; removing it")
                }
            }
            let _ = pins::unpin(&path);
        }
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
                let id = p
                    .attach(fd, CgroupSkbAttachType::Egress, mode)
                    .map_err(|e| attach_err(&e))?;
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
        self.attached.remove(&cgroup_id);
        Ok(())
    }

    /// Writes `compiled` as a new generation, flips to it, then removes the old one. If
    /// writing fails the partial generation is removed and the old one stays in force.
    pub fn apply(&mut self, compiled: &Compiled) -> Result<u32, EnforceError> {
        let in_use = self.rules.keys().count();
        let needed = compiled.nodes.len();
        if in_use + needed > self.max_rule_nodes as usize {
            return Err(EnforceError::Capacity {
                needed,
                in_use,
                capacity: self.max_rule_nodes,
            });
        }
        let next = match self.generation.wrapping_add(1) {
            0 => 1,
            g => g,
        };
        for node in &compiled.nodes {
            let key = Key::new(
                RuleKey::prefix_len(node.bits),
                RuleKey {
                    slot: node.slot,
                    generation: next,
                    addr: node.addr,
                },
            );
            if let Err(e) = self.rules.insert(&key, node.set, 0) {
                self.purge_generation(next);
                return Err(map_err(maps::RULES, "inserting")(e));
            }
        }
        let epoch = self.epoch().wrapping_add(1);
        self.state
            .set(
                0,
                PolicyState {
                    generation: next,
                    epoch,
                },
                0,
            )
            .map_err(|e| {
                self.purge_generation(next);
                map_err(maps::STATE, "flipping the generation")(e)
            })?;
        self.generation = next;
        thread::sleep(GENERATION_GRACE);
        self.purge_inactive()?;
        Ok(next)
    }

    fn epoch(&self) -> u32 {
        self.state.get(&0, 0).map(|s| s.epoch).unwrap_or_default()
    }

    /// Invalidates every cached flow verdict (`agentwall_common::state::FlowCacheEntry`).
    /// Called after a binding change is in place, so that a packet that sees the new epoch
    /// also sees the new binding.
    fn bump_epoch(&mut self) -> Result<(), EnforceError> {
        let state = PolicyState {
            generation: self.generation,
            epoch: self.epoch().wrapping_add(1),
        };
        self.state
            .set(0, state, 0)
            .map_err(map_err(maps::STATE, "bumping the epoch"))
    }

    /// Removes every rule node whose generation is not the active one.
    fn purge_inactive(&mut self) -> Result<(), EnforceError> {
        let active = self.generation;
        let stale: Vec<Key<RuleKey>> = self
            .rules
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().generation != active)
            .collect();
        for k in stale {
            match self.rules.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::RULES, "removing a stale node")(e)),
            }
        }
        Ok(())
    }

    fn purge_generation(&mut self, generation: u32) {
        let keys: Vec<Key<RuleKey>> = self
            .rules
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().generation == generation)
            .collect();
        for k in keys {
            let _ = self.rules.remove(&k);
        }
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
        self.rules.keys().count()
    }
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
    let _ = fs::remove_dir(layout.root());
    Ok(removed)
}
