//! kpx: the userspace agent and CLI of an eBPF kube-proxy replacement.

pub mod datapath;
pub mod manifests;
pub mod model;
pub mod sync;
