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

use std::net::{IpAddr, SocketAddr};

use data_encoding::BASE32;
use proxy_common::IPPROTO_TCP;
use sha2::{Digest, Sha256};

use crate::{
    control::cidr::{Cidr, Family},
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
    Only(Vec<IpAddr>),
}

impl NodePorts {
    /// kube-proxy's GetNodeIPs for `family`: the node's `local` addresses
    /// of the family inside the configured CIDRs of the family (`primary`:
    /// the Node's primary address of the family); every address when the
    /// configuration names no CIDR of the family.
    pub fn select(
        family: Family,
        cfg: &[NodePortAddress],
        primary: Option<IpAddr>,
        local: &[IpAddr],
    ) -> Self {
        let ours = |c: &&NodePortAddress| match c {
            NodePortAddress::Cidr(c) => Family::of_net(c) == family,
            NodePortAddress::Primary => primary.is_some(),
            NodePortAddress::All | NodePortAddress::Localhost => true,
        };
        let all = !cfg.iter().any(|c| ours(&c))
            || cfg.iter().filter(ours).any(|c| {
                matches!(c, NodePortAddress::All)
                    || matches!(c, NodePortAddress::Cidr(c) if c.prefix_len() == 0)
            });
        if all {
            return Self::All;
        }
        let mut ips: Vec<IpAddr> = local
            .iter()
            .copied()
            .filter(|a| Family::of(a) == family && serves_nodeports(cfg, primary, *a))
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
                NodePortAddress::Cidr(c) => c.contains(&IpAddr::from([127, 0, 0, 1])),
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
    /// The family of the rules: kube-proxy runs iptables and ip6tables (or
    /// the `ip` and `ip6` nftables tables), one proxier per family.
    pub family: Family,
    /// kube-proxy's nodeIP of the family: a source range containing it
    /// admits the LB IPs.
    pub node_ip: Option<IpAddr>,
    /// The local traffic detector (`--cluster-cidr`'s first CIDR of the
    /// family); without it, nothing is masqueraded for coming from outside.
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
            family: Family::V4,
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
        local: &[IpAddr],
        localhost_nodeports: bool,
    ) -> Self {
        self.nodeports = NodePorts::select(self.family, cfg, self.node_ip, local);
        self.localhost_nodeports = localhost_nodeports && self.nodeports.includes_loopback(cfg);
        self
    }

    /// Whether loopback takes NodePorts: IPv4's `localhostNodePorts`;
    /// never on IPv6, where kube-proxy blocks ::1.
    fn localhost_nodeports(&self) -> bool {
        self.localhost_nodeports && self.family == Family::V4
    }

    /// The loopback network of the rules' family.
    fn loopback(&self) -> &'static str {
        match self.family {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    /// nftables mode's table: `ip kube-proxy` or `ip6 kube-proxy`.
    fn nft_table(&self) -> &'static str {
        match self.family {
            Family::V4 => "ip kube-proxy",
            Family::V6 => "ip6 kube-proxy",
        }
    }

    /// nftables' address match keyword (`ip daddr`, `ip6 daddr`).
    fn nft_family(&self) -> &'static str {
        match self.family {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// nftables' address type in sets and maps.
    fn nft_addr_type(&self) -> &'static str {
        match self.family {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }

    /// The loopback match of nftables mode's NodePort rule.
    fn nft_loopback(&self) -> &'static str {
        match self.family {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1",
        }
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

/// `ip:port` (`[ip]:port` for IPv6, Go's JoinHostPort), kube-proxy's
/// endpoint string (and its sort key).
pub fn endpoint_string(e: &Endpoint) -> String {
    SocketAddr::new(e.addr, e.port).to_string()
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
        let local: Vec<IpAddr> = [
            "127.0.0.1",
            "198.18.0.1",
            "198.18.128.1",
            "::1",
            "2001:2::1",
            "2001:2:0:80::1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let primary = Some("198.18.128.1".parse().unwrap());
        let v4 = |cfg: &[NodePortAddress]| NodePorts::select(Family::V4, cfg, primary, &local);
        assert_eq!(v4(&[]), NodePorts::All);
        let cidr = |s: &str| NodePortAddress::Cidr(s.parse().unwrap());
        assert_eq!(v4(&[cidr("0.0.0.0/0")]), NodePorts::All);
        assert_eq!(
            v4(&[cidr("198.18.128.0/24")]),
            NodePorts::Only(vec!["198.18.128.1".parse().unwrap()])
        );
        assert_eq!(
            v4(&[NodePortAddress::Primary]),
            NodePorts::Only(vec!["198.18.128.1".parse().unwrap()])
        );
        // IPv6: only the family's CIDRs count; none of them means all.
        let primary6 = Some("2001:2::1".parse().unwrap());
        let v6 = |cfg: &[NodePortAddress]| NodePorts::select(Family::V6, cfg, primary6, &local);
        assert_eq!(v6(&[cidr("198.18.128.0/24")]), NodePorts::All);
        assert_eq!(
            v6(&[cidr("198.18.128.0/24"), cidr("2001:2:0:80::/64")]),
            NodePorts::Only(vec!["2001:2:0:80::1".parse().unwrap()])
        );
        assert_eq!(
            v6(&[NodePortAddress::Primary]),
            NodePorts::Only(vec!["2001:2::1".parse().unwrap()])
        );
        let s = Settings::new("n").with_nodeports(&[cidr("198.18.0.0/24")], &local, true);
        assert!(!s.localhost_nodeports, "loopback is not a NodePort address");
        let s = Settings::new("n").with_nodeports(&[], &local, true);
        assert!(s.localhost_nodeports);
        assert_eq!(Settings::new("n").mark(), "0x004000");
    }
}
