//! kpx: the userspace agent and CLI of an eBPF kube-proxy replacement.

pub mod agent;
pub mod attach;
pub mod bpffs;
pub mod cidr;
pub mod cleanup;
pub mod cluster;
pub mod config;
pub mod conntrack;
pub mod datapath;
pub mod dump;
pub mod health;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod node;
pub mod ports;
pub mod reference;
pub mod sync;
pub mod watch;
