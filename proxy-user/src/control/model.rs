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
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use proxy_common::{IPPROTO_TCP, IPPROTO_UDP};

use crate::control::cidr::Cidr;

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
/// serves it. A NodePort's address is 0.0.0.0 (any NodePort address).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// kube-proxy's service port name: `namespace/name:port-name`.
    pub name: String,
    /// The cluster-wide endpoints (kube-proxy's `KUBE-SVC-*`), sorted and
    /// de-duplicated; empty when the service has no endpoint at all.
    pub backends: Vec<Endpoint>,
    /// With `SVC_F_LOCAL`: the endpoints on this node (`KUBE-SVL-*`).
    pub local_backends: Vec<Endpoint>,
    /// `proxy_common::SVC_F_*`.
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
    pub addr: Ipv4Addr,
    pub port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

/// Everything the datapath must serve, keyed by frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
}

/// Why a well-formed object (or part of it) is not served. Not an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Skipped {
    Headless,
    ExternalName,
    OtherProxy,
    /// IPv6 addresses wait for the IPv6 datapath.
    Ipv6,
    /// SCTP waits for datapath support.
    Sctp,
}

impl Skipped {
    pub const ALL: [Skipped; 5] = [
        Skipped::Headless,
        Skipped::ExternalName,
        Skipped::OtherProxy,
        Skipped::Ipv6,
        Skipped::Sctp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Skipped::Headless => "headless",
            Skipped::ExternalName => "external_name",
            Skipped::OtherProxy => "other_proxy",
            Skipped::Ipv6 => "ipv6",
            Skipped::Sctp => "sctp",
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
    /// IPv4 InternalIP/ExternalIP addresses from the Node's status.
    pub addresses: Vec<Ipv4Addr>,
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
            .filter_map(|a| a.address.parse::<Ipv4Addr>().ok())
            .collect();
        Self {
            name: name.into(),
            zone,
            addresses,
        }
    }
}

/// `namespace/name` of a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn namespace(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

fn object_name(
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> String {
    format!(
        "{kind} {}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

fn protocol(p: Option<&str>) -> Result<Option<u8>, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Some(IPPROTO_TCP)),
        "UDP" => Ok(Some(IPPROTO_UDP)),
        "SCTP" => Ok(None),
        other => Err(format!("unknown protocol {other:?} (TCP, UDP or SCTP)")),
    }
}

fn port(p: i32) -> Result<u16, String> {
    match u16::try_from(p) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("port {p} is out of range 1-65535")),
    }
}

/// A validated Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcPort {
    pub name: String,
    pub proto: u8,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A validated Service: every field kube-proxy acts on, IPv4 only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svc {
    pub id: ServiceRef,
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<SvcPort>,
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip` whose `ipMode` is not `Proxy`.
    pub lb_ips: Vec<Ipv4Addr>,
    pub lb_source_ranges: Vec<Cidr>,
    /// `externalTrafficPolicy: Local` on an externally reachable Service.
    pub external_local: bool,
    pub internal_local: bool,
    pub health_check_node_port: Option<u16>,
    pub affinity_timeout: u32,
}

impl Svc {
    /// kube-proxy's ExternallyAccessible: reachable from outside the cluster.
    pub fn externally_accessible(&self) -> bool {
        self.ports.iter().any(|p| p.node_port.is_some())
            || !self.lb_ips.is_empty()
            || !self.external_ips.is_empty()
    }
}

/// Parses a list of IP strings: IPv4 kept, IPv6 skipped, garbage a problem.
fn ip_list<'a>(
    ips: impl Iterator<Item = &'a str>,
    field: &str,
    obj: &str,
    skipped: &mut Vec<(String, Skipped)>,
) -> Result<Vec<Ipv4Addr>, (String, String)> {
    let mut out = Vec::new();
    for (i, ip) in ips.enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => out.push(v4),
            Ok(IpAddr::V6(_)) => skipped.push((format!("{obj} {ip}"), Skipped::Ipv6)),
            Err(_) => {
                return Err((
                    format!("{field}[{i}]"),
                    format!("{ip:?} is not an IP address"),
                ))
            }
        }
    }
    Ok(out)
}

/// Validates a Service; Ok(None) when kube-proxy would ignore it.
pub fn service(
    s: &Sourced<Service>,
    skipped: &mut Vec<(String, Skipped)>,
) -> Result<Option<Svc>, Problem> {
    let obj = object_name("Service", &s.object.metadata);
    let problem = |field: &str, message: String| Problem {
        origin: s.origin.clone(),
        object: obj.clone(),
        field: field.to_string(),
        message,
    };
    let meta = &s.object.metadata;
    let name = meta
        .name
        .clone()
        .ok_or_else(|| problem("metadata.name", "missing".into()))?;
    if meta
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME))
    {
        skipped.push((obj, Skipped::OtherProxy));
        return Ok(None);
    }
    let spec = s
        .object
        .spec
        .as_ref()
        .ok_or_else(|| problem("spec", "missing".into()))?;
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    match type_ {
        "ExternalName" => {
            skipped.push((obj, Skipped::ExternalName));
            return Ok(None);
        }
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        other => {
            return Err(problem(
                "spec.type",
                format!(
                    "unknown type {other:?} (ClusterIP, NodePort, LoadBalancer or ExternalName)"
                ),
            ))
        }
    }
    let (field, ip_strings): (&str, Vec<&str>) = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => {
            ("spec.clusterIPs", ips.iter().map(String::as_str).collect())
        }
        (_, Some(ip)) => ("spec.clusterIP", vec![ip.as_str()]),
        _ => ("spec.clusterIP", Vec::new()),
    };
    if ip_strings.contains(&"None") {
        skipped.push((obj, Skipped::Headless));
        return Ok(None);
    }
    if ip_strings.is_empty() {
        return Err(problem(
            "spec.clusterIP",
            "missing (the API server allocates it; a manifest must carry it)".into(),
        ));
    }
    let cluster_ips = ip_list(ip_strings.into_iter(), field, &obj, skipped).map_err(|(f, m)| {
        // A lone clusterIP is not a list: name the field itself.
        let f = if field == "spec.clusterIP" {
            field.into()
        } else {
            f
        };
        problem(&f, m)
    })?;
    for (i, fam) in spec.ip_families.iter().flatten().enumerate() {
        if fam != "IPv4" && fam != "IPv6" {
            return Err(problem(
                &format!("spec.ipFamilies[{i}]"),
                format!("unknown family {fam:?} (IPv4 or IPv6)"),
            ));
        }
    }
    let exposes_node_ports = type_ != "ClusterIP";
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let proto = protocol(p.protocol.as_deref())
            .map_err(|m| problem(&format!("spec.ports[{i}].protocol"), m))?;
        let number = port(p.port).map_err(|m| problem(&format!("spec.ports[{i}].port"), m))?;
        let node_port = match p.node_port {
            Some(n) if exposes_node_ports => {
                Some(port(n).map_err(|m| problem(&format!("spec.ports[{i}].nodePort"), m))?)
            }
            _ => None,
        };
        let Some(proto) = proto else {
            skipped.push((format!("{obj} port {number}/SCTP"), Skipped::Sctp));
            continue;
        };
        if !seen.insert((number, proto)) {
            return Err(problem(
                &format!("spec.ports[{i}]"),
                format!("duplicate port {number}"),
            ));
        }
        ports.push(SvcPort {
            name: p.name.clone().unwrap_or_default(),
            proto,
            port: number,
            node_port,
        });
    }
    let external_ips = ip_list(
        spec.external_ips.iter().flatten().map(String::as_str),
        "spec.externalIPs",
        &obj,
        skipped,
    )
    .map_err(|(f, m)| problem(&f, m))?;
    let mut lb_ips = Vec::new();
    if type_ == "LoadBalancer" {
        let ingress = s
            .object
            .status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            // ipMode Proxy: the load balancer proxies, traffic arrives for
            // the node, not for this IP (KEP-1860).
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(ip) = ing.ip.as_deref().filter(|ip| !ip.is_empty()) else {
                continue; // hostname-only ingress
            };
            lb_ips.extend(
                ip_list(
                    std::iter::once(ip),
                    &format!("status.loadBalancer.ingress[{i}].ip"),
                    &obj,
                    skipped,
                )
                .map_err(|(_, m)| problem(&format!("status.loadBalancer.ingress[{i}].ip"), m))?,
            );
        }
    }
    let mut lb_source_ranges = Vec::new();
    for (i, r) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        if r.contains(':') {
            skipped.push((format!("{obj} source range {r}"), Skipped::Ipv6));
            continue;
        }
        lb_source_ranges.push(
            r.parse::<Cidr>()
                .map_err(|m| problem(&format!("spec.loadBalancerSourceRanges[{i}]"), m))?,
        );
    }
    let policy = |v: Option<&str>, field: &str| match v.unwrap_or("Cluster") {
        "Cluster" => Ok(false),
        "Local" => Ok(true),
        other => Err(problem(
            field,
            format!("unknown policy {other:?} (Cluster or Local)"),
        )),
    };
    let etp_local = policy(
        spec.external_traffic_policy.as_deref(),
        "spec.externalTrafficPolicy",
    )?;
    let internal_local = policy(
        spec.internal_traffic_policy.as_deref(),
        "spec.internalTrafficPolicy",
    )?;
    let health_check_node_port = match spec.health_check_node_port {
        Some(n) if n != 0 => Some(port(n).map_err(|m| problem("spec.healthCheckNodePort", m))?),
        _ => None,
    };
    let affinity_timeout = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => 0,
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => DEFAULT_AFFINITY_TIMEOUT,
                Some(t) if t > 0 && t as u32 <= MAX_AFFINITY_TIMEOUT => t as u32,
                Some(t) => {
                    return Err(problem(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is out of range 1-{MAX_AFFINITY_TIMEOUT}"),
                    ))
                }
            }
        }
        other => {
            return Err(problem(
                "spec.sessionAffinity",
                format!("unknown value {other:?} (None or ClientIP)"),
            ))
        }
    };
    let mut svc = Svc {
        id: ServiceRef {
            namespace: namespace(meta),
            name,
        },
        cluster_ips,
        ports,
        external_ips,
        lb_ips,
        lb_source_ranges,
        external_local: false,
        internal_local,
        health_check_node_port,
        affinity_timeout,
    };
    svc.external_local = etp_local && svc.externally_accessible();
    // kube-proxy's NeedsHealthCheck: only Local LoadBalancers get one.
    if !(type_ == "LoadBalancer" && etp_local) {
        svc.health_check_node_port = None;
    }
    Ok(Some(svc))
}

/// One endpoint of a slice, with everything endpoint selection looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first address: kube-proxy uses only that one.
    pub addr: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// A validated EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    pub service: ServiceRef,
    /// (port name, protocol, port number).
    pub ports: Vec<(String, u8, u16)>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// The Service an EndpointSlice belongs to, read from its label.
pub fn slice_owner(s: &EndpointSlice) -> Option<ServiceRef> {
    let name = s.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(ServiceRef {
        namespace: namespace(&s.metadata),
        name: name.clone(),
    })
}

/// Validates an EndpointSlice; Ok(None) when kube-proxy does not use it.
pub fn slice(
    s: &Sourced<EndpointSlice>,
    skipped: &mut Vec<(String, Skipped)>,
) -> Result<Option<Slice>, Problem> {
    let obj = object_name("EndpointSlice", &s.object.metadata);
    let problem = |field: String, message: String| Problem {
        origin: s.origin.clone(),
        object: obj.clone(),
        field,
        message,
    };
    let service = slice_owner(&s.object).ok_or_else(|| {
        problem(
            format!("metadata.labels[{LABEL_SERVICE_NAME}]"),
            "missing: the slice belongs to no Service".into(),
        )
    })?;
    match s.object.address_type.as_str() {
        "IPv4" => {}
        "IPv6" => {
            skipped.push((obj, Skipped::Ipv6));
            return Ok(None);
        }
        // FQDN slices are not used by kube-proxy.
        "FQDN" => return Ok(None),
        other => {
            return Err(problem(
                "addressType".into(),
                format!("unknown address type {other:?}"),
            ))
        }
    }
    let mut ports = Vec::new();
    for (i, p) in s.object.ports.iter().flatten().enumerate() {
        let proto = protocol(p.protocol.as_deref())
            .map_err(|m| problem(format!("ports[{i}].protocol"), m))?;
        let number = p
            .port
            .ok_or_else(|| problem(format!("ports[{i}].port"), "missing".into()))
            .and_then(|n| port(n).map_err(|m| problem(format!("ports[{i}].port"), m)))?;
        if let Some(proto) = proto {
            ports.push((p.name.clone().unwrap_or_default(), proto, number));
        }
    }
    let mut endpoints = Vec::new();
    for (i, e) in s.object.endpoints.iter().flatten().enumerate() {
        let mut first = None;
        for (j, a) in e.addresses.iter().enumerate() {
            let addr = a.parse::<Ipv4Addr>().map_err(|_| {
                problem(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{a:?} is not an IPv4 address"),
                )
            })?;
            first.get_or_insert(addr);
        }
        let Some(addr) = first else { continue };
        // Nil conditions mean unknown: `ready` and `serving` then count as
        // true, `terminating` as false (the API's documented defaults).
        let c = e.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let hints = e.hints.as_ref();
        endpoints.push(SliceEndpoint {
            addr,
            ready,
            serving: c.and_then(|c| c.serving).unwrap_or(ready),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            node_name: e.node_name.clone(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        });
    }
    Ok(Some(Slice {
        service,
        ports,
        endpoints,
    }))
}

/// One endpoint of one Service port, as endpoint selection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub endpoint: Endpoint,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node.
    pub local: bool,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// Which hint narrows the cluster-wide endpoints (kube-proxy's topology mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    All,
    SameNode,
    SameZone,
}

/// Everything kube-proxy acts on for one Service port, and its endpoint sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// kube-proxy's service port name: `namespace/name:port-name`.
    pub name: String,
    pub proto: u8,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<EndpointInfo>,
    pub topology: Topology,
    /// Where cluster-policy traffic goes: ready (topology-narrowed), else
    /// serving-terminating endpoints.
    pub cluster_endpoints: Vec<Endpoint>,
    /// Where local-policy traffic goes: local ready, else local
    /// serving-terminating endpoints.
    pub local_endpoints: Vec<Endpoint>,
    /// Some endpoint anywhere could serve: with none, the reference REJECTs;
    /// with some but none usable under a Local policy, it DROPs.
    pub has_any_endpoints: bool,
}

impl ServicePort {
    /// The endpoints of traffic to a cluster IP (internalTrafficPolicy).
    pub fn internal_endpoints(&self, svc: &Svc) -> &[Endpoint] {
        if svc.internal_local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }

    /// The endpoints of traffic to a NodePort, externalIP or LB IP.
    pub fn external_endpoints(&self, svc: &Svc) -> &[Endpoint] {
        if svc.external_local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }
}

/// The endpoints of `port` over all of the service's `slices`, de-duplicated
/// by ip:port; slices in name order, a non-terminating copy preferred.
fn port_endpoints(port: &SvcPort, slices: &[&Slice], node: &NodeInfo) -> Vec<EndpointInfo> {
    let mut by_addr: BTreeMap<Endpoint, EndpointInfo> = BTreeMap::new();
    for sl in slices {
        for (name, proto, number) in &sl.ports {
            if *name != port.name || *proto != port.proto {
                continue;
            }
            for e in &sl.endpoints {
                let endpoint = Endpoint {
                    addr: e.addr,
                    port: *number,
                };
                let info = EndpointInfo {
                    endpoint,
                    ready: e.ready,
                    serving: e.serving,
                    terminating: e.terminating,
                    local: !node.name.is_empty()
                        && e.node_name.as_deref() == Some(node.name.as_str()),
                    zone_hints: e.zone_hints.clone(),
                    node_hints: e.node_hints.clone(),
                };
                match by_addr.get(&endpoint) {
                    Some(prev) if !prev.terminating || info.terminating => {}
                    _ => {
                        by_addr.insert(endpoint, info);
                    }
                }
            }
        }
    }
    by_addr.into_values().collect()
}

/// kube-proxy's topologyModeFromHints: node hints, then zone hints, used
/// only when every ready endpoint carries one and one matches this node.
fn topology(endpoints: &[EndpointInfo], node: &NodeInfo) -> Topology {
    let ready: Vec<&EndpointInfo> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Topology::All;
    }
    let all = |f: fn(&EndpointInfo) -> &Vec<String>| ready.iter().all(|e| !f(e).is_empty());
    let any_has = |f: fn(&EndpointInfo) -> &Vec<String>, v: &str| {
        ready.iter().any(|e| f(e).iter().any(|h| h == v))
    };
    if all(|e| &e.node_hints) && any_has(|e| &e.node_hints, &node.name) {
        return Topology::SameNode;
    }
    match &node.zone {
        Some(z) if all(|e| &e.zone_hints) && any_has(|e| &e.zone_hints, z) => Topology::SameZone,
        _ => Topology::All,
    }
}

/// kube-proxy's CategorizeEndpoints for one port.
fn categorize(mut sp: ServicePort, node: &NodeInfo) -> ServicePort {
    let topo = topology(&sp.endpoints, node);
    let in_topology = |e: &EndpointInfo| match topo {
        Topology::All => true,
        Topology::SameNode => e.node_hints.contains(&node.name),
        Topology::SameZone => node
            .zone
            .as_ref()
            .is_some_and(|z| e.zone_hints.iter().any(|h| h == z)),
    };
    let pick = |f: &dyn Fn(&EndpointInfo) -> bool| -> Vec<Endpoint> {
        sp.endpoints
            .iter()
            .filter(|e| f(e))
            .map(|e| e.endpoint)
            .collect()
    };
    let mut cluster = pick(&|e| e.ready && in_topology(e));
    if cluster.is_empty() {
        cluster = pick(&|e| e.serving && e.terminating);
    }
    let mut local = pick(&|e| e.local && e.ready);
    if local.is_empty() {
        local = pick(&|e| e.local && e.serving && e.terminating);
    }
    sp.has_any_endpoints = sp
        .endpoints
        .iter()
        .any(|e| e.ready || (e.serving && e.terminating));
    sp.topology = topo;
    sp.cluster_endpoints = cluster;
    sp.local_endpoints = local;
    sp
}

/// kube-proxy's LocalReadyEndpoints for one Service: the distinct IPs of
/// ready endpoints on this node over all its ports (one pod serving 80 and
/// 443 counts once), what a health check node port reports.
pub fn local_ready_endpoints(ports: &[ServicePort]) -> usize {
    ports
        .iter()
        .flat_map(|p| &p.endpoints)
        .filter(|e| e.local && e.ready)
        .map(|e| e.endpoint.addr)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// Every port of `svc` with its endpoints from `slices` (the service's own).
pub fn service_ports(svc: &Svc, slices: &[&Slice], node: &NodeInfo) -> Vec<ServicePort> {
    svc.ports
        .iter()
        .map(|p| {
            let sp = ServicePort {
                // kube-proxy's ServicePortName: no colon for an unnamed port.
                name: if p.name.is_empty() {
                    svc.id.to_string()
                } else {
                    format!("{}:{}", svc.id, p.name)
                },
                proto: p.proto,
                port: p.port,
                node_port: p.node_port,
                endpoints: port_endpoints(p, slices, node),
                topology: Topology::All,
                cluster_endpoints: Vec::new(),
                local_endpoints: Vec::new(),
                has_any_endpoints: false,
            };
            categorize(sp, node)
        })
        .collect()
}

/// The datapath frontends of one Service, one per (entry point, port):
/// cluster IPs, NodePorts (address 0.0.0.0), external IPs and LoadBalancer
/// IPs, each with the traffic policy and firewall of its kube-proxy chain.
///
/// A service without any endpoint still gets its frontends (count 0): the
/// reference REJECTs on all of them. `node_ip` is the node's primary
/// address: when a source range contains it, the reference also accepts the
/// LoadBalancer IPs themselves as sources (VIPs looped back to the node).
pub fn frontends(
    svc: &Svc,
    ports: &[ServicePort],
    node_ip: Option<Ipv4Addr>,
) -> Vec<(FrontendKey, Frontend)> {
    use proxy_common::{SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_NODEPORT, SVC_F_SOURCE_RANGES};
    let mut out = Vec::new();
    let mut ranges = svc.lb_source_ranges.clone();
    if node_ip.is_some_and(|ip| ranges.iter().any(|r| r.contains(ip))) {
        ranges.extend(svc.lb_ips.iter().map(|ip| Cidr::host(*ip)));
    }
    for p in ports {
        let front = |local: bool, flags: u32, source_ranges: Vec<Cidr>| Frontend {
            name: p.name.clone(),
            backends: p.cluster_endpoints.clone(),
            local_backends: if local {
                p.local_endpoints.clone()
            } else {
                Vec::new()
            },
            flags: flags | if local { SVC_F_LOCAL } else { 0 },
            source_ranges,
            affinity_timeout: svc.affinity_timeout,
        };
        let key = |addr: Ipv4Addr, port: u16| FrontendKey {
            addr,
            port,
            proto: p.proto,
        };
        for &ip in &svc.cluster_ips {
            out.push((key(ip, p.port), front(svc.internal_local, 0, Vec::new())));
        }
        let ext = svc.external_local;
        if let Some(np) = p.node_port {
            out.push((
                key(Ipv4Addr::UNSPECIFIED, np),
                front(ext, SVC_F_EXTERNAL | SVC_F_NODEPORT, Vec::new()),
            ));
        }
        for &ip in &svc.external_ips {
            out.push((key(ip, p.port), front(ext, SVC_F_EXTERNAL, Vec::new())));
        }
        for &ip in &svc.lb_ips {
            let f = if ranges.is_empty() {
                front(ext, SVC_F_EXTERNAL, Vec::new())
            } else {
                front(ext, SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES, ranges.clone())
            };
            out.push((key(ip, p.port), f));
        }
    }
    out
}

/// The desired frontends for `services` and `slices` on `node`.
pub fn desired(
    services: &[Sourced<Service>],
    slices: &[Sourced<EndpointSlice>],
    node: &NodeInfo,
) -> Outcome {
    let mut index = crate::control::index::Index::new(node.clone());
    index.replace_all(services.to_vec(), slices.to_vec());
    index.outcome()
}
#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Sourced<Service> {
        Sourced {
            origin: "test".into(),
            object: serde_norway::from_str(yaml).expect("service yaml"),
        }
    }

    fn eps(yaml: &str) -> Sourced<EndpointSlice> {
        Sourced {
            origin: "test".into(),
            object: serde_norway::from_str(yaml).expect("slice yaml"),
        }
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 198.19.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns}
"#;

    const WEB_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [198.18.1.1]
  conditions: {ready: true}
- addresses: [198.18.1.2]
- addresses: [198.18.1.3]
  conditions: {ready: false}
"#;

    fn key(addr: &str, port: u16, proto: u8) -> FrontendKey {
        FrontendKey {
            addr: addr.parse().unwrap(),
            port,
            proto,
        }
    }

    fn ep(addr: &str, port: u16) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn ports_match_slices_by_name_and_protocol_and_only_ready_endpoints_serve() {
        let out = desired(&[svc(WEB)], &[eps(WEB_SLICE)], &NodeInfo::named("node-1"));
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let http = &out.desired.frontends[&key("198.19.0.10", 80, IPPROTO_TCP)];
        assert_eq!(http.name, "shop/web:http");
        assert_eq!(
            http.backends,
            vec![ep("198.18.1.1", 8080), ep("198.18.1.2", 8080)]
        );
        let dns = &out.desired.frontends[&key("198.19.0.10", 53, IPPROTO_UDP)];
        assert_eq!(
            dns.backends,
            vec![ep("198.18.1.1", 5353), ep("198.18.1.2", 5353)]
        );
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let slice = |ready: bool| {
            format!(
                r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-t
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [198.18.1.1]
  conditions: {{ready: {ready}, serving: true, terminating: false}}
- addresses: [198.18.1.2]
  conditions: {{ready: false, serving: true, terminating: true}}
- addresses: [198.18.1.3]
  conditions: {{ready: false, serving: false, terminating: true}}
"#
            )
        };
        let http = |out: &Outcome| {
            out.desired.frontends[&key("198.19.0.10", 80, IPPROTO_TCP)]
                .backends
                .clone()
        };
        let out = desired(
            &[svc(WEB)],
            &[eps(&slice(true))],
            &NodeInfo::named("node-1"),
        );
        assert_eq!(http(&out), vec![ep("198.18.1.1", 8080)]);
        // Nothing ready: the serving terminating endpoint, never the one
        // that stopped serving.
        let out = desired(
            &[svc(WEB)],
            &[eps(&slice(false))],
            &NodeInfo::named("node-1"),
        );
        assert_eq!(http(&out), vec![ep("198.18.1.2", 8080)]);
    }

    #[test]
    fn client_ip_affinity_has_kube_proxys_default_and_bounds() {
        let aff = |extra: &str| {
            WEB.replace(
                "  clusterIP: 198.19.0.10\n",
                &format!("  clusterIP: 198.19.0.10\n  sessionAffinity: ClientIP\n{extra}"),
            )
        };
        let timeout = |out: &Outcome| {
            out.desired.frontends[&key("198.19.0.10", 80, IPPROTO_TCP)].affinity_timeout
        };
        assert_eq!(
            timeout(&desired(&[svc(WEB)], &[], &NodeInfo::named("node-1"))),
            0
        );
        assert_eq!(
            timeout(&desired(&[svc(&aff(""))], &[], &NodeInfo::named("node-1"))),
            DEFAULT_AFFINITY_TIMEOUT
        );
        let custom = aff("  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n");
        assert_eq!(
            timeout(&desired(&[svc(&custom)], &[], &NodeInfo::named("node-1"))),
            60
        );
        let bad = aff("  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n");
        let out = desired(&[svc(&bad)], &[], &NodeInfo::named("node-1"));
        assert_eq!(
            out.problems[0].field,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        );
    }

    #[test]
    fn endpoints_from_several_slices_merge_and_duplicates_collapse() {
        let second = WEB_SLICE
            .replace("name: web-a", "name: web-b")
            .replace("198.18.1.2]", "198.18.1.4]");
        let out = desired(
            &[svc(WEB)],
            &[eps(WEB_SLICE), eps(&second)],
            &NodeInfo::named("node-1"),
        );
        let http = &out.desired.frontends[&key("198.19.0.10", 80, IPPROTO_TCP)];
        assert_eq!(
            http.backends,
            vec![
                ep("198.18.1.1", 8080),
                ep("198.18.1.2", 8080),
                ep("198.18.1.4", 8080)
            ]
        );
    }

    #[test]
    fn a_service_without_slices_has_a_frontend_with_no_backends() {
        let out = desired(&[svc(WEB)], &[], &NodeInfo::named("node-1"));
        assert_eq!(out.desired.frontends.len(), 2);
        assert!(out
            .desired
            .frontends
            .values()
            .all(|f| f.backends.is_empty()));
    }

    #[test]
    fn slices_of_another_namespace_or_service_do_not_serve() {
        let other_ns = WEB_SLICE.replace("namespace: shop", "namespace: other");
        let other_svc = WEB_SLICE.replace("service-name: web", "service-name: api");
        let out = desired(
            &[svc(WEB)],
            &[eps(&other_ns), eps(&other_svc)],
            &NodeInfo::named("node-1"),
        );
        assert!(out
            .desired
            .frontends
            .values()
            .all(|f| f.backends.is_empty()));
    }

    #[test]
    fn headless_external_name_and_other_proxies_are_ignored() {
        let headless = WEB.replace("clusterIP: 198.19.0.10", "clusterIP: None");
        let external = WEB.replace(
            "clusterIP: 198.19.0.10",
            "type: ExternalName\n  externalName: example.org",
        );
        let other = WEB.replace(
            "namespace: shop}",
            "namespace: shop, labels: {service.kubernetes.io/service-proxy-name: other}}",
        );
        let external = external.replace("name: web,", "name: ext,");
        let other = other.replace("name: web,", "name: other,");
        let out = desired(
            &[svc(&headless), svc(&external), svc(&other)],
            &[eps(WEB_SLICE)],
            &NodeInfo::named("node-1"),
        );
        assert!(out.desired.frontends.is_empty());
        assert!(out.problems.is_empty());
        let mut reasons: Vec<_> = out.skipped.iter().map(|s| s.1).collect();
        reasons.sort();
        assert_eq!(
            reasons,
            vec![
                Skipped::Headless,
                Skipped::ExternalName,
                Skipped::OtherProxy
            ]
        );
    }

    #[test]
    fn malformed_objects_are_reported_with_their_field_and_skipped_alone() {
        let cases = [
            (WEB.replace("198.19.0.10", "198.19.0.300"), "spec.clusterIP"),
            (
                WEB.replace("port: 80,", "port: 70000,"),
                "spec.ports[0].port",
            ),
            (
                WEB.replace("protocol: UDP", "protocol: QUIC"),
                "spec.ports[1].protocol",
            ),
            (
                WEB.replace("  clusterIP: 198.19.0.10\n", ""),
                "spec.clusterIP",
            ),
        ];
        let good = WEB
            .replace("name: web,", "name: good,")
            .replace("198.19.0.10", "198.19.0.11");
        for (bad, field) in cases {
            let out = desired(&[svc(&bad), svc(&good)], &[], &NodeInfo::named("node-1"));
            assert_eq!(out.problems.len(), 1, "{field}: {:?}", out.problems);
            assert_eq!(out.problems[0].field, field);
            assert_eq!(out.problems[0].object, "Service shop/web");
            assert_eq!(out.desired.frontends.len(), 2, "the good service must stay");
            assert!(out
                .desired
                .frontends
                .keys()
                .all(|k| k.addr == "198.19.0.11".parse::<Ipv4Addr>().unwrap()));
        }
        let bad_slice = WEB_SLICE.replace("[198.18.1.2]", "[198.18.1.x]");
        let out = desired(&[svc(WEB)], &[eps(&bad_slice)], &NodeInfo::named("node-1"));
        assert_eq!(out.problems[0].field, "endpoints[1].addresses[0]");
        assert_eq!(out.problems[0].object, "EndpointSlice shop/web-a");
        let unlabelled = WEB_SLICE.replace("  labels: {kubernetes.io/service-name: web}\n", "");
        let out = desired(&[svc(WEB)], &[eps(&unlabelled)], &NodeInfo::named("node-1"));
        assert_eq!(
            out.problems[0].field,
            "metadata.labels[kubernetes.io/service-name]"
        );
    }

    #[test]
    fn ipv6_and_sctp_are_skipped_with_a_reason() {
        let dual = WEB.replace(
            "clusterIP: 198.19.0.10",
            "clusterIP: 198.19.0.10\n  clusterIPs: [198.19.0.10, 'fd00::10']",
        );
        let sctp = dual.replace("protocol: UDP", "protocol: SCTP");
        let out = desired(&[svc(&sctp)], &[], &NodeInfo::named("node-1"));
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        assert_eq!(out.desired.frontends.len(), 1);
        let reasons: Vec<_> = out.skipped.iter().map(|s| s.1).collect();
        assert_eq!(reasons, vec![Skipped::Ipv6, Skipped::Sctp]);
    }

    fn node_a() -> NodeInfo {
        NodeInfo {
            name: "node-1".into(),
            zone: Some("zone-a".into()),
            addresses: vec![],
        }
    }

    /// One port `http` 80 → 8080 and endpoints given as YAML list items.
    fn port_of(svc_extra: &str, endpoints: &str, node: &NodeInfo) -> (Svc, ServicePort) {
        let svc_yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{{name: http, port: 80, nodePort: 30080}}]\n{svc_extra}"
        );
        let slice_yaml = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-a, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}"
        );
        let mut skipped = Vec::new();
        let svc = service(&svc(&svc_yaml), &mut skipped).unwrap().unwrap();
        let sl = slice(&eps(&slice_yaml), &mut skipped).unwrap().unwrap();
        let mut ports = service_ports(&svc, &[&sl], node);
        (svc, ports.remove(0))
    }

    fn addrs(eps: &[Endpoint]) -> Vec<String> {
        eps.iter().map(|e| e.addr.to_string()).collect()
    }

    #[test]
    fn zone_hints_narrow_cluster_endpoints_only_when_every_ready_endpoint_has_one() {
        let hinted = "- addresses: [198.18.1.1]\n  hints: {forZones: [{name: zone-a}]}\n- addresses: [198.18.1.2]\n  hints: {forZones: [{name: zone-b}]}\n";
        let (_, p) = port_of("", hinted, &node_a());
        assert_eq!(p.topology, Topology::SameZone);
        assert_eq!(addrs(&p.cluster_endpoints), ["198.18.1.1"]);
        // A node without a zone label, or a zone nobody is hinted for: all.
        let (_, p) = port_of("", hinted, &NodeInfo::named("node-1"));
        assert_eq!(addrs(&p.cluster_endpoints), ["198.18.1.1", "198.18.1.2"]);
        let mut zone_c = node_a();
        zone_c.zone = Some("zone-c".into());
        assert_eq!(port_of("", hinted, &zone_c).1.topology, Topology::All);
        // One ready endpoint without hints: hints are ignored.
        let partial = format!("{hinted}- addresses: [198.18.1.3]\n");
        let (_, p) = port_of("", &partial, &node_a());
        assert_eq!(p.topology, Topology::All);
        assert_eq!(p.cluster_endpoints.len(), 3);
        // Node hints win over zone hints (PreferSameNode).
        let by_node = "- addresses: [198.18.1.1]\n  hints: {forZones: [{name: zone-a}], forNodes: [{name: node-2}]}\n- addresses: [198.18.1.2]\n  hints: {forZones: [{name: zone-a}], forNodes: [{name: node-1}]}\n";
        let (_, p) = port_of("", by_node, &node_a());
        assert_eq!(p.topology, Topology::SameNode);
        assert_eq!(addrs(&p.cluster_endpoints), ["198.18.1.2"]);
    }

    #[test]
    fn local_traffic_policies_use_only_this_nodes_endpoints() {
        let eps = "- addresses: [198.18.1.1]\n  nodeName: node-1\n- addresses: [198.18.1.2]\n  nodeName: node-2\n- addresses: [198.18.1.3]\n  nodeName: node-1\n  conditions: {ready: false, serving: true, terminating: true}\n";
        let node = NodeInfo::named("node-1");
        let (svc, p) = port_of("  internalTrafficPolicy: Local\n", eps, &node);
        assert!(svc.internal_local && !svc.external_local);
        assert_eq!(addrs(p.internal_endpoints(&svc)), ["198.18.1.1"]);
        assert_eq!(
            addrs(p.external_endpoints(&svc)),
            ["198.18.1.1", "198.18.1.2"]
        );
        // ETP Local on a NodePort service: external traffic stays local,
        // falling back to the local terminating endpoint when needed.
        let (svc, p) = port_of(
            "  type: NodePort\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
            &eps.replace(
                "198.18.1.1]\n  nodeName: node-1",
                "198.18.1.1]\n  nodeName: node-3",
            ),
            &node,
        );
        assert!(svc.external_local);
        // Only LoadBalancers get a health check node port (NeedsHealthCheck).
        assert_eq!(svc.health_check_node_port, None);
        assert_eq!(p.node_port, Some(30080));
        assert_eq!(addrs(p.external_endpoints(&svc)), ["198.18.1.3"]);
        let (svc, p) = port_of(
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
            eps,
            &node,
        );
        assert_eq!(svc.health_check_node_port, Some(32000));
        // Ready and on this node: 198.18.1.1 (1.3 is terminating, 1.2 remote).
        assert_eq!(local_ready_endpoints(std::slice::from_ref(&p)), 1);
        // No endpoint on this node at all: empty, though others exist (the
        // reference drops rather than rejects).
        let (svc, p) = port_of(
            "  internalTrafficPolicy: Local\n",
            eps,
            &NodeInfo::named("node-9"),
        );
        assert!(p.internal_endpoints(&svc).is_empty() && p.has_any_endpoints);
        // ETP Local means nothing on a ClusterIP-only service (not external).
        let (svc, _) = port_of("  externalTrafficPolicy: Local\n", eps, &node);
        assert!(!svc.external_local);
    }

    #[test]
    fn the_same_endpoint_in_two_slices_counts_once_preferring_the_live_copy() {
        let moving = WEB_SLICE
            .replace("name: web-a", "name: web-0")
            .replace(
                "- addresses: [198.18.1.1]\n  conditions: {ready: true}",
                "- addresses: [198.18.1.1]\n  conditions: {ready: false, serving: true, terminating: true}",
            );
        let out = desired(
            &[svc(WEB)],
            &[eps(&moving), eps(WEB_SLICE)],
            &NodeInfo::named("n"),
        );
        let http = &out.desired.frontends[&key("198.19.0.10", 80, IPPROTO_TCP)];
        assert_eq!(
            http.backends,
            vec![ep("198.18.1.1", 8080), ep("198.18.1.2", 8080)]
        );
        let mut skipped = Vec::new();
        let s = service(&svc(WEB), &mut skipped).unwrap().unwrap();
        let a = slice(&eps(&moving), &mut skipped).unwrap().unwrap();
        let b = slice(&eps(WEB_SLICE), &mut skipped).unwrap().unwrap();
        let ports = service_ports(&s, &[&a, &b], &NodeInfo::named("n"));
        let e1 = ports[0]
            .endpoints
            .iter()
            .find(|e| e.endpoint.port == 8080)
            .unwrap();
        assert!(e1.ready && !e1.terminating, "{e1:?}");
    }

    #[test]
    fn external_entry_points_are_frontends_with_their_policies() {
        let lb = WEB.replace(
            "  clusterIP: 198.19.0.10\n",
            "  clusterIP: 198.19.0.10\n  type: LoadBalancer\n  externalIPs: [198.18.9.1, 'fd00::1']\n  loadBalancerSourceRanges: [198.18.0.0/16]\n",
        ) + "status:\n  loadBalancer:\n    ingress:\n    - {ip: 198.18.9.2}\n    - {ip: 198.18.9.3, ipMode: Proxy}\n    - {hostname: lb.example}\n";
        let mut skipped = Vec::new();
        let s = service(&svc(&lb), &mut skipped).unwrap().unwrap();
        assert_eq!(s.external_ips, vec![Ipv4Addr::new(198, 18, 9, 1)]);
        assert_eq!(s.lb_ips, vec![Ipv4Addr::new(198, 18, 9, 2)]);
        assert_eq!(s.lb_source_ranges, vec!["198.18.0.0/16".parse().unwrap()]);
        assert!(s.externally_accessible());
        let out = desired(&[svc(&lb)], &[], &NodeInfo::named("n"));
        // Two ports, each on the cluster IP, the external IP and the LB IP.
        assert_eq!(out.desired.frontends.len(), 6);
        let reasons: BTreeSet<Skipped> = out.skipped.iter().map(|s| s.1).collect();
        assert!(reasons.contains(&Skipped::Ipv6));
        use proxy_common::{SVC_F_EXTERNAL, SVC_F_SOURCE_RANGES};
        let f = |ip: &str| &out.desired.frontends[&key(ip, 80, IPPROTO_TCP)];
        assert_eq!(f("198.19.0.10").flags, 0);
        assert_eq!(f("198.18.9.1").flags, SVC_F_EXTERNAL);
        let lbf = f("198.18.9.2");
        assert_eq!(lbf.flags, SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES);
        assert_eq!(lbf.source_ranges, s.lb_source_ranges);
        // kube-proxy's allowFromNode: a node IP in a range admits the LB IP
        // itself as a source.
        let node = NodeInfo {
            addresses: vec![Ipv4Addr::new(198, 18, 200, 1)],
            ..NodeInfo::named("n")
        };
        let out = desired(&[svc(&lb)], &[], &node);
        let lbf = &out.desired.frontends[&key("198.18.9.2", 80, IPPROTO_TCP)];
        assert_eq!(
            lbf.source_ranges,
            vec![
                "198.18.0.0/16".parse().unwrap(),
                "198.18.9.2/32".parse().unwrap()
            ]
        );
        for (bad, field) in [
            (
                lb.replace("198.18.0.0/16", "198.18.0.0/40"),
                "spec.loadBalancerSourceRanges[0]",
            ),
            (lb.replace("198.18.9.1,", "nope,"), "spec.externalIPs[0]"),
            (
                lb.replace("{ip: 198.18.9.2}", "{ip: 1.2.3}"),
                "status.loadBalancer.ingress[0].ip",
            ),
            (lb.replace("type: LoadBalancer", "type: Magic"), "spec.type"),
            (
                lb.replace(
                    "type: LoadBalancer",
                    "type: LoadBalancer\n  externalTrafficPolicy: Nearby",
                ),
                "spec.externalTrafficPolicy",
            ),
        ] {
            let out = desired(&[svc(&bad)], &[], &NodeInfo::named("n"));
            assert_eq!(out.problems.len(), 1, "{field}");
            assert_eq!(out.problems[0].field, field);
            assert!(out.desired.frontends.is_empty());
        }
    }
}
