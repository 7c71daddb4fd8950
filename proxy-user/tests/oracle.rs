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
        let services = index.services_with_ports(kpx::control::cidr::Family::V4);
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

/// An iptables-restore text as kube-proxy's tests compare it: per table, the
/// declared chains, and each chain's rules in order.
type Ruleset = std::collections::BTreeMap<
    String,
    (
        BTreeSet<String>,
        std::collections::BTreeMap<String, Vec<String>>,
    ),
>;

/// Parses `text`, leaving out what is not kube-proxy's restore input (kpx's
/// comments and the `-I` jumps it prints for reference) and the differences
/// between kube-proxy v1.29, which kpx follows, and the test's version and
/// fake environment, none of which changes where a packet goes:
/// - the mark printed `%#08x` (v1.29: 0x004000) vs the fake's "0x4000";
/// - `--random-fully`, which the fake iptables lacks;
/// - nfacct counters added after v1.29: the `ct_state_invalid_dropped_pkts`
///   match, and the `localhost_nps_accepted_pkts` rules, each a counting copy
///   of the NodePort rule that follows it with the same target.
fn ruleset(text: &str) -> Ruleset {
    let mut out = Ruleset::new();
    let mut table = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with("-I ") || line == "COMMIT" {
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
            continue;
        }
        let (declared, rules) = out.entry(table.clone()).or_default();
        if let Some(decl) = line.strip_prefix(':') {
            declared.insert(decl.split(' ').next().unwrap_or_default().to_string());
            continue;
        }
        if line.contains("--nfacct-name localhost_nps_accepted_pkts") {
            continue;
        }
        let rule = line
            .replace("0x004000", "0x4000")
            .replace(" --random-fully", "")
            .replace(" -m nfacct --nfacct-name ct_state_invalid_dropped_pkts", "");
        let rest = rule
            .strip_prefix("-A ")
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
        rules
            .entry(chain.to_string())
            .or_default()
            .push(spec.to_string());
    }
    out
}

#[test]
fn iptables_rules_match_kube_proxys_overall_iptables_rules() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let flags = kpx::control::config::NodeFlags {
        manifests: Some(root.join("tests/oracle/overall_iptables_rules.yaml")),
        hostname_override: Some("test-node".into()),
        bind_address: Some("198.19.255.2".parse().expect("address")),
        cluster_cidr: Some(vec!["198.18.0.0/16".parse().expect("cidr")]),
        ..Default::default()
    };
    let got = kpx::reference::rules(
        &flags,
        kpx::reference::Mode::Iptables,
        kpx::control::cidr::Family::V4,
        true,
    )
    .expect("rules");
    let want = std::fs::read_to_string(root.join("tests/oracle/overall_iptables_rules.expected"))
        .expect("fixture");
    let (got, want) = (ruleset(&got), ruleset(&want));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "tables"
    );
    let mut diffs = Vec::new();
    for (table, (declared, rules)) in &want {
        let (got_declared, got_rules) = &got[table];
        if got_declared != declared {
            diffs.push(format!(
                "{table}: chains {:?} missing, {:?} extra",
                declared.difference(got_declared).collect::<Vec<_>>(),
                got_declared.difference(declared).collect::<Vec<_>>()
            ));
        }
        for chain in rules
            .keys()
            .chain(got_rules.keys())
            .collect::<BTreeSet<_>>()
        {
            let (w, g) = (rules.get(chain), got_rules.get(chain));
            if w != g {
                diffs.push(format!("{table} {chain}:\n  want {w:#?}\n  got  {g:#?}"));
            }
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}
