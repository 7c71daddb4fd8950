//! The model against kube-proxy's semantics, one behaviour per test.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use proxy_common::{IPPROTO_TCP, IPPROTO_UDP};

use super::*;
use crate::control::{cidr::Family, index::desired};

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
        local: false,
    }
}

#[test]
fn ports_match_slices_by_name_and_protocol_and_only_ready_endpoints_serve() {
    let out = desired(&[svc(WEB)], &[eps(WEB_SLICE)], &NodeInfo::named("node-1"));
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    let http = &out.desired.frontends[&key("198.19.0.10", 80, IPPROTO_TCP)];
    assert_eq!(&*http.name, "shop/web:http");
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

/// WEB on both families: IPv4 primary, IPv6 second.
fn dual_web() -> String {
    WEB.replace(
        "  clusterIP: 198.19.0.10\n",
        "  clusterIP: 198.19.0.10\n  clusterIPs: [198.19.0.10, '2001:2:0:ff::10']\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n",
    )
}

/// WEB_SLICE's endpoints on IPv6 (2001:2:0:1::n), named web-b.
fn web_slice6() -> String {
    WEB_SLICE
        .replace("name: web-a", "name: web-b")
        .replace("addressType: IPv4", "addressType: IPv6")
        .replace("[198.18.1.1]", "['2001:2:0:1::1']")
        .replace("[198.18.1.2]", "['2001:2:0:1::2']")
        .replace("[198.18.1.3]", "['2001:2:0:1::3']")
}

#[test]
fn a_dual_stack_service_is_served_on_each_family_by_that_familys_slices() {
    let slice6 = web_slice6();
    assert!(slice6.contains("['2001:2:0:1::2']"), "{slice6}");
    let out = desired(
        &[svc(&dual_web())],
        &[eps(WEB_SLICE), eps(&slice6)],
        &NodeInfo::named("node-1"),
    );
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    assert!(out.skipped.is_empty(), "{:?}", out.skipped);
    // Two ports on each family's cluster IP.
    assert_eq!(out.desired.frontends.len(), 4);
    let v4 = &out.desired.frontends[&key("198.19.0.10", 80, IPPROTO_TCP)];
    assert_eq!(
        v4.backends,
        vec![ep("198.18.1.1", 8080), ep("198.18.1.2", 8080)]
    );
    let v6 = &out.desired.frontends[&key("2001:2:0:ff::10", 80, IPPROTO_TCP)];
    assert_eq!(
        v6.backends,
        vec![ep("2001:2:0:1::1", 8080), ep("2001:2:0:1::2", 8080)]
    );
    let dns6 = &out.desired.frontends[&key("2001:2:0:ff::10", 53, IPPROTO_UDP)];
    assert_eq!(dns6.backends.len(), 2);
    assert_eq!(v4.name, v6.name, "one service port, two families");
    // Without IPv6 slices, the IPv6 frontends REJECT (no endpoints), as
    // kube-proxy's IPv6 proxier does; IPv4's are unaffected.
    let out = desired(
        &[svc(&dual_web())],
        &[eps(WEB_SLICE)],
        &NodeInfo::named("n"),
    );
    assert!(
        out.desired.frontends[&key("2001:2:0:ff::10", 80, IPPROTO_TCP)]
            .backends
            .is_empty()
    );
    assert_eq!(
        out.desired.frontends[&key("198.19.0.10", 80, IPPROTO_TCP)]
            .backends
            .len(),
        2
    );
}

#[test]
fn an_ipv6_only_service_gets_ipv6_frontends_nodeports_and_source_ranges() {
    let v6 = WEB
        .replace("  clusterIP: 198.19.0.10\n", "  clusterIP: '2001:2:0:ff::10'\n  type: LoadBalancer\n  externalIPs: ['2001:2:0:9::1', 198.18.9.1]\n  loadBalancerSourceRanges: ['2001:2:0:7::/64', 198.18.0.0/16]\n")
        .replace("{name: http, port: 80, targetPort: 8080}", "{name: http, port: 80, targetPort: 8080, nodePort: 30080}")
        + "status:\n  loadBalancer:\n    ingress:\n    - {ip: '2001:2:0:9::2'}\n    - {ip: 198.18.9.2}\n";
    let node = NodeInfo {
        addresses: vec![
            "198.18.0.1".parse().unwrap(),
            "2001:2:0:7::1".parse().unwrap(),
        ],
        ..NodeInfo::named("node-1")
    };
    let out = desired(&[svc(&v6)], &[eps(&web_slice6())], &node);
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    // The IPv4 external IP, LB IP and source range are not this Service's.
    let mut reasons: Vec<&str> = out.skipped.iter().map(|s| s.0.as_str()).collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "Service shop/web externalIP 198.18.9.1",
            "Service shop/web load balancer IP 198.18.9.2",
            "Service shop/web source range 198.18.0.0/16",
        ]
    );
    assert!(out.skipped.iter().all(|s| s.1 == Skipped::OtherFamily));
    use proxy_common::{SVC_F_EXTERNAL, SVC_F_NODEPORT, SVC_F_SOURCE_RANGES};
    let f = |ip: &str, port| &out.desired.frontends[&key(ip, port, IPPROTO_TCP)];
    assert_eq!(f("2001:2:0:ff::10", 80).backends.len(), 2);
    // The NodePort's address is IPv6's unspecified one.
    assert_eq!(f("::", 30080).flags & SVC_F_NODEPORT, SVC_F_NODEPORT);
    assert!(!out
        .desired
        .frontends
        .contains_key(&key("0.0.0.0", 30080, IPPROTO_TCP)));
    assert_eq!(f("2001:2:0:9::1", 80).flags, SVC_F_EXTERNAL);
    let lb = f("2001:2:0:9::2", 80);
    assert_eq!(lb.flags, SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES);
    // The node's IPv6 address is in the range: the LB IP itself is
    // admitted too (kube-proxy's allowFromNode, per family).
    assert_eq!(
        lb.source_ranges,
        vec![
            "2001:2:0:7::/64".parse().unwrap(),
            "2001:2:0:9::2/128".parse().unwrap()
        ]
    );
    // An IPv4 slice serves no IPv6 frontend.
    let out = desired(&[svc(&v6)], &[eps(WEB_SLICE)], &node);
    assert!(out
        .desired
        .frontends
        .values()
        .all(|f| f.backends.is_empty()));
}

#[test]
fn family_mismatches_are_problems_and_sctp_is_skipped_with_a_reason() {
    let sctp = dual_web().replace("protocol: UDP", "protocol: SCTP");
    let out = desired(&[svc(&sctp)], &[], &NodeInfo::named("node-1"));
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    assert_eq!(out.desired.frontends.len(), 2, "TCP on both families");
    let reasons: Vec<_> = out.skipped.iter().map(|s| s.1).collect();
    assert_eq!(reasons, vec![Skipped::Sctp]);
    for (bad, field) in [
        (
            dual_web().replace("ipFamilies: [IPv4, IPv6]", "ipFamilies: [IPv6, IPv4]"),
            "spec.ipFamilies[0]",
        ),
        (
            dual_web().replace("'2001:2:0:ff::10'", "198.19.0.11"),
            "spec.clusterIPs",
        ),
    ] {
        let out = desired(&[svc(&bad)], &[], &NodeInfo::named("n"));
        assert_eq!(out.problems.len(), 1, "{field}");
        assert_eq!(out.problems[0].field, field);
    }
    // An address of the other family in a slice is a problem.
    let mixed = web_slice6().replace("['2001:2:0:1::2']", "[198.18.1.2]");
    let out = desired(&[svc(&dual_web())], &[eps(&mixed)], &NodeInfo::named("n"));
    assert_eq!(out.problems[0].field, "endpoints[1].addresses[0]");
    assert!(out.problems[0].message.contains("not an IPv6 address"));
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
    let sl = slice(&eps(&slice_yaml)).unwrap().unwrap();
    let mut ports = service_ports(&svc, &[&sl], node, Family::V4);
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
    // Each endpoint knows whether it is on this node (direct server return
    // encapsulates only towards the others).
    let local: Vec<bool> = p.cluster_endpoints.iter().map(|e| e.local).collect();
    assert_eq!(local, [true, false]);
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
    let moving = WEB_SLICE.replace("name: web-a", "name: web-0").replace(
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
    let a = slice(&eps(&moving)).unwrap().unwrap();
    let b = slice(&eps(WEB_SLICE)).unwrap().unwrap();
    let ports = service_ports(&s, &[&a, &b], &NodeInfo::named("n"), Family::V4);
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
        "  clusterIP: 198.19.0.10\n  type: LoadBalancer\n  externalIPs: [198.18.9.1, '2001:2:0:9::1']\n  loadBalancerSourceRanges: [198.18.0.0/16]\n",
    ) + "status:\n  loadBalancer:\n    ingress:\n    - {ip: 198.18.9.2}\n    - {ip: 198.18.9.3, ipMode: Proxy}\n    - {hostname: lb.example}\n";
    let mut skipped = Vec::new();
    let s = service(&svc(&lb), &mut skipped).unwrap().unwrap();
    // An IPv6 external IP of an IPv4 Service is not its (kube-proxy's
    // IPv4 proxier ignores it; no IPv6 proxier serves the Service).
    assert_eq!(
        s.external_ips,
        vec![IpAddr::from(Ipv4Addr::new(198, 18, 9, 1))]
    );
    assert_eq!(s.lb_ips, vec![IpAddr::from(Ipv4Addr::new(198, 18, 9, 2))]);
    assert_eq!(s.lb_source_ranges, vec!["198.18.0.0/16".parse().unwrap()]);
    assert!(s.externally_accessible());
    let out = desired(&[svc(&lb)], &[], &NodeInfo::named("n"));
    // Two ports, each on the cluster IP, the external IP and the LB IP.
    assert_eq!(out.desired.frontends.len(), 6);
    let reasons: BTreeSet<Skipped> = out.skipped.iter().map(|s| s.1).collect();
    assert!(reasons.contains(&Skipped::OtherFamily));
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
        addresses: vec![Ipv4Addr::new(198, 18, 200, 1).into()],
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

#[test]
fn endpoints_on_one_node_share_its_name_and_carry_no_empty_hints() {
    let yaml = WEB_SLICE.replace(
        "- addresses: [198.18.1.1]\n  conditions: {ready: true}\n- addresses: [198.18.1.2]\n",
        "- addresses: [198.18.1.1]\n  nodeName: node-1\n  hints: {forZones: []}\n- addresses: [198.18.1.2]\n  nodeName: node-1\n  hints: {forZones: [{name: zone-a}]}\n",
    );
    let s = validate::slice(&eps(&yaml)).expect("valid").expect("used");
    let SliceEndpoints::V4(e) = &s.endpoints else {
        panic!("an IPv4 slice")
    };
    let (a, b) = (&e[0], &e[1]);
    let (na, nb) = (a.node_name.as_ref().unwrap(), b.node_name.as_ref().unwrap());
    assert_eq!(&**na, "node-1");
    assert!(
        super::NodeName::ptr_eq(na, nb),
        "one allocation per node name"
    );
    assert_eq!(s.hints_of(0), None, "empty hints are no hints");
    assert_eq!(
        s.hints_of(1).map(|h| h.zones.clone()),
        Some(vec!["zone-a".to_string()])
    );
    assert_eq!(s.hints.len(), 1);
}
