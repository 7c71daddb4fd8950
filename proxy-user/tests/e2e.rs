//! End to end: the real `kpx agent` binary in a node namespace, real TCP and
//! UDP servers in pod namespaces, real clients, traffic through the VIP.

mod bed;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::Command,
    time::Duration,
};

use bed::*;
use kpx::dataplane::maps::MapSet;
use proxy_common::DropReason;
use testbed::{service_yaml, tcp_ask, tcp_ask_many, udp_ask_many, wait_for, Conn, Held, Load};

#[test]
#[ignore = "needs root"]
fn clusterip_tcp_and_udp_reach_every_backend_and_replies_come_from_the_vip() {
    let c = running(&["web-1", "web-2", "web-3"]);
    let client = &c.pod("client").netns;

    let ids = tcp_ask_many(client, SocketAddrV4::new(VIP, 80), 300, T)
        .unwrap_or_else(|e| panic!("TCP through the VIP: {e:#}\n{}", c.agent_log()));
    let tcp = spread(&ids);
    assert_eq!(tcp.len(), 3, "{tcp:?}");
    // 100 each expected; 50 is five standard deviations away.
    assert!(tcp.values().all(|&n| n >= 50), "unfair TCP spread {tcp:?}");

    let answers = udp_ask_many(client, SocketAddrV4::new(VIP, 53), 150, T)
        .unwrap_or_else(|e| panic!("UDP through the VIP: {e:#}\n{}", c.agent_log()));
    for a in &answers {
        assert_eq!(
            a.from,
            SocketAddr::V4(SocketAddrV4::new(VIP, 53)),
            "reply not from the VIP"
        );
    }
    // A reused source port is the same flow.
    let flows = answers
        .iter()
        .map(|a| a.local_port)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let ids: Vec<String> = answers.into_iter().map(|a| a.identity).collect();
    let udp = spread(&ids);
    assert_eq!(udp.len(), 3, "{udp:?}");
    assert!(udp.values().all(|&n| n >= 20), "unfair UDP spread {udp:?}");

    // What `kpx dump` shows matches what was configured and what happened.
    let out = kpx_dump(&c.bpffs(), &["services", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let http = rows.iter().find(|r| r["protocol"] == "TCP").unwrap();
    assert_eq!(http["vip"], VIP.to_string());
    assert_eq!(http["port"], 80);
    assert_eq!(http["name"], "default/web:http");
    let mut got: Vec<String> = http["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| format!("{}:{}", b["addr"].as_str().unwrap(), b["port"]))
        .collect();
    got.sort();
    assert_eq!(
        got,
        ["198.18.1.1:8080", "198.18.1.2:8080", "198.18.1.3:8080"]
    );
    assert_eq!(http["new_flows"], 300);
    let dns = rows.iter().find(|r| r["protocol"] == "UDP").unwrap();
    assert_eq!(
        (dns["port"].as_u64(), dns["new_flows"].as_u64()),
        (Some(53), Some(flows as u64))
    );

    let table = Command::new(KPX)
        .args(["dump", "services", "--bpffs"])
        .arg(c.bpffs())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("198.19.0.10:80") && table.contains("-> 198.18.1.2:8080"),
        "{table}"
    );
}

#[test]
#[ignore = "needs root"]
fn endpoint_changes_apply_without_restart_and_live_connections_keep_their_backend() {
    let c = running(&["web-1", "web-2"]);
    let vip = SocketAddrV4::new(VIP, 80);

    // A long-lived connection, and its backend.
    let mut long = Conn::open(&c.pod("client").netns, vip, T).unwrap();
    let first = long.ask().unwrap();
    assert_eq!(long.peer().unwrap(), SocketAddr::V4(vip));

    // Add web-3: new connections reach it.
    let yaml = web(&c, &["web-1", "web-2", "web-3"]);
    c.write_manifest("web.yaml", &yaml).unwrap();
    wait_synced(&c, 2, &[3, 3]);
    let ids = tcp_ask_many(&c.pod("client").netns, vip, 120, T).unwrap();
    assert!(spread(&ids).contains_key("web-3"), "{:?}", spread(&ids));
    assert_eq!(
        long.ask().unwrap(),
        first,
        "the long-lived connection moved"
    );

    // Remove the long connection's backend from the endpoints... unless it
    // is the only one we would keep; remove another one instead.
    let gone = if first == "web-1" { "web-2" } else { "web-1" };
    let keep: Vec<&str> = ["web-1", "web-2", "web-3"]
        .into_iter()
        .filter(|n| *n != gone)
        .collect();
    let yaml = web(&c, &keep);
    c.write_manifest("web.yaml", &yaml).unwrap();
    wait_synced(&c, 2, &[2, 2]);
    let ids = tcp_ask_many(&c.pod("client").netns, vip, 120, T).unwrap();
    assert!(
        !ids.iter().any(|i| i == gone),
        "removed backend {gone} still reached"
    );
    // `kpx dump` lists the removed backend as such while its flows live.
    let out = Command::new(KPX)
        .args(["dump", "services", "--json", "--bpffs"])
        .arg(c.bpffs())
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let http = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["protocol"] == "TCP")
        .unwrap();
    let gone_ip = c.pod(gone).ip.to_string();
    let mut states = Vec::new();
    for b in http["backends"].as_array().unwrap() {
        let expected = if b["addr"] == gone_ip.as_str() {
            "removed"
        } else {
            "active"
        };
        assert_eq!(b["state"], expected, "{b}");
        states.push(expected);
    }
    // The earlier connections reached every backend, so the removed one has flows.
    assert!(states.contains(&"removed"), "{http}");
    assert_eq!(
        long.ask().unwrap(),
        first,
        "the long-lived connection moved"
    );

    // The service removed from the manifests stops answering.
    c.remove_manifest("web.yaml").unwrap();
    wait_synced(&c, 0, &[]);
    assert!(
        tcp_ask(&c.pod("client").netns, vip, Duration::from_secs(1)).is_err(),
        "VIP still answers"
    );
}

#[test]
#[ignore = "needs root"]
fn malformed_manifests_are_reported_and_the_valid_services_keep_working() {
    let mut c = start(&backends());
    let yaml = web(&c, &["web-1", "web-2", "web-3"]);
    c.write_manifest("web.yaml", &yaml).unwrap();
    let bad = |name: &str, vip: &str| {
        service_yaml(
            name,
            vip.parse().unwrap(),
            (80, 8080),
            (53, 5353),
            &[Ipv4Addr::new(198, 18, 1, 1)],
        )
    };
    let broken = [
        (
            "bad-ip.yaml",
            bad("bad-ip", "198.19.0.20")
                .replace("clusterIP: 198.19.0.20", "clusterIP: 198.19.0.300"),
            "Service default/bad-ip",
            "spec.clusterIP",
        ),
        (
            "bad-port.yaml",
            bad("bad-port", "198.19.0.21").replace("port: 80,", "port: 70000,"),
            "Service default/bad-port",
            "spec.ports[0].port",
        ),
        (
            "bad-proto.yaml",
            bad("bad-proto", "198.19.0.22")
                .replace("protocol: UDP, port: 53,", "protocol: QUIC, port: 53,"),
            "Service default/bad-proto",
            "spec.ports[1].protocol",
        ),
        (
            "no-ports-name.yaml",
            bad("bad-meta", "198.19.0.23").replace(
                "metadata: {name: bad-meta, namespace: default}",
                "metadata: {namespace: default}",
            ),
            "Service default/<unnamed>",
            "metadata.name",
        ),
        (
            "bad-endpoint.yaml",
            bad("bad-ep", "198.19.0.24")
                .replace("addresses: [\"198.18.1.1\"]", "addresses: [\"198.18.1.x\"]"),
            "EndpointSlice default/bad-ep-1",
            "endpoints[0].addresses[0]",
        ),
        (
            "syntax.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n".to_string(),
            "document",
            "-",
        ),
        // This node's own Node: its good address is used, the bad one said.
        (
            "node.yaml",
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {}}}, {{type: ExternalIP, address: 198.18.0.256}}]\n",
                c.node_name, c.node_ip
            ),
            "Node node-1",
            "status.addresses[1].address",
        ),
    ];
    for (file, text, _, _) in &broken {
        c.write_manifest(file, text).unwrap();
    }
    c.start_agent(Path::new(KPX), &[]).unwrap();
    // web's two frontends, plus bad-ep's (whose slice alone was skipped:
    // the service exists with no endpoints).
    wait_synced(&c, 4, &[3, 3, 0, 0]);
    let log = c.agent_log();
    for (file, _, object, field) in &broken {
        let line = log
            .lines()
            .find(|l| l.contains("skipped invalid input") && l.contains(file))
            .unwrap_or_else(|| panic!("no report for {file}:\n{log}"));
        assert!(
            line.contains(object) && line.contains(&format!("field {field}")),
            "{line}"
        );
    }
    let client = &c.pod("client").netns;
    let ids = tcp_ask_many(client, SocketAddrV4::new(VIP, 80), 60, T).unwrap_or_else(|e| {
        let maps = MapSet::open_pinned(&c.bpffs()).unwrap();
        let st = kpx::ops::dump::stats(&maps).unwrap();
        let ct = kpx::ops::dump::conntrack(&maps).unwrap();
        panic!(
            "{e:#}\n{}\n{}\n{}",
            kpx::ops::dump::stats_table(&st),
            kpx::ops::dump::conntrack_table(&ct),
            c.agent_log()
        )
    });
    assert_eq!(spread(&ids).len(), 3);
    let answers = udp_ask_many(client, SocketAddrV4::new(VIP, 53), 30, T).unwrap();
    assert_eq!(answers.len(), 30);
}

#[test]
#[ignore = "needs root"]
fn the_datapath_outlives_the_agent_a_restart_takes_it_over_and_cleanup_removes_it() {
    let mut c = running(&["web-1", "web-2", "web-3"]);
    let vip = SocketAddrV4::new(VIP, 80);
    let mut long = Conn::open(&c.pod("client").netns, vip, T).unwrap();
    let first = long.ask().unwrap();

    // A second agent on the same maps waits for the first to exit.
    let mut second = c
        .node
        .command(Path::new(KPX))
        .unwrap()
        .args(["agent", "--manifests"])
        .arg(c.manifests_dir())
        .arg("--bpffs")
        .arg(c.bpffs())
        .args(["--metrics-bind-address", "", "--healthz-bind-address", ""])
        .arg("--socket-lb=off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = second.stderr.take().unwrap();
    let mut first_line = [0u8; 256];
    let n = std::io::Read::read(&mut err, &mut first_line).unwrap();
    let _ = second.kill();
    let _ = second.wait();
    let said = String::from_utf8_lossy(&first_line[..n]);
    assert!(said.contains("another kpx agent manages"), "{said}");

    // SIGTERM: the agent exits, its programs stay attached through their
    // pinned links and the maps stay pinned, so the node keeps proxying
    // (as kube-proxy's rules outlive kube-proxy): a rolling update never
    // leaves a node without a proxy.
    let status = c.agent.as_mut().unwrap().stop().unwrap();
    assert!(status.success(), "agent exit {status}:\n{}", c.agent_log());
    assert!(c.agent_log().contains("maps stay pinned"));
    assert!(c.agent_log().contains("the datapath stays attached"));
    let ids = tcp_ask_many(&c.pod("client").netns, vip, 20, T)
        .unwrap_or_else(|e| panic!("no proxy while the agent is down: {e:#}"));
    assert_eq!(ids.len(), 20);
    assert!(MapSet::open_pinned(&c.bpffs()).is_ok());

    // Restart: takes every pinned link over (the new program swapped in
    // atomically), resumes with the same maps (nothing to write), and the
    // old connection's conntrack entry still sends it to its backend.
    c.start_agent(Path::new(KPX), &[]).unwrap();
    let resumed = wait_for(Duration::from_secs(20), || {
        c.agent_log()
            .lines()
            .any(|l| l.contains("synced 2 frontends") && l.contains(": 0 map writes"))
            .then_some(())
    });
    assert!(resumed.is_some(), "{}", c.agent_log());
    assert!(c.agent_log().contains("hold 2 frontends"));
    assert!(
        c.agent_log().contains("took over the pinned link"),
        "{}",
        c.agent_log()
    );
    assert_eq!(
        long.ask().unwrap(),
        first,
        "the long connection lost its backend"
    );

    // `kpx cleanup` detaches the programs and removes the maps: the VIP
    // is an ordinary unrouted address again.
    c.agent.as_mut().unwrap().stop().unwrap();
    let said = kpx_cleanup(&c);
    let expected = format!("removed {} pinned maps", proxy_common::map_names::ALL.len());
    assert!(said.contains(&expected), "{said}");
    assert!(!said.contains("detached 0 programs"), "{said}");
    assert!(MapSet::open_pinned(&c.bpffs()).is_err());
    // The kernel releases an unpinned link asynchronously.
    let gone = wait_for(Duration::from_secs(5), || {
        tcp_ask(&c.pod("client").netns, vip, Duration::from_millis(300))
            .is_err()
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "the VIP still answers after cleanup: {said}"
    );
}

#[test]
#[ignore = "needs root"]
fn interfaces_that_appear_later_are_attached() {
    let mut c = running(&["web-1", "web-2", "web-3"]);
    // A pod created after the agent started: its node-side veth appears then.
    c.add_pod("late", Ipv4Addr::new(198, 18, 2, 3)).unwrap();
    let host_if = c.pod("late").host_if.clone();
    let attached = wait_for(Duration::from_secs(10), || {
        let log = c.agent_log();
        // Without the socket-level load balancer, egress goes on at once.
        (log.contains(&format!("attached tc ingress to {host_if} ("))
            && log.contains(&format!("attached tc egress to {host_if} (")))
        .then_some(())
    });
    assert!(attached.is_some(), "{}", c.agent_log());
    let ids = tcp_ask_many(&c.pod("late").netns, SocketAddrV4::new(VIP, 80), 30, T)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", c.agent_log()));
    assert_eq!(ids.len(), 30);
}

/// Drill: the agent is killed (SIGKILL, no cleanup of its own) and
/// restarted while 50 long-lived connections are open and new ones keep
/// coming: none breaks, none fails, and each long-lived one keeps its
/// backend.
#[test]
#[ignore = "needs root"]
fn an_agent_killed_and_restarted_under_load_breaks_nothing() {
    let mut c = running(&["web-1", "web-2", "web-3"]);
    let vip = SocketAddrV4::new(VIP, 80);
    let mut long = Held::open(&c.pod("client").netns, vip, 50, T).unwrap();
    // New connections, one after another, for the whole drill.
    let load = Load::start(&c.pod("client").netns, vip, Duration::ZERO);
    std::thread::sleep(Duration::from_millis(300));
    let status = c.agent.as_mut().unwrap().kill().unwrap();
    assert!(!status.success(), "the agent was not killed: {status}");
    std::thread::sleep(Duration::from_millis(500));
    c.start_agent(Path::new(KPX), &[]).unwrap();
    wait_synced(&c, 2, &[3, 3]);
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed) = load.stop();
    let broken = long.broken();
    assert!(
        broken.is_empty() && failed == 0 && ok > 0,
        "broken long-lived connections {broken:?}; new connections: {ok} ok, {failed} failed\n{}",
        c.agent_log()
    );
    eprintln!("SIGKILL drill: 50 long-lived kept, {ok} new connections during the drill, 0 failed");
}

/// Drill: the reply filter rebuilt twenty times a second (a collection
/// every 50 ms) while new connections come one after another and 50
/// long-lived ones keep asking: each rebuild clears one copy of the filter
/// while the datapath sets bits in it, and no flow's reply may miss its bit
/// (a reply that did would go out untranslated, and its connection reset).
#[test]
#[ignore = "needs root"]
fn the_reply_filter_rebuilt_under_load_hides_no_reply() {
    let c = running_with(
        &["web-1", "web-2", "web-3"],
        &["--conntrack-gc-interval", "50ms"],
    );
    let vip = SocketAddrV4::new(VIP, 80);
    let mut long = Held::open(&c.pod("client").netns, vip, 50, T).unwrap();
    let load = Load::start(&c.pod("client").netns, vip, Duration::ZERO);
    let mut broken = Vec::new();
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        broken.extend(long.broken());
    }
    let (ok, failed) = load.stop();
    let dump = String::from_utf8_lossy(&kpx_dump(&c.bpffs(), &["stats", "--json"])).into_owned();
    let stats: serde_json::Value = serde_json::from_str(&dump).expect("stats JSON");
    assert!(
        broken.is_empty() && failed == 0 && ok > 100,
        "broken long-lived connections {broken:?}; new connections: {ok} ok, {failed} failed\n{}",
        c.agent_log()
    );
    // In use all along: rebuilt, not left full.
    let percent = stats["conntrack"]["reply_filter_percent"].as_f64();
    assert!(
        percent.is_some_and(|p| p < 1.0),
        "reply filter: {percent:?}"
    );
    eprintln!("reply filter drill: 50 long-lived asked 15 times, {ok} new connections, rebuilt every 50 ms, 0 failed");
}

/// Drill: more long-lived connections than the established table holds.
/// Those that fit stay up, on their backends, whatever comes after; the
/// rest are refused at their handshake (counted as `ct_full`), as netfilter
/// refuses new flows when full, never by evicting a live one. Once some
/// end and are collected, new connections get in again.
#[test]
#[ignore = "needs root"]
fn a_full_conntrack_table_refuses_new_connections_and_breaks_no_established_one() {
    const FLOWS: usize = 100;
    let mut c = start(&backends());
    let yaml = web(&c, &["web-1", "web-2", "web-3"]);
    c.write_manifest("web.yaml", &yaml).unwrap();
    let max = (2 * FLOWS).to_string();
    c.start_agent(
        Path::new(KPX),
        &[
            "--conntrack-max",
            &max,
            "--conntrack-tcp-timeout-time-wait",
            "1s",
            "--conntrack-gc-interval",
            "1s",
        ],
    )
    .unwrap();
    wait_synced(&c, 2, &[3, 3]);
    let vip = SocketAddrV4::new(VIP, 80);
    let client = &c.pod("client").netns;
    let refused_after = Duration::from_millis(2500);
    // Open until the table refuses, then a few more tries.
    let mut open = Held::default();
    let mut refused = 0;
    while refused < 3 && open.len() < 2 * FLOWS {
        if open.add(client, vip, refused_after).is_err() {
            refused += 1;
        }
    }
    eprintln!(
        "capacity drill: {} connections established, then {refused} refused",
        open.len()
    );
    assert_eq!(open.len(), FLOWS, "{}", c.agent_log());
    let full = drop_count(&c, DropReason::CtFull);
    assert!(
        full >= refused as u64,
        "{full} ct_full drops\n{}",
        c.agent_log()
    );
    let warned = c.agent_log();
    assert!(
        warned.contains("conntrack table KPX_CT_TCP at"),
        "no pressure warning:\n{warned}"
    );

    // Every established connection is still up, on its backend.
    let broken = open.broken();
    assert!(broken.is_empty(), "broken: {broken:?}\n{}", c.agent_log());

    // Ten end; once collected, ten new ones get in.
    open.0.truncate(FLOWS - 10);
    // (Those that get in stay open: closing them would take room again.)
    let mut fresh: Vec<Conn> = Vec::new();
    let admitted = wait_for(Duration::from_secs(20), || {
        while fresh.len() < 10 {
            fresh.push(Conn::open(client, vip, refused_after).ok()?);
        }
        Some(())
    });
    assert!(
        admitted.is_some(),
        "{} of 10 got in\n{}\n{}\n{}",
        fresh.len(),
        String::from_utf8_lossy(&kpx_dump(&c.bpffs(), &["stats"])),
        String::from_utf8_lossy(&kpx_dump(&c.bpffs(), &["conntrack"])),
        c.agent_log()
    );
    let moved = open.broken();
    assert!(moved.is_empty(), "{moved:?}");
    eprintln!(
        "capacity drill: {FLOWS} established kept on their backends, {full} handshakes refused (ct_full), 10 admitted once 10 ended"
    );
}

/// Drill: the step every adopter takes. 50 long-lived connections opened
/// through kube-proxy's rules (`kpx iptables-rules` loaded in the node
/// namespace), then kpx started with `--cleanup-kube-proxy`: kpx carries
/// netfilter's service flows into its conntrack before its frontends go
/// live, so none breaks, each keeps its backend, and new connections work
/// once kube-proxy's rules are gone.
#[test]
#[ignore = "needs root"]
fn taking_over_from_kube_proxy_breaks_no_connection() {
    let mut c = start(&backends());
    let yaml = web(&c, &["web-1", "web-2", "web-3"]);
    c.write_manifest("web.yaml", &yaml).unwrap();
    c.load_reference(testbed::Proxy::Iptables, Path::new(KPX))
        .unwrap();
    let vip = SocketAddrV4::new(VIP, 80);
    let mut long = Held::open(&c.pod("client").netns, vip, 50, T).unwrap();
    let spread = long.backends();
    assert!(spread.len() > 1, "kube-proxy used one backend: {spread:?}");

    c.start_agent(Path::new(KPX), &["--cleanup-kube-proxy"])
        .unwrap();
    wait_synced(&c, 2, &[3, 3]);
    let cleaned = wait_for(Duration::from_secs(10), || {
        c.agent_log()
            .contains("kube-proxy cleanup: iptables-nft: removed")
            .then_some(())
    });
    assert!(cleaned.is_some(), "{}", c.agent_log());
    none_broken(&mut long, "kube-proxy's connections", &c.agent_log());
    let log = c.agent_log();
    assert!(
        log.contains("takeover from netfilter: 50 service flows carried"),
        "{log}"
    );
    tcp_ask_many(&c.pod("client").netns, vip, 20, T).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("takeover from netfilter:"))
        .unwrap_or_default();
    eprintln!("takeover drill: 50 of 50 kube-proxy connections kept on their backends; {line}");
}

/// Drill: the way back. 50 long-lived connections through kpx; the agent
/// stopped, kube-proxy's rules loaded, then `kpx cleanup`: it hands kpx's
/// flows to netfilter, with kpx's NAT, before detaching, so none breaks and
/// each keeps its backend, while new connections go through kube-proxy's
/// rules.
#[test]
#[ignore = "needs root"]
fn going_back_to_kube_proxy_breaks_no_connection() {
    let mut c = running(&["web-1", "web-2", "web-3"]);
    let vip = SocketAddrV4::new(VIP, 80);
    let mut long = Held::open(&c.pod("client").netns, vip, 50, T).unwrap();
    // The DaemonSet deleted: the agent goes, its pinned datapath stays.
    c.agent.as_mut().unwrap().kill().unwrap();
    c.load_reference(testbed::Proxy::Iptables, Path::new(KPX))
        .unwrap();
    let said = kpx_cleanup(&c);
    assert!(
        said.contains("kpx's flows handed to netfilter: 50 service flows carried"),
        "{said}"
    );
    none_broken(&mut long, "kpx's connections", &said);
    // New connections: kube-proxy's rules alone now.
    let ids = tcp_ask_many(&c.pod("client").netns, vip, 30, T).unwrap();
    assert_eq!(spread(&ids).len(), 3, "{ids:?}");
    eprintln!(
        "way-back drill: 50 of 50 connections kept on their backends; {}",
        said.trim()
    );
}

#[test]
#[ignore = "needs root"]
fn a_connection_outlives_its_service_and_its_ports_and_address_leave_the_filter_after_it() {
    use proxy_common::{port_shift, port_word, PORT_BITS, PORT_F_BACKEND, PORT_F_FRONTEND};
    let mut c = start(&backends());
    c.write_manifest("web.yaml", &web(&c, &["web-1", "web-2"]))
        .unwrap();
    c.start_agent(
        Path::new(KPX),
        &[
            "--sync-period",
            "1s",
            "--conntrack-gc-interval",
            "1s",
            "--conntrack-tcp-timeout-time-wait",
            "1s",
        ],
    )
    .unwrap();
    wait_synced(&c, 2, &[2, 2]);
    // The port filter's bits of a port: the datapath looks a packet's flow
    // up only to a frontend's port or from a backend's.
    let bits = |port: u16| {
        let maps = MapSet::open_pinned(&c.bpffs()).unwrap();
        (maps.port_word(port_word(port)).unwrap() >> port_shift(port)) & ((1 << PORT_BITS) - 1)
    };
    // The address filter's bit of the service's address: the datapath
    // looks a packet to a frontend's port up only at such an address.
    let addr_set = || {
        let maps = MapSet::open_pinned(&c.bpffs()).unwrap();
        let bit = proxy_common::addr_bit(proxy_common::wire::addr(VIP));
        maps.port_word(bit.word).unwrap() & bit.mask != 0
    };
    assert_eq!(bits(80), PORT_F_FRONTEND);
    assert_eq!(bits(8080), PORT_F_BACKEND);
    assert!(addr_set());
    let vip = SocketAddrV4::new(VIP, 80);
    let mut long = Conn::open(&c.pod("client").netns, vip, T).unwrap();
    let first = long.ask().unwrap();

    // The service goes. kube-proxy's conntrack keeps translating its live
    // connections; so does kpx, across collector walks and resyncs.
    c.remove_manifest("web.yaml").unwrap();
    wait_synced(&c, 0, &[]);
    assert!(
        tcp_ask(&c.pod("client").netns, vip, Duration::from_secs(1)).is_err(),
        "VIP still answers new connections"
    );
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        long.ask().unwrap(),
        first,
        "the live connection broke\n{}",
        c.agent_log()
    );
    assert_eq!(bits(80), PORT_F_FRONTEND, "held while its flow lives");
    assert_eq!(bits(8080), PORT_F_BACKEND, "held while its flow lives");
    assert!(addr_set(), "held while its flow lives");

    // Once the connection is over and collected, its ports are released.
    drop(long);
    let released = wait_for(Duration::from_secs(20), || {
        (bits(80) == 0 && bits(8080) == 0 && !addr_set()).then_some(())
    });
    assert!(
        released.is_some(),
        "port 80: {:#x}, 8080: {:#x}\n{}",
        bits(80),
        bits(8080),
        c.agent_log()
    );
}
