//! What the command line tells about itself: its version and build, completion scripts for
//! three shells, man pages for every command, and JSON that is one document per line.
#![expect(clippy::unwrap_used, reason = "a test: failing here fails the test")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use agentwall_tests::{TestDaemon, agentwall_bin, serial};

/// A directory of the test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("awt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(agentwall_bin()).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn version_names_the_build_and_the_kernel_programs_it_loads() {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        agentwall::enforce::kernel_object(),
    );
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let text = stdout(&run(&["version"]));
    assert!(
        text.starts_with(&format!("agentwall {}\n", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(
        text.contains(&format!("kernel programs: sha256:{hex}")),
        "{text}"
    );
    // `--version` says the same.
    let flag = stdout(&run(&["--version"]));
    assert_eq!(flag, text);
    let json = stdout(&run(&["version", "--json"]));
    assert_eq!(json.lines().count(), 1, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["kernel_programs"], format!("sha256:{hex}"));
    assert_eq!(v["crypto"], "aws-lc-rs");
}

#[test]
fn completions_cover_every_command_and_bash_reads_its_script() {
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(&run(&["completions", shell]));
        for word in ["enforce-self", "policy", "explain", "revoke", "completions"] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
    }
    let dir = Scratch::new("completions");
    let path = dir.path().join("agentwall.bash");
    std::fs::write(&path, stdout(&run(&["completions", "bash"]))).unwrap();
    let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let bad = run(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values: bash, zsh, fish"));
}

#[test]
fn man_pages_are_written_for_every_visible_command() {
    let dir = Scratch::new("man");
    let listed = stdout(&run(&["man", dir.path().to_str().unwrap()]));
    for page in [
        "agentwall.1",
        "agentwall-run.1",
        "agentwall-policy-explain.1",
        "agentwall-identity-issue.1",
        "agentwall-audit-verify.1",
        "agentwall-completions.1",
    ] {
        let path = dir.path().join(page);
        assert!(listed.contains(page), "{page} not listed: {listed}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    // Hidden helpers of the binary itself get no page.
    assert!(
        !listed.contains("probe"),
        "a hidden command has a page: {listed}"
    );
    // groff reads every page without a warning.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Run as root into a directory someone else can write, `man` could be made to write through
/// a planted link or hard link: it refuses a directory that is not the caller's alone, and
/// never writes through what is already in it.
#[test]
fn man_pages_are_not_written_through_links() {
    use std::os::unix::fs::PermissionsExt as _;
    let victim = Scratch::new("man-victim");
    let target = victim.path().join("precious");
    std::fs::write(&target, "keep me").unwrap();
    let open = Scratch::new("man-open");
    std::os::unix::fs::symlink(&target, open.path().join("agentwall.1")).unwrap();
    std::fs::hard_link(&target, open.path().join("agentwall-run.1")).unwrap();
    let refused = |mode: u32, uid: u32| {
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::lchown(open.path(), Some(uid), None).unwrap();
        let out = run(&["man", &format!("{}/", open.path().display())]);
        assert!(!out.status.success(), "mode {mode:o} uid {uid}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("only you can write"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    refused(0o1777, 0);
    refused(0o775, 0);
    refused(0o755, 65534);
    // A directory of one's own: the link and the hard link are replaced, not written through.
    std::os::unix::fs::lchown(open.path(), Some(0), None).unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(&["man", open.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
    let page = std::fs::symlink_metadata(open.path().join("agentwall.1")).unwrap();
    assert!(page.file_type().is_file());
    assert!(
        std::fs::read_to_string(open.path().join("agentwall-run.1"))
            .unwrap()
            .contains(".TH")
    );
}

/// Every read command's `--json` prints one JSON document per line, nothing else.
#[test]
fn json_output_is_one_document_per_line() {
    let _s = serial();
    let policy = "policy:\n  name: web\n  egress:\n    - to: 127.0.0.1\n      protocol: tcp\n      ports: [80]\n";
    let d = TestDaemon::start(&[("web.yaml", policy)]);
    let policies = d.dir.join("policies");
    let policies = policies.to_str().unwrap();
    let socket = d.socket.to_str().unwrap();
    for args in [
        vec!["status", "--socket", socket, "--json"],
        vec![
            "revoke",
            "--socket",
            socket,
            "spiffe://agentwall.local/agent/nobody/test",
            "--reason",
            "a test",
            "--json",
        ],
        vec!["revoke", "--socket", socket, "--list", "--json"],
        vec!["policy", "check", policies, "--json"],
        vec![
            "policy",
            "explain",
            "--policies",
            policies,
            "--policy",
            "web",
            "--to",
            "127.0.0.1:80",
            "--json",
        ],
        vec!["version", "--json"],
    ] {
        let out = stdout(&run(&args));
        assert!(!out.is_empty(), "{args:?} printed nothing");
        for line in out.lines() {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{args:?}: {e}: {line:?}"));
        }
    }
}
