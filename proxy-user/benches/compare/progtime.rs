//! kpx's programs timed where they run: the kernel's own statistics
//! (`BPF_ENABLE_STATS`, on only while its descriptor is held, so nothing
//! is left switched on) of every loaded program whose name starts with
//! `kpx_`, read before and after a load, as time per run and runs per
//! transaction. What `BPF_PROG_TEST_RUN` cannot show: the socket
//! programs (no test run for cgroup hooks) and the tc programs on the
//! real path, caches and all. The kernel's timing of each run (two clock
//! reads) is inside the figures: about 20-30 ns a run on this machine kind,
//! as the empty paths show. Programs are told by name: the bench's own
//! agent is the only kpx running while it measures (a kpx loaded by
//! something else at the same time would be counted with it).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// One program's share of a load.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgramTime {
    pub name: String,
    /// Mean time per run, ns.
    pub ns_per_run: f64,
    /// Runs per transaction of the load (per connection for TCP_CRR).
    pub runs_per_transaction: f64,
}

/// A program's name as the kernel keeps it (15 characters: `connect4`
/// and `connect6` both read `kpx_sock_connec`), made readable: the socket
/// hooks by their call, both families together.
fn label(kernel_name: &str) -> String {
    const SOCK: [(&str, &str); 5] = [
        ("kpx_sock_connec", "connect()"),
        ("kpx_sock_sendms", "sendmsg()"),
        ("kpx_sock_recvms", "recvmsg()"),
        ("kpx_sock_getpee", "getpeername()"),
        ("kpx_sock_releas", "socket release"),
    ];
    SOCK.iter()
        .find(|(k, _)| *k == kernel_name)
        .map_or_else(|| kernel_name.to_string(), |(_, l)| l.to_string())
}

/// Run time and count by program (programs of one label summed).
fn snapshot() -> Result<BTreeMap<String, (u128, u64)>> {
    let mut by_name = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if !name.starts_with("kpx_") {
            continue;
        }
        let e = by_name.entry(label(name)).or_insert((0u128, 0u64));
        e.0 += info.run_time().as_nanos();
        e.1 += info.run_count();
    }
    Ok(by_name)
}

/// Runs `load` (which returns how many transactions it made) with the
/// kernel's statistics on; every `kpx_` program that ran, by name.
pub fn during(load: impl FnOnce() -> Result<f64>) -> Result<Vec<ProgramTime>> {
    let _on = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("BPF_ENABLE_STATS (kernel ≥ 5.8)")?;
    let before = snapshot()?;
    let transactions = load()?.max(1.0);
    let after = snapshot()?;
    Ok(after
        .into_iter()
        .filter_map(|(name, (ns, runs))| {
            let (ns0, runs0) = before.get(&name).copied().unwrap_or_default();
            let runs = runs.checked_sub(runs0).filter(|&r| r > 0)?;
            Some(ProgramTime {
                ns_per_run: ns.saturating_sub(ns0) as f64 / runs as f64,
                runs_per_transaction: runs as f64 / transactions,
                name,
            })
        })
        .collect())
}
