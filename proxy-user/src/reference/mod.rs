//! kube-proxy's own rulesets, generated from the same model the agent
//! serves: `kpx iptables-rules` prints what kube-proxy's iptables mode
//! (`iptables-restore` input) or nftables mode (an `nft -f` script) would
//! install on this node. kpx never installs them itself; they exist so the
//! differential tests and the benchmark can run the reference next to kpx.
//!
//! Followed: kube-proxy v1.29's `pkg/proxy/iptables/proxier.go` and
//! `pkg/proxy/nftables/proxier.go` (chain names, rule order, comments), and
//! `pkg/proxy/topology.go`'s CategorizeEndpoints, which [`Port`] mirrors.
//! Services come in namespace/name order and endpoints in kube-proxy's
//! (`ip:port` as strings), so the output is deterministic.

use std::net::{IpAddr, Ipv4Addr};

use data_encoding::BASE32;
use proxy_common::IPPROTO_TCP;
use sha2::{Digest, Sha256};

use crate::{
    control::cidr::Cidr,
    control::config::{serves_nodeports, NodePortAddress},
    control::model::{Endpoint, ServicePort, Svc},
};

pub mod incremental;
pub mod iptables;
pub mod nftables;
mod node;

pub use node::rules;

/// Which of kube-proxy's modes to render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Nftables,
}

/// Where NodePorts are served (kube-proxy's NodePortAddresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePorts {
    /// Every local address (`nodePortAddresses` empty or 0.0.0.0/0).
    All,
    /// Only these node addresses.
    Only(Vec<Ipv4Addr>),
}

impl NodePorts {
    /// kube-proxy's GetNodeIPs: the node's `local` addresses inside the
    /// configured CIDRs (`primary`: the Node's primary address).
    pub fn select(cfg: &[NodePortAddress], primary: Option<Ipv4Addr>, local: &[Ipv4Addr]) -> Self {
        let all = cfg.is_empty()
            || cfg.iter().any(|c| {
                matches!(c, NodePortAddress::All)
                    || matches!(c, NodePortAddress::Cidr(c) if c.prefix_len() == 0)
            });
        if all {
            return Self::All;
        }
        let mut ips: Vec<Ipv4Addr> = local
            .iter()
            .copied()
            .filter(|a| serves_nodeports(cfg, primary.map(IpAddr::V4), IpAddr::V4(*a)))
            .collect();
        if let Some(p) = primary.filter(|_| cfg.contains(&NodePortAddress::Primary)) {
            if !ips.contains(&p) {
                ips.push(p);
            }
        }
        ips.sort();
        Self::Only(ips)
    }

    /// Whether loopback addresses accept NodePorts (kube-proxy's
    /// ContainsIPv4Loopback, checked before `localhostNodePorts`).
    fn includes_loopback(&self, cfg: &[NodePortAddress]) -> bool {
        match self {
            Self::All => true,
            Self::Only(_) => cfg.iter().any(|c| match c {
                NodePortAddress::Localhost => true,
                NodePortAddress::Cidr(c) => c.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
                _ => false,
            }),
        }
    }
}

/// The node-level settings kube-proxy's rules depend on.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The node's name (for the header only; locality is in the model).
    pub node_name: String,
    /// kube-proxy's nodeIP: a source range containing it admits the LB IPs.
    pub node_ip: Option<Ipv4Addr>,
    /// The local traffic detector (`--cluster-cidr`'s first IPv4 CIDR);
    /// without it, nothing is masqueraded for coming from outside.
    pub cluster_cidr: Option<Cidr>,
    pub masquerade_all: bool,
    /// kube-proxy's `--iptables-masquerade-bit` (default 14: mark 0x4000).
    pub masquerade_bit: u8,
    pub nodeports: NodePorts,
    /// iptables mode's `localhostNodePorts` (default true), effective only
    /// when loopback is among the NodePort addresses.
    pub localhost_nodeports: bool,
    /// `nf_conntrack_tcp_be_liberal` is set: no DROP of INVALID packets.
    pub tcp_be_liberal: bool,
}

impl Settings {
    pub fn new(node_name: &str) -> Self {
        Self {
            node_name: node_name.into(),
            node_ip: None,
            cluster_cidr: None,
            masquerade_all: false,
            masquerade_bit: 14,
            nodeports: NodePorts::All,
            localhost_nodeports: true,
            tcp_be_liberal: false,
        }
    }

    /// The masquerade mark as kube-proxy formats it (`%#08x`: 0x004000).
    fn mark(&self) -> String {
        format!("{:#08x}", 1u32 << self.masquerade_bit.min(31))
    }

    /// Applies `nodePortAddresses` and whether loopback may serve them.
    pub fn with_nodeports(
        mut self,
        cfg: &[NodePortAddress],
        local: &[Ipv4Addr],
        localhost_nodeports: bool,
    ) -> Self {
        self.nodeports = NodePorts::select(cfg, self.node_ip, local);
        self.localhost_nodeports = localhost_nodeports && self.nodeports.includes_loopback(cfg);
        self
    }
}

/// Renders `services` in `mode`.
pub fn render(mode: Mode, services: &[(Svc, Vec<ServicePort>)], s: &Settings) -> String {
    match mode {
        Mode::Iptables => iptables::render(services, s),
        Mode::Nftables => nftables::render(services, s),
    }
}

/// The first 16 characters of base32(sha256(`input`)): kube-proxy's
/// iptables chain hash (portProtoHash and the endpoint chain's).
pub fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut s = BASE32.encode(&digest);
    s.truncate(16);
    s
}

/// The first 8 characters of the same hash: nftables names' prefix.
pub fn hash8(input: &str) -> String {
    let mut s = hash16(input);
    s.truncate(8);
    s
}

/// `ip:port`, kube-proxy's endpoint string (and its sort key).
pub fn endpoint_string(e: &Endpoint) -> String {
    format!("{}:{}", e.addr, e.port)
}

fn sorted(mut eps: Vec<Endpoint>) -> Vec<Endpoint> {
    eps.sort_by_key(endpoint_string);
    eps.dedup();
    eps
}

/// One Service port as both rule writers see it: CategorizeEndpoints'
/// results and the chain decisions of syncProxyRules.
pub struct Port<'a> {
    pub svc: &'a Svc,
    pub sp: &'a ServicePort,
    /// `tcp` / `udp`.
    pub proto: &'static str,
    /// The service port name (`ns/name:port`, `ns/name` when unnamed).
    pub name: &'a str,
    pub cluster: Vec<Endpoint>,
    pub local: Vec<Endpoint>,
    /// Endpoints some chain of this port jumps to (one KUBE-SEP each).
    pub reachable: Vec<Endpoint>,
    pub has_endpoints: bool,
    pub has_internal: bool,
    pub has_external: bool,
    pub uses_cluster_chain: bool,
    pub uses_local_chain: bool,
    pub uses_external_chain: bool,
}

impl<'a> Port<'a> {
    pub fn new(svc: &'a Svc, sp: &'a ServicePort) -> Self {
        // UsesClusterEndpoints / UsesLocalEndpoints (pkg/proxy/serviceport.go).
        let uses_cluster = !svc.internal_local || svc.externally_accessible();
        let uses_local = svc.internal_local || svc.external_local;
        let cluster = if uses_cluster {
            sorted(sp.cluster_endpoints.clone())
        } else {
            Vec::new()
        };
        let local = if uses_local {
            sorted(sp.local_endpoints.clone())
        } else {
            Vec::new()
        };
        let reachable = sorted(cluster.iter().chain(&local).copied().collect());
        let has_endpoints = sp.has_any_endpoints;
        Self {
            svc,
            sp,
            proto: if sp.proto == IPPROTO_TCP {
                "tcp"
            } else {
                "udp"
            },
            name: &sp.name,
            has_internal: has_endpoints && (!svc.internal_local || !local.is_empty()),
            has_external: has_endpoints && (!svc.external_local || !local.is_empty()),
            uses_cluster_chain: !cluster.is_empty() && uses_cluster,
            uses_local_chain: !local.is_empty() && uses_local,
            uses_external_chain: has_endpoints && svc.externally_accessible(),
            cluster,
            local,
            reachable,
            has_endpoints,
        }
    }

    /// Every port of every service, in order.
    pub fn all(services: &'a [(Svc, Vec<ServicePort>)]) -> Vec<Port<'a>> {
        services
            .iter()
            .flat_map(|(svc, ports)| ports.iter().map(move |sp| Port::new(svc, sp)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_hashes_match_kube_proxy() {
        // Vectors from kube-proxy's own proxier tests.
        assert_eq!(hash16("ns1/svc1:p80tcp"), "XPGD46QRK7WJZT7O");
        assert_eq!(hash16("ns1/svc1:p80tcp10.180.0.1:80"), "SXIVWICOYRO3J4NJ");
        assert_eq!(hash8("ns1/svc1/tcp/p80"), "ULMVA6XW");
        assert_eq!(hash8("ns1/svc1/tcp/p80__10.180.0.1/80"), "5OJB2KTY");
    }

    #[test]
    fn nodeport_addresses_select_like_kube_proxy() {
        let local: Vec<Ipv4Addr> = ["127.0.0.1", "198.18.0.1", "198.18.128.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let primary = Some("198.18.128.1".parse().unwrap());
        assert_eq!(NodePorts::select(&[], primary, &local), NodePorts::All);
        let cidr = |s: &str| NodePortAddress::Cidr(s.parse().unwrap());
        assert_eq!(
            NodePorts::select(&[cidr("0.0.0.0/0")], primary, &local),
            NodePorts::All
        );
        assert_eq!(
            NodePorts::select(&[cidr("198.18.128.0/24")], primary, &local),
            NodePorts::Only(vec!["198.18.128.1".parse().unwrap()])
        );
        assert_eq!(
            NodePorts::select(&[NodePortAddress::Primary], primary, &local),
            NodePorts::Only(vec!["198.18.128.1".parse().unwrap()])
        );
        let s = Settings::new("n").with_nodeports(&[cidr("198.18.0.0/24")], &local, true);
        assert!(!s.localhost_nodeports, "loopback is not a NodePort address");
        let s = Settings::new("n").with_nodeports(&[], &local, true);
        assert!(s.localhost_nodeports);
        assert_eq!(Settings::new("n").mark(), "0x004000");
    }
}
