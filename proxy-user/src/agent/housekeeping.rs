//! Housekeeping: gauges mirrored after each sync, and conntrack collection
//! (expired flows, UDP flows to backends that left), bounded by the GC
//! interval and never on the path from an API event to the maps.

use super::*;

impl Agent {
    pub(super) fn update_gauges(&self) {
        let m = &self.metrics;
        let st = &self.mirror.state;
        for (map, n) in [
            (proxy_common::map_names::SERVICES, st.services.len()),
            (proxy_common::map_names::SERVICE_ADDRS, st.addrs.len()),
            (proxy_common::map_names::SLOTS, st.slots.len()),
            (proxy_common::map_names::BACKENDS, st.backends.len()),
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
        m.invalid_objects_current
            .set(self.index.problem_count() as i64);
        let counts = self.index.skipped_counts();
        for why in Skipped::ALL {
            m.skipped
                .get_or_create(&ReasonLabel {
                    reason: why.name().into(),
                })
                .set(counts.get(&why).copied().unwrap_or(0) as i64);
        }
    }

    /// One conntrack collection: expired flows, and UDP flows to `stale` backends.
    pub(super) fn collect(&mut self, stale: &HashSet<conntrack::ServiceBackend>) {
        collect(
            &self.cfg,
            &mut self.dp.maps,
            stale,
            &mut self.stats,
            &self.metrics,
        );
    }
}

fn collect(
    cfg: &Settings,
    maps: &mut MapSet,
    stale: &HashSet<conntrack::ServiceBackend>,
    stats: &mut AgentStats,
    metrics: &Metrics,
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
    metrics.conntrack_entries.set(report.entries as i64);
    match maps.conntrack_capacity() {
        Ok(capacity) => pressure(stats, metrics, report.entries, capacity),
        Err(e) => log::debug!("reading the conntrack capacity: {e:#}"),
    }
    metrics
        .map_entries
        .get_or_create(&MapLabel {
            map: proxy_common::map_names::CONNTRACK.into(),
        })
        .set(report.entries as i64);
    if let Ok(events) = maps.events() {
        let total = |e: Event| events.iter().find(|(x, _)| *x == e).map_or(0, |(_, n)| *n);
        let removed = total(Event::CtRemoved) + stats.gc_expired + stats.gc_stale_udp;
        let evicted = conntrack::evicted(total(Event::CtInserted), removed, report.entries);
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

/// Table pressure, visible before it bites: at 90 % a warning (the LRU
/// then evicts the least recently used flows, established ones included,
/// to make room for new ones), and an all-clear under 80 %.
fn pressure(stats: &mut AgentStats, metrics: &Metrics, entries: usize, capacity: u32) {
    const WARN: f64 = 0.9;
    const CLEAR: f64 = 0.8;
    let used = entries as f64 / f64::from(capacity.max(1));
    metrics.conntrack_usage.set(used);
    if !stats.ct_pressure && used >= WARN {
        stats.ct_pressure = true;
        log::warn!(
            "conntrack table at {:.0}% ({entries} of {capacity} entries): when full, new flows evict the least recently used ones; raise --conntrack-max (or conntrack.maxPerCore)",
            used * 100.0
        );
    } else if stats.ct_pressure && used < CLEAR {
        stats.ct_pressure = false;
        log::info!(
            "conntrack table back to {:.0}% ({entries} of {capacity} entries)",
            used * 100.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_warns_once_at_90_percent_and_clears_under_80() {
        let (mut stats, metrics) = (AgentStats::default(), Metrics::new());
        let mut seen = Vec::new();
        for entries in [100, 899, 900, 950, 1000, 850, 799, 950] {
            pressure(&mut stats, &metrics, entries, 1000);
            seen.push(stats.ct_pressure);
        }
        assert_eq!(seen, [false, false, true, true, true, true, false, true]);
        assert!((metrics.conntrack_usage.get() - 0.95).abs() < 1e-9);
        assert!(metrics.render().contains("kpx_conntrack_usage_ratio 0.95"));
    }
}
