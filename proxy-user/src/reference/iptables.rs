//! kube-proxy's iptables mode: the `iptables-restore` input of one full
//! sync (filter and nat tables), preceded in each table by the jumps from
//! the built-in chains that kube-proxy installs with `iptables -I`.
//! Load it into a namespace without kube-proxy rules with
//! `iptables-restore --noflush`.
//!
//! Long because it follows kube-proxy's single syncProxyRules rule by rule,
//! in its order, so the two can be read side by side.

use std::fmt::Write as _;

use super::{endpoint_string, hash16, NodePorts, Port, Settings};
use crate::control::model::{Endpoint, ServicePort, Svc};

const SERVICES: &str = "KUBE-SERVICES";
const EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
const NODEPORTS: &str = "KUBE-NODEPORTS";
const POSTROUTING: &str = "KUBE-POSTROUTING";
const MARK_MASQ: &str = "KUBE-MARK-MASQ";
const FORWARD: &str = "KUBE-FORWARD";
const PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
const KUBELET_FIREWALL: &str = "KUBE-FIREWALL";

/// Above this many endpoints kube-proxy drops the per-endpoint comments.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// kube-proxy's iptablesJumpChains: (table, chain, from, comment, extra).
const JUMPS: [(&str, &str, &str, &str, &str); 12] = [
    (
        "filter",
        EXTERNAL_SERVICES,
        "INPUT",
        "kubernetes externally-visible service portals",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        EXTERNAL_SERVICES,
        "FORWARD",
        "kubernetes externally-visible service portals",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        NODEPORTS,
        "INPUT",
        "kubernetes health check service ports",
        "",
    ),
    (
        "filter",
        SERVICES,
        "FORWARD",
        "kubernetes service portals",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        SERVICES,
        "OUTPUT",
        "kubernetes service portals",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        FORWARD,
        "FORWARD",
        "kubernetes forwarding rules",
        "",
    ),
    (
        "filter",
        PROXY_FIREWALL,
        "INPUT",
        "kubernetes load balancer firewall",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        PROXY_FIREWALL,
        "OUTPUT",
        "kubernetes load balancer firewall",
        "-m conntrack --ctstate NEW",
    ),
    (
        "filter",
        PROXY_FIREWALL,
        "FORWARD",
        "kubernetes load balancer firewall",
        "-m conntrack --ctstate NEW",
    ),
    ("nat", SERVICES, "OUTPUT", "kubernetes service portals", ""),
    (
        "nat",
        SERVICES,
        "PREROUTING",
        "kubernetes service portals",
        "",
    ),
    (
        "nat",
        POSTROUTING,
        "POSTROUTING",
        "kubernetes postrouting rules",
        "",
    ),
];

/// The chain names of one service port (prefix + portProtoHash).
fn chain(prefix: &str, p: &Port) -> String {
    format!("{prefix}{}", hash16(&format!("{}{}", p.name, p.proto)))
}

/// KUBE-SEP-*: the hash also covers the endpoint.
fn endpoint_chain(p: &Port, e: &Endpoint) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{}{}{}", p.name, p.proto, endpoint_string(e)))
    )
}

/// A line buffer, as kube-proxy's LineBuffer: words joined by spaces.
#[derive(Default)]
struct Lines(String);

impl Lines {
    fn line(&mut self, words: &[&str]) {
        let words: Vec<&str> = words.iter().copied().filter(|w| !w.is_empty()).collect();
        self.0.push_str(&words.join(" "));
        self.0.push('\n');
    }
    /// `-A CHAIN -m comment --comment C -m P -p P -d IP --dport PORT -j T`:
    /// the shape of every rule about one service address.
    fn address_rule(
        &mut self,
        chain: &str,
        comment: &str,
        m_proto: &str,
        ip: &str,
        port: &str,
        target: &str,
    ) {
        self.line(&[
            "-A",
            chain,
            "-m comment --comment",
            comment,
            m_proto,
            "-d",
            ip,
            "--dport",
            port,
            "-j",
            target,
        ]);
    }
    fn chain(&mut self, name: &str) {
        let _ = writeln!(self.0, ":{name} - [0:0]");
    }
}

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

/// The whole restore input for `services` on this node.
pub fn render(services: &[(Svc, Vec<ServicePort>)], s: &Settings) -> String {
    let ports = Port::all(services);
    let mark = s.mark();
    let mark_match = format!("{mark}/{mark}");
    let (if_local, if_not_local) = match &s.cluster_cidr {
        Some(c) => (format!("-s {c}"), format!("! -s {c}")),
        None => (String::new(), String::new()),
    };
    let total_endpoints: usize = ports.iter().map(|p| p.sp.endpoints.len()).sum();
    let large = total_endpoints > LARGE_CLUSTER_ENDPOINTS;
    let comment = |c: &str| {
        if large {
            String::new()
        } else {
            format!("-m comment --comment {c}")
        }
    };

    let (mut filter_chains, mut filter_rules) = (Lines::default(), Lines::default());
    let (mut nat_chains, mut nat_rules) = (Lines::default(), Lines::default());
    for c in [
        SERVICES,
        EXTERNAL_SERVICES,
        FORWARD,
        NODEPORTS,
        PROXY_FIREWALL,
    ] {
        filter_chains.chain(c);
    }
    for c in [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ] {
        nat_chains.chain(c);
    }
    nat_rules.line(&[
        "-A",
        POSTROUTING,
        "-m mark ! --mark",
        &mark_match,
        "-j RETURN",
    ]);
    nat_rules.line(&["-A", POSTROUTING, "-j MARK --xor-mark", &mark]);
    nat_rules.line(&[
        "-A",
        POSTROUTING,
        "-m comment --comment",
        &quoted("kubernetes service traffic requiring SNAT"),
        "-j MASQUERADE --random-fully",
    ]);
    nat_rules.line(&["-A", MARK_MASQ, "-j MARK --or-mark", &mark]);
    if s.localhost_nodeports() {
        filter_chains.chain(KUBELET_FIREWALL);
        filter_rules.line(&[
            "-A",
            KUBELET_FIREWALL,
            "-m comment --comment",
            &quoted("block incoming localnet connections"),
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        ]);
    }

    for p in &ports {
        let (svc, proto, name) = (p.svc, p.proto, p.name);
        let m_proto = format!("-m {proto} -p {proto}");
        let port = p.sp.port.to_string();
        let cluster_chain = chain("KUBE-SVC-", p);
        let local_chain = chain("KUBE-SVL-", p);
        let fw_chain = chain("KUBE-FW-", p);
        let ext_chain = chain("KUBE-EXT-", p);
        let internal_chain = if svc.internal_local {
            &local_chain
        } else {
            &cluster_chain
        };
        let external_policy_chain = if svc.external_local {
            &local_chain
        } else {
            &cluster_chain
        };
        let uses_fw = p.has_endpoints && !svc.lb_ips.is_empty() && !svc.lb_source_ranges.is_empty();
        let lb_chain = if uses_fw { &fw_chain } else { &ext_chain };
        let no_endpoints = quoted(&format!("{name} has no endpoints"));
        let no_local = quoted(&format!("{name} has no local endpoints"));
        let (internal_target, internal_comment, external_target, external_comment) =
            if !p.has_endpoints {
                ("REJECT", &no_endpoints, "REJECT", &no_endpoints)
            } else {
                ("DROP", &no_local, "DROP", &no_local)
            };

        for ip in &svc.cluster_ips {
            let ip = ip.to_string();
            if p.has_internal {
                nat_rules.address_rule(
                    SERVICES,
                    &quoted(&format!("{name} cluster IP")),
                    &m_proto,
                    &ip,
                    &port,
                    internal_chain,
                );
            } else {
                filter_rules.address_rule(
                    SERVICES,
                    internal_comment,
                    &m_proto,
                    &ip,
                    &port,
                    internal_target,
                );
            }
        }
        for ip in &svc.external_ips {
            let ip = ip.to_string();
            if p.has_endpoints {
                nat_rules.address_rule(
                    SERVICES,
                    &quoted(&format!("{name} external IP")),
                    &m_proto,
                    &ip,
                    &port,
                    &ext_chain,
                );
            }
            if !p.has_external {
                filter_rules.address_rule(
                    EXTERNAL_SERVICES,
                    external_comment,
                    &m_proto,
                    &ip,
                    &port,
                    external_target,
                );
            }
        }
        for ip in &svc.lb_ips {
            let ip = ip.to_string();
            if p.has_endpoints {
                nat_rules.address_rule(
                    SERVICES,
                    &quoted(&format!("{name} loadbalancer IP")),
                    &m_proto,
                    &ip,
                    &port,
                    lb_chain,
                );
            }
            if uses_fw {
                filter_rules.address_rule(
                    PROXY_FIREWALL,
                    &quoted(&format!("{name} traffic not accepted by {fw_chain}")),
                    &m_proto,
                    &ip,
                    &port,
                    "DROP",
                );
            }
        }
        if !p.has_external {
            for ip in &svc.lb_ips {
                filter_rules.address_rule(
                    EXTERNAL_SERVICES,
                    external_comment,
                    &m_proto,
                    &ip.to_string(),
                    &port,
                    external_target,
                );
            }
        }
        if let Some(np) = p.sp.node_port {
            let np = np.to_string();
            if p.has_endpoints {
                nat_rules.line(&[
                    "-A",
                    NODEPORTS,
                    "-m comment --comment",
                    name,
                    &m_proto,
                    "--dport",
                    &np,
                    "-j",
                    &ext_chain,
                ]);
            }
            if !p.has_external {
                filter_rules.line(&[
                    "-A",
                    EXTERNAL_SERVICES,
                    "-m comment --comment",
                    external_comment,
                    "-m addrtype --dst-type LOCAL",
                    &m_proto,
                    "--dport",
                    &np,
                    "-j",
                    external_target,
                ]);
            }
        }
        if let Some(hc) = svc.health_check_node_port {
            filter_rules.line(&[
                "-A",
                NODEPORTS,
                "-m comment --comment",
                &quoted(&format!("{name} health check node port")),
                "-m tcp -p tcp --dport",
                &hc.to_string(),
                "-j ACCEPT",
            ]);
        }

        // Internal traffic: masquerade what does not come from a pod.
        if p.has_internal {
            for ip in &svc.cluster_ips {
                let ip = ip.to_string();
                let matches = [
                    "-m comment --comment",
                    &quoted(&format!("{name} cluster IP")),
                    &m_proto,
                    "-d",
                    &ip,
                    "--dport",
                    &port,
                ]
                .join(" ");
                if s.masquerade_all {
                    nat_rules.line(&["-A", internal_chain, &matches, "-j", MARK_MASQ]);
                } else if s.cluster_cidr.is_some() {
                    nat_rules.line(&[
                        "-A",
                        internal_chain,
                        &matches,
                        &if_not_local,
                        "-j",
                        MARK_MASQ,
                    ]);
                }
            }
        }
        if p.uses_external_chain {
            nat_chains.chain(&ext_chain);
            if !svc.external_local {
                nat_rules.line(&[
                    "-A",
                    &ext_chain,
                    "-m comment --comment",
                    &quoted(&format!(
                        "masquerade traffic for {name} external destinations"
                    )),
                    "-j",
                    MARK_MASQ,
                ]);
            } else {
                if s.cluster_cidr.is_some() {
                    nat_rules.line(&[
                        "-A",
                        &ext_chain,
                        "-m comment --comment",
                        &quoted(&format!("pod traffic for {name} external destinations")),
                        &if_local,
                        "-j",
                        &cluster_chain,
                    ]);
                }
                nat_rules.line(&[
                    "-A",
                    &ext_chain,
                    "-m comment --comment",
                    &quoted(&format!(
                        "masquerade LOCAL traffic for {name} external destinations"
                    )),
                    "-m addrtype --src-type LOCAL -j",
                    MARK_MASQ,
                ]);
                nat_rules.line(&[
                    "-A",
                    &ext_chain,
                    "-m comment --comment",
                    &quoted(&format!(
                        "route LOCAL traffic for {name} external destinations"
                    )),
                    "-m addrtype --src-type LOCAL -j",
                    &cluster_chain,
                ]);
            }
            if p.has_external {
                nat_rules.line(&["-A", &ext_chain, "-j", external_policy_chain]);
            }
        }
        if uses_fw {
            nat_chains.chain(&fw_chain);
            let head = format!(
                "-A {fw_chain} -m comment --comment {}",
                quoted(&format!("{name} loadbalancer IP"))
            );
            let mut allow_from_node = false;
            for r in &svc.lb_source_ranges {
                nat_rules.line(&[&head, "-s", &r.to_string(), "-j", &ext_chain]);
                allow_from_node |= s.node_ip.is_some_and(|ip| r.contains(&ip));
            }
            if allow_from_node {
                for ip in &svc.lb_ips {
                    nat_rules.line(&[&head, "-s", &ip.to_string(), "-j", &ext_chain]);
                }
            }
            nat_rules.line(&[
                "-A",
                &fw_chain,
                "-m comment --comment",
                &quoted(&format!(
                    "other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"
                )),
            ]);
        }
        if p.uses_cluster_chain {
            nat_chains.chain(&cluster_chain);
            to_endpoints(&mut nat_rules, p, &cluster_chain, &p.cluster, &comment);
        }
        if p.uses_local_chain {
            nat_chains.chain(&local_chain);
            to_endpoints(&mut nat_rules, p, &local_chain, &p.local, &comment);
        }
        for e in &p.reachable {
            let sep = endpoint_chain(p, e);
            nat_chains.chain(&sep);
            let head = format!("-A {sep} {}", comment(name));
            nat_rules.line(&[&head, "-s", &e.addr.to_string(), "-j", MARK_MASQ]);
            let affinity = if svc.affinity_timeout > 0 {
                format!("-m recent --name {sep} --set")
            } else {
                String::new()
            };
            nat_rules.line(&[
                &head,
                &affinity,
                &m_proto,
                "-j DNAT --to-destination",
                &endpoint_string(e),
            ]);
        }
    }

    // The NodePorts chain comes last in KUBE-SERVICES.
    let np_comment =
        quoted("kubernetes service nodeports; NOTE: this must be the last rule in this chain");
    match &s.nodeports {
        NodePorts::All => {
            // IPv6's ::1 never takes NodePorts; IPv4's loopback only
            // with localhostNodePorts.
            let not_localhost = if s.localhost_nodeports() {
                String::new()
            } else {
                format!("! -d {}", s.loopback())
            };
            nat_rules.line(&[
                "-A",
                SERVICES,
                "-m comment --comment",
                &np_comment,
                "-m addrtype --dst-type LOCAL",
                &not_localhost,
                "-j",
                NODEPORTS,
            ]);
        }
        NodePorts::Only(ips) => {
            for ip in ips
                .iter()
                .filter(|ip| !ip.is_loopback() || s.localhost_nodeports())
            {
                nat_rules.line(&[
                    "-A",
                    SERVICES,
                    "-m comment --comment",
                    &np_comment,
                    "-d",
                    &ip.to_string(),
                    "-j",
                    NODEPORTS,
                ]);
            }
        }
    }
    if !s.tcp_be_liberal {
        filter_rules.line(&["-A", FORWARD, "-m conntrack --ctstate INVALID -j DROP"]);
    }
    filter_rules.line(&[
        "-A",
        FORWARD,
        "-m comment --comment",
        &quoted("kubernetes forwarding rules"),
        "-m mark --mark",
        &mark_match,
        "-j ACCEPT",
    ]);
    filter_rules.line(&[
        "-A",
        FORWARD,
        "-m comment --comment",
        &quoted("kubernetes forwarding conntrack rule"),
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]);

    let mut out = format!(
        "# kube-proxy iptables mode (v1.29 proxier) for node {:?}, generated by kpx iptables-rules.\n\
         # Load into a namespace without kube-proxy rules: iptables-restore --noflush < FILE\n",
        s.node_name
    );
    for (table, chains, rules) in [
        ("filter", &filter_chains, &filter_rules),
        ("nat", &nat_chains, &nat_rules),
    ] {
        let _ = writeln!(out, "*{table}");
        out.push_str(&chains.0);
        out.push_str(&jumps(table, s));
        out.push_str(&rules.0);
        out.push_str("COMMIT\n");
    }
    out
}

/// The jumps kube-proxy keeps at the top of the built-in chains (each
/// `iptables -I`, so the last listed ends up first, as kube-proxy's).
fn jumps(table: &str, s: &Settings) -> String {
    let mut out = Lines::default();
    let _ = writeln!(
        out.0,
        "# jumps from the built-in chains (kube-proxy's EnsureRule, outside its restore)"
    );
    for (t, to, from, comment, extra) in JUMPS {
        if t == table {
            out.line(&[
                "-I",
                from,
                extra,
                "-m comment --comment",
                &quoted(comment),
                "-j",
                to,
            ]);
        }
    }
    // kubelet's firewall chain, which kube-proxy also ensures; it only has
    // a rule (declared above) with localhost NodePorts.
    if table == "filter" && s.localhost_nodeports() {
        for from in ["INPUT", "OUTPUT"] {
            out.line(&["-I", from, "-j", KUBELET_FIREWALL]);
        }
    }
    out.0
}

/// writeServiceToEndpointRules: affinity checks, then the random choice.
fn to_endpoints(
    rules: &mut Lines,
    p: &Port,
    chain: &str,
    eps: &[Endpoint],
    comment: &dyn Fn(&str) -> String,
) {
    if p.svc.affinity_timeout > 0 {
        for e in eps {
            let sep = endpoint_chain(p, e);
            rules.line(&[
                "-A",
                chain,
                &comment(&quoted(&format!("{} -> {}", p.name, endpoint_string(e)))),
                "-m recent --name",
                &sep,
                "--rcheck --seconds",
                &p.svc.affinity_timeout.to_string(),
                "--reap -j",
                &sep,
            ]);
        }
    }
    let n = eps.len();
    for (i, e) in eps.iter().enumerate() {
        let probability = if i + 1 < n {
            format!(
                "-m statistic --mode random --probability {:.10}",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        rules.line(&[
            "-A",
            chain,
            &comment(&quoted(&format!("{} -> {}", p.name, endpoint_string(e)))),
            &probability,
            "-j",
            &endpoint_chain(p, e),
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{control::index::Index, control::model::NodeInfo, reference::Settings};

    /// kube-proxy's basic proxier test case (ns1/svc1, port p80), with
    /// addresses from this project's ranges.
    const SVC1: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  clusterIP: 198.19.0.41
  ports: [{name: p80, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc1-a
  namespace: ns1
  labels: {kubernetes.io/service-name: svc1}
addressType: IPv4
ports: [{name: p80, port: 80, protocol: TCP}]
endpoints:
- addresses: ["198.18.1.1"]
"#;

    fn render_yaml(yaml: &str, s: &Settings) -> String {
        let mut loaded = crate::control::manifests::Loaded::default();
        crate::control::manifests::parse_file("test", yaml, &mut loaded);
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        let mut index = Index::new(NodeInfo::named("node-1"));
        index.replace_all(loaded.services, loaded.slices);
        render(&index.services_with_ports(s.family), s)
    }

    #[test]
    fn a_dual_stack_service_gets_each_familys_rules_from_each_proxier() {
        use crate::control::cidr::Family;
        let dual = SVC1.replace(
            "  clusterIP: 198.19.0.41\n",
            "  clusterIP: 198.19.0.41\n  clusterIPs: [198.19.0.41, '2001:2:0:ff::41']\n  externalIPs: [198.18.9.1, '2001:2:0:9::1']\n",
        ) + "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc1-b
  namespace: ns1
  labels: {kubernetes.io/service-name: svc1}
addressType: IPv6
ports: [{name: p80, port: 80, protocol: TCP}]
endpoints:
- addresses: ['2001:2:0:1::1']
";
        let v4 = render_yaml(&dual, &Settings::new("node-1"));
        let v6 = render_yaml(
            &dual,
            &Settings {
                family: Family::V6,
                cluster_cidr: Some("2001:2::/56".parse().unwrap()),
                ..Settings::new("node-1")
            },
        );
        // Each proxier has its own family's addresses only.
        assert!(
            v4.contains("-d 198.19.0.41 --dport 80") && !v4.contains("2001:2"),
            "{v4}"
        );
        assert!(!v6.contains("198."), "{v6}");
        let sep = endpoint_chain_for("ns1/svc1:p80", "tcp", "[2001:2:0:1::1]:80");
        for line in [
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 2001:2:0:ff::41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O".to_string(),
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 2001:2:0:ff::41 --dport 80 ! -s 2001:2::/56 -j KUBE-MARK-MASQ".into(),
            format!("-A {sep} -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination [2001:2:0:1::1]:80"),
            // ::1 never takes NodePorts; no localnet firewall on IPv6.
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS".into(),
        ] {
            assert!(v6.lines().any(|l| l == line), "missing {line:?} in\n{v6}");
        }
        assert!(v6.contains("-d 2001:2:0:9::1"), "{v6}");
        assert!(!v6.contains("KUBE-FIREWALL"), "{v6}");
    }

    #[test]
    fn a_cluster_ip_service_gets_kube_proxys_chains_and_rules() {
        let s = Settings {
            cluster_cidr: Some("198.18.0.0/16".parse().unwrap()),
            ..Settings::new("node-1")
        };
        let out = render_yaml(SVC1, &s);
        let sep = endpoint_chain_for("ns1/svc1:p80", "tcp", "198.18.1.1:80");
        let want = [
            ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]".to_string(),
            format!(":{sep} - [0:0]"),
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 198.19.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O".into(),
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 198.19.0.41 --dport 80 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ".into(),
            format!("-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 198.18.1.1:80\" -j {sep}"),
            format!("-A {sep} -m comment --comment ns1/svc1:p80 -s 198.18.1.1 -j KUBE-MARK-MASQ"),
            format!("-A {sep} -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 198.18.1.1:80"),
            "-A KUBE-POSTROUTING -m mark ! --mark 0x004000/0x004000 -j RETURN".into(),
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000".into(),
        ];
        for line in &want {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
        // The NodePorts jump is the last rule of KUBE-SERVICES.
        let last = out
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES "))
            .unwrap();
        assert!(
            last.ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"),
            "{last}"
        );
    }

    #[test]
    fn probabilities_and_large_cluster_mode_follow_kube_proxy() {
        let eps: String = (2..=4)
            .map(|i| format!("- addresses: [\"198.18.1.{i}\"]\n"))
            .collect();
        let out = render_yaml(&format!("{SVC1}{eps}"), &Settings::new("node-1"));
        // n endpoints: 1/n, 1/(n-1), ..., the last unconditional.
        assert!(out.contains("--probability 0.2500000000"), "{out}");
        assert!(out.contains("--probability 0.3333333333"));
        assert!(out.contains("--probability 0.5000000000"));
        // Without a cluster CIDR nothing is masqueraded for its source.
        assert!(!out
            .lines()
            .any(|l| l.contains("cluster IP\"") && l.ends_with("-j KUBE-MARK-MASQ")));

        let many: String = (0..1001)
            .map(|i| {
                format!(
                    "- addresses: [\"198.18.{}.{}\"]\n",
                    10 + i / 250,
                    1 + i % 250
                )
            })
            .collect();
        let out = render_yaml(&format!("{SVC1}{many}"), &Settings::new("node-1"));
        assert!(
            !out.contains("-m comment --comment ns1/svc1:p80 -s"),
            "over 1000 endpoints, per-endpoint comments are dropped"
        );
        assert!(out.contains("ns1/svc1:p80 cluster IP"));
    }

    fn endpoint_chain_for(name: &str, proto: &str, ep: &str) -> String {
        format!("KUBE-SEP-{}", hash16(&format!("{name}{proto}{ep}")))
    }
}
