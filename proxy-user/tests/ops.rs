//! What an operator relies on when kpx replaces kube-proxy: the health
//! server kubelet probes, the health check node ports cloud load balancers
//! probe, the metrics, the KubeProxyConfiguration file, and removing
//! kube-proxy's leftover rules. All over real HTTP from a running agent, in
//! namespaces the tests create.

mod bed;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use bed::*;
use testbed::{
    apiserver::{ApiServer, Kind},
    service_yaml_with, tcp_ask_many, wait_for, Cluster, Netns, READY,
};

const API: &str = "127.0.0.1:6443";
const NODE_IP: &str = "198.18.0.1";

fn node_yaml(extra_spec: &str) -> String {
    format!(
        "apiVersion: v1
kind: Node
metadata: {{name: node-1}}
spec: {{{extra_spec}}}
status:
  addresses: [{{type: InternalIP, address: {NODE_IP}}}]
"
    )
}

fn on_api(extra: &[&str]) -> (Cluster, ApiServer) {
    let mut c = start(&backends());
    let api = ApiServer::start_with(c.binder(API.parse().unwrap())).unwrap();
    api.apply_yaml(&node_yaml("")).unwrap();
    api.apply_all(&web(&c, &["web-1", "web-2"])).unwrap();
    c.start_agent_kube(Path::new(KPX), &api, extra).unwrap();
    wait_synced(&c, 2, &[2, 2]);
    (c, api)
}

/// `n` TCP exchanges from the client pod through the VIP, all answered.
fn through_vip(c: &Cluster, n: usize) {
    let ids = tcp_ask_many(&c.pod("client").netns, SocketAddrV4::new(VIP, 80), n, T)
        .unwrap_or_else(|e| panic!("through the VIP: {e:#}\n{}", c.agent_log()));
    assert_eq!(ids.len(), n);
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

fn get(c: &Cluster, addr: &str, path: &str) -> (u16, serde_json::Value) {
    let (code, body) = http_get(c, addr, path)
        .unwrap_or_else(|e| panic!("GET {addr}{path}: {e}\n{}", c.agent_log()));
    (code, json(&body))
}

/// Waits until GET answers `code`; returns the body.
fn until(c: &Cluster, addr: &str, path: &str, code: u16) -> serde_json::Value {
    wait_for(Duration::from_secs(10), || {
        let (got, body) = http_get(c, addr, path).ok()?;
        (got == code).then(|| json(&body))
    })
    .unwrap_or_else(|| {
        panic!(
            "GET {addr}{path} never answered {code} (last: {:?})\n{}",
            http_get(c, addr, path),
            c.agent_log()
        )
    })
}

#[test]
#[ignore = "needs root"]
fn healthz_and_livez_answer_like_kube_proxy_and_drain_a_node_being_removed() {
    let (c, api) = on_api(&[]);
    let h = "127.0.0.1:10256";
    let (code, body) = get(&c, h, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["nodeEligible"], true);
    // RFC 3339 times; a healthy answer reports lastUpdated as now.
    let now: k8s_openapi::jiff::Timestamp = body["currentTime"].as_str().unwrap().parse().unwrap();
    let last: k8s_openapi::jiff::Timestamp = body["lastUpdated"].as_str().unwrap().parse().unwrap();
    assert_eq!(now, last);
    let (code, body) = get(&c, h, "/livez");
    assert_eq!(code, 200, "{body}");
    assert!(body.get("nodeEligible").is_none());

    // The cluster autoscaler marks the node for removal: /healthz turns 503
    // so load balancers drain it; /livez (kubelet's liveness) stays 200.
    api.apply_yaml(&node_yaml(
        "taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]",
    ))
    .unwrap();
    let body = until(&c, h, "/healthz", 503);
    assert_eq!(body["nodeEligible"], false);
    assert_eq!(get(&c, h, "/livez").0, 200);
    api.apply_yaml(&node_yaml("")).unwrap();
    until(&c, h, "/healthz", 200);

    // Everything the agent asked the API for is granted by deploy/rbac.yaml.
    let asked = api.calls().audit.lock().unwrap().clone();
    let granted = rbac_grants(&deploy_role());
    assert!(!asked.is_empty());
    assert!(
        asked.is_subset(&granted),
        "asked {asked:?}, granted {granted:?}"
    );

    let m = metrics(&c);
    assert!(metric(&m, "kubeproxy_proxy_healthz_total{code=\"503\"}") >= 1.0);
    assert!(metric(&m, "kubeproxy_proxy_livez_total{code=\"200\"}") >= 2.0);
}

#[test]
#[ignore = "needs root"]
fn metrics_report_maps_datapath_verdicts_and_conntrack() {
    let (c, _api) = on_api(&[]);
    through_vip(&c, 25);
    // The datapath's counters are mirrored every 5 s.
    let m = wait_for(Duration::from_secs(15), || {
        let m = metrics(&c);
        (try_metric(&m, "kpx_datapath_packets_total{verdict=\"new_flow\"}")? >= 25.0).then_some(m)
    })
    .unwrap_or_else(|| panic!("no new_flow packets counted:\n{}", metrics(&c)));
    assert!(metric(&m, "kpx_datapath_packets_total{verdict=\"ct_reply\"}") >= 25.0);
    assert_eq!(metric(&m, "kpx_map_entries{map=\"KPX_SERVICES\"}"), 2.0);
    // Two endpoints, each on a TCP and a UDP port.
    assert_eq!(metric(&m, "kpx_backends"), 4.0);
    assert_eq!(metric(&m, "kpx_map_entries{map=\"KPX_SLOTS\"}"), 4.0);
    assert_eq!(
        metric(&m, "kpx_map_capacity{map=\"KPX_CT_TCP\"}"),
        f64::from(proxy_common::capacity::CT_TCP)
    );
    assert_eq!(
        metric(&m, "kpx_map_capacity{map=\"KPX_CT_ANY\"}"),
        f64::from(proxy_common::capacity::CT_ANY)
    );
    assert!(metric(&m, "kpx_datapath_events_total{event=\"ct_inserted\"}") >= 50.0);
    assert_eq!(
        metric(&m, "kpx_datapath_drops_total{reason=\"no_backend\"}"),
        0.0
    );
    assert_eq!(metric(&m, "kpx_conntrack_evictions_total"), 0.0);
    // Full (1) at load; rebuilt once the programs are attached: the
    // flows' reply bits alone, a few of 2^20.
    let fill = metric(&m, "kpx_reply_filter_fill_ratio");
    assert!(fill < 0.001, "reply filter not rebuilt: {fill}");
    // The same bits in the destinations' blocks: rebuilt with it.
    let dests = metric(&m, "kpx_dest_filter_fill_ratio");
    assert!(dests < 0.001, "destination filter not rebuilt: {dests}");
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_total",
    ] {
        try_metric(&m, name).unwrap_or_else(|| panic!("no {name}"));
    }
}

/// A LoadBalancer with externalTrafficPolicy Local, health checked on 32100;
/// each endpoint given as (pod, node it runs on).
fn local_lb(c: &Cluster, endpoints: &[(&str, &str)]) -> String {
    let conds: Vec<String> = endpoints
        .iter()
        .map(|(_, node)| format!("{READY}\n  nodeName: {node}"))
        .collect();
    let eps: Vec<(Ipv4Addr, &str)> = endpoints
        .iter()
        .zip(&conds)
        .map(|((pod, _), cond)| (c.pod(pod).ip, cond.as_str()))
        .collect();
    service_yaml_with(
        "lb",
        Ipv4Addr::new(198, 19, 0, 20),
        (80, 8080),
        (53, 5353),
        &eps,
        "type: LoadBalancer\nexternalTrafficPolicy: Local\nhealthCheckNodePort: 32100\nports: [{name: tcp, port: 80, protocol: TCP, nodePort: 30080}, {name: udp, port: 53, protocol: UDP, nodePort: 30053}]",
    )
}

#[test]
#[ignore = "needs root"]
fn health_check_node_ports_answer_with_the_local_endpoint_count() {
    let (c, api) = on_api(&[]);
    let hc = format!("{NODE_IP}:32100");
    api.apply_all(&local_lb(
        &c,
        &[
            ("web-1", "node-1"),
            ("web-2", "node-1"),
            ("web-3", "node-2"),
        ],
    ))
    .unwrap();
    let body = until(&c, &hc, "/", 200);
    assert_eq!(body["localEndpoints"], 2, "{body}");
    assert_eq!(body["service"]["namespace"], "default");
    assert_eq!(body["service"]["name"], "lb");
    assert_eq!(body["serviceProxyHealthy"], true);

    // Only a remote endpoint left: this node must not get LB traffic.
    api.apply_all(&local_lb(&c, &[("web-3", "node-2")]))
        .unwrap();
    let body = until(&c, &hc, "/", 503);
    assert_eq!(body["localEndpoints"], 0, "{body}");

    // Back on this node, then the Service goes: the port closes.
    api.apply_all(&local_lb(&c, &[("web-1", "node-1")]))
        .unwrap();
    assert_eq!(until(&c, &hc, "/healthz", 200)["localEndpoints"], 1);
    assert!(api.delete(Kind::Service, "default", "lb"));
    let closed = wait_for(Duration::from_secs(10), || {
        http_get(&c, &hc, "/").is_err().then_some(())
    });
    assert!(closed.is_some(), "{}", c.agent_log());
}

#[test]
#[ignore = "needs root"]
fn a_kube_proxy_configuration_file_configures_the_agent_and_flags_win() {
    let mut c = start(&backends());
    let api = ApiServer::start_with(c.binder(API.parse().unwrap())).unwrap();
    api.apply_yaml(&node_yaml("")).unwrap();
    api.apply_all(&web(&c, &["web-1"])).unwrap();
    let kubeconfig = c.bpffs().with_file_name("kubeconfig.conf");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let config = c.bpffs().with_file_name("config.conf");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {}}}
hostnameOverride: node-1
bindAddress: {NODE_IP}
healthzBindAddress: 0.0.0.0:20256
metricsBindAddress: 127.0.0.1:20249
clusterCIDR: 198.18.0.0/16
featureGates: {{SomeAlphaGate: true}}
ipvs: {{scheduler: rr}}
iptables: {{syncPeriod: 45s, minSyncPeriod: 0s}}
conntrack: {{tcpEstablishedTimeout: 1h, maxPerCore: 0}}
",
            kubeconfig.display()
        ),
    )
    .unwrap();
    // The node is migrating from kube-proxy: its rules are still there.
    in_ns(
        &c.node,
        "iptables-nft-restore",
        &[],
        Some(KUBE_PROXY_IPTABLES),
    );
    // The agent finds the API through the file's kubeconfig alone.
    c.spawn_agent(
        Path::new(KPX),
        &["--config", config.to_str().unwrap()],
        &[
            "--metrics-bind-address",
            "127.0.0.1:30249",
            "--cleanup-kube-proxy",
        ],
    )
    .unwrap();
    wait_synced(&c, 2, &[1, 1]);
    // After its first sync the agent removed kube-proxy's rules, and the
    // service is served by kpx alone.
    let cleaned = wait_for(Duration::from_secs(10), || {
        c.agent_log()
            .contains("kube-proxy cleanup: iptables-nft: removed 13 kube-proxy chains")
            .then_some(())
    });
    assert!(cleaned.is_some(), "{}", c.agent_log());
    let left = in_ns(&c.node, "iptables-nft-save", &[], None);
    assert!(
        !left.contains("KUBE-SVC-") && left.contains("MY-NAT"),
        "{left}"
    );
    through_vip(&c, 10);
    assert_eq!(
        until(&c, "127.0.0.1:20256", "/healthz", 200)["nodeEligible"],
        true
    );
    // The flag wins over the file's metricsBindAddress.
    let m = metrics_at(&c, "127.0.0.1:30249");
    assert!(m.contains("kubeproxy_sync_proxy_rules_duration_seconds"));
    assert!(http_get(&c, "127.0.0.1:20249", "/metrics").is_err());
    let log = c.agent_log();
    assert!(log.contains("ignoring featureGates.SomeAlphaGate"), "{log}");
    // ipvs.scheduler is the one IPVS setting kpx acts on.
    assert!(!log.contains("ignoring ipvs"), "{log}");
    assert!(log.contains("scheduler rr)"), "{log}");
    let view = String::from_utf8(kpx_dump(&c.bpffs(), &["services", "--ipvsadm"])).unwrap();
    assert!(view.lines().any(|l| l.ends_with(":80 rr")), "{view}");
    assert!(log.contains("node IPs [198.18.0.1]"), "{log}");
}

#[test]
#[ignore = "needs root"]
fn an_invalid_configuration_file_is_a_start_up_error_naming_the_field() {
    // In a namespace of its own: an agent that did start must not attach to
    // the machine's interfaces.
    let ns = testbed::built(
        "a namespace",
        Netns::create(&format!("kpxcfg{}", std::process::id())),
    );
    let dir = std::env::temp_dir().join(format!("kpx-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    for (yaml, field) in [
        ("clusterCidr: 198.18.0.0/16", "clusterCidr"),
        ("conntrack: {maxPerCore: -5}", "conntrack.maxPerCore"),
    ] {
        std::fs::write(
            &bad,
            format!("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{yaml}\n"),
        )
        .unwrap();
        let out = ns
            .command(Path::new(KPX))
            .unwrap()
            .args(["agent", "--socket-lb=off", "--config"])
            .arg(&bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(field) && err.contains("bad.yaml"), "{err}");
    }
    // A path that does not exist stops the agent before it touches the
    // node, naming the flag and the path.
    for (flag, path) in [
        ("--manifests", "/no/such/path"),
        ("--kubeconfig", "/no/such/kubeconfig"),
    ] {
        let bpffs = format!("/sys/fs/bpf/kpxcfg{}", std::process::id());
        let out = ns
            .command(Path::new(KPX))
            .unwrap()
            .args(["agent", "--socket-lb=off", flag, path, "--bpffs", &bpffs])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {path}: the agent started");
        assert!(err.contains(&format!("{flag} {path}")), "{err}");
        assert!(
            !std::path::Path::new(&bpffs).exists(),
            "{flag} {path}: the agent set up {bpffs} before failing"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// kube-proxy's iptables mode, as `iptables-save` shows it, with a user's
/// own chain and kubelet's chains beside it, which must survive.
const KUBE_PROXY_IPTABLES: &str = "*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
:MY-FILTER - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A INPUT -s 198.18.9.0/24 -j MY-FILTER
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-SERVICES -d 198.19.0.30/32 -p tcp -m comment --comment \"default/empty:http has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A MY-FILTER -p tcp --dport 22 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-IIUZMA2DNHGBKVZL - [0:0]
:KUBE-SEP-SZ5QCONKAQ6RU3GQ - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-LOLE4ISW44XBNF3G - [0:0]
:MY-NAT - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -s 198.18.9.0/24 -j MY-NAT
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-SEP-IIUZMA2DNHGBKVZL -s 198.18.1.1/32 -m comment --comment \"default/web:http\" -j KUBE-MARK-MASQ
-A KUBE-SEP-IIUZMA2DNHGBKVZL -p tcp -m comment --comment \"default/web:http\" -m tcp -j DNAT --to-destination 198.18.1.1:8080
-A KUBE-SEP-SZ5QCONKAQ6RU3GQ -s 198.18.1.2/32 -m comment --comment \"default/web:http\" -j KUBE-MARK-MASQ
-A KUBE-SEP-SZ5QCONKAQ6RU3GQ -p tcp -m comment --comment \"default/web:http\" -m tcp -j DNAT --to-destination 198.18.1.2:8080
-A KUBE-SERVICES -d 198.19.0.10/32 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-LOLE4ISW44XBNF3G
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-LOLE4ISW44XBNF3G ! -s 198.18.0.0/16 -d 198.19.0.10/32 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-LOLE4ISW44XBNF3G -m comment --comment \"default/web:http -> 198.18.1.1:8080\" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-IIUZMA2DNHGBKVZL
-A KUBE-SVC-LOLE4ISW44XBNF3G -m comment --comment \"default/web:http -> 198.18.1.2:8080\" -j KUBE-SEP-SZ5QCONKAQ6RU3GQ
-A MY-NAT -p udp --dport 53 -j DNAT --to-destination 198.18.9.53:53
COMMIT
";

const KUBE_PROXY_NFT: &str = "table ip kube-proxy {
  chain services {
    ip daddr 198.19.0.10 tcp dport 80 counter
  }
  chain nat-prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }
}
table ip6 kube-proxy {
  chain filter-input {
    type filter hook input priority -110; policy accept;
  }
}
table inet my-firewall {
  chain input {
    type filter hook input priority 0; policy accept;
    tcp dport 22 accept
  }
}
";

fn in_ns(ns: &Netns, program: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write as _;
    let mut cmd = ns.command(Path::new(program)).unwrap();
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{program}: {e}"));
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs root"]
fn cleanup_kube_proxy_removes_its_rules_and_leaves_the_rest() {
    // A namespace of its own: the root namespace's firewall is never touched.
    testbed::require_root();
    let ns = Netns::create(&format!("kpxclean{}", std::process::id())).unwrap();
    in_ns(&ns, "iptables-nft-restore", &[], Some(KUBE_PROXY_IPTABLES));
    in_ns(
        &ns,
        "iptables-legacy-restore",
        &[],
        Some(KUBE_PROXY_IPTABLES),
    );
    in_ns(&ns, "nft", &["-f", "-"], Some(KUBE_PROXY_NFT));
    // IPVS mode's leftovers: its interface holding two service addresses
    // (a dummy there; this kernel has no dummy driver, and the cleanup goes
    // by name), its sets, and a set of someone else's.
    in_ns(
        &ns,
        "ip",
        &[
            "link",
            "add",
            "kube-ipvs0",
            "type",
            "veth",
            "peer",
            "name",
            "kpxpeer0",
        ],
        None,
    );
    for vip in ["198.19.0.10/32", "198.19.0.11/32"] {
        in_ns(&ns, "ip", &["addr", "add", vip, "dev", "kube-ipvs0"], None);
    }
    for (set, kind) in [
        ("KUBE-CLUSTER-IP", "hash:ip,port"),
        ("KUBE-LOOP-BACK", "hash:ip,port,ip"),
        ("MY-SET", "hash:ip"),
    ] {
        in_ns(&ns, "ipset", &["create", set, kind], None);
    }
    let before = in_ns(&ns, "iptables-nft-save", &[], None);
    assert!(before.contains("KUBE-SVC-LOLE4ISW44XBNF3G"));

    let said = in_ns(&ns, KPX, &["cleanup", "--kube-proxy"], None);
    assert!(
        said.contains("iptables-nft: removed 13 kube-proxy chains and 9 rules jumping to them"),
        "{said}"
    );
    assert!(said.contains("iptables-legacy: removed 13"), "{said}");
    assert!(said.contains("deleted table ip kube-proxy"), "{said}");
    assert!(said.contains("deleted table ip6 kube-proxy"), "{said}");
    assert!(
        said.contains("ipvs: deleted interface kube-ipvs0 and its 2 service addresses"),
        "{said}"
    );
    assert!(
        said.contains("ipset: destroyed 2 kube-proxy sets"),
        "{said}"
    );
    let links = in_ns(&ns, "ip", &["-o", "link"], None);
    assert!(!links.contains("kube-ipvs0"), "{links}");
    let sets = in_ns(&ns, "ipset", &["list", "-n"], None);
    assert_eq!(sets.trim(), "MY-SET");

    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        let after = in_ns(&ns, save, &[], None);
        // (Each backend lists its tables in its own order.)
        let chains: std::collections::BTreeSet<&str> = after
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| c.starts_with("KUBE-") || c.starts_with("MY-"))
            .collect();
        assert_eq!(
            chains,
            [
                "KUBE-FIREWALL",
                "KUBE-IPTABLES-HINT",
                "KUBE-KUBELET-CANARY",
                "MY-FILTER",
                "MY-NAT"
            ]
            .into(),
            "{save}:\n{after}"
        );
        // kubelet's and the user's rules, and the jumps to them, are intact.
        for rule in [
            "-A INPUT -j KUBE-FIREWALL",
            "-A OUTPUT -j KUBE-FIREWALL",
            "-A INPUT -s 198.18.9.0/24 -j MY-FILTER",
            "-A MY-FILTER -p tcp -m tcp --dport 22 -j ACCEPT",
            "-A PREROUTING -s 198.18.9.0/24 -j MY-NAT",
            "-A MY-NAT -p udp -m udp --dport 53 -j DNAT --to-destination 198.18.9.53:53",
        ] {
            assert!(after.contains(rule), "{save} lost {rule:?}:\n{after}");
        }
        assert!(!after.contains("kubernetes"), "{save}:\n{after}");
    }
    let tables = in_ns(&ns, "nft", &["list", "tables"], None);
    assert!(!tables.contains("kube-proxy"), "{tables}");
    assert!(tables.contains("table inet my-firewall"), "{tables}");

    // Nothing left: a second run changes nothing and says so.
    let again = in_ns(&ns, KPX, &["cleanup", "--kube-proxy"], None);
    assert!(!again.contains("removed"), "{again}");
    assert!(again.contains("nftables: no kube-proxy table"), "{again}");
    assert!(again.contains("ipvs: no kube-ipvs0 interface"), "{again}");
    assert!(again.contains("ipset: no kube-proxy set"), "{again}");
}
