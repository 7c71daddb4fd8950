//! Prometheus metrics: kube-proxy's names where the meaning is the same, so
//! existing dashboards keep working, plus kpx's own.

use std::{
    net::SocketAddr,
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

    /// Serves `/metrics` on `addr`, retrying the bind until it works: a busy
    /// port costs the metrics, never the datapath.
    pub fn serve(&self, addr: SocketAddr) {
        let m = self.clone();
        tokio::spawn(async move {
            let app = axum::Router::new().route(
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
            );
            loop {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(listener) => {
                        log::info!("metrics on http://{addr}/metrics");
                        if let Err(e) = axum::serve(listener, app.clone()).await {
                            log::warn!("metrics server on {addr}: {e}; restarting");
                        }
                    }
                    Err(e) => log::warn!("metrics server cannot bind {addr}: {e}; retrying in 5s"),
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }
}
