//! Validation: a Service or EndpointSlice becomes the typed view the model
//! works on, or a [`Problem`] naming the object and the offending field.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use proxy_common::{IPPROTO_TCP, IPPROTO_UDP};

use super::{
    Problem, ServiceRef, Skipped, Sourced, DEFAULT_AFFINITY_TIMEOUT, LABEL_SERVICE_NAME,
    LABEL_SERVICE_PROXY_NAME, MAX_AFFINITY_TIMEOUT,
};
use crate::control::{
    cidr::{Cidr, Family},
    scheduler::{
        Kind, Parsed, Scheduler, ANNOTATION_SCHEDULER, ANNOTATION_SCHEDULER_FLAGS,
        KUBE_ROUTER_SCHEDULER, KUBE_ROUTER_SCHEDULER_FLAGS,
    },
};

fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

fn object_name(kind: &str, meta: &ObjectMeta) -> String {
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
    /// Interned: a cluster uses a handful of port names.
    pub name: Arc<str>,
    pub proto: u8,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A validated Service: every field kube-proxy acts on. Its cluster IPs
/// (one per family) name the families it is served on; its other
/// addresses and source ranges are only those of these families (kube-proxy
/// ignores the rest: a family's proxier sees only its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svc {
    pub id: ServiceRef,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<SvcPort>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` whose `ipMode` is not `Proxy`.
    pub lb_ips: Vec<IpAddr>,
    pub lb_source_ranges: Vec<Cidr>,
    /// `externalTrafficPolicy: Local` on an externally reachable Service.
    pub external_local: bool,
    pub internal_local: bool,
    pub health_check_node_port: Option<u16>,
    pub affinity_timeout: u32,
    /// From the Service's scheduler annotations; None: the node's default.
    pub scheduler: Option<Scheduler>,
}

impl Svc {
    /// Exact capacities: tens of thousands of these are kept.
    fn compact(&mut self) {
        self.cluster_ips.shrink_to_fit();
        self.ports.shrink_to_fit();
        self.external_ips.shrink_to_fit();
        self.lb_ips.shrink_to_fit();
        self.lb_source_ranges.shrink_to_fit();
    }

    /// The families the Service is served on, its primary first.
    pub fn families(&self) -> impl Iterator<Item = Family> + '_ {
        self.cluster_ips.iter().map(Family::of)
    }

    /// Whether it is served on `family`.
    pub fn has_family(&self, family: Family) -> bool {
        self.families().any(|f| f == family)
    }

    /// The Service as `family`'s proxier sees it: only that family's
    /// addresses and source ranges (kube-proxy's per-family serviceInfo).
    pub fn on(&self, family: Family) -> Svc {
        let ours = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter()
                .copied()
                .filter(|ip| Family::of(ip) == family)
                .collect()
        };
        Svc {
            cluster_ips: ours(&self.cluster_ips),
            external_ips: ours(&self.external_ips),
            lb_ips: ours(&self.lb_ips),
            lb_source_ranges: self
                .lb_source_ranges
                .iter()
                .copied()
                .filter(|r| Family::of_net(r) == family)
                .collect(),
            ..self.clone()
        }
    }

    /// kube-proxy's ExternallyAccessible: reachable from outside the cluster.
    pub fn externally_accessible(&self) -> bool {
        self.ports.iter().any(|p| p.node_port.is_some())
            || !self.lb_ips.is_empty()
            || !self.external_ips.is_empty()
    }
}

/// Parses a list of IP strings; garbage is a problem.
fn ip_list<'a>(
    ips: impl Iterator<Item = &'a str>,
    field: &str,
) -> Result<Vec<IpAddr>, (String, String)> {
    ips.enumerate()
        .map(|(i, ip)| {
            ip.parse::<IpAddr>().map_err(|_| {
                (
                    format!("{field}[{i}]"),
                    format!("{ip:?} is not an IP address"),
                )
            })
        })
        .collect()
}

/// Keeps the addresses of the Service's `families`; the others are
/// counted and logged as skipped (kube-proxy's proxier of a family ignores
/// the other family's, as a dual-stack cluster expects).
fn of_families<T>(
    items: Vec<T>,
    family: impl Fn(&T) -> Family,
    families: &[Family],
    what: impl Fn(&T) -> String,
    skipped: &mut Vec<(String, Skipped)>,
) -> Vec<T> {
    items
        .into_iter()
        .filter(|x| {
            let keep = families.contains(&family(x));
            if !keep {
                skipped.push((what(x), Skipped::OtherFamily));
            }
            keep
        })
        .collect()
}

/// The scheduler a Service's annotations ask for (kpx's, else
/// kube-router's). A value kpx cannot use is reported, counted as a skipped
/// part and replaced by the default: an annotation no API server validates
/// must not take a Service's traffic away.
fn annotated_scheduler(
    meta: &ObjectMeta,
    obj: &str,
    skipped: &mut Vec<(String, Skipped)>,
) -> Option<Scheduler> {
    let notes = meta.annotations.as_ref()?;
    let (key, name) = [ANNOTATION_SCHEDULER, KUBE_ROUTER_SCHEDULER]
        .into_iter()
        .find_map(|k| notes.get(k).map(|v| (k, v.trim())))?;
    let flags_key = if key == ANNOTATION_SCHEDULER {
        ANNOTATION_SCHEDULER_FLAGS
    } else {
        KUBE_ROUTER_SCHEDULER_FLAGS
    };
    let mut skip = |field: &str, why: String| {
        log::warn!("{obj}: annotation {field}: {why}; the node's default scheduler is used");
        skipped.push((format!("{obj} annotation {field}"), Skipped::Scheduler));
        None
    };
    let kind = match Kind::parse(name) {
        Ok(Parsed::Known(k)) => k,
        Ok(Parsed::NotImplemented(n)) => {
            return skip(key, format!("kpx does not implement {n} yet"))
        }
        Err(e) => return skip(key, e),
    };
    let flags = notes.get(flags_key).map_or("", |f| f.as_str());
    match Scheduler::new(kind).with_flags(flags) {
        Ok(s) => Some(s),
        Err(e) => skip(flags_key, e),
    }
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
    let cluster_ips = ip_list(ip_strings.into_iter(), field).map_err(|(f, m)| {
        // A lone clusterIP is not a list: name the field itself.
        let f = if field == "spec.clusterIP" {
            field.into()
        } else {
            f
        };
        problem(&f, m)
    })?;
    let families: Vec<Family> = cluster_ips.iter().map(Family::of).collect();
    if families.len() > 2 || (families.len() == 2 && families[0] == families[1]) {
        return Err(problem(
            field,
            "at most one cluster IP of each family (the API server allows no more)".into(),
        ));
    }
    for (i, fam) in spec.ip_families.iter().flatten().enumerate() {
        let named = match fam.as_str() {
            "IPv4" => Family::V4,
            "IPv6" => Family::V6,
            _ => {
                return Err(problem(
                    &format!("spec.ipFamilies[{i}]"),
                    format!("unknown family {fam:?} (IPv4 or IPv6)"),
                ))
            }
        };
        // The API server keeps both lists in one order; a manifest that
        // does not would make the primary family ambiguous.
        if let Some(&ip_family) = families.get(i) {
            if ip_family != named {
                return Err(problem(
                    &format!("spec.ipFamilies[{i}]"),
                    format!("{fam} does not match {field}[{i}] {}", cluster_ips[i]),
                ));
            }
        }
    }
    let exposes_node_ports = type_ != "ClusterIP";
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        // Endpoints are matched to a port by name: two ports of one name
        // would share them (the API refuses such a Service).
        let name = p.name.clone().unwrap_or_default();
        if !names.insert(name.clone()) {
            return Err(problem(
                &format!("spec.ports[{i}].name"),
                format!("duplicate port name {name:?}"),
            ));
        }
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
            name: super::intern(&name),
            proto,
            port: number,
            node_port,
        });
    }
    let external_ips = ip_list(
        spec.external_ips.iter().flatten().map(String::as_str),
        "spec.externalIPs",
    )
    .map_err(|(f, m)| problem(&f, m))?;
    let external_ips = of_families(
        external_ips,
        Family::of,
        &families,
        |ip| format!("{obj} externalIP {ip}"),
        skipped,
    );
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
                )
                .map_err(|(_, m)| problem(&format!("status.loadBalancer.ingress[{i}].ip"), m))?,
            );
        }
    }
    let lb_ips = of_families(
        lb_ips,
        Family::of,
        &families,
        |ip| format!("{obj} load balancer IP {ip}"),
        skipped,
    );
    let mut lb_source_ranges = Vec::new();
    for (i, r) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        lb_source_ranges.push(
            crate::control::cidr::parse(r)
                .map_err(|m| problem(&format!("spec.loadBalancerSourceRanges[{i}]"), m))?,
        );
    }
    let lb_source_ranges = of_families(
        lb_source_ranges,
        Family::of_net,
        &families,
        |r| format!("{obj} source range {r}"),
        skipped,
    );
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
    let scheduler = annotated_scheduler(meta, &obj, skipped);
    let mut svc = Svc {
        id: ServiceRef::new(namespace(meta), &name),
        cluster_ips,
        ports,
        external_ips,
        lb_ips,
        lb_source_ranges,
        external_local: false,
        internal_local,
        health_check_node_port,
        affinity_timeout,
        scheduler,
    };
    svc.external_local = etp_local && svc.externally_accessible();
    // kube-proxy's NeedsHealthCheck: only Local LoadBalancers get one.
    if !(type_ == "LoadBalancer" && etp_local) {
        svc.health_check_node_port = None;
    }
    svc.compact();
    Ok(Some(svc))
}

/// One endpoint of a slice, with everything endpoint selection looks at.
/// Half a million of them live at 50,000 Services, so: the node name is
/// shared (a cluster has few nodes), and the rare topology hints are kept
/// beside the endpoints ([`Slice::hints`]), not in each.
/// Generic over the slice's family, so that IPv4's (the many) stay 16 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint<A = Ipv4Addr> {
    /// The first address: kube-proxy uses only that one.
    pub addr: A,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<super::NodeName>,
}

const _: () = assert!(std::mem::size_of::<SliceEndpoint>() == 16);

/// An endpoint of a slice of either family, as endpoint selection reads
/// it (borrowed: half a million are read at a full recompute).
#[derive(Clone, Copy, Debug)]
pub struct EndpointView<'a> {
    pub addr: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<&'a super::NodeName>,
}

impl<A: Into<IpAddr> + Copy> SliceEndpoint<A> {
    pub fn view(&self) -> EndpointView<'_> {
        EndpointView {
            addr: self.addr.into(),
            ready: self.ready,
            serving: self.serving,
            terminating: self.terminating,
            node_name: self.node_name.as_ref(),
        }
    }
}

/// [`Slice::endpoints`]: a slice's endpoints as [`EndpointView`]s.
pub enum Views<'a> {
    V4(std::slice::Iter<'a, SliceEndpoint<Ipv4Addr>>),
    V6(std::slice::Iter<'a, SliceEndpoint<Ipv6Addr>>),
}

impl<'a> Iterator for Views<'a> {
    type Item = EndpointView<'a>;

    fn next(&mut self) -> Option<EndpointView<'a>> {
        match self {
            Views::V4(i) => i.next().map(SliceEndpoint::view),
            Views::V6(i) => i.next().map(SliceEndpoint::view),
        }
    }
}

/// A slice's endpoints: all of its `addressType`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SliceEndpoints {
    V4(Vec<SliceEndpoint<Ipv4Addr>>),
    V6(Vec<SliceEndpoint<Ipv6Addr>>),
}

impl SliceEndpoints {
    pub fn len(&self) -> usize {
        match self {
            SliceEndpoints::V4(v) => v.len(),
            SliceEndpoints::V6(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An endpoint's topology hints (`hints.forZones`, `hints.forNodes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    pub zones: Vec<String>,
    pub nodes: Vec<String>,
}

/// A validated EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    pub service: ServiceRef,
    /// (port name (interned), protocol, port number).
    pub ports: Vec<(Arc<str>, u8, u16)>,
    pub endpoints: SliceEndpoints,
    /// The topology hints of the endpoints that have any, by index into
    /// `endpoints`, in order.
    pub hints: Vec<(u32, Hints)>,
}

impl Slice {
    /// Its `addressType`: kube-proxy serves a Service port's family from
    /// that family's slices only.
    pub fn family(&self) -> Family {
        match self.endpoints {
            SliceEndpoints::V4(_) => Family::V4,
            SliceEndpoints::V6(_) => Family::V6,
        }
    }

    /// Its endpoints in order, with addresses of either family (no
    /// allocation: read per slice and port at every recompute).
    pub fn endpoints(&self) -> Views<'_> {
        match &self.endpoints {
            SliceEndpoints::V4(v) => Views::V4(v.iter()),
            SliceEndpoints::V6(v) => Views::V6(v.iter()),
        }
    }

    /// The hints of endpoint `i`.
    pub fn hints_of(&self, i: usize) -> Option<&Hints> {
        let i = u32::try_from(i).ok()?;
        let at = self.hints.binary_search_by_key(&i, |(j, _)| *j).ok()?;
        Some(&self.hints[at].1)
    }
}

/// The Service an EndpointSlice belongs to, read from its label.
pub fn slice_owner(s: &EndpointSlice) -> Option<ServiceRef> {
    let name = s.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(ServiceRef::new(namespace(&s.metadata), name))
}

/// Validates an EndpointSlice; Ok(None) when kube-proxy does not use it.
pub fn slice(s: &Sourced<EndpointSlice>) -> Result<Option<Slice>, Problem> {
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
    let family = match s.object.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        // FQDN slices are not used by kube-proxy.
        "FQDN" => return Ok(None),
        other => {
            return Err(problem(
                "addressType".into(),
                format!("unknown address type {other:?}"),
            ))
        }
    };
    // Sized exactly: tens of thousands of slices are kept for the agent's
    // life, and doubling growth would leave a third of them unused.
    let mut ports = Vec::with_capacity(s.object.ports.as_ref().map_or(0, Vec::len));
    for (i, p) in s.object.ports.iter().flatten().enumerate() {
        let proto = protocol(p.protocol.as_deref())
            .map_err(|m| problem(format!("ports[{i}].protocol"), m))?;
        let number = p
            .port
            .ok_or_else(|| problem(format!("ports[{i}].port"), "missing".into()))
            .and_then(|n| port(n).map_err(|m| problem(format!("ports[{i}].port"), m)))?;
        if let Some(proto) = proto {
            ports.push((
                super::intern(p.name.as_deref().unwrap_or("")),
                proto,
                number,
            ));
        }
    }
    ports.shrink_to_fit();
    let n = s.object.endpoints.as_ref().map_or(0, Vec::len);
    let mut endpoints = match family {
        Family::V4 => SliceEndpoints::V4(Vec::with_capacity(n)),
        Family::V6 => SliceEndpoints::V6(Vec::with_capacity(n)),
    };
    let mut hinted = Vec::new();
    for (i, e) in s.object.endpoints.iter().flatten().enumerate() {
        if e.addresses.is_empty() {
            return Err(problem(
                format!("endpoints[{i}].addresses"),
                "missing (an endpoint has at least one address)".into(),
            ));
        }
        let mut first = None;
        for (j, a) in e.addresses.iter().enumerate() {
            let addr = a
                .parse::<IpAddr>()
                .ok()
                .filter(|ip| Family::of(ip) == family)
                .ok_or_else(|| {
                    problem(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a:?} is not an {} address", family.name()),
                    )
                })?;
            first.get_or_insert(addr);
        }
        let Some(addr) = first else { continue };
        // Nil conditions mean unknown: `ready` and `serving` then count as
        // true, `terminating` as false (the API's documented defaults).
        let c = e.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let hints = e.hints.as_ref().map(|h| Hints {
            zones: h
                .for_zones
                .iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            nodes: h
                .for_nodes
                .iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        });
        if let Some(h) = hints.filter(|h| *h != Hints::default()) {
            // At most a slice's endpoints: far below u32::MAX.
            hinted.push((endpoints.len() as u32, h));
        }
        let serving = c.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        let node_name = e.node_name.as_deref().map(super::NodeName::intern);
        match (&mut endpoints, addr) {
            (SliceEndpoints::V4(v), IpAddr::V4(addr)) => v.push(SliceEndpoint {
                addr,
                ready,
                serving,
                terminating,
                node_name,
            }),
            (SliceEndpoints::V6(v), IpAddr::V6(addr)) => v.push(SliceEndpoint {
                addr,
                ready,
                serving,
                terminating,
                node_name,
            }),
            // Checked above: every address is of the slice's family.
            _ => continue,
        }
    }
    match &mut endpoints {
        SliceEndpoints::V4(v) => v.shrink_to_fit(),
        SliceEndpoints::V6(v) => v.shrink_to_fit(),
    }
    Ok(Some(Slice {
        service,
        ports,
        endpoints,
        hints: hinted,
    }))
}

/// The Node address types (`NodeAddressType`).
const NODE_ADDRESS_TYPES: [&str; 5] = [
    "Hostname",
    "InternalIP",
    "ExternalIP",
    "InternalDNS",
    "ExternalDNS",
];

/// The taint effects (`TaintEffect`).
const TAINT_EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];

/// What is wrong with the fields of a Node kpx reads (its addresses, which
/// serve NodePorts and masquerade, and its taints, which drain it). The
/// rest of the Node is still used: a bad address is skipped, not the node.
pub fn node_problems(origin: &str, node: &k8s_openapi::api::core::v1::Node) -> Vec<Problem> {
    let object = format!(
        "Node {}",
        node.metadata.name.as_deref().unwrap_or("<unnamed>")
    );
    let problem = |field: String, message: String| Problem {
        origin: origin.into(),
        object: object.clone(),
        field,
        message,
    };
    let mut out = Vec::new();
    if node.metadata.name.as_deref().unwrap_or("").is_empty() {
        out.push(problem("metadata.name".into(), "missing".into()));
    }
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in addresses.into_iter().flatten().enumerate() {
        if !NODE_ADDRESS_TYPES.contains(&a.type_.as_str()) {
            out.push(problem(
                format!("status.addresses[{i}].type"),
                format!(
                    "unknown address type {:?} ({})",
                    a.type_,
                    NODE_ADDRESS_TYPES.join(", ")
                ),
            ));
        } else if (a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            && a.address.parse::<IpAddr>().is_err()
        {
            out.push(problem(
                format!("status.addresses[{i}].address"),
                format!("{:?} is not an IP address", a.address),
            ));
        }
    }
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_ref());
    for (i, t) in taints.into_iter().flatten().enumerate() {
        if !TAINT_EFFECTS.contains(&t.effect.as_str()) {
            out.push(problem(
                format!("spec.taints[{i}].effect"),
                format!(
                    "unknown taint effect {:?} ({})",
                    t.effect,
                    TAINT_EFFECTS.join(", ")
                ),
            ));
        }
    }
    out
}
