//! Traffic policy: which of a frontend's backend tables a new flow may use,
//! whether it is masqueraded, and the LoadBalancer source-range firewall,
//! exactly as kube-proxy's `KUBE-SVC`/`KUBE-SVL`/`KUBE-EXT`/`KUBE-FW` chains
//! decide. At most one lookup (`SRC_RANGES`, for frontends with ranges).

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{
    DropReason, ServiceValue, SrcRange, CFG_F_DSR_TCP, CFG_F_DSR_UDP, CFG_F_MASQUERADE_ALL,
    IPPROTO_TCP, SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_SOURCE_RANGES,
};

use crate::{
    family::{Family, NetRef},
    service::Config,
};

/// Where a new flow was seen.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Arrived on an interface (a pod, another node, an outside client).
    Network,
    /// Sent by this node itself (tc egress, source a node address): the
    /// reference's `--src-type LOCAL`.
    Node,
}

pub struct Choice {
    /// Use the node-local table.
    pub local: bool,
    /// Masquerade (the reference's `KUBE-MARK-MASQ`).
    pub masquerade: bool,
}

/// The reference's verdict for a new flow from `src` to the frontend `svc`
/// (which has endpoints: the REJECT case is decided before).
#[inline(always)]
pub fn decide<A: Family>(
    svc: &ServiceValue,
    src: A,
    origin: Origin,
    cfg: &Config,
    net: &NetRef<A>,
) -> Result<Choice, DropReason> {
    // The cluster CIDR is the reference's local-traffic detector; unknown,
    // no source counts as a pod and none as off-cluster.
    let known = net.known();
    let from_pod = net.is_pod(src);
    let policy_local = svc.flags & SVC_F_LOCAL != 0;
    let choice = if svc.flags & SVC_F_EXTERNAL == 0 {
        // A cluster IP: masquerade off-cluster sources, or all.
        Choice {
            local: policy_local,
            masquerade: cfg.flags() & CFG_F_MASQUERADE_ALL != 0 || (known && !from_pod),
        }
    } else {
        if svc.flags & SVC_F_SOURCE_RANGES != 0 && !in_source_ranges(svc.svc_id, src) {
            return Err(DropReason::SourceRange);
        }
        if !policy_local {
            // Cluster policy: may cross nodes, so always masquerade.
            Choice {
                local: false,
                masquerade: true,
            }
        } else if from_pod {
            // Pods reaching an external address are short-circuited to the
            // cluster-wide endpoints, their source kept.
            Choice {
                local: false,
                masquerade: false,
            }
        } else if origin == Origin::Node {
            Choice {
                local: false,
                masquerade: true,
            }
        } else {
            // Local policy: the client's address reaches a local endpoint.
            Choice {
                local: true,
                masquerade: false,
            }
        }
    };
    let usable = if choice.local {
        svc.local_count
    } else {
        svc.count
    };
    if usable == 0 {
        return Err(DropReason::NoLocalEndpoint);
    }
    Ok(choice)
}

/// Whether a new flow goes by direct server return (`--nodeport-mode`):
/// from outside the cluster (not a pod, not the node itself) to a NodePort,
/// LoadBalancer IP or externalIP with the Cluster policy, which the
/// reference masquerades so that replies come back through this node. With
/// DSR they need not: the flow keeps the client's address. No lookup.
#[inline(always)]
pub fn dsr<A: Family>(
    svc: &ServiceValue,
    src: A,
    proto: u8,
    origin: Origin,
    cfg: &Config,
    net: &NetRef<A>,
) -> bool {
    let wanted = if proto == IPPROTO_TCP {
        CFG_F_DSR_TCP
    } else {
        CFG_F_DSR_UDP
    };
    cfg.flags() & wanted != 0
        && cfg.flags() & A::DSR_FLAG == A::DSR_FLAG
        && origin == Origin::Network
        && svc.flags & (SVC_F_EXTERNAL | SVC_F_LOCAL) == SVC_F_EXTERNAL
        && !net.is_pod(src)
}

/// One LPM lookup: is `src` in one of the frontend's source ranges?
#[inline(always)]
fn in_source_ranges<A: Family>(svc_id: u32, src: A) -> bool {
    let key = Key::new(
        32 + A::BITS,
        SrcRange {
            svc_id_be: svc_id.to_be(),
            addr: src,
        },
    );
    A::src_ranges().get(&key).is_some()
}
