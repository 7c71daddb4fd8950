//! `cargo xtask`: bootstrap, build, test and benchmark kpx.

mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "kpx development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Make this machine ready: Debian packages, nightly rust-src, bpf-linker.
    Setup,
    /// Build the agent (with its embedded eBPF datapath), release profile.
    Build,
    /// Run the whole test suite, the root-only (ignored) tests included: run
    /// it as root.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Formatting and clippy, for the workspace and the eBPF crate.
    Lint,
    /// Benchmark kpx against kube-proxy's iptables and nftables modes
    /// (needs root): results in target/bench/.
    Bench {
        /// About a minute: 1 and 1,000 services, one short run per figure.
        #[arg(long)]
        quick: bool,
        /// Only kpx's cost per packet (test_run and path lengths): seconds,
        /// no beds, no references.
        #[arg(long)]
        packet: bool,
        /// Further arguments for the benchmark (--sizes, --runs, --seconds).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run kpx for real on a namespace "cluster" and show it working (root).
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            cargo(&["build", "--release", "--package", "proxy-user"])
        }
        Task::Test { args } => {
            setup::run()?;
            // Tests that need root are `#[ignore = "needs root"]` so that a
            // plain `cargo test` reports them as not run; this suite runs
            // them, and without root they fail with the reason.
            // The socket-level load balancer's tests run their clients as
            // this program, in a cgroup of their own.
            cargo(&["build", "--package", "testbed", "--bin", "kpx-probe"])?;
            let mut cmd = vec!["test", "--workspace", "--exclude", "proxy-ebpf", "--"];
            cmd.push("--include-ignored");
            cmd.extend(args.iter().map(String::as_str));
            // A report only ever describes this run.
            let _ = std::fs::remove_file(differential_report());
            let result = cargo(&cmd);
            differential_summary();
            result
        }
        Task::Lint => {
            setup::run()?;
            cargo(&["fmt", "--all", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--exclude",
                "proxy-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            // The eBPF crate only builds for the BPF target, with nightly.
            run(Command::new("cargo")
                .args([
                    "+nightly",
                    "clippy",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                ])
                .args(["-Z", "build-std=core", "--", "-D", "warnings"])
                .current_dir(workspace_root().join("proxy-ebpf")))
        }
        Task::Demo => {
            setup::run()?;
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                bail!("the demo creates network namespaces and loads eBPF: run it as root");
            }
            cargo(&[
                "build",
                "--release",
                "--package",
                "proxy-user",
                "--bin",
                "kpx",
                "--example",
                "demo",
            ])?;
            cargo(&[
                "build",
                "--release",
                "--package",
                "testbed",
                "--bin",
                "kpx-probe",
            ])?;
            let root = workspace_root();
            let release = root.join("target/release");
            run(Command::new(release.join("examples/demo"))
                .arg("--kpx")
                .arg(release.join("kpx"))
                .arg("--probe")
                .arg(release.join("kpx-probe"))
                .arg("--manifest")
                .arg(root.join("examples/web.yaml")))
        }
        Task::Bench {
            quick,
            packet,
            args,
        } => {
            setup::run()?;
            let mut cmd = vec![
                "bench",
                "--package",
                "proxy-user",
                "--bench",
                "compare",
                "--",
            ];
            if quick {
                cmd.push("--quick");
            }
            if packet {
                cmd.push("--packet");
            }
            cmd.extend(args.iter().map(String::as_str));
            cargo(&cmd)
        }
    }
}

pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Runs `cargo ARGS` in the workspace root with cargo's own bin dir on PATH
/// (bpf-linker lives there).
fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new("cargo")
        .args(args)
        .current_dir(workspace_root()))
}

pub fn run(cmd: &mut Command) -> Result<()> {
    cmd.env("PATH", setup::path_with_cargo_bin());
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Shows which differential scenarios (kpx against kube-proxy) passed,
/// are pending, or failed, from the report the test leaves behind.
fn differential_summary() {
    let path = differential_report();
    let Ok(report) = std::fs::read_to_string(&path) else {
        return;
    };
    println!();
    for line in report.lines() {
        // The headline and one status line per scenario.
        if !line.starts_with("    ") {
            println!("{line}");
        }
    }
    println!("(full report: {})", path.display());
}

fn differential_report() -> PathBuf {
    workspace_root().join("target/tmp/differential-report.txt")
}
