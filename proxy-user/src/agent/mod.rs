//! `kpx agent`: load and attach the datapath, keep its maps equal to the
//! desired state from the manifests or the Kubernetes API, follow changes,
//! exit on SIGTERM/SIGINT leaving the pinned datapath serving for the next
//! agent to take over.
//!
//! Syncs are rate-limited the way kube-proxy's are: a change is synced at
//! once if the last sync is older than `--min-sync-period`, else when it
//! becomes so; every change that arrived meanwhile rides along. Each sync
//! recomputes only the Services that changed and writes only differences.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant, SystemTime},
};

mod host;
mod housekeeping;
mod input;
mod resync;
mod runner;
pub mod settings;

pub use housekeeping::tune_malloc;
use input::{Input, Kind, Outcome};
use runner::SyncRunner;
pub use settings::{AgentFlags, Settings, Source};

use anyhow::{Context as _, Result};
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::runtime::watcher::Event as WatchEvent;
use proxy_common::{Event, LAYOUT_VERSION};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
    time::{interval, sleep_until, MissedTickBehavior},
};

use crate::{
    control::index::Index,
    control::manifests,
    control::model::{NodeInfo, Problem, Skipped},
    control::watch::{self, Change},
    dataplane::bpffs,
    dataplane::conntrack::{self},
    dataplane::layout,
    dataplane::maps::{CtTable, Datapath, LoadOptions, MapSet},
    dataplane::node::{self},
    dataplane::ports::PortFilter,
    dataplane::reconcile::{self, Mirror, Op},
    dataplane::takeover,
    dataplane::{
        attach::{self, Attacher},
        socklb,
        xdp::{self, XdpAttacher},
    },
    ops::health::{self, Health, ServiceHealth},
    ops::metrics::{DatapathCounters, MapLabel, Metrics, OutcomeLabel, ReasonLabel, ResourceLabel},
};

/// How long a failed sync waits before it is retried.
const RETRY: Duration = Duration::from_secs(1);
/// How often new flows' requests for tc egress are looked at: the longest
/// an ICMP error about a pod's first flow through tc can pass untranslated.
const EGRESS_POLL: Duration = Duration::from_millis(20);
/// A plan this long leaves enough freed heap behind to hand back.
const LARGE_PLAN: usize = 10_000;

/// The writes a large plan's writing thread hands over at a time.
const PIPELINE_CHUNK: usize = 32 * 1024;

/// Running totals the agent owns (also in the pinned event counters).
#[derive(Debug, Default)]
struct AgentStats {
    syncs: u64,
    sync_failures: u64,
    invalid_objects: u64,
}

struct Agent {
    cfg: Settings,
    dp: Datapath,
    mirror: Mirror,
    /// The frontend-port filter, kept with the mirror.
    ports: PortFilter,
    runner: SyncRunner,
    index: Index,
    metrics: Metrics,
    stats: AgentStats,
    collector: housekeeping::Collector,
    /// A resync's read of the maps is running: the writes made since it
    /// began.
    written_since_read: Option<Vec<Op>>,
    /// The inputs are complete enough to sync (manifests read, or both
    /// Services and EndpointSlices listed once).
    ready: bool,
    services: Input<Service>,
    slices: Input<EndpointSlice>,
    node_seen: Option<Option<Node>>,
    health: Health,
    service_health: ServiceHealth,
    /// netfilter's service flows were carried over (once, at the first
    /// sync: see `dataplane::takeover`).
    taken_over: bool,
    /// This agent's network namespace cookie: the node's sockets, for the
    /// socket-level load balancer (0: unknown, every socket a pod's).
    host_netns: u64,
    /// What is wrong with this node's Node object, as last reported.
    node_problems: Vec<Problem>,
    /// The manifests held this node's Node object at the last read.
    manifest_node: bool,
    /// "XDP on no interface" was said.
    xdp_reported: bool,
    /// IPv6's conntrack tables were created small (no IPv6 configured):
    /// said once when an IPv6 frontend appears.
    ipv6_small: bool,
}

pub async fn run(cfg: Settings) -> Result<()> {
    check_inputs(&cfg)?;
    bpffs::ensure(&cfg.bpffs)?;
    let _claim = loop {
        if let Some(lock) = bpffs::try_lock(&cfg.bpffs)? {
            break lock;
        }
        log::warn!(
            "another kpx agent manages {}; waiting for it to exit",
            cfg.bpffs.display()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    // IPv6's conntrack and affinity tables are preallocated: full size on
    // a node configured for IPv6 (an IPv6 cluster CIDR or node IP), small
    // elsewhere (IPv6 Services are still served, with fewer flows).
    let ipv6 = cfg.node_ips.iter().any(IpAddr::is_ipv6)
        || cfg.cluster_cidrs.iter().any(|c| c.addr().is_ipv6());
    let mut dp = Datapath::load(&LoadOptions {
        pin_dir: Some(cfg.bpffs.clone()),
        conntrack_entries: cfg.conntrack_entries,
        ipv6,
    })?;
    if !ipv6 {
        log::info!(
            "IPv6: no IPv6 cluster CIDR or node IP configured: IPv6's conntrack holds {} entries (pass --cluster-cidr with an IPv6 CIDR on a dual-stack or IPv6 cluster)",
            crate::dataplane::maps::IPV6_OFF_ENTRIES
        );
    }
    // Pinned maps survive restarts: start from what they hold, so the first
    // sync only writes differences and live flows keep their conntrack.
    let mirror = Mirror::new(dp.maps.read_state().context("reading the pinned maps")?);
    let mut ports =
        PortFilter::rebuild(&mirror.state, &dp.maps).context("reading the port filter")?;
    // Flows an earlier agent tracked keep their ports and addresses
    // marked (the filter map may be new: an upgrade replaces one of another
    // shape).
    match crate::dataplane::conntrack::flow_ports(&dp.maps) {
        Ok((live, addrs)) => ports.hold_live(&live, &addrs),
        // The collector's first walk marks them; until then their packets
        // may miss their ports' bits (only where the filter map is new).
        Err(e) => log::warn!("reading the conntrack tables for the port filter: {e:#}"),
    }
    log::info!(
        "kpx agent on node {:?} (node IPs {:?}, cluster CIDRs {:?}, scheduler {}); maps in {} hold {} frontends",
        cfg.hostname,
        cfg.node_ips,
        cfg.cluster_cidrs,
        cfg.scheduler,
        cfg.bpffs.display(),
        mirror.state.services.len()
    );
    match node::reserve_ports(&cfg.masquerade_ports) {
        Ok(Some(msg)) => log::info!("{msg}"),
        Ok(None) => {}
        Err(e) => log::warn!(
            "keeping local sockets out of the masquerade ports {}: {e:#}",
            cfg.masquerade_ports
        ),
    }
    let mut attacher = Attacher::new(cfg.interfaces.clone(), Some(&cfg.bpffs));
    let mut xdp = XdpAttacher::new(
        cfg.xdp,
        cfg.xdp_interfaces.clone(),
        cfg.interfaces.clone(),
        &cfg.bpffs,
    );
    let (link_tx, mut link_rx) = mpsc::channel(1);
    attach::watch_links(link_tx);

    let counters = match DatapathCounters::open(&cfg.bpffs) {
        Ok(c) => Some(Box::new(c) as Box<dyn prometheus_client::collector::Collector>),
        Err(e) => {
            log::warn!("the datapath's counters will not be in /metrics: {e:#}");
            None
        }
    };
    let metrics = Metrics::with_collector(counters);
    // kube-proxy's health timeout is twice its sync period.
    let health = Health::new(cfg.resync);
    if let Some(addr) = cfg.metrics_addr {
        health::serve("metrics", addr, metrics.router(), cfg.bind_hard_fail).await?;
    }
    if let Some(addr) = cfg.healthz_addr {
        let app = health::router(health.clone(), metrics.clone());
        health::serve("healthz", addr, app, cfg.bind_hard_fail).await?;
    }
    match dp.maps.capacities() {
        Ok(caps) => {
            for (map, cap) in caps {
                metrics
                    .map_capacity
                    .get_or_create(&MapLabel { map: map.into() })
                    .set(i64::from(cap));
            }
        }
        Err(e) => log::warn!("reading map capacities: {e:#}"),
    }
    // Room for a few hundred decoded objects: the event loop takes them in
    // batches anyway, and a deeper queue let the watches (on this thread
    // too) decode thousands ahead of it while listing, a peak of heap that
    // stayed resident (4 MiB at 10,000 Services) and delayed the first sync.
    let (change_tx, mut change_rx) = mpsc::channel::<Change>(256);
    let kube = matches!(cfg.source, Source::Kube { .. });
    if let Source::Kube { kubeconfig } = &cfg.source {
        let client = watch::client(kubeconfig.as_deref()).await?;
        log::info!(
            "watching Services, EndpointSlices and Node {:?} at {}",
            cfg.hostname,
            client.default_namespace()
        );
        watch::spawn(client, &cfg.hostname, change_tx);
    } else {
        drop(change_tx);
    }

    let expirer = match dp.expirer() {
        Ok(x) => Some(x),
        Err(e) => {
            log::warn!("no program to end expired flows' connection counts ({e:#}): least-connection counts keep expired flows");
            None
        }
    };
    let collector = housekeeping::Collector::start(&cfg, metrics.clone(), expirer)?;
    let mut agent = Agent {
        index: Index::new(NodeInfo {
            addresses: cfg.node_ips.clone(),
            ..NodeInfo::named(&cfg.hostname)
        })
        .scheduled_by(cfg.scheduler),
        runner: SyncRunner::new(cfg.min_sync, RETRY),
        cfg,
        dp,
        mirror,
        ports,
        metrics,
        stats: AgentStats::default(),
        collector,
        written_since_read: None,
        ready: false,
        services: Input::default(),
        slices: Input::default(),
        node_seen: None,
        service_health: ServiceHealth::new(health.clone(), Ipv4Addr::UNSPECIFIED),
        health,
        taken_over: false,
        host_netns: match socklb::netns_cookie() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("this network namespace's cookie: {e:#}; the socket-level load balancer takes every socket for a pod's");
                0
            }
        },
        node_problems: Vec::new(),
        manifest_node: false,
        xdp_reported: false,
        ipv6_small: !ipv6,
    };
    // Settings, addresses and the port filter of the frontends already in
    // the maps first, so the programs never run without them.
    agent.node_settings();
    agent.flush_ports();
    // On demand where the socket-level load balancer should take pods'
    // flows; on every interface after all if it does not.
    attacher.egress_on_demand(agent.cfg.socket_lb == socklb::Mode::All);
    attacher.reconcile(&mut agent.dp);
    if attacher.attached().next().is_none() {
        log::warn!(
            "--interfaces matches no interface of this node yet: nothing is translated until one appears (kpx attaches to it then)"
        );
    }
    // After tc: what XDP leaves alone goes on to tc ingress.
    agent.xdp(&mut xdp);
    if !agent.socket_lb() {
        attacher.egress_on_demand(false);
        attacher.reconcile(&mut agent.dp);
    }
    let (with_egress, attached) = (attacher.with_egress(), attacher.attached().count());
    log::info!(
        "tc egress on {with_egress} of {attached} interfaces{}",
        if with_egress < attached {
            "; on the others when a flow tc translates arrives there"
        } else {
            ""
        }
    );
    // Every program that creates flows is this build's now: what the old
    // ones set up while this one loaded is carried, and counted.
    agent.dp.carry_late();
    let migrated = |u: &&layout::Upgrade| matches!(u.from, Some(v) if v != LAYOUT_VERSION);
    if let Some(up) = agent.dp.upgrade.as_ref().filter(migrated) {
        for (outcome, n) in [("carried", up.carried), ("lost", up.lost)] {
            agent
                .metrics
                .upgrade_entries
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.into(),
                })
                .set(n as i64);
        }
    }
    agent.collector.arm();

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut poll = interval(agent.cfg.poll);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // New flows' requests for tc egress: served within this period.
    let mut egress_requests = interval(EGRESS_POLL);
    egress_requests.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut resync = interval(agent.cfg.resync);
    resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
    resync.tick().await;
    let (resync_tx, mut resync_rx) = mpsc::channel(1);
    let mut last_fingerprint = None;
    loop {
        let due = agent.sync_due();
        tokio::select! {
            _ = sigterm.recv() => { log::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { log::info!("SIGINT: stopping"); break; }
            Some(()) = link_rx.recv() => {
                agent.node_settings();
                attacher.reconcile(&mut agent.dp);
                agent.xdp(&mut xdp);
            }
            Some(change) = change_rx.recv(), if kube => {
                agent.on_change(change);
                // Take everything already queued: one sync for the batch.
                while let Ok(c) = change_rx.try_recv() {
                    agent.on_change(c);
                }
                agent.note_pending();
            }
            _ = poll.tick(), if !kube => {
                agent.poll_manifests(&mut last_fingerprint);
                agent.note_pending();
            }
            _ = async { sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await }, if due.is_some() => {
                agent.sync();
            }
            _ = egress_requests.tick() => {
                attacher.serve_requests(&mut agent.dp);
            }
            _ = resync.tick() => {
                agent.release_ports();
                agent.node_settings();
                attacher.reconcile(&mut agent.dp);
                agent.xdp(&mut xdp);
                agent.start_resync(&resync_tx, resync::Read::Digest);
            }
            Some(read) = resync_rx.recv() => agent.resynced(read, &resync_tx),
        }
    }
    let staying = attacher.release(&mut agent.dp);
    log::info!(
        "stopped after {} syncs ({} failed, {} invalid objects); maps stay pinned in {}{}",
        agent.stats.syncs,
        agent.stats.sync_failures,
        agent.stats.invalid_objects,
        agent.cfg.bpffs.display(),
        if staying > 0 {
            format!(
                " and the datapath stays attached to {staying} interfaces until the next agent takes it over (`kpx cleanup` removes it)"
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// What must hold before the agent touches the node: a path given at start
/// is checked at once (a typo must not start an agent that attaches
/// everywhere and serves an empty cluster). After start, an unreadable
/// manifest keeps the last good state instead.
fn check_inputs(cfg: &Settings) -> Result<()> {
    if let Source::Manifests(path) = &cfg.source {
        manifests::files(path).with_context(|| format!("--manifests {}", path.display()))?;
    }
    if let Source::Kube {
        kubeconfig: Some(path),
    } = &cfg.source
    {
        std::fs::metadata(path).with_context(|| format!("--kubeconfig {}", path.display()))?;
    }
    Ok(())
}

impl Agent {
    /// When the next sync may run, if one is owed.
    fn sync_due(&self) -> Option<tokio::time::Instant> {
        self.runner.due(self.ready, self.index.is_dirty())
    }

    /// Changes the maps do not reflect yet count against health.
    fn note_pending(&self) {
        if self.index.is_dirty() {
            self.health.queued();
        }
    }

    fn report(&mut self, problems: impl IntoIterator<Item = Problem>) {
        for p in problems {
            self.stats.invalid_objects += 1;
            self.metrics.invalid_objects.inc();
            log::warn!("skipped invalid input: {p}");
        }
    }

    fn poll_manifests(&mut self, last: &mut Option<u64>) {
        let Source::Manifests(path) = &self.cfg.source else {
            return;
        };
        match manifests::fingerprint(path) {
            Ok(fp) if Some(fp) != *last => {}
            Ok(_) => return,
            // Keep serving the last good state; never flush.
            Err(e) => {
                log::warn!("manifests unreadable, keeping the current state: {e:#}");
                return;
            }
        }
        let loaded = match manifests::load(path) {
            Ok(l) => l,
            Err(e) => {
                log::warn!("manifests unreadable, keeping the current state: {e:#}");
                return;
            }
        };
        *last = manifests::fingerprint(path).ok();
        let (_, problems) = self.index.replace_all(loaded.services, loaded.slices);
        // Every object of the files is reported, Nodes included.
        self.report(loaded.problems.into_iter().chain(problems));
        let hostname = self.cfg.hostname.clone();
        let mine = loaded
            .nodes
            .into_iter()
            .rev()
            .find(|n| n.object.metadata.name.as_deref() == Some(hostname.as_str()));
        let had = std::mem::replace(&mut self.manifest_node, mine.is_some());
        match mine {
            Some(n) => self.set_node(Some(n.object), false, &n.origin),
            // Removed from the files: as deleted. (Never given one: the
            // configured addresses stand.)
            None if had => self.set_node(None, true, "manifests"),
            None => {}
        }
        self.ready = true;
    }

    fn on_change(&mut self, change: Change) {
        match change {
            Change::Service(ev) => {
                let out = self.services.handle(&mut self.index, *ev);
                self.took::<Service>(out);
            }
            Change::Slice(ev) => {
                let out = self.slices.handle(&mut self.index, *ev);
                self.took::<EndpointSlice>(out);
            }
            Change::Node(ev) => self.on_node(*ev),
            Change::Error { resource, error } => {
                self.metrics
                    .api_errors
                    .get_or_create(&ResourceLabel {
                        resource: resource.into(),
                    })
                    .inc();
                log::warn!(
                    "Kubernetes API, {resource}: {error}; retrying with backoff, serving the last known state"
                );
            }
        }
        self.ready |= self.services.listed() && self.slices.listed();
    }

    fn relisted(&self, resource: &str, n: usize) {
        self.metrics
            .api_relists
            .get_or_create(&ResourceLabel {
                resource: resource.into(),
            })
            .inc();
        log::info!("listed {n} {resource}");
    }

    /// Counts and reports what one event of kind `K` did.
    fn took<K: Kind>(&mut self, out: Outcome) {
        K::changes(&self.metrics).inc_by(out.changes);
        if let Some(n) = out.relisted {
            self.relisted(K::RESOURCE, n);
        }
        self.report(out.problem);
    }

    /// Writes the port filter's changed words, after the frontends they
    /// let packets reach; false (logged) when a write failed.
    fn flush_ports(&mut self) -> bool {
        match self.ports.flush(&mut self.dp.maps) {
            Ok(n) => {
                self.metrics.map_writes.inc_by(n as u64);
                true
            }
            Err(e) => {
                log::error!("writing the port filter failed: {e}; will retry");
                false
            }
        }
    }

    /// Clears the port filter's held bits that the collector's last walk
    /// found no flow on.
    fn release_ports(&mut self) {
        let Some(live) = self.collector.live_ports() else {
            return;
        };
        let n = self.ports.release(&live);
        if n > 0 && self.flush_ports() {
            log::debug!("port filter: {n} bits released (no frontend, backend or flow uses them)");
        }
    }

    /// One sync: recompute what changed, write the difference.
    fn sync(&mut self) {
        let started = Instant::now();
        let full = self.runner.begin();
        let up = self.index.update();
        for c in &up.conflicts {
            log::warn!("{c}");
        }
        if self.ipv6_small && up.touched.iter().any(|k| k.addr.is_ipv6()) {
            self.ipv6_small = false;
            log::warn!(
                "IPv6 Services are served, but IPv6's conntrack tables hold {} flows (no IPv6 cluster CIDR or node IP was configured at start): set --cluster-cidr (clusterCIDR) with this cluster's IPv6 CIDR: the next start creates them at full size",
                crate::dataplane::maps::IPV6_OFF_ENTRIES
            );
        }
        let desired = self.index.desired();
        let cap = proxy_common::capacity::SERVICE_STATS;
        // Steady state: only what changed, so a sync costs the same at 10
        // or 10,000 services. A full diff repairs anything else.
        let scope = if full {
            reconcile::Scope::All
        } else {
            reconcile::Scope::Touched(&up.touched)
        };
        let ops = match reconcile::reconcile(&self.mirror, desired, scope, cap) {
            Ok(ops) => ops,
            Err(e) => {
                self.failed();
                log::error!("sync: {e}");
                return;
            }
        };
        let stale = reconcile::stale_udp(&self.mirror.state, desired, scope);
        let writing = Instant::now();
        // The new backends' ports before the slots that let flows pick
        // them: a flow's first reply must find its entry.
        if let Err(e) = self
            .ports
            .prepare(&ops, &self.mirror.state, &mut self.dp.maps)
        {
            log::error!("writing the port filter failed: {e}; will retry");
            self.failed();
            return;
        }
        if !self.apply(&ops) {
            self.failed();
            // What was written is served: its ports too.
            self.flush_ports();
            return;
        }
        if !std::mem::replace(&mut self.taken_over, true) {
            // Before the port filter lets the new frontends' packets reach
            // kpx's service lookup: until then they pass to netfilter.
            self.take_over();
        }
        if !self.flush_ports() {
            self.failed();
            return;
        }
        let (took, wrote) = (started.elapsed(), writing.elapsed());
        self.runner.succeeded();
        self.health.updated();
        self.service_health.sync(self.index.health_checks());
        if std::mem::take(&mut self.cfg.cleanup_kube_proxy) {
            tokio::task::spawn_blocking(|| match crate::ops::cleanup::kube_proxy() {
                Ok(report) => {
                    for line in report.to_string().lines() {
                        log::info!("kube-proxy cleanup: {line}");
                    }
                }
                Err(e) => log::warn!("kube-proxy cleanup failed: {e:#}"),
            });
        }
        self.stats.syncs += 1;
        self.metrics.synced(took);
        let now = SystemTime::now();
        for t in self.index.take_triggers() {
            let d = now.duration_since(t).unwrap_or_default();
            self.metrics.programming_latency.observe(d.as_secs_f64());
        }
        self.update_gauges();
        if !stale.is_empty() {
            // After the writes: no new flow can pick these backends any more.
            self.collector.flush_stale(stale);
        }
        // Quiet when nothing changed, except the first sync: "resumed from
        // the pinned maps with 0 writes" is worth seeing after a restart.
        let level = if ops.is_empty() && self.stats.syncs > 1 {
            log::Level::Debug
        } else {
            log::Level::Info
        };
        log::log!(
            level,
            "synced {} frontends ({}; {} services recomputed): {} map writes in {:.1?} (writing {:.1?})",
            self.index.desired().frontends.len(),
            if full { "full diff" } else { "changes only" },
            up.services,
            ops.iter().filter(|op| op.writes_map()).count(),
            took,
            wrote
        );
        // A first sync's plan at 50,000 services is ~80 MB, gone now.
        if ops.len() >= LARGE_PLAN {
            drop(ops);
            housekeeping::release_freed_memory();
        }
    }

    /// Writes `ops` in order, each recorded in the mirror (and the port
    /// filter) once it is in the maps. On a failed write, stops there
    /// (every prefix of a plan is a consistent datapath), logs and returns
    /// false. The one write stream of frontends, node addresses and settings.
    fn apply(&mut self, ops: &[Op]) -> bool {
        let (maps, mirror, ports) = (&mut self.dp.maps, &mut self.mirror, &mut self.ports);
        let mut record = |written: &[Op]| {
            for op in written {
                ports.observe(op, &mirror.state);
                mirror.record(op);
            }
        };
        let (done, failed) = if ops.len() < LARGE_PLAN {
            let (done, failed) = match maps.write_all(ops) {
                Ok(()) => (ops.len(), None),
                Err((done, e)) => (done, Some(e)),
            };
            record(&ops[..done]);
            (done, failed)
        } else {
            // A first sync's million writes: the kernel's share on a thread
            // of its own, so that recording the writes done overlaps the
            // next ones.
            maps.write_all_pipelined(ops, PIPELINE_CHUNK, &mut record)
        };
        if let Some(log) = &mut self.written_since_read {
            log.extend_from_slice(&ops[..done]);
        }
        let written = ops[..done].iter().filter(|op| op.writes_map()).count();
        self.metrics.map_writes.inc_by(written as u64);
        if let Some(e) = failed {
            log::error!(
                "map write {}/{} ({:?}) failed: {e}; will retry",
                done + 1,
                ops.len(),
                ops.get(done)
            );
            return false;
        }
        true
    }

    /// Carries the service flows netfilter (kube-proxy's DNAT) tracks into
    /// kpx's conntrack, so they outlive kube-proxy's rules.
    fn take_over(&mut self) {
        let started = Instant::now();
        match takeover::take_over(&mut self.dp.maps, &self.mirror.state) {
            Ok(report) if report.carried == 0 && report.skipped.is_empty() => {
                log::debug!("takeover: no netfilter service flow to carry over");
            }
            Ok(report) => log::info!(
                "takeover from netfilter: {report} in {:.1?}",
                started.elapsed()
            ),
            Err(e) => log::info!(
                "takeover: netfilter's conntrack not read ({e:#}); no kube-proxy flow carried over"
            ),
        }
    }

    fn failed(&mut self) {
        self.runner.failed();
        self.stats.sync_failures += 1;
        self.metrics.sync_failures.inc();
    }
}
