//! This node as the datapath sees it: its addresses (which serve NodePorts,
//! which sources are the node itself) and the masquerade settings.
//!
//! Addresses are read with `getifaddrs` whenever an address or link changes
//! (netlink notifies the agent) and written to `KPX_NODE_ADDRS` as a diff.

use std::{
    collections::HashMap,
    fmt, fs,
    net::{IpAddr, Ipv6Addr},
    ops::RangeInclusive,
    str::FromStr,
};

use anyhow::{bail, Context as _, Result};
use proxy_common::{
    wire, DatapathConfig, Net6, CFG_F_DSR_TCP, CFG_F_DSR_UDP, CFG_F_MASQUERADE_ALL, NODE_F_LOCAL,
    NODE_F_NODEPORT,
};

use crate::{
    control::cidr::{Cidr, Family},
    control::config::{serves_nodeports, NodePortAddress},
    dataplane::reconcile::NodeConfig,
};

/// The source ports masqueraded flows use, inclusive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRange(pub RangeInclusive<u16>);

impl Default for PortRange {
    /// Below the NodePort range (30000-32767) and Linux's ephemeral ports
    /// (32768-60999): no local socket picks these ports by itself.
    fn default() -> Self {
        Self(1024..=29999)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not a port range (first-last)"))?;
        let p = |x: &str| {
            x.trim()
                .parse::<u16>()
                .map_err(|_| format!("{x:?} is not a port"))
        };
        let (a, b) = (p(a)?, p(b)?);
        if a == 0 || a > b || b - a < 255 {
            return Err(format!(
                "{s:?}: want first-last with 1 <= first and at least 256 ports"
            ));
        }
        Ok(Self(a..=b))
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0.start(), self.0.end())
    }
}

/// `--nodeport-mode`: how flows from outside the cluster to a NodePort,
/// LoadBalancer IP or externalIP with the Cluster traffic policy reach a
/// backend on another node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NodePortMode {
    /// Masqueraded, as kube-proxy does: the backend sees this node's
    /// address and answers through it.
    #[default]
    Snat,
    /// Direct server return for TCP and UDP: the backend sees the client's
    /// address and its node answers the client directly.
    Dsr,
    /// Direct server return for TCP, masquerade for UDP.
    Hybrid,
}

impl NodePortMode {
    const NAMES: [(&'static str, NodePortMode); 3] = [
        ("snat", NodePortMode::Snat),
        ("dsr", NodePortMode::Dsr),
        ("hybrid", NodePortMode::Hybrid),
    ];

    /// The datapath's `CFG_F_DSR_*` flags for this mode.
    pub fn flags(self) -> u32 {
        match self {
            NodePortMode::Snat => 0,
            NodePortMode::Dsr => CFG_F_DSR_TCP | CFG_F_DSR_UDP,
            NodePortMode::Hybrid => CFG_F_DSR_TCP,
        }
    }
}

impl std::str::FromStr for NodePortMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, m)| *m)
            .ok_or_else(|| format!("{s:?}: want snat, dsr or hybrid"))
    }
}

impl fmt::Display for NodePortMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::NAMES.iter().find(|(_, m)| m == self).map(|(n, _)| *n);
        f.write_str(name.unwrap_or("?"))
    }
}

/// The node-wide datapath settings of both families: each family's first
/// cluster CIDR of `cluster_cidrs` and its node IP (`node_ips`, the first
/// of each family) as masquerade source.
pub fn datapath_config(
    cluster_cidrs: &[Cidr],
    node_ips: &[IpAddr],
    ports: &PortRange,
    masquerade_all: bool,
) -> NodeConfig {
    let cidr = |f: Family| cluster_cidrs.iter().find(|c| Family::of_net(c) == f);
    let snat = |f: Family| node_ips.iter().copied().find(|a| Family::of(a) == f);
    let (cidr4, mask4) = match cidr(Family::V4) {
        Some(Cidr::V4(c)) => (wire::addr(c.network()), wire::addr(c.netmask())),
        _ => (0, 0),
    };
    let snat4 = match snat(Family::V4) {
        Some(IpAddr::V4(a)) => wire::addr(a),
        _ => 0,
    };
    let (cidr6, mask6) = match cidr(Family::V6) {
        Some(Cidr::V6(c)) => (wire::addr6(c.network()), wire::addr6(c.netmask())),
        _ => Default::default(),
    };
    let snat6 = match snat(Family::V6) {
        Some(IpAddr::V6(a)) => wire::addr6(a),
        _ => Default::default(),
    };
    NodeConfig {
        v4: DatapathConfig {
            cluster_cidr: cidr4,
            cluster_mask: mask4,
            snat_addr: snat4,
            snat_port_min: *ports.0.start(),
            snat_port_max: *ports.0.end(),
            flags: if masquerade_all {
                CFG_F_MASQUERADE_ALL
            } else {
                0
            },
            _pad: 0,
            // The agent's, set with the socket-level load balancer's mode.
            host_netns_cookie: 0,
        },
        v6: Net6 {
            cluster_cidr: cidr6,
            cluster_mask: mask6,
            snat_addr: snat6,
        },
    }
}

/// Every address of this network namespace, both families. IPv6's
/// link-local addresses are left out: no Service or NodePort is reached
/// through one (kube-proxy's GetNodeIPs skips them too).
pub fn local_addrs() -> std::io::Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()?
        .filter_map(|i| {
            let a = i.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            let v6: Ipv6Addr = a.as_sockaddr_in6()?.ip();
            (!v6.is_unicast_link_local()).then_some(IpAddr::V6(v6))
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// `NODE_F_*` bits of each address: every address is the node's; those
/// `--nodeport-addresses` selects (all but loopback by default) serve
/// NodePorts. Loopback never does: kpx sees no traffic on `lo`.
/// `primaries` are the node IPs, the first of each family its primary.
pub fn node_addrs(
    addrs: &[IpAddr],
    nodeport: &[NodePortAddress],
    primaries: &[IpAddr],
) -> HashMap<IpAddr, u32> {
    addrs
        .iter()
        .map(|a| {
            let primary = primaries
                .iter()
                .copied()
                .find(|p| Family::of(p) == Family::of(a));
            let serves = !a.is_loopback() && serves_nodeports(nodeport, primary, *a);
            let flags = NODE_F_LOCAL | if serves { NODE_F_NODEPORT } else { 0 };
            (*a, flags)
        })
        .collect()
}

/// Keeps local sockets out of the masquerade ports: when the node's
/// ephemeral range (`ip_local_port_range`) overlaps them, they are added to
/// `ip_local_reserved_ports` (kept across agent restarts, as any sysctl).
pub fn reserve_ports(ports: &PortRange) -> Result<Option<String>> {
    const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let text = fs::read_to_string(RANGE).with_context(|| format!("reading {RANGE}"))?;
    let mut it = text
        .split_whitespace()
        .filter_map(|x| x.parse::<u16>().ok());
    let (Some(lo), Some(hi)) = (it.next(), it.next()) else {
        bail!("{RANGE}: unexpected content {text:?}");
    };
    if hi < *ports.0.start() || lo > *ports.0.end() {
        return Ok(None);
    }
    let reserved = fs::read_to_string(RESERVED).with_context(|| format!("reading {RESERVED}"))?;
    let covered = reserved.trim().split(',').any(|r| {
        let mut p = r.split('-').filter_map(|x| x.trim().parse::<u16>().ok());
        match (p.next(), p.next()) {
            (Some(a), Some(b)) => a <= *ports.0.start() && b >= *ports.0.end(),
            _ => false,
        }
    });
    if covered {
        return Ok(None);
    }
    let new = match reserved.trim() {
        "" => ports.to_string(),
        old => format!("{old},{ports}"),
    };
    fs::write(RESERVED, &new).with_context(|| format!("writing {RESERVED}"))?;
    Ok(Some(format!(
        "the ephemeral ports {lo}-{hi} overlap the masquerade ports {ports}: reserved them ({RESERVED} = {new})"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_refuse_nonsense() {
        assert_eq!(
            "20000-29999".parse::<PortRange>().unwrap(),
            PortRange(20000..=29999)
        );
        for bad in ["0-1000", "3000-2000", "100", "20000-20010", "a-b"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn nodeport_addresses_select_node_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let addrs = [
            ip("127.0.0.1"),
            ip("198.18.128.1"),
            ip("198.18.0.1"),
            ip("::1"),
            ip("2001:2::1"),
            ip("2001:2:0:1::1"),
        ];
        let primaries = [ip("198.18.128.1"), ip("2001:2::1")];
        let flags = |np: &[NodePortAddress]| {
            let m = node_addrs(&addrs, np, &primaries);
            addrs.iter().map(|a| m[a]).collect::<Vec<_>>()
        };
        let (l, n) = (NODE_F_LOCAL, NODE_F_LOCAL | NODE_F_NODEPORT);
        assert_eq!(flags(&[]), [l, n, n, l, n, n]);
        assert_eq!(flags(&[NodePortAddress::Primary]), [l, n, l, l, n, l]);
        // A family without a CIDR of its own serves on all its addresses,
        // as kube-proxy's per-family nodePortAddresses do.
        let cidr = NodePortAddress::Cidr("198.18.0.0/24".parse().unwrap());
        assert_eq!(flags(&[cidr]), [l, l, n, l, n, n]);
        let cidr6 = NodePortAddress::Cidr("2001:2:0:1::/64".parse().unwrap());
        assert_eq!(flags(&[cidr, cidr6]), [l, l, n, l, l, n]);
        assert_eq!(flags(&[NodePortAddress::Localhost]), [l, l, l, l, l, l]);
    }

    #[test]
    fn config_carries_cidr_mask_and_masquerade_of_each_family() {
        let cidrs: Vec<Cidr> = vec![
            "2001:2::/56".parse().unwrap(),
            "198.18.0.0/17".parse().unwrap(),
        ];
        let ips: Vec<IpAddr> = vec![
            "198.18.128.1".parse().unwrap(),
            "2001:2::1".parse().unwrap(),
        ];
        let cfg = datapath_config(&cidrs, &ips, &PortRange::default(), true);
        let v4 = cfg.v4;
        assert_eq!(
            wire::to_addr(v4.cluster_mask),
            Ipv4Addr::new(255, 255, 128, 0)
        );
        assert_eq!(wire::to_addr(v4.snat_addr), Ipv4Addr::new(198, 18, 128, 1));
        assert_eq!((v4.snat_port_min, v4.snat_port_max), (1024, 29999));
        assert_eq!(v4.flags, CFG_F_MASQUERADE_ALL);
        let v6 = cfg.v6;
        assert_eq!(wire::to_addr6(v6.cluster_cidr), ip6("2001:2::"));
        assert_eq!(
            wire::to_addr6(v6.cluster_mask),
            ip6("ffff:ffff:ffff:ff00::")
        );
        assert_eq!(wire::to_addr6(v6.snat_addr), ip6("2001:2::1"));
        // IPv4 only: IPv6's settings stay zero (no masquerade, no CIDR).
        let cfg = datapath_config(&cidrs[1..], &ips[..1], &PortRange::default(), false);
        assert_eq!(cfg.v6, Net6::default());
    }

    use std::net::Ipv4Addr;

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }
}
