//! Frontends: the (address, port, protocol) keys a Service port is served on
//! (cluster IP, NodePort, externalIPs, LoadBalancer IPs), each with the
//! traffic policy and firewall of its kube-proxy chain.

use std::net::IpAddr;

use super::{Frontend, FrontendKey, ServicePort, Svc};
use crate::control::{
    cidr::{Cidr, Family},
    scheduler::Scheduler,
};

/// The datapath frontends of one Service on `family`, one per (entry
/// point, port): its cluster IP, NodePorts (the family's unspecified
/// address), external IPs and LoadBalancer IPs, each with the traffic
/// policy and firewall of its kube-proxy chain. `ports` are the family's
/// ([`super::service_ports`]); addresses and source ranges of the other
/// family are not this family's (kube-proxy's proxiers are one per family).
///
/// A service without any endpoint still gets its frontends (count 0): the
/// reference REJECTs on all of them. `node_ip` is the node's primary
/// address of `family`: when a source range contains it, the reference also accepts the
/// LoadBalancer IPs themselves as sources (VIPs looped back to the node).
/// Every frontend is scheduled by the Service's annotated scheduler, else
/// by `default` (the node's).
pub fn frontends(
    svc: &Svc,
    ports: &[ServicePort],
    node_ip: Option<IpAddr>,
    default: Scheduler,
    family: Family,
) -> Vec<(FrontendKey, Frontend)> {
    use proxy_common::{SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_NODEPORT, SVC_F_SOURCE_RANGES};
    let mut out = Vec::new();
    let ours = |ip: &&IpAddr| Family::of(ip) == family;
    let lb_ips: Vec<IpAddr> = svc.lb_ips.iter().filter(ours).copied().collect();
    let mut ranges: Vec<Cidr> = svc
        .lb_source_ranges
        .iter()
        .filter(|r| Family::of_net(r) == family)
        .copied()
        .collect();
    // kube-proxy: a zero-length prefix allows any source, as no range does.
    if ranges.iter().any(|r| r.prefix_len() == 0) {
        ranges.clear();
    }
    if node_ip.is_some_and(|ip| ranges.iter().any(|r| r.contains(&ip))) {
        ranges.extend(lb_ips.iter().map(|ip| Cidr::from(*ip)));
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
        let key = |addr: IpAddr, port: u16| FrontendKey {
            addr,
            port,
            proto: p.proto,
        };
        for &ip in svc.cluster_ips.iter().filter(ours) {
            out.push((key(ip, p.port), front(svc.internal_local, 0, Vec::new())));
        }
        let ext = svc.external_local;
        if let Some(np) = p.node_port {
            out.push((
                key(family.any(), np),
                front(ext, SVC_F_EXTERNAL | SVC_F_NODEPORT, Vec::new()),
            ));
        }
        for &ip in svc.external_ips.iter().filter(ours) {
            out.push((key(ip, p.port), front(ext, SVC_F_EXTERNAL, Vec::new())));
        }
        for &ip in &lb_ips {
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
