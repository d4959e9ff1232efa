//! Compiles the kernel programs in `ebpf/` for `bpfel-unknown-none` and places the object in
//! OUT_DIR, where the daemon embeds it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    if which::which("bpf-linker").is_err() {
        return Err(anyhow!(
            "bpf-linker is not installed (or not on PATH). Run `cargo xtask setup` once; it installs \
             bpf-linker and the nightly rust-src component that building the kernel programs needs."
        ));
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading the workspace metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "agentwall-ebpf")
        .ok_or_else(|| anyhow!("package agentwall-ebpf not found in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root.as_str(),
        ..Default::default()
    };
    // The nested cargo's progress lines would each become a cargo warning; keep only its
    // diagnostics.
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    // The nightly that `cargo xtask setup` prepared (rust-src, bpf-linker against its LLVM).
    println!("cargo:rerun-if-env-changed=AGENTWALL_NIGHTLY");
    let nightly = std::env::var("AGENTWALL_NIGHTLY").unwrap_or_default();
    let toolchain = if nightly.is_empty() {
        aya_build::Toolchain::Nightly
    } else {
        aya_build::Toolchain::Custom(&nightly)
    };
    aya_build::build_ebpf([package], toolchain).context(
        "building the kernel programs (ebpf/); `cargo xtask setup` installs what this needs",
    )
}
