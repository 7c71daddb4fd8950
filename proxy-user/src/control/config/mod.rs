//! One settings pipeline for `kpx agent` and `kpx iptables-rules`: flags
//! ([`NodeFlags`], shared by both commands) over the KubeProxyConfiguration
//! file ([`file`]) over the defaults, merged field by field as
//! [`Overrides`] (`None`: not given; flags win, as in kube-proxy).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::control::{
    cidr::{Cidr, Family},
    scheduler::Parsed,
};

pub mod file;

pub use file::{load, parse, parse_go_duration, Loaded};

/// The settings that can come from the file or from flags; `None` is
/// "not given". Flags win over the file (`or`), as in kube-proxy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pub kubeconfig: Option<PathBuf>,
    pub hostname_override: Option<String>,
    /// The node's primary IP (kube-proxy's historical "bindAddress").
    pub bind_address: Option<IpAddr>,
    pub cluster_cidrs: Option<Vec<Cidr>>,
    pub healthz_bind_address: Option<Bind>,
    pub metrics_bind_address: Option<Bind>,
    pub bind_address_hard_fail: Option<bool>,
    pub nodeport_addresses: Option<Vec<NodePortAddress>>,
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<u8>,
    pub conntrack_max_per_core: Option<u32>,
    pub conntrack_min: Option<u32>,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub oom_score_adj: Option<i32>,
    pub verbosity: Option<u32>,
    /// `ipvs.scheduler` / `--ipvs-scheduler`: the default scheduler.
    pub scheduler: Option<Parsed>,
    /// `kpx.socketLB` / `--socket-lb`.
    pub socket_lb: Option<crate::dataplane::socklb::Mode>,
    /// `kpx.socketLBCgroup` / `--socket-lb-cgroup`.
    pub socket_lb_cgroup: Option<PathBuf>,
    /// `kpx.xdp` / `--xdp`.
    pub xdp: Option<crate::dataplane::xdp::Mode>,
    /// `kpx.xdpInterfaces` / `--xdp-interfaces`.
    pub xdp_interfaces: Option<String>,
    /// `kpx.nodePortMode` / `--nodeport-mode`.
    pub nodeport_mode: Option<crate::dataplane::node::NodePortMode>,
    /// `kpx.dsrIPv6` / `--dsr-ipv6`.
    pub dsr_ipv6: Option<bool>,
}

impl Overrides {
    /// `self` where given, else `lower`.
    pub fn or(self, lower: Overrides) -> Overrides {
        Overrides {
            kubeconfig: self.kubeconfig.or(lower.kubeconfig),
            hostname_override: self.hostname_override.or(lower.hostname_override),
            bind_address: self.bind_address.or(lower.bind_address),
            cluster_cidrs: self.cluster_cidrs.or(lower.cluster_cidrs),
            healthz_bind_address: self.healthz_bind_address.or(lower.healthz_bind_address),
            metrics_bind_address: self.metrics_bind_address.or(lower.metrics_bind_address),
            bind_address_hard_fail: self.bind_address_hard_fail.or(lower.bind_address_hard_fail),
            nodeport_addresses: self.nodeport_addresses.or(lower.nodeport_addresses),
            masquerade_all: self.masquerade_all.or(lower.masquerade_all),
            masquerade_bit: self.masquerade_bit.or(lower.masquerade_bit),
            conntrack_max_per_core: self.conntrack_max_per_core.or(lower.conntrack_max_per_core),
            conntrack_min: self.conntrack_min.or(lower.conntrack_min),
            tcp_established_timeout: self
                .tcp_established_timeout
                .or(lower.tcp_established_timeout),
            tcp_close_wait_timeout: self.tcp_close_wait_timeout.or(lower.tcp_close_wait_timeout),
            udp_timeout: self.udp_timeout.or(lower.udp_timeout),
            udp_stream_timeout: self.udp_stream_timeout.or(lower.udp_stream_timeout),
            sync_period: self.sync_period.or(lower.sync_period),
            min_sync_period: self.min_sync_period.or(lower.min_sync_period),
            oom_score_adj: self.oom_score_adj.or(lower.oom_score_adj),
            verbosity: self.verbosity.or(lower.verbosity),
            scheduler: self.scheduler.or(lower.scheduler),
            socket_lb: self.socket_lb.or(lower.socket_lb),
            socket_lb_cgroup: self.socket_lb_cgroup.or(lower.socket_lb_cgroup),
            xdp: self.xdp.or(lower.xdp),
            xdp_interfaces: self.xdp_interfaces.or(lower.xdp_interfaces),
            nodeport_mode: self.nodeport_mode.or(lower.nodeport_mode),
            dsr_ipv6: self.dsr_ipv6.or(lower.dsr_ipv6),
        }
    }
}

/// A listen address; `Bind(None)` (an empty string) serves nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bind(pub Option<SocketAddr>);

impl std::str::FromStr for Bind {
    type Err = String;
    /// `ip:port`, or empty for none. A bare IP is refused: which port
    /// would be a guess.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(Bind(None));
        }
        s.parse()
            .map(|a| Bind(Some(a)))
            .map_err(|_| format!("{s:?} is not an address:port"))
    }
}

/// One entry of `nodePortAddresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodePortAddress {
    Cidr(Cidr),
    /// The Node object's primary address.
    Primary,
    /// Every address (0.0.0.0/0).
    All,
    /// 127.0.0.0/8.
    Localhost,
}

impl std::str::FromStr for NodePortAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "primary" => Ok(Self::Primary),
            "all" => Ok(Self::All),
            "localhost" => Ok(Self::Localhost),
            cidr => crate::control::cidr::parse(cidr)
                .map(Self::Cidr)
                .map_err(|e| {
                    format!("{e}; expected a CIDR or one of the keywords primary, all, localhost")
                }),
        }
    }
}

/// The flags `kpx agent` and `kpx iptables-rules` share: where the cluster
/// comes from and what this node is. Declared once, flattened into both.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NodeFlags {
    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1), as
    /// kube-proxy's ConfigMap holds it. Flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Read Services and EndpointSlices from this YAML file or directory
    /// (standalone mode; the agent follows edits without restart) instead
    /// of the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Use the Kubernetes API through this kubeconfig (default: the
    /// in-cluster service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as in the EndpointSlices' nodeName (default: the
    /// hostname).
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// This node's primary address (kube-proxy's --bind-address; no
    /// socket is bound to it): its family's node IP.
    #[arg(long)]
    pub bind_address: Option<IpAddr>,
    /// A further address of this node (repeatable; the first of each
    /// family is that family's node IP on a dual-stack node).
    #[arg(long = "node-ip")]
    pub node_ips: Vec<IpAddr>,
    /// The cluster's pod CIDR(s), comma-separated, one per family on a
    /// dual-stack cluster (the first of each family detects pod traffic,
    /// as kube-proxy's local traffic detector).
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Option<Vec<Cidr>>,
    /// NodePorts are served only on node addresses in these CIDRs, or the
    /// keywords primary, all, localhost; comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Option<Vec<NodePortAddress>>,
    /// Masquerade all traffic to cluster IPs.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub masquerade_all: Option<bool>,
    /// The fwmark bit of kube-proxy's masquerade mark (0-31, default 14:
    /// 0x4000): `kpx iptables-rules` uses it, kpx's datapath marks nothing.
    #[arg(long = "iptables-masquerade-bit", value_parser = clap::value_parser!(u8).range(0..=31))]
    pub masquerade_bit: Option<u8>,
}

impl NodeFlags {
    /// The settings these flags give.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            kubeconfig: self.kubeconfig.clone(),
            hostname_override: self.hostname_override.clone(),
            bind_address: self.bind_address,
            cluster_cidrs: self.cluster_cidr.clone(),
            nodeport_addresses: self.nodeport_addresses.clone(),
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.masquerade_bit,
            ..Overrides::default()
        }
    }

    /// The configuration file named by `--config`, if any.
    pub fn file(&self) -> Result<Option<Loaded>> {
        self.config.as_deref().map(load).transpose()
    }

    /// The configured node IPs, the primary (`--bind-address`, or the
    /// file's `bindAddress`) first.
    pub fn node_ips(&self, merged: &Overrides) -> Vec<IpAddr> {
        let bind = merged.bind_address;
        let mut ips: Vec<IpAddr> = bind.into_iter().collect();
        ips.extend(self.node_ips.iter().filter(|ip| Some(**ip) != bind));
        ips
    }
}

/// The node's name: the override, else the kernel's hostname.
pub fn hostname(over: Option<&str>) -> Result<String> {
    match over {
        Some(h) => Ok(h.to_string()),
        None => Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the hostname (or pass --hostname-override)")?
            .trim()
            .to_string()),
    }
}

/// Whether local address `addr` serves NodePorts under `nodePortAddresses`
/// `cfg` (`primary`: the node's primary IP of `addr`'s family), as
/// kube-proxy's GetNodeIPs selects them for that family: only the entries
/// of the family count, and none means every address of the family.
pub fn serves_nodeports(cfg: &[NodePortAddress], primary: Option<IpAddr>, addr: IpAddr) -> bool {
    let family = Family::of(&addr);
    let ours: Vec<&NodePortAddress> = cfg
        .iter()
        .filter(|c| match c {
            NodePortAddress::Cidr(c) => Family::of_net(c) == family,
            NodePortAddress::Primary => primary.is_some(),
            NodePortAddress::Localhost | NodePortAddress::All => true,
        })
        .collect();
    ours.is_empty()
        || ours.iter().any(|c| match c {
            NodePortAddress::Cidr(c) => c.contains(&addr),
            NodePortAddress::Primary => Some(addr) == primary,
            NodePortAddress::Localhost => addr.is_loopback(),
            NodePortAddress::All => true,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let file = Overrides {
            hostname_override: Some("from-file".into()),
            sync_period: Some(Duration::from_secs(30)),
            ..Overrides::default()
        };
        let flags = Overrides {
            hostname_override: Some("from-flag".into()),
            ..Overrides::default()
        };
        let o = flags.or(file);
        assert_eq!(o.hostname_override.as_deref(), Some("from-flag"));
        assert_eq!(o.sync_period, Some(Duration::from_secs(30)));
    }
}
