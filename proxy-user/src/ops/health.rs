//! Health, as kube-proxy reports it (pkg/proxy/healthcheck), so kubelet
//! probes and cloud load balancers keep working unchanged:
//!
//! - `/healthz` and `/livez` on `--healthz-bind-address` (default
//!   `0.0.0.0:10256`): healthy unless a change has waited for a sync longer
//!   than twice the sync period. `/healthz` also turns 503 when the Node is
//!   being deleted or tainted `ToBeDeletedByClusterAutoscaler`, so load
//!   balancers drain it; `/livez` ignores the Node.
//! - One server per `externalTrafficPolicy: Local` LoadBalancer Service on
//!   its `healthCheckNodePort`, answering 200 while the Service has ready
//!   endpoints on this node (and the proxy is healthy), else 503.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use axum::{
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use k8s_openapi::api::core::v1::Node;
use tokio::task::JoinHandle;

use crate::{
    control::model::ServiceRef,
    ops::metrics::{CodeLabel, Metrics},
};

/// The taint the cluster autoscaler puts on a node it is about to remove.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug)]
struct State {
    last_updated: Option<SystemTime>,
    /// When the oldest change not yet in the maps arrived.
    oldest_pending: Option<Instant>,
    node_eligible: bool,
}

/// The proxy's health: shared by the agent (which reports changes and syncs)
/// and the HTTP handlers.
#[derive(Clone, Debug)]
pub struct Health {
    state: Arc<Mutex<State>>,
    /// kube-proxy's healthTimeout: twice the sync period.
    timeout: Duration,
}

impl Health {
    pub fn new(sync_period: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                last_updated: None,
                oldest_pending: None,
                // Eligible until a Node event says otherwise.
                node_eligible: true,
            })),
            timeout: sync_period * 2,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicked holder cannot leave State inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change arrived that the maps do not reflect yet.
    pub fn queued(&self) {
        self.lock().oldest_pending.get_or_insert_with(Instant::now);
    }

    /// A sync succeeded: the maps reflect every change seen so far.
    pub fn updated(&self) {
        let mut s = self.lock();
        s.oldest_pending = None;
        s.last_updated = Some(SystemTime::now());
    }

    /// Reads eligibility off the Node (None: not found, which kube-proxy
    /// treats as eligible).
    pub fn set_node(&self, node: Option<&Node>) {
        self.set_eligible(node.is_none_or(node_eligible));
    }

    pub fn set_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    /// Healthy unless a change has been pending longer than the timeout.
    pub fn is_healthy(&self) -> bool {
        self.check().0
    }

    fn check(&self) -> (bool, Option<SystemTime>, bool) {
        let s = self.lock();
        let healthy = s.oldest_pending.is_none_or(|t| t.elapsed() < self.timeout);
        (healthy, s.last_updated, s.node_eligible)
    }
}

/// kube-proxy's SyncNode: a Node being deleted, or tainted for deletion by
/// the cluster autoscaler, should get no new load-balancer traffic.
pub fn node_eligible(node: &Node) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    !node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

fn rfc3339(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn json_response(ok: bool, body: String) -> axum::response::Response {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// The `/healthz` and `/livez` router.
pub fn router(health: Health, metrics: Metrics) -> Router {
    let h = health.clone();
    let m = metrics.clone();
    let healthz = move || {
        let (healthy, last, eligible) = h.check();
        let ok = healthy && eligible;
        count(&m.healthz_requests, ok);
        let now = SystemTime::now();
        // As kube-proxy: a healthy answer reports "now" as lastUpdated.
        let last = if ok { Some(now) } else { last };
        let body = serde_json::json!({
            "lastUpdated": last.map(rfc3339).unwrap_or_default(),
            "currentTime": rfc3339(now),
            "nodeEligible": eligible,
        });
        async move { json_response(ok, body.to_string()) }
    };
    let h = health;
    let m = metrics;
    let livez = move || {
        let (ok, last, _) = h.check();
        count(&m.livez_requests, ok);
        let now = SystemTime::now();
        let last = if ok { Some(now) } else { last };
        let body = serde_json::json!({
            "lastUpdated": last.map(rfc3339).unwrap_or_default(),
            "currentTime": rfc3339(now),
        });
        async move { json_response(ok, body.to_string()) }
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
}

fn count(
    family: &prometheus_client::metrics::family::Family<
        CodeLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    ok: bool,
) {
    family
        .get_or_create(&CodeLabel {
            code: if ok { "200" } else { "503" }.into(),
        })
        .inc();
}

/// Serves `app` on `addr`. With `hard_fail` a failed bind is returned (the
/// agent exits, as kube-proxy with bindAddressHardFail); otherwise it is
/// logged and retried, never costing the datapath.
pub async fn serve(
    what: &'static str,
    addr: SocketAddr,
    app: Router,
    hard_fail: bool,
) -> Result<()> {
    let first = tokio::net::TcpListener::bind(addr).await;
    let first = match first {
        Ok(l) => Some(l),
        Err(e) if hard_fail => {
            return Err(e).with_context(|| format!("{what} server cannot bind {addr}"))
        }
        Err(e) => {
            log::warn!("{what} server cannot bind {addr}: {e}; retrying in 5s");
            None
        }
    };
    tokio::spawn(async move {
        let mut listener = first;
        loop {
            if let Some(l) = listener.take() {
                log::info!("{what} on http://{addr}");
                if let Err(e) = axum::serve(l, app.clone()).await {
                    log::warn!("{what} server on {addr}: {e}; restarting");
                }
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => listener = Some(l),
                Err(e) => log::warn!("{what} server cannot bind {addr}: {e}; retrying in 5s"),
            }
        }
    });
    Ok(())
}

/// One health-check node port server.
struct Instance {
    port: u16,
    endpoints: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Aborting the task drops its listener: the port closes.
        self.task.abort();
    }
}

/// The health-check node port servers, kept equal to the Services that
/// need one (kube-proxy's ServiceHealthServer).
pub struct ServiceHealth {
    health: Health,
    address: Ipv4Addr,
    services: BTreeMap<ServiceRef, Instance>,
}

impl ServiceHealth {
    /// Servers listen on `address` (0.0.0.0: every node address).
    pub fn new(health: Health, address: Ipv4Addr) -> Self {
        Self {
            health,
            address,
            services: BTreeMap::new(),
        }
    }

    /// The open servers: Service → port.
    pub fn ports(&self) -> BTreeMap<ServiceRef, u16> {
        self.services
            .iter()
            .map(|(s, i)| (s.clone(), i.port))
            .collect()
    }

    /// Makes the open servers equal to `wanted` (Service → (port, local
    /// ready endpoints)): closes what is gone or moved, opens what is new
    /// (a failed bind is logged and retried at the next sync), updates counts.
    pub fn sync(&mut self, wanted: &BTreeMap<ServiceRef, (u16, usize)>) {
        self.services.retain(|svc, inst| {
            let keep = wanted.get(svc).is_some_and(|(p, _)| *p == inst.port);
            if !keep {
                log::info!("closing health check node port {} of {svc}", inst.port);
            }
            keep
        });
        for (svc, &(port, endpoints)) in wanted {
            if let Some(inst) = self.services.get(svc) {
                inst.endpoints.store(endpoints, Ordering::Relaxed);
                continue;
            }
            match self.open(svc, port, endpoints) {
                Ok(inst) => {
                    log::info!(
                        "health check node port {port} of {svc}: {endpoints} local endpoints"
                    );
                    self.services.insert(svc.clone(), inst);
                }
                Err(e) => log::warn!(
                    "health check node port {port} of {svc}: {e:#}; retrying at the next sync"
                ),
            }
        }
    }

    fn open(&self, svc: &ServiceRef, port: u16, endpoints: usize) -> Result<Instance> {
        let addr = SocketAddr::from((self.address, port));
        // A std listener binds synchronously, so a busy port is known now.
        let std = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        std.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(std)?;
        let count = Arc::new(AtomicUsize::new(endpoints));
        let c = count.clone();
        let health = self.health.clone();
        let id = svc.clone();
        let handler = move || {
            let n = c.load(Ordering::Relaxed);
            let healthy = health.is_healthy();
            let body = serde_json::json!({
                "service": {"namespace": &*id.namespace, "name": &*id.name},
                "localEndpoints": n,
                "serviceProxyHealthy": healthy,
            });
            async move { json_response(n > 0 && healthy, body.to_string()) }
        };
        // Every path answers, as kube-proxy's handler does.
        let app = Router::new().fallback(get(handler));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                log::warn!("health check server on {addr}: {e}");
            }
        });
        Ok(Instance {
            port,
            endpoints: count,
            task,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};

    #[test]
    fn pending_change_turns_unhealthy_only_after_the_timeout() {
        let h = Health::new(Duration::from_millis(50));
        assert!(h.is_healthy(), "healthy while starting up");
        h.queued();
        assert!(h.is_healthy(), "a fresh change is not late");
        std::thread::sleep(Duration::from_millis(120));
        assert!(!h.is_healthy(), "a change pending for > 2 x sync period");
        h.queued();
        assert!(!h.is_healthy(), "a newer change does not reset the oldest");
        h.updated();
        assert!(h.is_healthy());
    }

    #[test]
    fn nodes_being_removed_are_not_eligible() {
        let mut n = Node::default();
        assert!(node_eligible(&n));
        n.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TO_BE_DELETED_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        assert!(!node_eligible(&n));
        n.spec = None;
        n.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        assert!(!node_eligible(&n));
    }
}
