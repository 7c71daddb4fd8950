//! This node as the datapath sees it: its addresses (which serve NodePorts,
//! which sources are the node itself) and the masquerade settings.
//!
//! Addresses are read with `getifaddrs` whenever an address or link changes
//! (netlink notifies the agent) and written to `KPX_NODE_ADDRS` as a diff.

use std::{collections::HashMap, fmt, fs, net::Ipv4Addr, ops::RangeInclusive, str::FromStr};

use anyhow::{bail, Context as _, Result};
use proxy_common::{
    wire, DatapathConfig, CFG_F_DSR_TCP, CFG_F_DSR_UDP, CFG_F_MASQUERADE_ALL, NODE_F_LOCAL,
    NODE_F_NODEPORT,
};

use crate::{
    control::cidr::Cidr,
    control::config::{serves_nodeports, NodePortAddress},
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

/// The node-wide datapath settings.
pub fn datapath_config(
    cluster_cidr: Option<&Cidr>,
    snat_addr: Option<Ipv4Addr>,
    ports: &PortRange,
    masquerade_all: bool,
) -> DatapathConfig {
    let (cidr, mask) = cluster_cidr.map_or((0, 0), |c| {
        (wire::addr(c.network()), wire::addr(c.netmask()))
    });
    DatapathConfig {
        cluster_cidr: cidr,
        cluster_mask: mask,
        snat_addr: snat_addr.map_or(0, wire::addr),
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
    }
}

/// Every IPv4 address of this network namespace.
pub fn local_ipv4() -> std::io::Result<Vec<Ipv4Addr>> {
    let mut out: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()?
        .filter_map(|i| Some(i.address?.as_sockaddr_in()?.ip()))
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// `NODE_F_*` bits of each address: every address is the node's; those
/// `--nodeport-addresses` selects (all but loopback by default) serve
/// NodePorts. Loopback never does: kpx sees no traffic on `lo`.
pub fn node_addrs(
    addrs: &[Ipv4Addr],
    nodeport: &[NodePortAddress],
    primary: Option<Ipv4Addr>,
) -> HashMap<Ipv4Addr, u32> {
    addrs
        .iter()
        .map(|a| {
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
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let addrs = [ip("127.0.0.1"), ip("198.18.128.1"), ip("198.18.0.1")];
        let flags = |np: &[NodePortAddress]| {
            let m = node_addrs(&addrs, np, Some(ip("198.18.128.1")));
            addrs.iter().map(|a| m[a]).collect::<Vec<_>>()
        };
        let (l, n) = (NODE_F_LOCAL, NODE_F_LOCAL | NODE_F_NODEPORT);
        assert_eq!(flags(&[]), [l, n, n]);
        assert_eq!(flags(&[NodePortAddress::Primary]), [l, n, l]);
        let cidr = NodePortAddress::Cidr("198.18.0.0/24".parse().unwrap());
        assert_eq!(flags(&[cidr]), [l, l, n]);
        assert_eq!(flags(&[NodePortAddress::Localhost]), [l, l, l]);
    }

    #[test]
    fn config_carries_cidr_mask_and_masquerade() {
        let c: Cidr = "198.18.0.0/17".parse().unwrap();
        let cfg = datapath_config(
            Some(&c),
            Some("198.18.128.1".parse().unwrap()),
            &PortRange::default(),
            true,
        );
        assert_eq!(
            wire::to_addr(cfg.cluster_mask),
            Ipv4Addr::new(255, 255, 128, 0)
        );
        assert_eq!(wire::to_addr(cfg.snat_addr), Ipv4Addr::new(198, 18, 128, 1));
        assert_eq!((cfg.snat_port_min, cfg.snat_port_max), (1024, 29999));
        assert_eq!(cfg.flags, CFG_F_MASQUERADE_ALL);
    }
}
