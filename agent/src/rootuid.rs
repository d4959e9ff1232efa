//! Host uids for commands that run as root under `agentwall exec`.
//!
//! A confined root command runs as root of a user namespace of its own, in which uid 0 (and
//! gid 0) is one host uid from this range, a different one for each live exec cgroup. On the
//! host it is then nobody in particular: it cannot signal or trace the daemon or any other
//! process, it cannot open or change a file it would need root's ownership or capabilities
//! for, and two root agents cannot reach each other as the same user.
//!
//! The daemon hands the uids out (it knows which exec cgroups live). The range must belong to
//! no user of the host: the default is high in the space that login and system users never
//! take, and a configuration can move it.

use std::{
    collections::HashSet,
    fs, io,
    ops::ControlFlow,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::cgroup::{Cgroup, CgroupError};

/// The name of the note on an exec cgroup that says which uid it was handed.
const NOTE: &str = "root_uid";

/// The host uids root agents are mapped to: `first` .. `first + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RootUids {
    pub first: u32,
    pub count: u32,
}

/// The lowest first uid a configuration may give: below it live system and login users and
/// `nobody` (65534).
const MIN_FIRST: u32 = 65_536;

impl Default for RootUids {
    fn default() -> Self {
        Self {
            first: 0x7A77_0000,
            count: 65_536,
        }
    }
}

/// Why a range of root uids cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("first {0} is below {MIN_FIRST}: system users, login users and nobody live there")]
    BelowMin(u32),
    #[error("count must be at least 1")]
    Empty,
    #[error("first {first} and count {count} go past the last uid, {}", u32::MAX - 1)]
    PastLast { first: u32, count: u32 },
}

impl RootUids {
    pub fn check(&self) -> Result<(), RangeError> {
        if self.first < MIN_FIRST {
            return Err(RangeError::BelowMin(self.first));
        }
        if self.count == 0 {
            return Err(RangeError::Empty);
        }
        // u32::MAX is (uid_t)-1, which no process can hold.
        if self
            .first
            .checked_add(self.count - 1)
            .is_none_or(|last| last == u32::MAX)
        {
            return Err(RangeError::PastLast {
                first: self.first,
                count: self.count,
            });
        }
        Ok(())
    }

    pub fn contains(&self, uid: u32) -> bool {
        uid >= self.first && uid - self.first < self.count
    }

    /// A uid of the range not in `used`, looking from `hint` on (so that a uid just freed is
    /// not the next one handed out); `None` when all are taken.
    pub fn pick(&self, used: &HashSet<u32>, hint: u64) -> Option<u32> {
        let count = u64::from(self.count);
        (0..count)
            .map(|i| self.first + ((hint.wrapping_add(i)) % count) as u32)
            .find(|uid| !used.contains(uid))
    }

    /// Leaves on the exec cgroup the uid it was handed, so that a daemon that restarts before
    /// the command runs as it does not hand the same uid to another cgroup.
    pub fn record(cg: &Cgroup, uid: u32) -> Result<(), CgroupError> {
        cg.set_note(NOTE, uid.to_string().as_bytes())
    }

    /// The uid of this range a previous daemon handed the exec cgroup: the note it left, else
    /// (a cgroup of a daemon that left none) one its processes run as.
    pub fn handed_to(&self, cg: &Cgroup) -> Option<u32> {
        let noted = cg
            .note(NOTE)
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
            .filter(|uid| self.contains(*uid));
        noted.or_else(|| self.in_use_below(cg.path()).into_iter().next())
    }

    /// The uids of this range that processes of the cgroup at `dir` (and below) run as: how a
    /// daemon that restarted learns what its predecessor handed out.
    fn in_use_below(&self, dir: &Path) -> HashSet<u32> {
        let mut out = HashSet::new();
        // Bounded: an agent may make many cgroups below its own.
        crate::cgroup::for_each_process_below(&[dir.to_path_buf()], 1024, |pid| {
            if let Some(uid) = real_uid(pid)
                && self.contains(uid)
            {
                out.insert(uid);
            }
            ControlFlow::Continue(())
        });
        out
    }
}

/// Why the range cannot be used on this host: a user, group or subordinate range of the host
/// has an id in it, and a root agent mapped there would be that user (or be reachable by it).
#[derive(Debug, thiserror::Error)]
pub enum HostOverlap {
    #[error(
        "exec.root_uids ({first}..={last}) overlaps {what} in {file}: a root agent mapped there \
         would act as that user or group; choose exec.root_uids.first and count so that the \
         range holds no user, group or subordinate id range of the host"
    )]
    Overlap {
        first: u32,
        last: u32,
        file: PathBuf,
        what: String,
    },
    #[error("exec.root_uids: reading {file} to check the range against it: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The files of the host's user database the range is checked against, and which fields of
/// their lines hold ids: a single id, or a subordinate range (start and count).
const DATABASE: [(&str, Ids); 4] = [
    ("passwd", Ids::Single(&[2, 3])),
    ("group", Ids::Single(&[2])),
    ("subuid", Ids::Range),
    ("subgid", Ids::Range),
];

#[derive(Clone, Copy)]
enum Ids {
    /// These fields (by index, `:`-separated) are ids.
    Single(&'static [usize]),
    /// Fields 1 and 2 are the start and the length of a range of ids.
    Range,
}

impl RootUids {
    /// Checks the range against the host's user database in `etc` (`/etc`): passwd and group
    /// (uids and gids, the range maps both) and subuid and subgid (ranges that users may map
    /// into their own user namespaces). Users of a network directory (LDAP, sssd) are not
    /// listed there and not checked; a missing file has nothing to overlap.
    pub fn check_host(&self, etc: &Path) -> Result<(), HostOverlap> {
        let last = self.first + (self.count - 1);
        for (name, ids) in DATABASE {
            let file = etc.join(name);
            let text = match fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(HostOverlap::Read { file, source }),
            };
            if let Some(what) = overlapping_line(&text, ids, self.first, last) {
                return Err(HostOverlap::Overlap {
                    first: self.first,
                    last,
                    file,
                    what,
                });
            }
        }
        Ok(())
    }
}

/// The first line of a user database file with an id in `first..=last`, described.
fn overlapping_line(text: &str, ids: Ids, first: u32, last: u32) -> Option<String> {
    let inside = |a: u64, b: u64| a <= u64::from(last) && b >= u64::from(first);
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let num = |i: usize| fields.get(i)?.trim().parse::<u64>().ok();
            let owner = fields.first().copied().unwrap_or("");
            match ids {
                Ids::Single(at) => at.iter().find_map(|&i| {
                    let id = num(i)?;
                    inside(id, id).then(|| format!("{owner:?} (id {id})"))
                }),
                Ids::Range => {
                    let (start, len) = (num(1)?, num(2)?);
                    (len > 0 && inside(start, start + len - 1))
                        .then(|| format!("the range of {owner:?} ({start}..={})", start + len - 1))
                }
            }
        })
}

/// The real uid of a process, from `/proc/PID/status`.
fn real_uid(pid: &str) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_that_reach_users_or_past_the_last_uid_are_refused() {
        assert!(RootUids::default().check().is_ok());
        let low = RootUids {
            first: 1000,
            count: 10,
        };
        assert!(low.check().unwrap_err().to_string().contains("below 65536"));
        let empty = RootUids {
            first: 100_000,
            count: 0,
        };
        assert!(
            empty
                .check()
                .unwrap_err()
                .to_string()
                .contains("at least 1")
        );
        let past = RootUids {
            first: u32::MAX - 5,
            count: 6,
        };
        assert!(
            past.check()
                .unwrap_err()
                .to_string()
                .contains("past the last uid")
        );
        let last = RootUids {
            first: u32::MAX - 5,
            count: 5,
        };
        assert!(last.check().is_ok());
    }

    #[test]
    fn a_free_uid_is_picked_from_the_hint_on_and_none_when_all_are_taken() {
        let r = RootUids {
            first: 100_000,
            count: 3,
        };
        let mut used = HashSet::new();
        assert_eq!(r.pick(&used, 1), Some(100_001));
        used.insert(100_001);
        assert_eq!(r.pick(&used, 1), Some(100_002));
        used.insert(100_002);
        assert_eq!(r.pick(&used, 1), Some(100_000));
        used.insert(100_000);
        assert_eq!(r.pick(&used, 1), None);
        assert!(r.contains(100_002) && !r.contains(100_003) && !r.contains(99_999));
    }

    #[test]
    fn users_groups_and_subordinate_ranges_inside_the_range_are_found() {
        let r = RootUids {
            first: 200_000,
            count: 10,
        };
        let etc = std::env::temp_dir().join(format!("aw-rootuid-{}", std::process::id()));
        let _ = fs::remove_dir_all(&etc);
        fs::create_dir(&etc).unwrap();
        let write = |name: &str, text: &str| fs::write(etc.join(name), text).unwrap();
        // No files: nothing to overlap. Lines around the range, comments and junk: fine.
        assert!(r.check_host(&etc).is_ok());
        write(
            "passwd",
            "root:x:0:0::/root:/bin/sh\n# x:x:200000:0\nbad line\nhi:x:200010:199999::/:/bin/sh\n",
        );
        write("group", "g:x:199999:\n");
        write("subuid", "alice:100000:100000\n");
        write("subgid", "alice:200010:65536\n");
        assert!(r.check_host(&etc).is_ok());
        let found = |name: &str, text: &str, expect: &str| {
            let keep = fs::read_to_string(etc.join(name)).unwrap();
            write(name, text);
            let e = r.check_host(&etc).unwrap_err().to_string();
            write(name, &keep);
            assert!(e.contains(expect) && e.contains(name), "{e}");
        };
        found("passwd", "u:x:200009:1::/:/bin/sh\n", "\"u\" (id 200009)");
        found("passwd", "u:x:1000:200000::/:/bin/sh\n", "(id 200000)");
        found("group", "g:x:200005:a,b\n", "\"g\" (id 200005)");
        found("subuid", "bob:199990:11\n", "\"bob\" (199990..=200000)");
        found("subgid", "1000:200009:1\n", "\"1000\" (200009..=200009)");
        fs::remove_dir_all(&etc).unwrap();
    }
}
