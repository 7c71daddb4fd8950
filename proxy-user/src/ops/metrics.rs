//! Prometheus metrics: kube-proxy's names where the meaning is the same, so
//! existing dashboards keep working, plus kpx's own.

use std::{
    fmt,
    path::Path,
    sync::{atomic::AtomicU64, Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::MetricType,
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use proxy_common::{Counter as DpCounter, DropReason, Event};

use crate::dataplane::MapSet;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// Every metric the agent updates. Clones share the same values.
#[derive(Clone)]
pub struct Metrics {
    pub sync_duration: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub programming_latency: Histogram,
    pub endpoint_changes: Counter,
    pub service_changes: Counter,
    pub sync_failures: Counter,
    /// Periodic resyncs that found the maps not holding what the agent wrote.
    pub drift_repairs: Counter,
    pub map_writes: Counter,
    pub invalid_objects: Counter,
    pub invalid_objects_current: Gauge,
    pub skipped: Family<ReasonLabel, Gauge>,
    pub api_errors: Family<ResourceLabel, Counter>,
    pub api_relists: Family<ResourceLabel, Counter>,
    pub services: Gauge,
    pub slices: Gauge,
    pub frontends: Gauge,
    /// Distinct backends (address, port, protocol) the slots hold.
    pub backends: Gauge,
    pub gc_expired: Counter,
    pub gc_stale_udp: Counter,
    pub healthz_requests: Family<CodeLabel, Counter>,
    pub livez_requests: Family<CodeLabel, Counter>,
    /// Entries of each conntrack table, at the last collection.
    pub conntrack_entries: Family<MapLabel, Gauge>,
    /// Each conntrack table's entries over its capacity, at the last collection.
    pub conntrack_usage: Family<MapLabel, Gauge<f64, AtomicU64>>,
    pub conntrack_evictions: Counter,
    /// The reply filter's bits set (either copy) over all, at its last
    /// rebuild.
    pub reply_filter_fill: Gauge<f64, AtomicU64>,
    /// The destination filter's reply bits set (either copy, every block)
    /// over all, at the reply filter's last rebuild.
    pub dest_filter_fill: Gauge<f64, AtomicU64>,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    /// Conntrack entries found pinned in another layout at start, carried
    /// into this one or not.
    pub upgrade_entries: Family<OutcomeLabel, Gauge>,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_collector(None)
    }

    /// As [`Metrics::new`], with a collector read at every scrape (the
    /// datapath's counters).
    pub fn with_collector(collector: Option<Box<dyn Collector>>) -> Self {
        let mut r = Registry::default();
        if let Some(c) = collector {
            r.register_collector(c);
        }
        // 100 µs to ~105 s, doubling: map syncs are fast, API latency is not.
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 21));
        let programming_latency = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        let m = Self {
            sync_duration,
            last_sync: Gauge::default(),
            programming_latency,
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            sync_failures: Counter::default(),
            drift_repairs: Counter::default(),
            map_writes: Counter::default(),
            invalid_objects: Counter::default(),
            invalid_objects_current: Gauge::default(),
            skipped: Family::default(),
            api_errors: Family::default(),
            api_relists: Family::default(),
            services: Gauge::default(),
            slices: Gauge::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            gc_expired: Counter::default(),
            gc_stale_udp: Counter::default(),
            healthz_requests: Family::default(),
            livez_requests: Family::default(),
            conntrack_entries: Family::default(),
            conntrack_usage: Family::default(),
            conntrack_evictions: Counter::default(),
            reply_filter_fill: Gauge::default(),
            dest_filter_fill: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            upgrade_entries: Family::default(),
            registry: Arc::new(Registry::default()),
        };
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time one sync of the datapath maps took",
            m.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last successful sync",
            m.last_sync.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to its change being in the maps",
            m.programming_latency.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "EndpointSlice changes seen",
            m.endpoint_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Service changes seen",
            m.service_changes.clone(),
        );
        r.register(
            "kpx_sync_failures",
            "Syncs that failed (and were retried)",
            m.sync_failures.clone(),
        );
        r.register(
            "kpx_drift_repairs",
            "Periodic resyncs that found the maps changed behind the agent (repaired by a full diff)",
            m.drift_repairs.clone(),
        );
        r.register(
            "kpx_map_writes",
            "Datapath map writes",
            m.map_writes.clone(),
        );
        r.register(
            "kpx_invalid_objects",
            "Malformed Services and EndpointSlices reported and skipped",
            m.invalid_objects.clone(),
        );
        r.register(
            "kpx_invalid_objects_current",
            "Objects currently skipped as malformed, and frontend conflicts",
            m.invalid_objects_current.clone(),
        );
        r.register(
            "kpx_skipped",
            "Objects or parts not served, by reason",
            m.skipped.clone(),
        );
        r.register(
            "kpx_api_errors",
            "Failed list/watch calls, by resource (each is retried with backoff)",
            m.api_errors.clone(),
        );
        r.register(
            "kpx_api_relists",
            "Complete lists received, by resource (start, 410 Gone, reconnects)",
            m.api_relists.clone(),
        );
        r.register("kpx_services", "Services known", m.services.clone());
        r.register(
            "kpx_endpoint_slices",
            "EndpointSlices known",
            m.slices.clone(),
        );
        r.register(
            "kpx_frontends",
            "Service frontends in the datapath",
            m.frontends.clone(),
        );
        r.register(
            "kpx_backends",
            "Distinct backends (address, port, protocol) the datapath's slots hold",
            m.backends.clone(),
        );
        r.register(
            "kpx_conntrack_gc_expired",
            "Conntrack entries removed as expired",
            m.gc_expired.clone(),
        );
        r.register(
            "kpx_conntrack_gc_stale_udp",
            "UDP conntrack entries removed because their backend left",
            m.gc_stale_udp.clone(),
        );
        r.register(
            "kubeproxy_proxy_healthz",
            "/healthz answers by HTTP status code",
            m.healthz_requests.clone(),
        );
        r.register(
            "kubeproxy_proxy_livez",
            "/livez answers by HTTP status code",
            m.livez_requests.clone(),
        );
        r.register(
            "kpx_conntrack_entries",
            "Conntrack entries (two per flow) of each table at the last collection",
            m.conntrack_entries.clone(),
        );
        r.register(
            "kpx_reply_filter_fill_ratio",
            "Share of the reply filter's bits set at its last rebuild: of packets from a backend's port that are no flow's reply, the share still looked up in conntrack (1 until the filter is first rebuilt)",
            m.reply_filter_fill.clone(),
        );
        r.register(
            "kpx_dest_filter_fill_ratio",
            "Share of the destination filter's reply bits set at the reply filter's last rebuild: of packets to no frontend's address, the share read further than their destination's block (1 until the filter is first rebuilt)",
            m.dest_filter_fill.clone(),
        );
        r.register(
            "kpx_conntrack_usage_ratio",
            "Each conntrack table's entries over its capacity at the last collection (a warning is logged from 0.9)",
            m.conntrack_usage.clone(),
        );
        r.register(
            "kpx_conntrack_evictions",
            "Conntrack entries of UDP flows and TCP handshakes lost to LRU eviction because their table was full (established TCP is never evicted)",
            m.conntrack_evictions.clone(),
        );
        r.register(
            "kpx_map_entries",
            "Entries in each datapath map",
            m.map_entries.clone(),
        );
        r.register(
            "kpx_map_capacity",
            "Capacity (max entries) of each datapath map",
            m.map_capacity.clone(),
        );
        r.register(
            "kpx_upgrade_conntrack_entries",
            "Conntrack entries the agent found pinned in another map layout at start: carried into this layout, or lost",
            m.upgrade_entries.clone(),
        );
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Records a successful sync that took `took`.
    pub fn synced(&self, took: Duration) {
        self.sync_duration.observe(took.as_secs_f64());
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_sync.set(now.as_secs_f64());
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            log::warn!("encoding metrics: {e}");
        }
        out
    }

    /// The `/metrics` router.
    pub fn router(&self) -> axum::Router {
        let m = self.clone();
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
    }
}

/// The datapath's own counters (verdicts, drops, events), read from its
/// per-CPU maps at scrape time: no mirror loop, no copy that lags, and a
/// scrape costs three small map reads.
pub struct DatapathCounters {
    maps: Mutex<MapSet>,
}

impl fmt::Debug for DatapathCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatapathCounters")
    }
}

impl DatapathCounters {
    /// Reads through its own handles on the maps pinned in `bpffs`.
    pub fn open(bpffs: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            maps: Mutex::new(MapSet::open_pinned(bpffs)?),
        })
    }
}

/// One labelled counter family from a map's totals; a map that cannot be
/// read leaves its family out of this scrape (logged), not the scrape.
fn encode_totals<T: Copy, L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    (name, help): (&str, &str),
    totals: anyhow::Result<Vec<(T, u64)>>,
    label: impl Fn(T) -> L,
) -> fmt::Result {
    let totals = match totals {
        Ok(t) => t,
        Err(e) => {
            log::debug!("reading the datapath's {name}: {e:#}");
            return Ok(());
        }
    };
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (x, n) in totals {
        ConstCounter::new(n).encode(family.encode_family(&label(x))?)?;
    }
    Ok(())
}

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        encode_totals(
            &mut encoder,
            (
                "kpx_datapath_packets",
                "Packets seen by the datapath, by verdict",
            ),
            maps.counters(),
            |c: DpCounter| VerdictLabel {
                verdict: c.name().into(),
            },
        )?;
        encode_totals(
            &mut encoder,
            (
                "kpx_datapath_drops",
                "Packets the datapath dropped, by reason",
            ),
            maps.drops(),
            |r: DropReason| ReasonLabel {
                reason: r.name().into(),
            },
        )?;
        encode_totals(
            &mut encoder,
            (
                "kpx_datapath_events",
                "Conntrack and affinity events of the datapath",
            ),
            maps.events(),
            |e: Event| EventLabel {
                event: e.name().into(),
            },
        )
    }
}
