//! The desired state: a pure function from Services and EndpointSlices (and
//! the node's configuration) to the service frontends the datapath must serve.
//!
//! Semantics follow kube-proxy: a Service port is served by the endpoints of
//! the Service's EndpointSlices whose port has the same name and protocol (the
//! EndpointSlice controller already resolved `targetPort`); `ready`
//! endpoints serve, and when none is ready the `serving` and `terminating`
//! ones do (kube-proxy's ProxyTerminatingEndpoints); headless, ExternalName
//! and `service-proxy-name`-labelled
//! Services are not ours. A malformed object is reported, with its origin and
//! the offending field, and skipped as a whole; everything else is served.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_common::{IPPROTO_TCP, IPPROTO_UDP};

/// kube-proxy ignores Services carrying this label (they belong to another proxy).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Links an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// An object and where it came from (a manifest file and document, or the API).
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    pub origin: String,
    pub object: T,
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

/// One frontend (VIP, port, protocol) of a Service port, and who serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// kube-proxy's service port name: `namespace/name:port-name`.
    pub name: String,
    /// Endpoints new flows may go to, sorted and de-duplicated: the ready
    /// ones, or if none is ready the serving terminating ones.
    pub backends: Vec<Endpoint>,
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
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skipped {
    Headless,
    ExternalName,
    OtherProxy,
    /// IPv6 addresses wait for the IPv6 datapath.
    Ipv6,
    /// SCTP waits for datapath support.
    Sctp,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub desired: Desired,
    pub problems: Vec<Problem>,
    /// Skipped objects or parts with the reason, for logs and counters.
    pub skipped: Vec<(String, Skipped)>,
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
struct SvcPort {
    name: String,
    proto: u8,
    port: u16,
}

/// A validated Service: its IPv4 cluster IPs and ports.
struct Svc {
    namespace: String,
    name: String,
    ips: Vec<Ipv4Addr>,
    ports: Vec<SvcPort>,
    affinity_timeout: u32,
}

/// Validates a Service; Ok(None) when kube-proxy would ignore it.
fn service(
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
    if spec.type_.as_deref() == Some("ExternalName") {
        skipped.push((obj, Skipped::ExternalName));
        return Ok(None);
    }
    let ip_strings: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => Vec::new(),
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
    let field = if spec.cluster_ips.as_ref().is_some_and(|v| !v.is_empty()) {
        "spec.clusterIPs"
    } else {
        "spec.clusterIP"
    };
    let mut ips = Vec::new();
    for (i, ip) in ip_strings.iter().enumerate() {
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => ips.push(v4),
            Ok(std::net::IpAddr::V6(_)) => skipped.push((format!("{obj} {ip}"), Skipped::Ipv6)),
            Err(_) => {
                let f = if field == "spec.clusterIPs" {
                    format!("{field}[{i}]")
                } else {
                    field.to_string()
                };
                return Err(problem(&f, format!("{ip:?} is not an IP address")));
            }
        }
    }
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let proto = protocol(p.protocol.as_deref())
            .map_err(|m| problem(&format!("spec.ports[{i}].protocol"), m))?;
        let number = port(p.port).map_err(|m| problem(&format!("spec.ports[{i}].port"), m))?;
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
        });
    }
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
    Ok(Some(Svc {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name,
        ips,
        ports,
        affinity_timeout,
    }))
}

/// A validated EndpointSlice: its ports, and its endpoints that may serve.
struct Slice {
    namespace: String,
    service: String,
    ports: Vec<(String, u8, u16)>,
    ready: Vec<Ipv4Addr>,
    /// Not ready, but `serving` and `terminating`: used when none is ready.
    terminating: Vec<Ipv4Addr>,
}

fn slice(
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
    let meta = &s.object.metadata;
    let service = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .cloned()
        .ok_or_else(|| {
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
    let mut ready = Vec::new();
    let mut terminating = Vec::new();
    for (i, e) in s.object.endpoints.iter().flatten().enumerate() {
        let mut addrs = Vec::new();
        for (j, a) in e.addresses.iter().enumerate() {
            let addr = a.parse::<Ipv4Addr>().map_err(|_| {
                problem(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{a:?} is not an IPv4 address"),
                )
            })?;
            addrs.push(addr);
        }
        // Nil conditions mean unknown: `ready` and `serving` then count as
        // true, `terminating` as false (the API's documented defaults).
        let c = e.conditions.as_ref();
        let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
        let serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
        let is_terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        // Only the first address is used, as by kube-proxy.
        if is_ready {
            ready.extend(addrs.first().copied());
        } else if serving && is_terminating {
            terminating.extend(addrs.first().copied());
        }
    }
    Ok(Some(Slice {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        service,
        ports,
        ready,
        terminating,
    }))
}

/// The endpoints of one service port over all its slices.
#[derive(Default)]
struct PortEndpoints {
    ready: BTreeSet<Endpoint>,
    terminating: BTreeSet<Endpoint>,
}

impl PortEndpoints {
    /// Where new flows go: the ready endpoints, else the serving terminating
    /// ones, so that a rolling update's last old pods keep answering.
    fn usable(&self) -> Vec<Endpoint> {
        let set = if self.ready.is_empty() {
            &self.terminating
        } else {
            &self.ready
        };
        set.iter().copied().collect()
    }
}

/// (namespace, service) → (port name, protocol) → endpoints.
type EndpointsByService = BTreeMap<(String, String), BTreeMap<(String, u8), PortEndpoints>>;

/// The desired frontends for `services` and `slices`.
pub fn desired(services: &[Sourced<Service>], slices: &[Sourced<EndpointSlice>]) -> Outcome {
    let mut out = Outcome::default();
    let mut endpoints: EndpointsByService = BTreeMap::new();
    for s in slices {
        match slice(s, &mut out.skipped) {
            Ok(Some(sl)) => {
                let by_port = endpoints.entry((sl.namespace, sl.service)).or_default();
                for (name, proto, port) in &sl.ports {
                    let eps = by_port.entry((name.clone(), *proto)).or_default();
                    let at = |&addr: &Ipv4Addr| Endpoint { addr, port: *port };
                    eps.ready.extend(sl.ready.iter().map(at));
                    eps.terminating.extend(sl.terminating.iter().map(at));
                }
            }
            Ok(None) => {}
            Err(p) => out.problems.push(p),
        }
    }
    for s in services {
        let svc = match service(s, &mut out.skipped) {
            Ok(Some(svc)) => svc,
            Ok(None) => continue,
            Err(p) => {
                out.problems.push(p);
                continue;
            }
        };
        let eps = endpoints.get(&(svc.namespace.clone(), svc.name.clone()));
        for p in &svc.ports {
            let backends: Vec<Endpoint> = eps
                .and_then(|e| e.get(&(p.name.clone(), p.proto)))
                .map(PortEndpoints::usable)
                .unwrap_or_default();
            for &ip in &svc.ips {
                let key = FrontendKey {
                    addr: ip,
                    port: p.port,
                    proto: p.proto,
                };
                let frontend = Frontend {
                    name: format!("{}/{}:{}", svc.namespace, svc.name, p.name),
                    backends: backends.clone(),
                    affinity_timeout: svc.affinity_timeout,
                };
                if let Some(prev) = out.desired.frontends.insert(key, frontend) {
                    out.problems.push(Problem {
                        origin: s.origin.clone(),
                        object: format!("Service {}/{}", svc.namespace, svc.name),
                        field: "spec.clusterIP".into(),
                        message: format!(
                            "{ip}:{} is also claimed by {}; the later object wins",
                            p.port, prev.name
                        ),
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Sourced<Service> {
        Sourced {
            origin: "test".into(),
            object: serde_yaml::from_str(yaml).expect("service yaml"),
        }
    }

    fn eps(yaml: &str) -> Sourced<EndpointSlice> {
        Sourced {
            origin: "test".into(),
            object: serde_yaml::from_str(yaml).expect("slice yaml"),
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
        let out = desired(&[svc(WEB)], &[eps(WEB_SLICE)]);
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
        let out = desired(&[svc(WEB)], &[eps(&slice(true))]);
        assert_eq!(http(&out), vec![ep("198.18.1.1", 8080)]);
        // Nothing ready: the serving terminating endpoint, never the one
        // that stopped serving.
        let out = desired(&[svc(WEB)], &[eps(&slice(false))]);
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
        assert_eq!(timeout(&desired(&[svc(WEB)], &[])), 0);
        assert_eq!(
            timeout(&desired(&[svc(&aff(""))], &[])),
            DEFAULT_AFFINITY_TIMEOUT
        );
        let custom = aff("  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n");
        assert_eq!(timeout(&desired(&[svc(&custom)], &[])), 60);
        let bad = aff("  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n");
        let out = desired(&[svc(&bad)], &[]);
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
        let out = desired(&[svc(WEB)], &[eps(WEB_SLICE), eps(&second)]);
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
        let out = desired(&[svc(WEB)], &[]);
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
        let out = desired(&[svc(WEB)], &[eps(&other_ns), eps(&other_svc)]);
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
        let out = desired(
            &[svc(&headless), svc(&external), svc(&other)],
            &[eps(WEB_SLICE)],
        );
        assert!(out.desired.frontends.is_empty());
        assert!(out.problems.is_empty());
        let reasons: Vec<_> = out.skipped.iter().map(|s| s.1.clone()).collect();
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
            let out = desired(&[svc(&bad), svc(&good)], &[]);
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
        let out = desired(&[svc(WEB)], &[eps(&bad_slice)]);
        assert_eq!(out.problems[0].field, "endpoints[1].addresses[0]");
        assert_eq!(out.problems[0].object, "EndpointSlice shop/web-a");
        let unlabelled = WEB_SLICE.replace("  labels: {kubernetes.io/service-name: web}\n", "");
        let out = desired(&[svc(WEB)], &[eps(&unlabelled)]);
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
        let out = desired(&[svc(&sctp)], &[]);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        assert_eq!(out.desired.frontends.len(), 1);
        let reasons: Vec<_> = out.skipped.iter().map(|s| s.1.clone()).collect();
        assert_eq!(reasons, vec![Skipped::Ipv6, Skipped::Sctp]);
    }
}
