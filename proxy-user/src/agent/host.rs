//! The host node under the agent: its Node object (zone, addresses, drain
//! state), the node-wide datapath settings and the node's own addresses.

use super::*;
use crate::control::cidr::Family;

impl Agent {
    pub(super) fn on_node(&mut self, ev: WatchEvent<Node>) {
        // A Node deleted under a running proxy gets no new LB traffic.
        let deleted = matches!(ev, WatchEvent::Delete(_));
        let node = match ev {
            WatchEvent::Init => {
                self.node_seen = Some(None);
                return;
            }
            WatchEvent::InitApply(n) => {
                self.node_seen = Some(Some(n));
                return;
            }
            WatchEvent::InitDone => {
                let node = self.node_seen.take().flatten();
                self.relisted("nodes", usize::from(node.is_some()));
                node
            }
            WatchEvent::Apply(n) => Some(n),
            WatchEvent::Delete(_) => None,
        };
        self.set_node(node, deleted, "api");
    }

    /// This node's Node object (None: there is none, or it was `deleted`),
    /// from the API or the manifests (`origin`).
    pub(super) fn set_node(&mut self, node: Option<Node>, deleted: bool, origin: &str) {
        let problems = node
            .as_ref()
            .map(|n| crate::control::model::node_problems(origin, n))
            .unwrap_or_default();
        // Reported when they change, not at every status update.
        if problems != self.node_problems {
            self.node_problems = problems.clone();
            if origin == "api" {
                self.report(problems);
            }
        }
        let info = match &node {
            Some(n) => NodeInfo::from_node(&self.cfg.hostname, n),
            None => NodeInfo::named(&self.cfg.hostname),
        }
        .configured_first(&self.cfg.node_ips);
        let was = self.health.node_eligible();
        if deleted {
            self.health.set_eligible(false);
        } else {
            self.health.set_node(node.as_ref());
        }
        if was != self.health.node_eligible() {
            log::info!(
                "node {:?} {} load-balancer traffic: /healthz answers {}",
                self.cfg.hostname,
                if was {
                    "is leaving (deleted or tainted ToBeDeletedByClusterAutoscaler), draining"
                } else {
                    "takes"
                },
                if was { 503 } else { 200 }
            );
        }
        if self.index.set_node(info) {
            log::info!(
                "node {:?}: zone {:?}, addresses {:?}",
                self.cfg.hostname,
                self.index.node().zone,
                self.index.node().addresses
            );
            self.node_settings();
        }
    }

    /// Writes the node-wide datapath settings and this node's addresses
    /// when they changed, through the same write stream as the frontends.
    /// Each family's masquerade source is the node's primary IP of that
    /// family: configured, else the Node object's, else none (no masquerade
    /// on that family, and a warning: off-cluster clients of its cluster
    /// IPs then fail).
    pub(super) fn node_settings(&mut self) {
        let node_ips = self.index.node().addresses.clone();
        let mut cfg = node::datapath_config(
            &self.cfg.cluster_cidrs,
            &node_ips,
            &self.cfg.masquerade_ports,
            self.cfg.masquerade_all,
        );
        let v4 = &mut cfg.v4;
        if !self.cfg.fib_forwarding {
            v4.flags |= proxy_common::CFG_F_STACK_FORWARDING;
        }
        if self.cfg.socket_lb == socklb::Mode::HostOnly {
            v4.flags |= proxy_common::CFG_F_SOCK_HOST_ONLY;
        }
        v4.flags |= self.cfg.nodeport_mode.flags();
        if self.cfg.dsr_ipv6 {
            v4.flags |= proxy_common::CFG_F_DSR_IPV6;
        }
        v4.host_netns_cookie = self.host_netns;
        let addrs = match node::local_addrs() {
            Ok(a) => a,
            Err(e) => {
                log::warn!("listing this node's addresses: {e}; retrying at the next change");
                // The settings do not wait for the addresses.
                self.mirror.state.node_addrs.keys().copied().collect()
            }
        };
        let want = node::node_addrs(&addrs, &self.cfg.nodeport_addresses, &node_ips);
        let ops = reconcile::node(&self.mirror.state, &want, &cfg);
        if ops.is_empty() {
            return;
        }
        // A new address's filter bit before the address: the destination
        // filter must not pass a packet to its NodePorts.
        if let Err(e) = self
            .ports
            .prepare(&ops, &self.mirror.state, &mut self.dp.maps)
        {
            log::warn!("node addresses: writing the port filter failed: {e}; retrying at the next change or resync");
            return;
        }
        if !self.apply(&ops) || !self.flush_ports() {
            log::warn!("node settings and addresses: retrying at the next change or resync");
            return;
        }
        if ops.iter().any(|op| matches!(op, Op::SetConfig(_))) {
            log::info!(
                "NodePort mode: {} ({}){}",
                self.cfg.nodeport_mode,
                match self.cfg.nodeport_mode {
                    node::NodePortMode::Snat =>
                        "outside clients of Cluster-policy external frontends are masqueraded",
                    node::NodePortMode::Dsr => "direct server return for TCP and UDP: a backend on another node sees the client and answers it directly",
                    node::NodePortMode::Hybrid =>
                        "direct server return for TCP, masquerade for UDP",
                },
                match (self.cfg.nodeport_mode, self.cfg.dsr_ipv6) {
                    (node::NodePortMode::Snat, _) => "",
                    (_, true) => "; IPv6 flows too (--dsr-ipv6)",
                    (_, false) => "; IPv4 flows only: IPv6's are masqueraded until --dsr-ipv6, once every node runs a kpx that takes IPv6 Geneve out",
                }
            );
            for family in Family::BOTH {
                let primary = self.index.node().primary(family);
                let cidr = self
                    .cfg
                    .cluster_cidrs
                    .iter()
                    .find(|c| Family::of_net(c) == family);
                match primary {
                    // A node of one family: the other is not worth a warning.
                    None if family == Family::V6 => {}
                    None => log::warn!(
                        "no {} node IP known (--bind-address, --node-ip or the Node's InternalIP): nothing is masqueraded on {}",
                        family.name(),
                        family.name()
                    ),
                    Some(p) => log::info!(
                        "datapath: {} masquerade to {p} ports {}, cluster CIDR {}{}",
                        family.name(),
                        self.cfg.masquerade_ports,
                        cidr.map_or_else(|| "unknown".to_string(), |c| c.to_string()),
                        if self.cfg.masquerade_all {
                            ", masquerade all"
                        } else {
                            ""
                        }
                    ),
                }
            }
        }
        if ops.iter().any(|op| !matches!(op, Op::SetConfig(_))) {
            let mut nodeport: Vec<IpAddr> = want
                .iter()
                .filter(|(_, f)| *f & proxy_common::NODE_F_NODEPORT != 0)
                .map(|(a, _)| *a)
                .collect();
            nodeport.sort();
            log::info!("node addresses {addrs:?}; NodePorts on {nodeport:?}");
        }
    }

    /// Attaches (or detaches) XDP as `--xdp` says, on the interfaces it
    /// selects: by default those holding this node's addresses that serve
    /// NodePorts.
    /// Never fatal: tc serves every interface XDP is not on.
    pub(super) fn xdp(&mut self, xdp: &mut XdpAttacher) {
        // The Node's own addresses (InternalIP, ExternalIP, --node-ip) that
        // serve NodePorts: the external interfaces, not the pod-side
        // gateways, which hold NodePort addresses too.
        let state = &self.mirror.state;
        // IPv4's: XDP hands IPv6 to tc.
        let nodeport: Vec<Ipv4Addr> = self
            .index
            .node()
            .addresses
            .iter()
            .copied()
            .filter(|a| {
                state
                    .node_addrs
                    .get(a)
                    .is_some_and(|f| f & proxy_common::NODE_F_NODEPORT != 0)
            })
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect();
        xdp.reconcile(&mut self.dp, &nodeport);
        // Said once: each interface's own reason was logged as it came.
        if xdp.attached().next().is_none() && !std::mem::replace(&mut self.xdp_reported, true) {
            log::info!(
                "XDP: {}; tc serves every interface",
                if xdp.mode() == xdp::Mode::Off {
                    "off (--xdp=off)"
                } else {
                    "on no interface (none selected, or no driver runs it natively)"
                }
            );
        }
    }

    /// Attaches the socket-level load balancer as `--socket-lb` says (after
    /// the node settings, which tell it the node's sockets from pods'), or
    /// detaches an earlier agent's. Never fatal: without it, tc translates
    /// every flow per packet, as before. Whether it takes every socket of
    /// its cgroup (`all`): pods' flows then reach tc only when they bypass
    /// sockets, and tc egress goes on pods' veths on demand.
    pub(super) fn socket_lb(&mut self) -> bool {
        let mode = self.cfg.socket_lb;
        if mode == socklb::Mode::Off {
            match socklb::unpin(&self.cfg.bpffs) {
                Ok(0) => {}
                Ok(n) => log::info!("detached {n} socket-LB links of an earlier agent"),
                Err(e) => log::warn!("detaching an earlier agent's socket-LB links: {e:#}"),
            }
            log::info!("socket-level load balancing: off (--socket-lb=off); tc translates every service flow");
            return false;
        }
        let cgroup = match &self.cfg.socket_lb_cgroup {
            Some(c) => socklb::resolve(c),
            None => socklb::default_cgroup(),
        };
        let bpffs = self.cfg.bpffs.clone();
        match cgroup.and_then(|cg| {
            let n = self.dp.attach_socket_lb(&cg, &bpffs)?;
            Ok((cg, n))
        }) {
            Ok((cg, n)) => {
                log::info!(
                    "socket-level load balancing: {mode}, {n} programs on cgroup {}: connect() and sendmsg() to a service go straight to a backend",
                    cg.display()
                );
                mode == socklb::Mode::All
            }
            Err(e) => {
                log::warn!(
                    "socket-level load balancing unavailable ({e:#}); tc translates every service flow per packet"
                );
                false
            }
        }
    }
}
