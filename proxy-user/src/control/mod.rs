//! The control plane: from Kubernetes objects (or manifests) to the frontends
//! the datapath must serve. Nothing here touches a map or the kernel.
//!
//! watch / manifests → [`index`] (changes, dirty Services) → [`model`]
//! (validated objects, endpoint selection, frontends) → `Desired`.

pub mod cidr;
pub mod config;
pub mod index;
pub mod manifests;
pub mod model;
pub mod scheduler;
pub mod watch;
