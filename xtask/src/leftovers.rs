//! What an interrupted run of the root tests or benchmarks left behind.
//!
//! Their guards clean up when a test fails, but not when the run itself dies (SIGKILL,
//! Ctrl-C): then a cgroup subtree, its bpffs pins (links still attached to it) and a scratch
//! directory stay. Every one of them carries the name of the run's process: `awt-<pid>-...`
//! (test daemons and test cgroups), `awbench-<pid>` (the enforcement benchmark, also its
//! nftables table), and in the temporary directory `awt-...-<pid>...`, `aw-bench-audit-<pid>`. Before the next run, names
//! whose process is gone are torn down with `agentwall teardown --kill`, which refuses the
//! root cgroup; a live process's names are left alone.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

/// The process id a name of ours carries (its first all-digit part), if it is one of ours.
fn owner(name: &str, prefixes: &[&str]) -> Option<u32> {
    let rest = prefixes.iter().find_map(|p| name.strip_prefix(p))?;
    rest.split('-')
        .find(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Names in `dir` of ours whose process is gone.
fn stale(dir: &Path, prefixes: &[&str]) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| owner(n, prefixes).is_some_and(gone))
        .collect();
    names.sort();
    names
}

/// The cgroup v2 mount point, from /proc/self/mounts.
fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mounts").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, at, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(at))
    })
}

/// Tears down what earlier runs left; says what it removed and what it could not.
#[expect(clippy::print_stderr, reason = "xtask reports to the terminal")]
pub(crate) fn sweep(agentwall: &Path) {
    const KERNEL: &[&str] = &["awt-", "awbench-"];
    let bpffs = Path::new("/sys/fs/bpf");
    let mut names = stale(bpffs, KERNEL);
    if let Some(mount) = cgroup2_mount() {
        names.extend(stale(&mount, KERNEL));
    }
    names.sort();
    names.dedup();
    let tmp = std::env::temp_dir();
    for name in &names {
        let out = Command::new(agentwall)
            .arg("teardown")
            .arg("--pin-dir")
            .arg(bpffs.join(name))
            .arg("--cgroup-root")
            .arg(name)
            .arg("--socket")
            .arg(tmp.join(name).join("admin.sock"))
            .arg("--kill")
            .output();
        match out {
            Ok(o) if o.status.success() => {
                eprintln!("==> removed {name}, left by an interrupted run");
            }
            Ok(o) => eprintln!(
                "==> could not remove {name}, left by an interrupted run: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("==> could not run {}: {e}", agentwall.display()),
        }
    }
    for name in stale(&tmp, &["awt-", "aw-bench-"]) {
        if let Err(e) = fs::remove_dir_all(tmp.join(&name)) {
            eprintln!("==> could not remove {}: {e}", tmp.join(&name).display());
        }
    }
    // The enforcement benchmark's nftables table (`table inet awbench-<pid>`).
    let tables = Command::new("/usr/sbin/nft")
        .args(["list", "tables", "inet"])
        .output();
    let listed = tables.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    for name in listed.iter().flat_map(|l| stale_tables(l)) {
        let deleted = Command::new("/usr/sbin/nft")
            .args(["delete", "table", "inet", &name])
            .status();
        if deleted.is_ok_and(|s| s.success()) {
            eprintln!("==> removed nftables table {name}, left by an interrupted run");
        } else {
            eprintln!("==> could not remove nftables table {name}");
        }
    }
}

/// The tables of ours in `nft list tables inet` output whose process is gone.
fn stale_tables(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .filter(|n| owner(n, &["awbench-"]).is_some_and(gone))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tables_of_dead_benchmarks_are_stale() {
        let me = std::process::id();
        let listing =
            format!("table inet filter\ntable inet awbench-{me}\ntable inet awbench-4194305\n");
        assert_eq!(stale_tables(&listing), ["awbench-4194305"]);
    }

    #[test]
    fn names_of_ours_give_their_process() {
        let k = &["awt-", "awbench-"];
        assert_eq!(owner("awt-1234-0", k), Some(1234));
        assert_eq!(owner("awt-1234-svc", k), Some(1234));
        assert_eq!(owner("awbench-77", k), Some(77));
        assert_eq!(owner("awt-crash-99", k), Some(99));
        assert_eq!(owner("awt-partner-5-x", k), Some(5));
        for other in [
            "agentwall",
            "awt-",
            "awt-svc",
            "system.slice",
            "aw-1",
            "awbench-x",
        ] {
            assert_eq!(owner(other, k), None, "{other}");
        }
    }

    #[test]
    fn only_names_of_dead_processes_are_stale() {
        let dir = std::env::temp_dir().join(format!("xtask-leftovers-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        // Pid 1 lives; a pid above the kernel's limit never does.
        for name in [
            "awt-1-0",
            "awt-4194305-0",
            "awbench-4194305",
            "keep-4194305",
        ] {
            fs::create_dir_all(dir.join(name)).unwrap();
        }
        fs::write(dir.join("awt-4194306-file"), "").unwrap();
        let got = stale(&dir, &["awt-", "awbench-"]);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got, ["awbench-4194305", "awt-4194305-0"]);
    }
}
