//! `cargo xtask setup`: make a bare machine of this kind ready to build and
//! test kpx. Idempotent; takes well under a second when nothing is missing.
//!
//! - Debian packages the tests use (iproute2 for namespaces, iptables and
//!   nftables for the reference rules, ipset for the cleanup of IPVS
//!   mode's sets);
//! - the nightly toolchain's `rust-src` (the eBPF crate builds `core` itself);
//! - `bpf-linker`, built from crates.io against the nightly toolchain's own
//!   LLVM shared library (no prebuilt download exists here).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _, Result};

const DEBIAN_PACKAGES: &[&str] = &["iproute2", "iptables", "nftables", "ipset"];
const NIGHTLY: &str = "nightly";
/// The bpf-linker release this project is built and tested with.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    debian_packages()?;
    rust_src()?;
    bpf_linker()?;
    Ok(())
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// PATH with cargo's bin directory first, where rustup, cargo and bpf-linker live.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let bin = cargo_home().join("bin");
    let mut paths = vec![bin];
    if let Some(p) = env::var_os("PATH") {
        paths.extend(env::split_paths(&p));
    }
    env::join_paths(paths).unwrap_or_else(|_| env::var_os("PATH").unwrap_or_default())
}

fn output(cmd: &mut Command) -> Result<String> {
    cmd.env("PATH", path_with_cargo_bin());
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing Debian packages {missing:?}; as root run: apt-get install -y {}",
            missing.join(" ")
        );
    }
    eprintln!("setup: installing Debian packages {missing:?}");
    let apt = |args: &[&str]| {
        crate::run(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))
        .context("the nightly toolchain is needed to build the eBPF datapath")?;
    Ok(PathBuf::from(out.trim()))
}

fn rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    crate::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        NIGHTLY,
    ]))
}

/// The nightly toolchain's LLVM shared library: (file name, LLVM major version).
fn nightly_llvm(sysroot: &Path) -> Result<(String, u32)> {
    let lib_dir = sysroot.join("lib");
    let lib = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .ok_or_else(|| anyhow!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let verbose = output(Command::new("rustup").args(["run", NIGHTLY, "rustc", "-vV"]))?;
    let major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .ok_or_else(|| anyhow!("no LLVM version in `rustc +nightly -vV`:\n{verbose}"))?;
    Ok((lib, major))
}

fn bpf_linker() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    let (lib, major) = nightly_llvm(&sysroot)?;
    // The linker's RUNPATH points into this directory, so it lives beside
    // cargo's own files rather than in a temporary directory.
    let prefix = cargo_home().join("kpx-llvm");
    let stamp_path = prefix.join("stamp");
    let stamp = format!("bpf-linker {BPF_LINKER_VERSION} against {lib}\n");
    let linker_works = Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path_with_cargo_bin())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if linker_works && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against {lib} (about a minute)");
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    let target = sysroot.join("lib").join(&lib);
    for name in ["libLLVM.so", lib.as_str()] {
        let link = lib_dir.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
    }
    crate::run(
        Command::new("cargo")
            .args(["+nightly", "install", "bpf-linker", "--force"])
            .args(["--version", BPF_LINKER_VERSION])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )?;
    fs::write(&stamp_path, stamp).with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(())
}
