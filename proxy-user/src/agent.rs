//! `kpx agent`: load and attach the datapath, keep its maps equal to the
//! desired state, follow changes, detach cleanly on SIGTERM/SIGINT.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use proxy_common::Event;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
    time::{interval, MissedTickBehavior},
};

use crate::{
    attach::{self, Attacher, Patterns},
    bpffs,
    conntrack::{self, Timeouts},
    datapath::{Datapath, LoadOptions, MapSet},
    manifests, model,
    sync::{self, MapState},
};

/// An IPv4 CIDR such as `198.18.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("bad prefix length {l:?}"))?;
        Ok(Self { addr, len })
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Manifest file or directory (standalone mode).
    pub manifests: PathBuf,
    pub hostname: String,
    pub node_ips: Vec<Ipv4Addr>,
    pub cluster_cidrs: Vec<Cidr>,
    pub interfaces: Patterns,
    pub bpffs: PathBuf,
    pub conntrack_entries: Option<u32>,
    /// How often the manifests are checked for changes.
    pub poll: Duration,
    /// How often the maps are re-read and repaired.
    pub resync: Duration,
    pub ct_timeouts: Timeouts,
    /// How often expired conntrack entries are collected.
    pub ct_gc_interval: Duration,
}

/// Counters the agent keeps about itself (exported as metrics later).
#[derive(Debug, Default)]
pub struct AgentStats {
    pub syncs: u64,
    pub sync_failures: u64,
    pub invalid_objects: u64,
    /// Running totals of the agent-owned event counters.
    pub gc_expired: u64,
    pub gc_stale_udp: u64,
}

pub async fn run(cfg: Config) -> Result<()> {
    bpffs::ensure(&cfg.bpffs)?;
    let mut dp = Datapath::load(&LoadOptions {
        pin_dir: Some(cfg.bpffs.clone()),
        conntrack_entries: cfg.conntrack_entries,
    })?;
    // Pinned maps survive restarts: start from what they hold, so the first
    // sync only writes differences and live flows keep their conntrack.
    let mut mirror = dp.maps.read_state().context("reading the pinned maps")?;
    log::info!(
        "kpx agent on node {:?} (node IPs {:?}, cluster CIDRs {:?}); maps in {} hold {} frontends",
        cfg.hostname,
        cfg.node_ips,
        cfg.cluster_cidrs,
        cfg.bpffs.display(),
        mirror.services.len()
    );
    let mut attacher = Attacher::new(cfg.interfaces.clone());
    attacher.reconcile(&mut dp);
    let (link_tx, mut link_rx) = mpsc::channel(1);
    attach::watch_links(link_tx);

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut poll = interval(cfg.poll);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut resync = interval(cfg.resync);
    resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
    resync.tick().await;

    let mut stats = AgentStats::default();
    // Continue the totals an earlier agent left in the pinned counters.
    for (e, n) in dp.maps.events().unwrap_or_default() {
        match e {
            Event::GcExpired => stats.gc_expired = n,
            Event::GcStaleUdp => stats.gc_stale_udp = n,
            _ => {}
        }
    }
    let mut gc = interval(cfg.ct_gc_interval);
    gc.set_missed_tick_behavior(MissedTickBehavior::Delay);
    gc.tick().await;
    let mut last_fingerprint = None;
    let mut dirty = true;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { log::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { log::info!("SIGINT: stopping"); break; }
            Some(()) = link_rx.recv() => attacher.reconcile(&mut dp),
            _ = poll.tick() => {
                match manifests::fingerprint(&cfg.manifests) {
                    Ok(fp) if Some(fp) != last_fingerprint => {
                        last_fingerprint = Some(fp);
                        dirty = true;
                    }
                    Ok(_) => {}
                    // Keep serving the last good state; never flush.
                    Err(e) => log::warn!("manifests unreadable, keeping the current state: {e:#}"),
                }
                if dirty {
                    dirty = !sync_once(&cfg, &mut dp.maps, &mut mirror, &mut stats);
                }
            }
            _ = gc.tick() => collect(&cfg, &mut dp.maps, &HashSet::new(), &mut stats),
            _ = resync.tick() => {
                // Repairs drift: entries edited or deleted behind our back.
                match dp.maps.read_state() {
                    Ok(state) => mirror = state,
                    Err(e) => log::warn!("re-reading maps: {e:#}"),
                }
                attacher.reconcile(&mut dp);
                dirty = true;
            }
        }
    }
    attacher.detach_all(&mut dp);
    log::info!(
        "stopped after {} syncs ({} failed, {} invalid objects); maps stay pinned in {}",
        stats.syncs,
        stats.sync_failures,
        stats.invalid_objects,
        cfg.bpffs.display()
    );
    Ok(())
}

/// One conntrack collection: expired flows, and UDP flows to `stale` backends.
fn collect(
    cfg: &Config,
    maps: &mut MapSet,
    stale: &HashSet<conntrack::ServiceBackend>,
    stats: &mut AgentStats,
) {
    let started = Instant::now();
    let report = match conntrack::collect(maps, &cfg.ct_timeouts, stale) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("conntrack collection: {e:#}; will retry");
            return;
        }
    };
    stats.gc_expired += report.expired;
    stats.gc_stale_udp += report.stale_udp;
    for (e, n) in [
        (Event::GcExpired, stats.gc_expired),
        (Event::GcStaleUdp, stats.gc_stale_udp),
    ] {
        if let Err(err) = maps.set_event(e, n) {
            log::warn!("updating the {} counter: {err:#}", e.name());
        }
    }
    if report.stale_udp > 0 {
        log::info!(
            "removed {} UDP conntrack entries of {} backends that left their service",
            report.stale_udp,
            stale.len()
        );
    }
    let level = if report.expired > 0 {
        log::Level::Info
    } else {
        log::Level::Debug
    };
    log::log!(
        level,
        "conntrack: {} entries, {} expired removed in {:.1?}",
        report.entries,
        report.expired,
        started.elapsed()
    );
}

/// One sync from the manifests; false when it must be retried.
fn sync_once(
    cfg: &Config,
    maps: &mut MapSet,
    mirror: &mut MapState,
    stats: &mut AgentStats,
) -> bool {
    let started = Instant::now();
    let loaded = match manifests::load(&cfg.manifests) {
        Ok(l) => l,
        Err(e) => {
            log::warn!("manifests unreadable, keeping the current state: {e:#}");
            return false;
        }
    };
    let outcome = model::desired(&loaded.services, &loaded.slices);
    for p in loaded.problems.iter().chain(&outcome.problems) {
        stats.invalid_objects += 1;
        log::warn!("skipped invalid input: {p}");
    }
    for (what, why) in &outcome.skipped {
        log::debug!("not served: {what}: {why:?}");
    }
    let ops = match sync::plan(
        mirror,
        &outcome.desired,
        proxy_common::capacity::SERVICE_STATS,
    ) {
        Ok(ops) => ops,
        Err(e) => {
            stats.sync_failures += 1;
            log::error!("sync: {e}");
            return false;
        }
    };
    let stale = sync::stale_udp(mirror, &outcome.desired);
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = maps.write(op) {
            stats.sync_failures += 1;
            // Every prefix of a plan is a consistent datapath: stop here and retry.
            log::error!(
                "map write {}/{} ({op:?}) failed: {e}; will retry",
                i + 1,
                ops.len()
            );
            return false;
        }
        mirror.record(op);
    }
    stats.syncs += 1;
    if !stale.is_empty() {
        // After the writes: no new flow can pick these backends any more.
        collect(cfg, maps, &stale, stats);
    }
    let served = outcome
        .desired
        .frontends
        .values()
        .filter(|f| !f.backends.is_empty())
        .count();
    log::info!(
        "synced {} frontends ({} with endpoints): {} map writes in {:.1?}",
        outcome.desired.frontends.len(),
        served,
        ops.len(),
        started.elapsed()
    );
    true
}
