//! Prometheus metrics: kube-proxy's names where the meaning is the same, so
//! existing dashboards keep working, plus kpx's own.

use std::{
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

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

/// Every metric the agent updates. Clones share the same values.
#[derive(Clone)]
pub struct Metrics {
    pub sync_duration: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub programming_latency: Histogram,
    pub endpoint_changes: Counter,
    pub service_changes: Counter,
    pub sync_failures: Counter,
    pub map_writes: Counter,
    pub invalid_objects: Counter,
    pub invalid_objects_current: Gauge,
    pub skipped: Family<ReasonLabel, Gauge>,
    pub api_errors: Family<ResourceLabel, Counter>,
    pub api_relists: Family<ResourceLabel, Counter>,
    pub services: Gauge,
    pub slices: Gauge,
    pub frontends: Gauge,
    pub gc_expired: Counter,
    pub gc_stale_udp: Counter,
    pub healthz_requests: Family<CodeLabel, Counter>,
    pub livez_requests: Family<CodeLabel, Counter>,
    /// Packets by the datapath's verdict (read from its per-CPU counters).
    pub packets: Family<VerdictLabel, Counter>,
    pub drops: Family<ReasonLabel, Counter>,
    pub datapath_events: Family<EventLabel, Counter>,
    pub conntrack_entries: Gauge,
    pub conntrack_evictions: Counter,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
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
            map_writes: Counter::default(),
            invalid_objects: Counter::default(),
            invalid_objects_current: Gauge::default(),
            skipped: Family::default(),
            api_errors: Family::default(),
            api_relists: Family::default(),
            services: Gauge::default(),
            slices: Gauge::default(),
            frontends: Gauge::default(),
            gc_expired: Counter::default(),
            gc_stale_udp: Counter::default(),
            healthz_requests: Family::default(),
            livez_requests: Family::default(),
            packets: Family::default(),
            drops: Family::default(),
            datapath_events: Family::default(),
            conntrack_entries: Gauge::default(),
            conntrack_evictions: Counter::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
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
            "kpx_datapath_packets",
            "Packets seen by the datapath, by verdict",
            m.packets.clone(),
        );
        r.register(
            "kpx_datapath_drops",
            "Packets the datapath dropped, by reason",
            m.drops.clone(),
        );
        r.register(
            "kpx_datapath_events",
            "Conntrack and affinity events of the datapath",
            m.datapath_events.clone(),
        );
        r.register(
            "kpx_conntrack_entries",
            "Conntrack entries (two per flow) at the last collection",
            m.conntrack_entries.clone(),
        );
        r.register(
            "kpx_conntrack_evictions",
            "Conntrack entries lost to LRU eviction because the map was full",
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

/// Advances `counter` to a running `total` read from a map; `last` is the
/// total seen before. A smaller total means the map was recreated.
pub fn advance(counter: &Counter, last: &mut u64, total: u64) {
    counter.inc_by(total.checked_sub(*last).unwrap_or(total));
    *last = total;
}
