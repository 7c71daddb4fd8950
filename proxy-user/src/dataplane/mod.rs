//! The datapath as userspace sees it: the eBPF object and its maps
//! ([`maps`]), the one reconcile path that makes the maps equal the model
//! ([`reconcile`], [`ports`], [`node`]; the reply filter in [`replies`]), the hooks the programs are attached
//! to ([`attach`] for tc, egress where a flow asks in [`egress`], [`socklb`] for the socket hooks, with bpffs pins in [`bpffs`], carried across kpx versions
//! by [`layout`]) and conntrack housekeeping ([`conntrack`]). Host byte
//! order everywhere but at the map boundary.

pub mod attach;
pub mod batch;
pub mod bpffs;
pub mod conntrack;
pub mod egress;
pub mod layout;
pub mod maps;
pub mod node;
pub mod ports;
pub mod reconcile;
pub mod replies;
pub mod sockdiag;
pub mod socklb;
pub mod sys;
pub mod takeover;
pub mod xdp;

pub use maps::{Datapath, LoadOptions, MapSet};
