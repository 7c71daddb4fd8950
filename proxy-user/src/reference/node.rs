//! `kpx iptables-rules`: the inputs gathered exactly as the agent gathers
//! them (the same flags, file, index and node addresses), then rendered as
//! kube-proxy's rules.

use anyhow::Result;

use super::{render, Mode, Settings};
use crate::control::{
    cidr::Family,
    config::{self, NodeFlags},
    index::Index,
    manifests,
    model::{NodeInfo, Sourced},
    watch,
};

/// The rules kube-proxy in `mode` would install on this node for what
/// `flags` point at (manifests, or a one-time list from the API), for
/// `family`: its iptables (IPv4) or ip6tables (IPv6) proxier's.
/// `localhost_nodeports` is iptables mode's `localhostNodePorts`.
pub fn rules(
    flags: &NodeFlags,
    mode: Mode,
    family: Family,
    localhost_nodeports: bool,
) -> Result<String> {
    let file = flags.file()?.map(|l| l.overrides).unwrap_or_default();
    let o = flags.overrides().or(file);
    let hostname = config::hostname(o.hostname_override.as_deref())?;
    let node_ips = flags.node_ips(&o);
    let mut index = Index::new(NodeInfo::named(&hostname).configured_first(&node_ips));
    let problems = if let Some(path) = &flags.manifests {
        let loaded = manifests::load(path)?;
        let (_, mut problems) = index.replace_all(loaded.services, loaded.slices);
        problems.extend(loaded.problems);
        problems
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (services, slices, node) = rt.block_on(async {
            let client = watch::client(o.kubeconfig.as_deref()).await?;
            watch::list_once(client, &hostname).await
        })?;
        if let Some(n) = &node {
            index.set_node(NodeInfo::from_node(&hostname, n).configured_first(&node_ips));
        }
        let (_, problems) = index.replace_all(
            services.into_iter().map(Sourced::api).collect(),
            slices.into_iter().map(Sourced::api).collect(),
        );
        problems
    };
    for p in &problems {
        log::warn!("skipped: {p}");
    }
    index.update();
    let local = crate::dataplane::node::local_addrs().unwrap_or_else(|e| {
        log::warn!("listing this node's addresses: {e}; NodePort addresses unknown");
        Vec::new()
    });
    let settings = Settings {
        family,
        node_ip: index.node().primary(family),
        cluster_cidr: o
            .cluster_cidrs
            .as_ref()
            .and_then(|c| c.iter().find(|c| Family::of_net(c) == family).copied()),
        masquerade_all: o.masquerade_all.unwrap_or(false),
        masquerade_bit: o.masquerade_bit.unwrap_or(14),
        ..Settings::new(&hostname)
    }
    .with_nodeports(
        &o.nodeport_addresses.unwrap_or_default(),
        &local,
        localhost_nodeports,
    );
    Ok(render(mode, &index.services_with_ports(family), &settings))
}
