//! Housekeeping: gauges mirrored after each sync, and conntrack collection
//! (expired flows, UDP flows to backends that left) on a thread of its own
//! with its own handles on the pinned maps: however long a walk of the
//! tables takes, it never delays the path from an API event to the maps.

use std::{
    sync::{
        mpsc::{self, RecvTimeoutError},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use crate::dataplane::ports::LivePorts;

use super::*;

impl Agent {
    pub(super) fn update_gauges(&self) {
        let m = &self.metrics;
        let st = &self.mirror.state;
        for (map, n) in [
            (proxy_common::map_names::SERVICES, st.services.len()),
            (proxy_common::map_names::SERVICE_ADDRS, st.addrs.len()),
            (proxy_common::map_names::SLOTS, st.slots.len()),
            (proxy_common::map_names::SERVICE_NAMES, st.names.len()),
        ] {
            m.map_entries
                .get_or_create(&MapLabel { map: map.into() })
                .set(n as i64);
        }
        let (services, slices) = self.index.counts();
        m.services.set(services as i64);
        m.slices.set(slices as i64);
        m.frontends.set(self.index.desired().frontends.len() as i64);
        m.backends.set(st.backends.len() as i64);
        m.invalid_objects_current
            .set((self.index.problem_count() + self.node_problems.len()) as i64);
        let counts = self.index.skipped_counts();
        for why in Skipped::ALL {
            m.skipped
                .get_or_create(&ReasonLabel {
                    reason: why.name().into(),
                })
                .set(counts.get(&why).copied().unwrap_or(0) as i64);
        }
    }
}

/// Hands heap memory freed by a large transient (a first sync's plan, a
/// resync's read of every map) back to the kernel. glibc otherwise keeps it
/// in its arenas, and the agent's resident set would stay at its peak.
pub(super) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas, under their locks;
    // no pointer of the program is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// glibc's allocator, tuned for an agent whose heap is a few large tables
/// that grow by doubling, plus transient vectors of a million writes:
/// - one arena for every thread. glibc gives each thread that allocates
///   its own (64 MiB reserved each), and the memory the collector's and the
///   resync's threads free stays resident in theirs: 11 MiB of a 66 MiB
///   agent at 10,000 Services. The threads allocate little and rarely at
///   once, and glibc's per-thread caches keep the shared lock cold;
/// - a fixed mmap threshold (256 KiB). glibc raises it to the size of any
///   mapped block freed (up to 32 MiB), so after a table's first doubling
///   the next ones, and the plans, come from the heap, and the heap keeps
///   their holes: 4 MiB of RSS at 10,000 Services, 9 MiB at 50,000. Fixed,
///   every large block is its own mapping, returned whole when freed.
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: sets glibc tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// The collector's running totals (continued from the pinned counters an
/// earlier agent left).
#[derive(Debug, Default)]
struct GcStats {
    expired: u64,
    stale_udp: u64,
    sockets_destroyed: u64,
    /// The eviction total last mirrored into the metrics.
    evicted_seen: u64,
    /// The conntrack tables past the warning level (until they fall back
    /// under the all-clear level).
    ct_pressure: HashSet<CtTable>,
}

impl GcStats {
    fn resume(maps: &MapSet) -> Self {
        let mut s = Self::default();
        for (e, n) in maps.events().unwrap_or_default() {
            match e {
                Event::GcExpired => s.expired = n,
                Event::GcStaleUdp => s.stale_udp = n,
                Event::SockDestroyed => s.sockets_destroyed = n,
                _ => {}
            }
        }
        s
    }
}

/// How often the collector looks for balanced TCP sockets' entries whose
/// socket is gone (a walk of every namespace's TCP sockets).
const SOCKET_SWEEP: Duration = Duration::from_secs(60);

/// What the collector's thread is asked to do besides its periodic walk.
enum Work {
    /// Walk now, and remove the UDP flows of these backends.
    Stale(HashSet<conntrack::ServiceBackend>),
    /// This agent's programs are attached: the reply filter may be
    /// rebuilt from now on (twice at once, so it is in use at once).
    Arm,
}

/// The conntrack collector: every `--conntrack-gc-interval`, and at once
/// for the UDP flows of backends a sync removed. Each walk also rebuilds
/// one copy of the reply filter (`dataplane::replies`), once armed: a
/// copy cleared while programs that do not set its bits are attached (an
/// earlier agent's, before this one's replace them) would hide their
/// flows' replies.
pub(super) struct Collector {
    work: Option<mpsc::Sender<Work>>,
    thread: Option<JoinHandle<()>>,
    /// The ports of the flows the last walk found, for the port filter.
    live: Arc<Mutex<Option<LivePorts>>>,
}

impl Collector {
    pub(super) fn start(
        cfg: &Settings,
        metrics: Metrics,
        expirer: Option<conntrack::Expirer>,
    ) -> Result<Self> {
        let mut maps = MapSet::open_pinned(&cfg.bpffs)
            .context("opening the pinned maps for the conntrack collector")?;
        let (tx, rx) = mpsc::channel::<Work>();
        // Every bit is set at load, until the first rebuilds (`arm`).
        metrics.reply_filter_fill.set(1.0);
        metrics.dest_filter_fill.set(1.0);
        let (timeouts, every) = (cfg.ct_timeouts, cfg.ct_gc_interval);
        let socks = cfg.socket_lb != crate::dataplane::socklb::Mode::Off;
        let live = Arc::new(Mutex::new(None));
        let published = live.clone();
        let publish = move |walk: Option<LivePorts>| {
            if let (Some(walk), Ok(mut slot)) = (walk, published.lock()) {
                *slot = Some(walk);
            }
        };
        let thread = std::thread::Builder::new()
            .name("kpx-conntrack".into())
            .spawn(move || {
                let mut stats = GcStats::resume(&maps);
                let mut next = Instant::now() + every;
                let mut armed = false;
                let mut swept = Instant::now();
                loop {
                    let mut stale = HashSet::new();
                    let mut periodic = false;
                    match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                        Ok(work) => {
                            // Syncs in a row: one walk for all of them.
                            let mut walk = false;
                            for w in std::iter::once(work).chain(rx.try_iter()) {
                                match w {
                                    Work::Stale(more) => {
                                        walk = true;
                                        stale.extend(more);
                                    }
                                    Work::Arm if !armed => {
                                        armed = true;
                                        arm(&maps, &metrics);
                                    }
                                    Work::Arm => {}
                                }
                            }
                            if !walk {
                                continue;
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => periodic = true,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    let gc = Gc {
                        timeouts: &timeouts,
                        socks,
                        replies: armed,
                        metrics: &metrics,
                        expirer: expirer.as_ref(),
                    };
                    publish(collect(&gc, &mut maps, &stale, &mut stats));
                    // Once this agent's release program runs, now and then:
                    // the entries of TCP sockets that died without it.
                    if periodic && socks && armed && swept.elapsed() >= SOCKET_SWEEP {
                        swept = Instant::now();
                        match crate::dataplane::socklb::sweep_tcp(&mut maps) {
                            Ok(0) => {}
                            Ok(n) => log::info!(
                                "removed the entries of {n} balanced TCP sockets closed while no release program ran"
                            ),
                            Err(e) => log::warn!("sweeping balanced TCP sockets' entries: {e:#}; will retry"),
                        }
                    }
                    if periodic {
                        // The interval runs from the end of a walk.
                        next = Instant::now() + every;
                    }
                }
            })
            .context("starting the conntrack collector")?;
        Ok(Self {
            work: Some(tx),
            thread: Some(thread),
            live,
        })
    }

    /// This agent's programs are attached to every interface they serve:
    /// the reply filter is rebuilt from now on.
    pub(super) fn arm(&self) {
        if let Some(tx) = &self.work {
            // Stopped: the filter stays full, every reply looked up.
            let _ = tx.send(Work::Arm);
        }
    }

    /// What the last walk since the previous call found, if one ended.
    pub(super) fn live_ports(&self) -> Option<LivePorts> {
        self.live.lock().ok()?.take()
    }

    /// Removes the UDP flows to `stale` backends (after the sync that took
    /// them out of the service: no new flow can pick them any more).
    pub(super) fn flush_stale(&self, stale: HashSet<conntrack::ServiceBackend>) {
        if let Some(tx) = &self.work {
            if tx.send(Work::Stale(stale)).is_err() {
                log::warn!(
                    "the conntrack collector stopped; stale UDP flows stay until they expire"
                );
            }
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.work.take();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the conntrack collector panicked");
            }
        }
    }
}

/// The reply filter's first rebuilds, both copies one after the other
/// (each from a read of its own): from then on a packet from a backend's
/// port that is no flow's reply skips the conntrack lookup.
fn arm(maps: &MapSet, metrics: &Metrics) {
    for _ in 0..2 {
        if let Err(e) = maps.replies.rebuild(|| conntrack::reply_bits(maps)) {
            log::warn!(
                "rebuilding the reply filter: {e:#}; its bits stay set until the next collection"
            );
            return;
        }
    }
    let (fill, dests) = report_fill(maps, metrics);
    log::info!(
        "reply filter rebuilt: {:.2} % of its bits set ({:.2} % of the destination filter's)",
        fill * 100.0,
        dests * 100.0
    );
}

/// The reply and destination filters' fill, read and exported after a
/// rebuild.
fn report_fill(maps: &MapSet, metrics: &Metrics) -> (f64, f64) {
    let (fill, dests) = (maps.replies.fill_ratio(), maps.replies.dest_fill_ratio());
    metrics.reply_filter_fill.set(fill);
    metrics.dest_filter_fill.set(dests);
    (fill, dests)
}

/// How the collector walks.
struct Gc<'a> {
    timeouts: &'a conntrack::Timeouts,
    /// Look for connected UDP sockets of stale backends (socket LB is on).
    socks: bool,
    /// Rebuild a copy of the reply filter from the walk (armed).
    replies: bool,
    metrics: &'a Metrics,
    expirer: Option<&'a conntrack::Expirer>,
}

/// One walk: expired flows and those of `stale` backends removed. Returns
/// the ports of the flows the walk found.
fn collect(
    gc: &Gc,
    maps: &mut MapSet,
    stale: &HashSet<conntrack::ServiceBackend>,
    stats: &mut GcStats,
) -> Option<LivePorts> {
    let (timeouts, socks, metrics) = (gc.timeouts, gc.socks, gc.metrics);
    let started = Instant::now();
    // Cleared before the read begins (`dataplane::replies`).
    let copy = gc.replies.then(|| maps.replies.clear_next());
    let mut report = match conntrack::collect(maps, timeouts, stale, gc.expirer) {
        Ok(r) => r,
        Err(e) => {
            if let Some(copy) = copy {
                maps.replies.refill(copy);
            }
            log::warn!("conntrack collection: {e:#}; will retry");
            return None;
        }
    };
    if let Some(copy) = copy {
        maps.replies.mark(copy, report.replies.drain(..));
        report_fill(maps, metrics);
    }
    let live_ports = LivePorts {
        started,
        ports: std::mem::take(&mut report.ports),
        addrs: std::mem::take(&mut report.addrs),
    };
    stats.expired += report.expired;
    stats.stale_udp += report.stale_udp;
    let total: usize = report.entries.values().sum();
    for table in CtTable::ALL {
        let entries = report.entries.get(&table).copied().unwrap_or(0);
        let label = MapLabel {
            map: table.map_name().into(),
        };
        metrics
            .conntrack_entries
            .get_or_create(&label)
            .set(entries as i64);
        metrics
            .map_entries
            .get_or_create(&label)
            .set(entries as i64);
        match maps.ct.capacity(table) {
            Ok(capacity) => pressure(stats, metrics, table, entries, capacity),
            Err(e) => log::debug!("reading the capacity of {}: {e:#}", table.map_name()),
        }
    }
    let live = total;
    if let Ok(events) = maps.events() {
        let total = |e: Event| events.iter().find(|(x, _)| *x == e).map_or(0, |(_, n)| *n);
        let removed = total(Event::CtRemoved) + stats.expired + stats.stale_udp;
        let evicted = conntrack::evicted(total(Event::CtInserted), removed, live);
        // Derived while traffic runs, so it may dip: count only growth.
        if evicted > stats.evicted_seen {
            metrics
                .conntrack_evictions
                .inc_by(evicted - stats.evicted_seen);
            stats.evicted_seen = evicted;
        }
    }
    metrics.gc_expired.inc_by(report.expired);
    metrics.gc_stale_udp.inc_by(report.stale_udp);
    for (e, n) in [
        (Event::GcExpired, stats.expired),
        (Event::GcStaleUdp, stats.stale_udp),
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
    let closed = match socks {
        true => crate::dataplane::socklb::destroy_stale(maps, stale),
        false => Ok(0),
    };
    match closed {
        Ok(0) => {}
        Ok(n) => {
            stats.sockets_destroyed += n;
            if let Err(err) = maps.set_event(Event::SockDestroyed, stats.sockets_destroyed) {
                log::warn!("updating the sock_destroyed counter: {err:#}");
            }
            log::info!("closed {n} connected UDP sockets of backends that left their service");
        }
        Err(e) => log::warn!(
            "closing connected UDP sockets of backends that left their service: {e:#}; they keep their backend until the application reconnects"
        ),
    }
    let level = if report.expired > 0 {
        log::Level::Info
    } else {
        log::Level::Debug
    };
    log::log!(
        level,
        "conntrack: {} entries, {} expired removed in {:.1?}",
        live,
        report.expired,
        started.elapsed()
    );
    Some(live_ports)
}

/// Table pressure, visible before it bites: at 90 % a warning, and an
/// all-clear under 80 %. What full means differs by table: the established
/// table refuses new connections, the other evicts its least recently used
/// UDP flows and handshakes.
fn pressure(stats: &mut GcStats, metrics: &Metrics, table: CtTable, entries: usize, capacity: u32) {
    const WARN: f64 = 0.9;
    const CLEAR: f64 = 0.8;
    let used = entries as f64 / f64::from(capacity.max(1));
    let name = table.map_name();
    metrics
        .conntrack_usage
        .get_or_create(&MapLabel { map: name.into() })
        .set(used);
    let when_full = match table {
        CtTable::Tcp => "new TCP connections are refused (established ones are kept)",
        CtTable::Any => "the least recently used UDP flows and TCP handshakes are evicted",
    };
    let warned = stats.ct_pressure.contains(&table);
    if !warned && used >= WARN {
        stats.ct_pressure.insert(table);
        log::warn!(
            "conntrack table {name} at {:.0}% ({entries} of {capacity} entries): when full, {when_full}; raise --conntrack-max (or conntrack.maxPerCore)",
            used * 100.0
        );
    } else if warned && used < CLEAR {
        stats.ct_pressure.remove(&table);
        log::info!(
            "conntrack table {name} back to {:.0}% ({entries} of {capacity} entries)",
            used * 100.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_warns_once_at_90_percent_and_clears_under_80() {
        let (mut stats, metrics) = (GcStats::default(), Metrics::new());
        let mut seen = Vec::new();
        for entries in [100, 899, 900, 950, 1000, 850, 799, 950] {
            pressure(&mut stats, &metrics, CtTable::Tcp, entries, 1000);
            seen.push(stats.ct_pressure.contains(&CtTable::Tcp));
        }
        assert_eq!(seen, [false, false, true, true, true, true, false, true]);
        // Each table on its own.
        pressure(&mut stats, &metrics, CtTable::Any, 10, 1000);
        assert!(!stats.ct_pressure.contains(&CtTable::Any));
        let out = metrics.render();
        assert!(
            out.contains("kpx_conntrack_usage_ratio{map=\"KPX_CT_TCP\"} 0.95"),
            "{out}"
        );
        assert!(
            out.contains("kpx_conntrack_usage_ratio{map=\"KPX_CT_ANY\"} 0.01"),
            "{out}"
        );
    }
}
