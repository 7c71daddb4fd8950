//! Fixtures: Service and EndpointSlice manifests the tests and the demo serve.

use std::net::Ipv4Addr;

/// Service and EndpointSlice YAML for a ClusterIP service with a TCP port
/// `http` and a UDP port `dns`, all endpoints ready.
pub fn service_yaml(
    name: &str,
    vip: Ipv4Addr,
    tcp: (u16, u16),
    udp: (u16, u16),
    endpoints: &[Ipv4Addr],
) -> String {
    let eps: Vec<(Ipv4Addr, &str)> = endpoints.iter().map(|e| (*e, READY)).collect();
    service_yaml_with(name, vip, tcp, udp, &eps, "")
}

/// EndpointSlice conditions of a ready endpoint.
pub const READY: &str = "{ready: true, serving: true, terminating: false}";
/// ... of an endpoint shutting down that still serves.
pub const TERMINATING: &str = "{ready: false, serving: true, terminating: true}";

/// As [`service_yaml`], with each endpoint's conditions and extra lines for
/// the Service's spec (e.g. `sessionAffinity: ClientIP`).
pub fn service_yaml_with(
    name: &str,
    vip: Ipv4Addr,
    tcp: (u16, u16),
    udp: (u16, u16),
    endpoints: &[(Ipv4Addr, &str)],
    spec_extra: &str,
) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(e, cond)| format!("- addresses: [\"{e}\"]\n  conditions: {cond}\n"))
        .collect();
    let extra: String = spec_extra.lines().map(|l| format!("  {l}\n")).collect();
    let eps = if eps.is_empty() {
        " []\n".to_string()
    } else {
        format!("\n{eps}")
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {vip}
{extra}  ports:
  - {{name: http, protocol: TCP, port: {}, targetPort: {}}}
  - {{name: dns, protocol: UDP, port: {}, targetPort: {}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: {}}}
- {{name: dns, protocol: UDP, port: {}}}
endpoints:{eps}",
        tcp.0, tcp.1, udp.0, udp.1, tcp.1, udp.1
    )
}

/// An endpoint of [`service_manifest`]: its address, node and conditions.
pub struct Ep {
    pub addr: Ipv4Addr,
    pub node: &'static str,
    pub conditions: &'static str,
}

impl Ep {
    /// A ready endpoint on `node`.
    pub fn ready(addr: Ipv4Addr, node: &'static str) -> Self {
        Self {
            addr,
            node,
            conditions: READY,
        }
    }
}

/// A Service in namespace `default` (its `spec` lines and `status` block
/// given) and one EndpointSlice for it, with the ports `http` TCP 8080 and
/// `dns` UDP 5353 unless `slice_ports` lists others.
pub fn service_manifest(
    name: &str,
    spec: &str,
    status: &str,
    slice_ports: &str,
    eps: &[Ep],
) -> String {
    let eps: String = eps
        .iter()
        .map(|e| {
            format!(
                "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {}\n",
                e.addr, e.node, e.conditions
            )
        })
        .collect();
    let eps = if eps.is_empty() {
        "endpoints: []\n".to_string()
    } else {
        format!("endpoints:\n{eps}")
    };
    let slice_ports = if slice_ports.is_empty() {
        "- {name: http, protocol: TCP, port: 8080}\n- {name: dns, protocol: UDP, port: 5353}"
    } else {
        slice_ports
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
{spec}
{status}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
{slice_ports}
{eps}"
    )
}

/// An IPv6 EndpointSlice `{service}-6` for Service `service` (namespace
/// `default`), with the ports of [`service_yaml`] (`http` TCP `tcp`, `dns`
/// UDP `udp`), all endpoints ready: appended to a Service's manifest, it
/// makes the Service's IPv6 half reachable.
pub fn slice6_yaml(service: &str, tcp: u16, udp: u16, endpoints: &[std::net::Ipv6Addr]) -> String {
    let eps: Vec<_> = endpoints.iter().map(|e| (*e, None)).collect();
    slice6_on_nodes(service, tcp, udp, &eps)
}

/// [`slice6_yaml`] with each endpoint's node where one is given (a
/// multi-node bed's endpoints: local to one node, remote to the others).
pub fn slice6_on_nodes(
    service: &str,
    tcp: u16,
    udp: u16,
    endpoints: &[(std::net::Ipv6Addr, Option<&str>)],
) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(e, node)| {
            let node = node.map_or_else(String::new, |n| format!("  nodeName: {n}\n"));
            format!("- addresses: [\"{e}\"]\n{node}  conditions: {READY}\n")
        })
        .collect();
    let eps = if eps.is_empty() {
        " []\n".to_string()
    } else {
        format!("\n{eps}")
    };
    format!(
        "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-6
  namespace: default
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv6
ports:
- {{name: http, protocol: TCP, port: {tcp}}}
- {{name: dns, protocol: UDP, port: {udp}}}
endpoints:{eps}"
    )
}
