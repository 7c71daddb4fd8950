//! kpx's model against an oracle it did not write: kube-proxy's own test
//! expectations, transcribed as facts in `tests/oracle/` (see each file's
//! header for its source). No root needed.

use std::collections::BTreeSet;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kpx::control::{
    index::Index,
    model::{NodeInfo, Sourced},
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    zone: Option<String>,
    #[serde(default)]
    itp_local: bool,
    #[serde(default)]
    etp_local: bool,
    #[serde(default)]
    node_port: bool,
    endpoints: Vec<Ep>,
    cluster: Option<Vec<String>>,
    local: Option<Vec<String>>,
    all: Option<Vec<String>>,
    #[serde(default)]
    only_remote: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ep {
    ep: String,
    #[serde(default)]
    zones: Vec<String>,
    ready: bool,
    serving: Option<bool>,
    #[serde(default)]
    terminating: bool,
    #[serde(default)]
    local: bool,
}

const NODE: &str = "node-1";

fn service(c: &Case) -> Service {
    let policy = |local| if local { "Local" } else { "Cluster" };
    let yaml = format!(
        "metadata: {{name: svc, namespace: ns}}
spec:
  type: {}
  clusterIP: 198.19.0.1
  internalTrafficPolicy: {}
  externalTrafficPolicy: {}
  ports: [{{name: p, port: 80, protocol: TCP{}}}]",
        if c.node_port { "NodePort" } else { "ClusterIP" },
        policy(c.itp_local),
        policy(c.etp_local),
        if c.node_port { ", nodePort: 30080" } else { "" },
    );
    serde_norway::from_str(&yaml).expect("case Service")
}

fn slice(c: &Case) -> EndpointSlice {
    let endpoints: Vec<String> = c
        .endpoints
        .iter()
        .map(|e| {
            let (ip, _) = e.ep.split_once(':').expect("ip:port");
            let zones: Vec<String> = e.zones.iter().map(|z| format!("{{name: {z}}}")).collect();
            format!(
                "  - addresses: [{ip}]
    nodeName: {}
    conditions: {{ready: {}, serving: {}, terminating: {}}}
    hints: {{forZones: [{}]}}",
                if e.local { NODE } else { "node-2" },
                e.ready,
                // The API's rule: serving is ready, but for terminating endpoints.
                e.serving.unwrap_or(e.ready),
                e.terminating,
                zones.join(", ")
            )
        })
        .collect();
    let yaml = format!(
        "metadata: {{name: svc-1, namespace: ns, labels: {{kubernetes.io/service-name: svc}}}}
addressType: IPv4
ports: [{{name: p, port: 80, protocol: TCP}}]
endpoints:{}",
        if endpoints.is_empty() {
            " []".to_string()
        } else {
            format!("\n{}", endpoints.join("\n"))
        }
    );
    serde_norway::from_str(&yaml).expect("case EndpointSlice")
}

fn set(v: &[String]) -> BTreeSet<String> {
    v.iter().cloned().collect()
}

#[test]
fn endpoint_selection_matches_kube_proxys_categorize_endpoints() {
    let cases: Vec<Case> =
        serde_norway::from_str(include_str!("oracle/categorize_endpoints.yaml")).expect("fixture");
    assert_eq!(cases.len(), 26, "every case of the source is here");
    let mut failures = Vec::new();
    for c in &cases {
        let mut index = Index::new(NodeInfo {
            zone: c.zone.clone().filter(|z| !z.is_empty()),
            ..NodeInfo::named(NODE)
        });
        let a = index.apply_service(Sourced::api(service(c)));
        let b = index.apply_slice(Sourced::api(slice(c)));
        assert!(
            a.problem.is_none() && b.problem.is_none(),
            "{}: invalid input",
            c.name
        );
        index.update();
        let services = index.services_with_ports();
        let [(_, ports)] = services.as_slice() else {
            panic!("{}: one service expected", c.name);
        };
        let [port] = ports.as_slice() else {
            panic!("{}: one port expected", c.name);
        };
        let strings = |eps: &[kpx::control::model::Endpoint]| -> BTreeSet<String> {
            eps.iter()
                .map(|e| format!("{}:{}", e.addr, e.port))
                .collect()
        };
        // What the datapath is given: each frontend's tables, and which of
        // them its packets can use (an external frontend with a Local policy
        // still sends pods and the node to the cluster-wide table: kube-
        // proxy's short circuit).
        let (mut cluster, mut local) = (None, None);
        let mut why = Vec::new();
        for (k, f) in &index.desired().frontends {
            let external = f.flags & proxy_common::SVC_F_EXTERNAL != 0;
            let is_local = f.flags & proxy_common::SVC_F_LOCAL != 0;
            for (used, table, seen) in [
                (!is_local || external, strings(&f.backends), &mut cluster),
                (is_local, strings(&f.local_backends), &mut local),
            ] {
                if !used {
                    continue;
                }
                if seen.as_ref().is_some_and(|s| *s != table) {
                    why.push(format!(
                        "{}:{} disagrees with another frontend",
                        k.addr, k.port
                    ));
                }
                *seen = Some(table);
            }
        }
        for (what, got, want) in [
            ("cluster", &cluster, &c.cluster),
            ("local", &local, &c.local),
        ] {
            if got.as_ref() != want.as_deref().map(set).as_ref() {
                why.push(format!("{what} endpoints {got:?}, want {want:?}"));
            }
        }
        let got_all: BTreeSet<String> = cluster.iter().chain(&local).flatten().cloned().collect();
        let want_all = match (&c.cluster, &c.local) {
            (Some(cl), None) => set(cl),
            (None, Some(l)) => set(l),
            _ => set(c.all.as_deref().unwrap_or_default()),
        };
        if got_all != want_all {
            why.push(format!("reachable {got_all:?}, want {want_all:?}"));
        }
        let want_any = !want_all.is_empty() || c.only_remote;
        if port.has_any_endpoints != want_any {
            why.push(format!(
                "has endpoints {}, want {want_any}",
                port.has_any_endpoints
            ));
        }
        if !why.is_empty() {
            failures.push(format!("{}: {}", c.name, why.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
