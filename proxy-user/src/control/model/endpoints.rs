//! Endpoint selection: which endpoints serve a Service port, cluster-wide
//! and node-local (ready, then serving-terminating; topology hints; traffic
//! policies), as kube-proxy's endpointslicecache.go and topology.go choose.

use std::{collections::BTreeMap, sync::Arc};

use super::{Endpoint, NodeInfo, Slice, Svc, SvcPort};
use crate::control::cidr::Family;

/// One endpoint of one Service port, as endpoint selection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub endpoint: Endpoint,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// Which hint narrows the cluster-wide endpoints (kube-proxy's topology mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    All,
    SameNode,
    SameZone,
}

/// Everything kube-proxy acts on for one Service port, and its endpoint sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// kube-proxy's service port name: `namespace/name:port-name`.
    pub name: Arc<str>,
    pub proto: u8,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<EndpointInfo>,
    pub topology: Topology,
    /// Where cluster-policy traffic goes: ready (topology-narrowed), else
    /// serving-terminating endpoints.
    pub cluster_endpoints: Vec<Endpoint>,
    /// Where local-policy traffic goes: local ready, else local
    /// serving-terminating endpoints.
    pub local_endpoints: Vec<Endpoint>,
    /// Some endpoint anywhere could serve: with none, the reference REJECTs;
    /// with some but none usable under a Local policy, it DROPs.
    pub has_any_endpoints: bool,
}

impl ServicePort {
    /// The endpoints of traffic to a cluster IP (internalTrafficPolicy).
    pub fn internal_endpoints(&self, svc: &Svc) -> &[Endpoint] {
        if svc.internal_local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }

    /// The endpoints of traffic to a NodePort, externalIP or LB IP.
    pub fn external_endpoints(&self, svc: &Svc) -> &[Endpoint] {
        if svc.external_local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }
}

/// The endpoints of `port` over all of the service's `slices` of `family`,
/// de-duplicated by ip:port; slices in name order, a non-terminating copy
/// preferred.
fn port_endpoints(
    port: &SvcPort,
    slices: &[&Slice],
    node: &NodeInfo,
    family: Family,
) -> Vec<EndpointInfo> {
    let mut by_addr: BTreeMap<Endpoint, EndpointInfo> = BTreeMap::new();
    for sl in slices.iter().filter(|s| s.family() == family) {
        for (name, proto, number) in &sl.ports {
            if *name != port.name || *proto != port.proto {
                continue;
            }
            for (i, e) in sl.endpoints().enumerate() {
                let hints = sl.hints_of(i);
                let local =
                    !node.name.is_empty() && e.node_name.map(|n| &**n) == Some(node.name.as_str());
                let endpoint = Endpoint {
                    addr: e.addr,
                    port: *number,
                    local,
                };
                let info = EndpointInfo {
                    endpoint,
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    zone_hints: hints.map_or_else(Vec::new, |h| h.zones.clone()),
                    node_hints: hints.map_or_else(Vec::new, |h| h.nodes.clone()),
                };
                match by_addr.get(&endpoint) {
                    Some(prev) if !prev.terminating || info.terminating => {}
                    _ => {
                        by_addr.insert(endpoint, info);
                    }
                }
            }
        }
    }
    by_addr.into_values().collect()
}

/// kube-proxy's topologyModeFromHints: node hints, then zone hints, used
/// only when every ready endpoint carries one and one matches this node.
fn topology(endpoints: &[EndpointInfo], node: &NodeInfo) -> Topology {
    let ready: Vec<&EndpointInfo> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Topology::All;
    }
    let all = |f: fn(&EndpointInfo) -> &Vec<String>| ready.iter().all(|e| !f(e).is_empty());
    let any_has = |f: fn(&EndpointInfo) -> &Vec<String>, v: &str| {
        ready.iter().any(|e| f(e).iter().any(|h| h == v))
    };
    if all(|e| &e.node_hints) && any_has(|e| &e.node_hints, &node.name) {
        return Topology::SameNode;
    }
    match &node.zone {
        Some(z) if all(|e| &e.zone_hints) && any_has(|e| &e.zone_hints, z) => Topology::SameZone,
        _ => Topology::All,
    }
}

/// kube-proxy's CategorizeEndpoints for one port.
fn categorize(mut sp: ServicePort, node: &NodeInfo) -> ServicePort {
    let topo = topology(&sp.endpoints, node);
    let in_topology = |e: &EndpointInfo| match topo {
        Topology::All => true,
        Topology::SameNode => e.node_hints.contains(&node.name),
        Topology::SameZone => node
            .zone
            .as_ref()
            .is_some_and(|z| e.zone_hints.iter().any(|h| h == z)),
    };
    let pick = |f: &dyn Fn(&EndpointInfo) -> bool| -> Vec<Endpoint> {
        sp.endpoints
            .iter()
            .filter(|e| f(e))
            .map(|e| e.endpoint)
            .collect()
    };
    let mut cluster = pick(&|e| e.ready && in_topology(e));
    if cluster.is_empty() {
        cluster = pick(&|e| e.serving && e.terminating);
    }
    let mut local = pick(&|e| e.endpoint.local && e.ready);
    if local.is_empty() {
        local = pick(&|e| e.endpoint.local && e.serving && e.terminating);
    }
    sp.has_any_endpoints = sp
        .endpoints
        .iter()
        .any(|e| e.ready || (e.serving && e.terminating));
    sp.topology = topo;
    sp.cluster_endpoints = cluster;
    sp.local_endpoints = local;
    sp
}

/// kube-proxy's LocalReadyEndpoints for one Service: the distinct IPs of
/// ready endpoints on this node over all its ports (one pod serving 80 and
/// 443 counts once), what a health check node port reports.
pub fn local_ready_endpoints(ports: &[ServicePort]) -> usize {
    ports
        .iter()
        .flat_map(|p| &p.endpoints)
        .filter(|e| e.endpoint.local && e.ready)
        .map(|e| e.endpoint.addr)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// Every port of `svc` on `family` with its endpoints from `slices` (the
/// service's own) of that family.
pub fn service_ports(
    svc: &Svc,
    slices: &[&Slice],
    node: &NodeInfo,
    family: Family,
) -> Vec<ServicePort> {
    svc.ports
        .iter()
        .map(|p| {
            let sp = ServicePort {
                // kube-proxy's ServicePortName: no colon for an unnamed port.
                name: if p.name.is_empty() {
                    svc.id.to_string().into()
                } else {
                    format!("{}:{}", svc.id, p.name).into()
                },
                proto: p.proto,
                port: p.port,
                node_port: p.node_port,
                endpoints: port_endpoints(p, slices, node, family),
                topology: Topology::All,
                cluster_endpoints: Vec::new(),
                local_endpoints: Vec::new(),
                has_any_endpoints: false,
            };
            categorize(sp, node)
        })
        .collect()
}
