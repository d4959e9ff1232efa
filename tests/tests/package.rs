//! What a user downloads (`cargo xtask package`): the Debian package installs with dpkg, its
//! daemon starts on the configuration and policies it ships and enforces them, and it is
//! removed and purged as Debian's rules say; the tarball holds the same pieces and its
//! binary runs.
//!
//! The package is installed into a throwaway root: in a mount namespace of the test's own,
//! /etc, /usr and /var are overlays whose upper layers live in the test's directory, so that
//! dpkg, its maintainer scripts and the daemon's state write there and never into the host.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test: failing here fails the test"
)]

use std::{
    fs,
    net::TcpListener,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use agentwall_tests::{TcpSink, TestDaemon, lines, serial};

fn artifact(var: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: `cargo xtask test` builds the package and sets it")
    });
    assert!(p.exists(), "{} is missing", p.display());
    p
}

/// A throwaway root: overlays of /etc, /usr and /var over the host's, in `dir`.
struct Root {
    dir: PathBuf,
}

const OVERLAYS: &str = r#"set -eu
w=$1; shift
for d in etc usr var; do
  mkdir -p "$w/upper/$d" "$w/work/$d"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$w/upper/$d,workdir=$w/work/$d" "/$d"
done
exec "$@"
"#;

impl Root {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("awt-{}-pkgroot", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    /// `argv` run in the throwaway root (a mount namespace of its own each time; the
    /// overlays' upper layers carry what earlier commands wrote).
    fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(OVERLAYS)
            .arg("sh")
            .arg(&self.dir)
            .args(argv)
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    fn run(&self, argv: &[&str]) -> Output {
        self.command(argv).output().unwrap()
    }

    fn ok(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        assert!(
            out.status.success(),
            "{argv:?} failed in the throwaway root:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Whether `path` exists in the throwaway root.
    fn has(&self, path: &str) -> bool {
        self.run(&["test", "-e", path]).status.success()
    }

    /// A file the throwaway root's upper layer holds (what the package or daemon wrote).
    fn upper(&self, path: &str) -> PathBuf {
        self.dir.join("upper").join(path.trim_start_matches('/'))
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port in 8000-8099 (what the shipped `local-dev` policy allows) that is free.
fn local_dev_port() -> u16 {
    (8000..8100)
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port in 8000-8099")
}

#[test]
fn the_debian_package_installs_starts_enforces_and_purges() {
    let _s = serial();
    let deb = artifact("AGENTWALL_DEB");
    let host = || HOST_FILES.map(|p| Path::new(p).exists());
    let host_before = host();
    let root = Root::new();
    root.ok(&["dpkg", "-i", deb.to_str().unwrap()]);
    assert_eq!(host(), host_before, "the installation reached the host");
    let status = root.ok(&["dpkg-query", "-W", "-f=${Status} ${Version}", "agentwall"]);
    assert!(
        status.starts_with(&format!(
            "install ok installed {}",
            env!("CARGO_PKG_VERSION")
        )),
        "{status}"
    );
    let files = root.ok(&["dpkg-query", "-L", "agentwall"]);
    for want in [
        "/usr/bin/agentwall",
        "/usr/lib/systemd/system/agentwall.service",
        "/usr/lib/systemd/system/agentwall-agents.service",
        "/etc/agentwall/agentwall.yaml",
        "/etc/agentwall/policies/README.md",
        "/usr/share/doc/agentwall/examples/policies/local-dev.yaml",
        "/usr/share/man/man1/agentwall.1.gz",
        "/usr/share/man/man1/agentwall-run.1.gz",
        "/usr/share/bash-completion/completions/agentwall",
        "/usr/share/zsh/vendor-completions/_agentwall",
        "/usr/share/fish/vendor_completions.d/agentwall.fish",
        "/usr/share/doc/agentwall/copyright",
        "/usr/share/doc/agentwall/operations.md",
    ] {
        assert!(
            files.lines().any(|l| l == want),
            "{want} is not in the package:\n{files}"
        );
    }
    // The configuration is the administrator's: dpkg keeps their edits across upgrades.
    let conffiles =
        fs::read_to_string(root.upper("var/lib/dpkg/info/agentwall.conffiles")).unwrap_or_default();
    assert!(
        conffiles
            .lines()
            .any(|l| l == "/etc/agentwall/agentwall.yaml"),
        "{conffiles}"
    );
    // No example is a live grant: the policy directory holds no policy.
    assert!(
        !files
            .lines()
            .any(|l| l.starts_with("/etc/agentwall/policies/") && l.ends_with(".yaml")),
        "{files}"
    );
    // The maintainer scripts enabled the units (there is no systemd to start them here).
    for unit in ["agentwall.service", "agentwall-agents.service"] {
        assert!(
            root.upper(&format!(
                "etc/systemd/system/multi-user.target.wants/{unit}"
            ))
            .symlink_metadata()
            .is_ok(),
            "{unit} is not enabled"
        );
        root.ok(&[
            "systemd-analyze",
            "verify",
            &format!("/usr/lib/systemd/system/{unit}"),
        ]);
    }
    let version = root.ok(&["/usr/bin/agentwall", "version"]);
    assert!(
        version.starts_with(&format!("agentwall {}\n", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let page = root.ok(&["man", "-w", "agentwall-run"]);
    assert_eq!(page.trim(), "/usr/share/man/man1/agentwall-run.1.gz");

    // The administrator puts a policy in place: the shipped local-dev example.
    root.ok(&[
        "cp",
        "/usr/share/doc/agentwall/examples/policies/local-dev.yaml",
        "/etc/agentwall/policies/",
    ]);
    // The installed daemon on the installed configuration, policies, state directory and
    // audit key; only what is shared with the host (pins, cgroup subtree, sockets) is the
    // test's own.
    let mut d = TestDaemon::prepare(&[], None);
    // The installed binary, started here as it is: the unit's sandbox is tested elsewhere.
    d.without_unit();
    let argv: Vec<String> = [
        "/usr/bin/agentwall",
        "run",
        "--config",
        "/etc/agentwall/agentwall.yaml",
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .chain(
        [
            ("--pin-dir", d.pin_dir.clone()),
            ("--cgroup-root", PathBuf::from(&d.cgroup_root)),
            ("--socket", d.socket.clone()),
            ("--enroll-socket", d.enroll_socket.clone()),
            ("--workload-socket", d.workload_socket.clone()),
            ("--decision-socket", d.decision_socket.clone()),
            ("--agent-dir", d.dir.join("agents")),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v.display().to_string()]),
    )
    .collect();
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    d.launch_command(root.command(&argv));
    d.wait_healthy();
    let st = d.status();
    assert!(
        st.policies.iter().any(|p| p.name == "local-dev"),
        "the shipped policies are loaded: {:?}",
        st.policies
    );
    let allowed = TcpSink::new(&format!("127.0.0.1:{}", local_dev_port()));
    let denied = TcpSink::new("127.0.0.1:0");
    let out = d.exec(
        "local-dev",
        None,
        &[
            &format!("tcp 127.0.0.1:{}", allowed.port()),
            &format!("tcp 127.0.0.1:{}", denied.port()),
        ],
    );
    assert_eq!(lines(&out), ["ok", "err EPERM"], "{out:?}");
    agentwall_tests::wait_for(
        std::time::Duration::from_secs(5),
        "the allowed connect to reach its listener",
        || (allowed.accepted() == 1).then_some(()),
    );
    assert_eq!(
        denied.accepted(),
        0,
        "the denied connect reached its listener"
    );
    d.stop_cleanly();
    // The daemon made its state where the configuration says, its key readable by root only.
    let key = root.upper("etc/agentwall/audit.key");
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600,
        "{}",
        key.display()
    );
    assert!(root.upper("var/lib/agentwall").is_dir());
    drop(d);

    // Removal keeps the configuration; purge removes it. The audit key and the state (the
    // CA, the audit log) are evidence and stay until the administrator deletes them.
    root.ok(&["dpkg", "-r", "agentwall"]);
    assert!(!root.has("/usr/bin/agentwall"));
    assert!(root.has("/etc/agentwall/agentwall.yaml"));
    root.ok(&["dpkg", "--purge", "agentwall"]);
    assert!(!root.has("/etc/agentwall/agentwall.yaml"));
    assert!(!root.has("/etc/systemd/system/multi-user.target.wants/agentwall.service"));
    assert!(!root.has("/etc/agentwall/policies/README.md"));
    assert!(root.has("/etc/agentwall/audit.key"));
    assert!(root.has("/var/lib/agentwall"));
}

/// Files of the package whose presence on the host must not change.
const HOST_FILES: [&str; 3] = [
    "/usr/bin/agentwall",
    "/etc/agentwall/agentwall.yaml",
    "/var/lib/dpkg/info/agentwall.list",
];

#[test]
fn the_release_tarball_holds_the_same_pieces_and_runs() {
    let _s = serial();
    let tarball = artifact("AGENTWALL_TARBALL");
    let sums = tarball.parent().unwrap();
    let out = Command::new("sha256sum")
        .current_dir(sums)
        .args(["-c", "SHA256SUMS"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let root = Root::new();
    let out = Command::new("tar")
        .arg("-C")
        .arg(&root.dir)
        .arg("-xzf")
        .arg(&tarball)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let top = root.dir.join(format!(
        "agentwall-{}-{}-linux",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    ));
    for want in [
        "bin/agentwall",
        "systemd/agentwall.service",
        "systemd/agentwall-agents.service",
        "etc/agentwall.yaml",
        "etc/policies/local-dev.yaml",
        "share/man/man1/agentwall.1.gz",
        "share/completions/agentwall.bash",
        "share/completions/_agentwall",
        "share/completions/agentwall.fish",
        "share/doc/operations.md",
        "LICENSE",
        "README.md",
    ] {
        assert!(top.join(want).is_file(), "{want} is not in the tarball");
    }
    let bin = top.join("bin/agentwall");
    let version = Command::new(&bin).arg("version").output().unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout)
            .starts_with(&format!("agentwall {}\n", env!("CARGO_PKG_VERSION"))),
        "{version:?}"
    );
    // The shipped policies pass the shipped binary's own check.
    let check = Command::new(&bin)
        .args(["policy", "check"])
        .arg(top.join("etc/policies"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
}
