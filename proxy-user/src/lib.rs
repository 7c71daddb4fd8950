//! kpx: the userspace agent and CLI of an eBPF kube-proxy replacement.
//!
//! The tree is the pipeline, in the order an object travels:
//! - [`control`]: what the cluster wants — the sources (API watch,
//!   manifests), the change index, the pure model (validation, endpoint
//!   selection, frontends) and the settings;
//! - [`dataplane`]: the eBPF datapath as userspace sees it — map layouts,
//!   the one reconcile path from the model to the maps, attachment, bpffs,
//!   conntrack housekeeping and the node's addresses;
//! - [`agent`]: the long-running loop that drives control into dataplane;
//! - [`ops`]: what operators touch — health, metrics, `kpx dump`, cleanup
//!   of kube-proxy's rules;
//! - [`reference`]: kube-proxy's own rules for the same model (iptables and
//!   nftables modes), for `kpx iptables-rules`, the differential tests and
//!   the benchmark.

pub mod agent;
pub mod control;
pub mod dataplane;
pub mod ops;
pub mod reference;
