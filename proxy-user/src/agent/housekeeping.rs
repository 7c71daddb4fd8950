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
        match maps.ct_capacity(table) {
            Ok(capacity) => pressure(stats, metrics, table, entries, capacity),
            Err(e) => log::debug!("reading the capacity of {}: {e:#}", table.map_name()),
        }
    }
    let live = total;
    if let Ok(events) = maps.events() {
        let total = |e: Event| events.iter().find(|(x, _)| *x == e).map_or(0, |(_, n)| *n);
        let removed = total(Event::CtRemoved) + stats.gc_expired + stats.gc_stale_udp;
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
        live,
        report.expired,
        started.elapsed()
    );
}

/// Table pressure, visible before it bites: at 90 % a warning, and an
/// all-clear under 80 %. What full means differs by table: the established
/// table refuses new connections, the other evicts its least recently used
/// UDP flows and handshakes.
fn pressure(
    stats: &mut AgentStats,
    metrics: &Metrics,
    table: CtTable,
    entries: usize,
    capacity: u32,
) {
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
        let (mut stats, metrics) = (AgentStats::default(), Metrics::new());
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
