//! The desired state: a pure function from Services, EndpointSlices and the
//! node to the service frontends the datapath must serve.
//!
//! Semantics follow kube-proxy (`pkg/proxy`: service.go, endpointslicecache.go,
//! topology.go):
//! - a Service port is served by the endpoints of its EndpointSlices whose
//!   port has the same name and protocol (the EndpointSlice controller has
//!   already resolved numeric and named `targetPort`s into those ports);
//! - the same ip:port in several slices counts once, a non-terminating copy
//!   winning over a terminating one;
//! - `ready` endpoints serve; when none is ready the `serving` and
//!   `terminating` ones do, separately for cluster-wide and node-local use;
//! - topology hints (same node, then same zone) narrow the cluster-wide set
//!   when every ready endpoint carries them and one matches this node;
//! - `internalTrafficPolicy: Local` / `externalTrafficPolicy: Local` use only
//!   endpoints whose `nodeName` is this node;
//! - headless, ExternalName and `service-proxy-name`-labelled Services are
//!   not ours.
//!
//! A malformed object is reported, with its origin and the offending field,
//! and skipped as a whole; everything else is served.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::Node;

use crate::control::cidr::{Cidr, Family};

mod endpoints;
mod frontends;
#[cfg(test)]
mod tests;
mod validate;

pub use endpoints::*;
pub use frontends::*;
pub use validate::*;

/// kube-proxy ignores Services carrying this label (they belong to another proxy).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Links an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The node's zone, matched against endpoint zone hints.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// When the endpoints controller saw the change a slice carries (RFC 3339).
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// An object and where it came from (a manifest file and document, or the API).
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    pub origin: String,
    pub object: T,
}

impl<T> Sourced<T> {
    /// An object read from the Kubernetes API.
    pub fn api(object: T) -> Self {
        Self {
            origin: "API".into(),
            object,
        }
    }
}

/// A reported input problem: the object is skipped, nothing else is affected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub origin: String,
    /// "Service default/web", "EndpointSlice default/web-abc", or "document".
    pub object: String,
    /// The offending field's path, e.g. `spec.ports[0].port`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: field {}: {}",
            self.origin, self.object, self.field, self.message
        )
    }
}

/// One frontend (address, port, protocol) of a Service port, and who
/// serves it. A NodePort's address is its family's unspecified address
/// (0.0.0.0 or ::, any NodePort address of that family).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// kube-proxy's service port name: `namespace/name:port-name`.
    pub name: Arc<str>,
    /// The cluster-wide endpoints (kube-proxy's `KUBE-SVC-*`), sorted and
    /// de-duplicated; empty when the service has no endpoint at all.
    pub backends: Vec<Endpoint>,
    /// With `SVC_F_LOCAL`: the endpoints on this node (`KUBE-SVL-*`).
    pub local_backends: Vec<Endpoint>,
    /// `proxy_common::SVC_F_*`, and the scheduler's bits.
    pub flags: u32,
    /// With `SVC_F_SOURCE_RANGES`: the clients allowed (`KUBE-FW-*`).
    pub source_ranges: Vec<Cidr>,
    /// ClientIP session affinity timeout in seconds; 0 when off.
    pub affinity_timeout: u32,
}

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// The API server's upper bound for it (one day).
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// Of its frontend's family (slices serve their own family only).
    pub addr: IpAddr,
    pub port: u16,
    /// On this node (its `nodeName` is the node's): direct server return
    /// sends flows to it without encapsulation.
    pub local: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
}

impl FrontendKey {
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }
}

/// Everything the datapath must serve, keyed by frontend. Each frontend is
/// shared with the index's claim it comes from, not copied (at 50,000
/// Services that copy was tens of megabytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendKey, Arc<Frontend>>,
}

/// Why a well-formed object (or part of it) is not served. Not an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Skipped {
    Headless,
    ExternalName,
    OtherProxy,
    /// An address or source range of a family the Service is not served
    /// on (kube-proxy's proxier of each family ignores the other's).
    OtherFamily,
    /// SCTP waits for datapath support.
    Sctp,
    /// A scheduler annotation kpx cannot use (the default serves instead).
    Scheduler,
}

impl Skipped {
    pub const ALL: [Skipped; 6] = [
        Skipped::Headless,
        Skipped::ExternalName,
        Skipped::OtherProxy,
        Skipped::OtherFamily,
        Skipped::Sctp,
        Skipped::Scheduler,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Skipped::Headless => "headless",
            Skipped::ExternalName => "external_name",
            Skipped::OtherProxy => "other_proxy",
            Skipped::OtherFamily => "other_family",
            Skipped::Sctp => "sctp",
            Skipped::Scheduler => "scheduler_annotation",
        }
    }
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub desired: Desired,
    pub problems: Vec<Problem>,
    /// Skipped objects or parts with the reason, for logs and counters.
    pub skipped: Vec<(String, Skipped)>,
}

/// What the model needs to know about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Endpoints with this `nodeName` are local.
    pub name: String,
    /// `topology.kubernetes.io/zone`, for zone hints.
    pub zone: Option<String>,
    /// InternalIP/ExternalIP addresses of both families from the Node's
    /// status (the configured node IPs first).
    pub addresses: Vec<IpAddr>,
}

impl NodeInfo {
    pub fn named(name: &str) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Reads the zone label and addresses of `node`.
    pub fn from_node(name: &str, node: &Node) -> Self {
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_ZONE))
            .filter(|z| !z.is_empty())
            .cloned();
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .collect();
        Self {
            name: name.into(),
            zone,
            addresses,
        }
    }

    /// The configured node IPs first (the first of each family is that
    /// family's nodeIP: masquerade source, source-range exception), then
    /// the Node's others.
    pub fn configured_first(mut self, configured: &[IpAddr]) -> Self {
        let mut addresses = configured.to_vec();
        addresses.extend(self.addresses.iter().filter(|a| !configured.contains(a)));
        self.addresses = addresses;
        self
    }

    /// kube-proxy's nodeIP of `family`: the first address of that family.
    pub fn primary(&self, family: Family) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| Family::of(a) == family)
    }
}

/// `namespace/name` of a Service (and, in the index, of any object).
/// Shared strings: the index holds each Service's reference in several
/// tables, and a clone is two reference counts, not two allocations.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    /// Interned ([`intern`]): a cluster has few namespaces.
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceRef {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: intern(namespace),
            name: name.into(),
        }
    }
}

/// `s`, shared with every other use of the same string. For the few
/// distinct values a cluster has many references to (namespaces, node
/// names); the set only grows, so never for per-object names.
pub fn intern(s: &str) -> Arc<str> {
    static SEEN: Mutex<BTreeSet<Arc<str>>> = Mutex::new(BTreeSet::new());
    // A poisoned lock only means another thread panicked mid-insert; the
    // set is still a set.
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = seen.get(s) {
        return Arc::clone(n);
    }
    let n: Arc<str> = s.into();
    seen.insert(Arc::clone(&n));
    n
}

/// A node's name, interned and one pointer wide: every endpoint of a slice
/// holds one (half a million at 50,000 Services of 10 endpoints), where a
/// fat `Arc<str>` cost each 8 bytes more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeName(Arc<Arc<str>>);

impl NodeName {
    /// `s`, shared with every other endpoint on the same node.
    pub fn intern(s: &str) -> Self {
        static SEEN: Mutex<BTreeMap<Arc<str>, NodeName>> = Mutex::new(BTreeMap::new());
        // As in `intern`: a poisoned map is still a map.
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = seen.get(s) {
            return n.clone();
        }
        let name = intern(s);
        let n = Self(Arc::new(Arc::clone(&name)));
        seen.insert(name, n.clone());
        n
    }

    /// Whether `a` and `b` are one allocation.
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl std::ops::Deref for NodeName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}
