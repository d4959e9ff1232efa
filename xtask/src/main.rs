//! Project tasks: `cargo xtask setup | build | run | test | lint | bench | package | proto`.
//!
//! `setup` installs what building the kernel programs needs and is idempotent; every other
//! task runs it first, so a fresh machine needs no other step.

mod leftovers;
mod package;
mod previous;
mod proto;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install nightly rust-src and bpf-linker (built against the nightly toolchain's LLVM).
    Setup,
    /// Build the agentwall binary (kernel programs embedded).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build and run the daemon on policies/ with the embedded defaults (needs root).
    Run {
        /// Extra arguments for `agentwall run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Lints, unit tests, then the root integration tests (serially, against the real kernel).
    Test,
    /// cargo fmt --check and clippy, the kernel crate on its own target.
    Lint,
    /// Benchmarks (enforcement overhead, audit store, hostile load, identity, policy, fleet); writes
    /// docs/benchmarks.md.
    Bench {
        /// Interleaved rounds per configuration (at least 11).
        #[arg(long, default_value_t = 61)]
        rounds: u32,
        /// Only this benchmark (enforcement, audit, load, identity, policy or fleet); its
        /// section of docs/benchmarks.md is rewritten, the others kept.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(BENCHES.iter().map(|(n, _)| *n)))]
        only: Option<String>,
    },
    /// The Debian package and the release tarball, from a release build, in target/package.
    Package,
    /// Generate the Workload API code (agent/src/workload/pb.rs) from agent/proto.
    Proto,
}

#[expect(clippy::print_stderr, reason = "xtask reports to the terminal")]
fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Runs a command, failing with its command line if it fails.
fn status(mut cmd: Command) -> anyhow::Result<()> {
    let line = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("starting {line}"))?;
    if !st.success() {
        bail!("{line} failed ({st})");
    }
    Ok(())
}

#[expect(clippy::print_stderr, reason = "xtask reports to the terminal")]
fn step(what: &str) {
    eprintln!("==> {what}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup::run(),
        Task::Proto => proto::run(&root()),
        Task::Build { release } => {
            setup::run()?;
            build(release)
        }
        Task::Run { args } => {
            setup::run()?;
            build(true)?;
            if !is_root() {
                bail!("the daemon loads kernel programs and manages cgroups: run this as root");
            }
            let bin = root().join("target/release/agentwall");
            step(&format!(
                "{} run --policies policies {}",
                bin.display(),
                args.join(" ")
            ));
            use std::os::unix::process::CommandExt as _;
            let err = Command::new(&bin)
                .current_dir(root())
                .arg("run")
                .arg("--policies")
                .arg("policies")
                .args(&args)
                .exec();
            Err(err).context("starting the daemon")
        }
        Task::Lint => {
            setup::run()?;
            lint()
        }
        Task::Package => {
            setup::run()?;
            build(true)?;
            package::run().map(drop)
        }
        Task::Test => {
            setup::run()?;
            lint()?;
            test()
        }
        Task::Bench { rounds, only } => {
            setup::run()?;
            if !is_root() {
                bail!("the benchmark loads kernel programs: run it as root");
            }
            if rounds < 11 {
                bail!("--rounds must be at least 11");
            }
            build(true)?;
            leftovers::sweep(&root().join("target/release/agentwall"));
            test_tools()?;
            let report = root().join("docs/benchmarks.md");
            for (name, what) in BENCHES {
                if only.as_deref().is_some_and(|o| o != *name) {
                    continue;
                }
                step(&format!("benchmark: {what}"));
                let mut c = cargo();
                c.args(["bench", "-p", "agentwall-tests", "--bench", name, "--"]);
                if *name == "enforcement" {
                    c.arg(format!("--rounds={rounds}"));
                } else {
                    c.env("AGENTWALL_BIN", root().join("target/release/agentwall"));
                }
                c.arg(format!("--report={}", report.display()));
                status(c)?;
            }
            Ok(())
        }
    }
}

/// The benchmarks `cargo xtask bench` runs, in order: name (of tests/benches/NAME.rs), what
/// it measures.
const BENCHES: &[(&str, &str)] = &[
    (
        "enforcement",
        "enforcement overhead, and side by side with nftables (release build)",
    ),
    ("audit", "audit store and pipeline (release daemon)"),
    ("load", "hostile load (release daemon)"),
    ("identity", "identity (release daemon)"),
    (
        "policy",
        "policy compile and swap, decisions (release daemon)",
    ),
    (
        "fleet",
        "fleet propagation and idle footprint (release daemons, etcd)",
    ),
    (
        "secrets",
        "secret fetches over mTLS, database credentials (release daemon, PostgreSQL)",
    ),
];

fn build(release: bool) -> anyhow::Result<()> {
    step(&format!(
        "build agentwall ({})",
        if release { "release" } else { "debug" }
    ));
    let mut c = cargo();
    // --locked: the build uses Cargo.lock as committed, or fails saying it is stale.
    c.args(["build", "--locked", "-p", "agentwall", "--bin", "agentwall"]);
    if release {
        c.arg("--release");
    }
    // `agentwall version` names it.
    if let Some(commit) = build_commit() {
        c.env("AGENTWALL_BUILD_COMMIT", commit);
    }
    status(c)
}

/// The commit being built, `-dirty` when the work tree differs from it; none without git.
fn build_commit() -> Option<String> {
    let out = Command::new("git")
        .current_dir(root())
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let clean = Command::new("git")
        .current_dir(root())
        .args(["diff", "--quiet", "HEAD"])
        .status()
        .is_ok_and(|s| s.success());
    Some(if clean {
        commit
    } else {
        format!("{commit}-dirty")
    })
}

fn lint() -> anyhow::Result<()> {
    step("cargo fmt --check");
    let mut c = cargo();
    c.args(["fmt", "--all", "--", "--check"]);
    status(c)?;
    step("clippy (userspace crates)");
    let mut c = cargo();
    // Default members: every crate but the kernel one, which only builds for BPF.
    c.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    status(c)?;
    step("clippy (kernel crate, bpfel-unknown-none)");
    let mut c = Command::new("rustup");
    c.current_dir(root());
    c.args([
        "run",
        &setup::nightly(),
        "cargo",
        "clippy",
        "-p",
        "agentwall-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--bins",
        "--",
        "-D",
        "warnings",
    ]);
    // aya-ebpf picks the architecture's bindings from this cfg, as aya-build sets it.
    c.env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
    );
    c.env("CARGO_TARGET_DIR", root().join("target/ebpf-clippy"));
    c.env_remove("RUSTC");
    c.env_remove("RUSTC_WORKSPACE_WRAPPER");
    status(c)?;
    step("cargo deny check licenses bans sources (deny.toml)");
    setup::cargo_deny()?;
    let mut c = cargo();
    c.args(["deny", "check", "licenses", "bans", "sources"]);
    status(c)
}

/// Programs the integration tests drive, with the Debian package of each: curl through
/// `agentwall exec`, the Python example agent (standard library only), Python's venv for
/// py-spiffe (see [`py_spiffe`]), and rsyslog with its OpenSSL driver as the real remote
/// collector of the audit log.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("/usr/bin/curl", "curl"),
    ("/usr/bin/python3", "python3"),
    ("/usr/lib/python3.11/ensurepip/__init__.py", "python3-venv"),
    ("/usr/sbin/rsyslogd", "rsyslog"),
    (
        "/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_ossl.so",
        "rsyslog-openssl",
    ),
    // The package: cargo-deb's dependency scan, strip for the tarball, `man -w` in its test.
    ("/usr/bin/dpkg-shlibdeps", "dpkg-dev"),
    ("/usr/bin/strip", "binutils"),
    ("/usr/bin/man", "man-db"),
    // The enforcement benchmark's side-by-side with nftables.
    ("/usr/sbin/nft", "nftables"),
    // The fleet's tests run etcd on loopback, and write to it as any writer could.
    ("/usr/bin/etcd", "etcd-server"),
    ("/usr/bin/etcdctl", "etcd-client"),
    // The secret store's database engine issues roles in a real PostgreSQL on loopback.
    ("/usr/bin/psql", "postgresql-client"),
    ("/usr/lib/postgresql/15/bin/initdb", "postgresql"),
    // The systemd unit's tests: its score, its system-call groups and the syscall numbers
    // the sandbox builds its filter from.
    ("/usr/bin/systemd-analyze", "systemd"),
    (
        "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
        "linux-libc-dev",
    ),
];

/// Installs the test tools that are missing (Debian's packages; idempotent).
fn test_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = TEST_TOOLS
        .iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "install the test tools: apt-get install {}",
        missing.join(" ")
    ));
    let mut c = Command::new("apt-get");
    c.args(["update", "-qq"]);
    status(c).context("apt-get update (the tests need Debian's packages)")?;
    let mut c = Command::new("apt-get");
    c.args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    status(c).with_context(|| {
        format!(
            "installing {} (needed by the integration tests)",
            missing.join(" ")
        )
    })
}

/// Where the tests' Python environments live: outside the build tree, which may sit in a
/// directory the unprivileged user a client runs as cannot enter.
const TEST_VENVS: &str = "/opt/agentwall-tests";

/// Installs py-spiffe, the third-party SPIFFE client of the Workload API tests, with the
/// versions `tests/fixtures/workload/requirements.txt` pins. Returns its Python.
fn py_spiffe() -> anyhow::Result<PathBuf> {
    venv("py-spiffe", "tests/fixtures/workload/requirements.txt").map(|bin| bin.join("python3"))
}

/// Installs Helm, kubernetes-validate and checkov, for the chart's tests, with the versions
/// `tests/fixtures/kubernetes/requirements.txt` pins. Returns their `bin` directory.
fn kubernetes_tools() -> anyhow::Result<PathBuf> {
    venv("kubernetes", "tests/fixtures/kubernetes/requirements.txt")
}

/// A virtual environment of Debian's Python named `name` under [`TEST_VENVS`], with what the
/// requirements file `req` pins (installed again whenever that file changes). Returns its
/// `bin` directory.
fn venv(name: &str, req: &str) -> anyhow::Result<PathBuf> {
    let dir = Path::new(TEST_VENVS).join(name);
    let req = root().join(req);
    let wanted =
        std::fs::read_to_string(&req).with_context(|| format!("reading {}", req.display()))?;
    let stamp = dir.join("requirements.txt");
    let bin = dir.join("bin");
    if bin.join("python3").exists()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted)
    {
        return Ok(bin);
    }
    step(&format!("install {} into {}", req.display(), dir.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut c = Command::new("/usr/bin/python3");
    c.args(["-m", "venv"]).arg(&dir);
    status(c).context("creating the virtual environment (python3-venv)")?;
    let mut c = Command::new(bin.join("pip"));
    c.args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-cache-dir",
        "-r",
    ])
    .arg(&req);
    status(c).with_context(|| format!("installing {} from PyPI", req.display()))?;
    std::fs::copy(&req, &stamp).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(bin)
}

fn test() -> anyhow::Result<()> {
    step("build binaries for the tests");
    let mut c = cargo();
    c.args([
        "build",
        "--locked",
        "-p",
        "agentwall",
        "-p",
        "agentwall-tests",
        "--bins",
    ]);
    status(c)?;
    step("unit tests");
    let mut c = cargo();
    c.args([
        "test",
        "--locked",
        "-p",
        "agentwall-common",
        "-p",
        "agentwall",
        "-p",
        "xtask",
    ]);
    status(c)?;
    if !is_root() {
        bail!(
            "the integration tests load kernel programs and create cgroups: run `cargo xtask test` as root \
             (they are never skipped)"
        );
    }
    test_tools()?;
    let python = py_spiffe()?;
    let kubernetes = kubernetes_tools()?;
    // The package tests install and start what a user would download.
    build(true)?;
    let artifacts = package::run()?;
    // The upgrade tests start the previous release's daemon, then this one on its pins.
    let previous = previous::build()?;
    // Twice: the daemon as it is, then under the restrictions of the shipped systemd unit
    // (tests/src/bin/aw-unit-sandbox applies them; systemd is not PID 1 on these machines).
    let unit = root().join("deploy/systemd/agentwall.service");
    for (what, under) in [("", None), (" under the systemd unit", Some(&unit))] {
        leftovers::sweep(&root().join("target/debug/agentwall"));
        step(&format!(
            "root integration tests{what} (serial, real kernel)"
        ));
        let mut c = cargo();
        c.args([
            "test",
            "--locked",
            "-p",
            "agentwall-tests",
            "--",
            "--test-threads=1",
        ]);
        c.env("AGENTWALL_BIN", root().join("target/debug/agentwall"));
        c.env("AGENTWALL_PY_SPIFFE", &python);
        c.env("AGENTWALL_KUBERNETES_TOOLS", &kubernetes);
        c.env("AGENTWALL_DEB", &artifacts.deb);
        c.env("AGENTWALL_TARBALL", &artifacts.tarball);
        c.env("AGENTWALL_PREVIOUS_BIN", &previous);
        match under {
            Some(u) => c.env("AGENTWALL_UNDER_UNIT", u),
            None => c.env_remove("AGENTWALL_UNDER_UNIT"),
        };
        root_tests(c, what)?;
    }
    Ok(())
}

/// Runs the root integration tests of `c`, passing their output through, and fails unless
/// some ran and none failed.
#[expect(clippy::print_stderr, reason = "xtask reports to the terminal")]
fn root_tests(mut c: Command, what: &str) -> anyhow::Result<()> {
    c.stdout(std::process::Stdio::piped());
    let out = c
        .spawn()
        .context("starting the integration tests")?
        .wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    #[expect(clippy::print_stdout, reason = "the test output, passed through")]
    {
        print!("{text}");
    }
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in text.lines().filter(|l| l.starts_with("test result:")) {
        let num = |key: &str| -> u64 {
            line.split(';')
                .find_map(|part| {
                    part.trim()
                        .strip_suffix(key)
                        .map(str::trim)
                        .map(|n| n.rsplit(' ').next().unwrap_or("0").parse().unwrap_or(0))
                })
                .unwrap_or(0)
        };
        passed += num("passed");
        failed += num("failed");
    }
    eprintln!("==> root integration tests{what}: {passed} passed, {failed} failed");
    if !out.status.success() || failed > 0 {
        bail!("integration tests{what} failed");
    }
    if passed == 0 {
        bail!("no root integration test ran{what}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The image's inputs stay pinned: each base image by digest, the nightly by date, and
    /// the build image's Rust the one rust-toolchain.toml names.
    #[test]
    fn the_image_is_built_from_pinned_inputs() {
        let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
        let toolchain = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
        let channel = toolchain
            .lines()
            .find_map(|l| l.trim().strip_prefix("channel = "))
            .map(|c| c.trim_matches('"'))
            .expect("a channel in rust-toolchain.toml");
        let arg = |name: &str| {
            dockerfile
                .lines()
                .find_map(|l| l.strip_prefix(&format!("ARG {name}=")))
                .unwrap_or_else(|| panic!("ARG {name} with a default"))
                .to_owned()
        };
        for name in ["BUILD_IMAGE", "RUNTIME_IMAGE"] {
            let image = arg(name);
            let digest = image.split_once("@sha256:").map(|(_, d)| d);
            assert!(
                digest.is_some_and(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit())),
                "{name} is not pinned by digest: {image}"
            );
        }
        assert!(
            arg("BUILD_IMAGE").contains(&format!("/rust:{channel}-")),
            "the build image's Rust is not {channel}"
        );
        let froms: Vec<&str> = dockerfile
            .lines()
            .filter_map(|l| l.strip_prefix("FROM "))
            .collect();
        assert_eq!(froms, ["${BUILD_IMAGE} AS build", "${RUNTIME_IMAGE}"]);
        let nightly = dockerfile
            .lines()
            .find_map(|l| l.strip_prefix("ENV AGENTWALL_NIGHTLY="))
            .expect("the image names its nightly");
        let date = nightly.strip_prefix("nightly-").unwrap_or_default();
        assert!(
            date.len() == 10 && date.bytes().filter(|b| *b == b'-').count() == 2,
            "the nightly is not dated: {nightly}"
        );
        assert!(dockerfile.contains("cargo xtask build --release"));
    }

    #[test]
    fn every_benchmark_named_has_its_file() {
        for (name, _) in BENCHES {
            let file = root().join("tests/benches").join(format!("{name}.rs"));
            assert!(file.is_file(), "{} is missing", file.display());
        }
    }
}
