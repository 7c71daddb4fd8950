//! Builds the eBPF datapath (proxy-ebpf) for bpfel-unknown-none with aya-build
//! and leaves the object in OUT_DIR, where `datapath.rs` embeds it.
//!
//! Needs the nightly toolchain with rust-src and bpf-linker: `cargo xtask setup`.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("proxy-user has no parent directory"))?;
    let ebpf_dir = root.join("proxy-ebpf");
    let common_dir = root.join("proxy-common");
    // aya-build watches the eBPF crate; the shared layouts are part of it too.
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
