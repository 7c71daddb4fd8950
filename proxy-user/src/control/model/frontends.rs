//! Frontends: the (address, port, protocol) keys a Service port is served on
//! (cluster IP, NodePort, externalIPs, LoadBalancer IPs), each with the
//! traffic policy and firewall of its kube-proxy chain.

use std::net::Ipv4Addr;

use super::{Frontend, FrontendKey, ServicePort, Svc};
use crate::control::{cidr::Cidr, scheduler::Scheduler};

/// The datapath frontends of one Service, one per (entry point, port):
/// cluster IPs, NodePorts (address 0.0.0.0), external IPs and LoadBalancer
/// IPs, each with the traffic policy and firewall of its kube-proxy chain.
///
/// A service without any endpoint still gets its frontends (count 0): the
/// reference REJECTs on all of them. `node_ip` is the node's primary
/// address: when a source range contains it, the reference also accepts the
/// LoadBalancer IPs themselves as sources (VIPs looped back to the node).
/// Every frontend is scheduled by the Service's annotated scheduler, else
/// by `default` (the node's).
pub fn frontends(
    svc: &Svc,
    ports: &[ServicePort],
    node_ip: Option<Ipv4Addr>,
    default: Scheduler,
) -> Vec<(FrontendKey, Frontend)> {
    use proxy_common::{SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_NODEPORT, SVC_F_SOURCE_RANGES};
    let mut out = Vec::new();
    let mut ranges = svc.lb_source_ranges.clone();
    if node_ip.is_some_and(|ip| ranges.iter().any(|r| r.contains(&ip))) {
        ranges.extend(svc.lb_ips.iter().map(|ip| Cidr::from(*ip)));
    }
    let sched = svc.scheduler.unwrap_or(default).flags();
    for p in ports {
        let front = |local: bool, flags: u32, source_ranges: Vec<Cidr>| Frontend {
            name: p.name.clone(),
            backends: p.cluster_endpoints.clone(),
            local_backends: if local {
                p.local_endpoints.clone()
            } else {
                Vec::new()
            },
            flags: flags | sched | if local { SVC_F_LOCAL } else { 0 },
            source_ranges,
            affinity_timeout: svc.affinity_timeout,
        };
        let key = |addr: Ipv4Addr, port: u16| FrontendKey {
            addr,
            port,
            proto: p.proto,
        };
        for &ip in &svc.cluster_ips {
            out.push((key(ip, p.port), front(svc.internal_local, 0, Vec::new())));
        }
        let ext = svc.external_local;
        if let Some(np) = p.node_port {
            out.push((
                key(Ipv4Addr::UNSPECIFIED, np),
                front(ext, SVC_F_EXTERNAL | SVC_F_NODEPORT, Vec::new()),
            ));
        }
        for &ip in &svc.external_ips {
            out.push((key(ip, p.port), front(ext, SVC_F_EXTERNAL, Vec::new())));
        }
        for &ip in &svc.lb_ips {
            let f = if ranges.is_empty() {
                front(ext, SVC_F_EXTERNAL, Vec::new())
            } else {
                front(ext, SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES, ranges.clone())
            };
            out.push((key(ip, p.port), f));
        }
    }
    out
}
