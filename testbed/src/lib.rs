//! A test bed of network namespaces: one node running a real `kpx agent`,
//! pods wired to it by veth pairs, real TCP/UDP servers answering with their
//! identity, and clients. Used by the end-to-end tests and the demo.
//!
//! Everything lives in namespaces created here, with no link to the root
//! namespace and no route out; addresses come from 198.18.0.0/15. Dropping a
//! [`Cluster`] stops its agent and servers and removes its namespaces, mounts
//! and files, also when a test fails.
//!
//! Dev-only: tests, the benchmark and the demo use it; the product does not.

use std::{net::Ipv4Addr, process::Command, sync::atomic::AtomicU32};

use anyhow::{bail, Context as _, Result};

pub mod apiserver;
mod cluster;
mod fixtures;
mod netns;
pub mod probe;
mod root;
mod traffic;
pub mod xdp;

pub use cluster::*;
pub use fixtures::*;
pub use netns::*;
pub use root::*;
pub use traffic::*;

/// The node's address on every pod link (each pod routes through it).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Its IPv6 address, on a dual-stack bed (RFC 5180's 2001:2::/48).
pub const GATEWAY6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
/// A dual-stack bed's IPv6 cluster CIDR: its pods are in 2001:2:0:N::/64.
pub const CLUSTER_CIDR6: &str = "2001:2::/56";
const WORK_ROOT: &str = "/run/kpx-testbed";
const PREFIX: &str = "kpxtb";

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}
