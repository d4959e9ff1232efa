//! `cargo xtask setup`: what building the kernel programs needs, installed once.
//!
//! - the nightly toolchain's `rust-src` (for `-Z build-std=core` on bpfel-unknown-none);
//! - protoc and the well-known protobuf types, which the etcd client's build generates its
//!   gRPC code with (Debian's protobuf-compiler and libprotobuf-dev);
//! - bpf-linker, built against the very LLVM of the nightly toolchain that emits the bitcode.
//!   No LLVM development package of that version exists on these machines, so a prefix
//!   directory whose `lib/` links to the toolchain's own libLLVM stands in for one; the
//!   linker's RUNPATH points there, so the prefix lives under CARGO_HOME, not in target/.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::step;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-deny, which `cargo xtask lint` runs on the dependency graph (deny.toml).
const CARGO_DENY_VERSION: &str = "0.20.2";
/// cargo-deb, which `cargo xtask package` builds the Debian package with.
const CARGO_DEB_VERSION: &str = "3.8.0";

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// The nightly toolchain that builds the kernel programs: `AGENTWALL_NIGHTLY` (the image pins
/// a dated one, e.g. `nightly-2026-05-20`), else whatever `nightly` rustup has.
pub(crate) fn nightly() -> String {
    std::env::var("AGENTWALL_NIGHTLY")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "nightly".into())
}

pub(crate) fn run() -> anyhow::Result<()> {
    protoc()?;
    step("setup: nightly toolchain");
    let nightly = nightly();
    let verbose = output(Command::new("rustc").args([
        &format!("+{nightly}"),
        "--version",
        "--verbose",
    ]))
    .with_context(|| {
        format!(
            "the nightly Rust toolchain `{nightly}` is needed to build the kernel programs; \
             install it with `rustup toolchain install {nightly} --profile minimal`"
        )
    })?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .with_context(|| format!("cannot read the LLVM version from `rustc +{nightly} -vV`"))?
        .to_string();
    let nightly_version = verbose.lines().next().unwrap_or_default().to_string();

    step("setup: rust-src for nightly");
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &nightly,
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        let st = Command::new("rustup")
            .args(["component", "add", "rust-src", "--toolchain", &nightly])
            .status()
            .context("starting rustup")?;
        if !st.success() {
            bail!("`rustup component add rust-src --toolchain {nightly}` failed");
        }
    }

    step("setup: bpf-linker");
    let home = cargo_home();
    let stamp = home.join("agentwall").join("bpf-linker.stamp");
    let want_stamp = format!("bpf-linker {BPF_LINKER_VERSION} for {nightly_version}");
    let linker_works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let stamp_ok = fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == want_stamp);
    if linker_works && stamp_ok {
        return Ok(());
    }
    if linker_works && !stamp.exists() {
        // Installed by other means; trust it if it runs.
        return Ok(());
    }
    let prefix = llvm_prefix(&home)?;
    step(&format!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly LLVM {llvm_major} (about two minutes)"
    ));
    let st = Command::new("cargo")
        .args([
            &format!("+{nightly}"),
            "install",
            "--locked",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("starting cargo install")?;
    if !st.success() {
        bail!("installing bpf-linker failed (see the cargo output above)");
    }
    let works = Command::new("bpf-linker").arg("--version").output();
    match works {
        Ok(o) if o.status.success() => {}
        Ok(o) => bail!(
            "bpf-linker was installed but does not run: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => bail!(
            "bpf-linker was installed but is not on PATH ({e}); add {} to PATH",
            home.join("bin").display()
        ),
    }
    fs::write(&stamp, format!("{want_stamp}\n"))
        .with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

/// The well-known types the etcd client's protocol files import.
const PROTOBUF_INCLUDE: &str = "/usr/include/google/protobuf/descriptor.proto";

/// Installs Debian's protobuf-compiler and libprotobuf-dev unless a protoc runs (or PROTOC
/// names one) and the well-known types are there (or PROTOC_INCLUDE names them).
fn protoc() -> anyhow::Result<()> {
    let runs = |p: &std::ffi::OsStr| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let named = std::env::var_os("PROTOC");
    let includes = std::env::var_os("PROTOC_INCLUDE").is_some()
        || std::path::Path::new(PROTOBUF_INCLUDE).exists();
    if includes
        && named
            .as_deref()
            .map_or_else(|| runs("protoc".as_ref()), runs)
    {
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "protoc is needed to build the etcd client: install Debian's protobuf-compiler and \
             libprotobuf-dev (`apt-get install protobuf-compiler libprotobuf-dev`), or set \
             PROTOC and PROTOC_INCLUDE"
        );
    }
    step("setup: protoc (apt-get install protobuf-compiler libprotobuf-dev)");
    let mut c = Command::new("apt-get");
    c.args(["update", "-qq"]);
    crate::status(c).context("apt-get update (for protobuf-compiler)")?;
    let mut c = Command::new("apt-get");
    c.args([
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "protobuf-compiler",
        "libprotobuf-dev",
    ])
    .env("DEBIAN_FRONTEND", "noninteractive");
    crate::status(c).context("installing protobuf-compiler")?;
    if !runs("protoc".as_ref()) || !std::path::Path::new(PROTOBUF_INCLUDE).exists() {
        bail!(
            "protobuf-compiler and libprotobuf-dev were installed but protoc does not run or {PROTOBUF_INCLUDE} is missing"
        );
    }
    Ok(())
}

/// Installs cargo-deny at the pinned version unless it is there (a few minutes, once).
pub(crate) fn cargo_deny() -> anyhow::Result<()> {
    cargo_tool("cargo-deny", "deny", CARGO_DENY_VERSION)
}

/// Installs cargo-deb at the pinned version unless it is there (under a minute, once).
pub(crate) fn cargo_deb() -> anyhow::Result<()> {
    cargo_tool("cargo-deb", "deb", CARGO_DEB_VERSION)
}

/// `cargo install --locked` of `krate` at `version` unless `cargo SUB --version` names it.
fn cargo_tool(krate: &str, sub: &str, version: &str) -> anyhow::Result<()> {
    let have = Command::new("cargo")
        .args([sub, "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if have.is_some_and(|v| v.split_whitespace().any(|w| w == version)) {
        return Ok(());
    }
    step(&format!("setup: building {krate} {version} (once)"));
    let st = Command::new("cargo")
        .args(["install", krate, "--locked", "--version", version])
        .status()
        .context("starting cargo install")?;
    if !st.success() {
        bail!("installing {krate} failed (see the cargo output above)");
    }
    Ok(())
}

/// A directory with `lib/libLLVM.so` (and the library's own soname) linking to the nightly
/// toolchain's libLLVM.
fn llvm_prefix(home: &Path) -> anyhow::Result<PathBuf> {
    let sysroot =
        output(Command::new("rustc").args([&format!("+{}", nightly()), "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let lib = fs::read_dir(&libdir)
        .with_context(|| format!("listing {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: the nightly toolchain is incomplete",
                libdir.display()
            )
        })?;
    let prefix = home.join("agentwall").join("llvm-prefix");
    let plib = prefix.join("lib");
    fs::create_dir_all(&plib).with_context(|| format!("creating {}", plib.display()))?;
    let soname = lib
        .file_name()
        .context("libLLVM path without a file name")?;
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        let link = plib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(prefix)
}
