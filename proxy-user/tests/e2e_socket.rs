//! Socket-level load balancing end to end: the real agent with its cgroup
//! programs attached to a cgroup this test creates, clients run as
//! `kpx-probe` processes inside it (and inside a pod's or the node's
//! network namespace), and what they see: which backend answered, the
//! address `getpeername()` / `recvfrom()` report, how fast a service
//! without endpoints refuses, and whether tc or the socket hooks did the
//! translating (the datapath's counters).

mod bed;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use bed::*;
use proxy_common::{Counter, Event};
use testbed::{
    probe::{self, Answer, Cgroup, Session},
    service_yaml, Cluster,
};

/// The bed with `web` served by `endpoints`, the agent attached to a new
/// cgroup with `flags`, synced.
fn socket_bed(endpoints: &[&str], flags: &[&str]) -> (Cluster, Cgroup) {
    let eps: Vec<(&str, &str)> = endpoints.iter().map(|n| (*n, "")).collect();
    let (c, cg) = socket_bed_with("", &eps, flags);
    let n = endpoints.len() as u32;
    wait_synced(&c, 2, &[n, n]);
    wait_attached(&c);
    (c, cg)
}

/// `web` without the backends in `gone` (their pods keep running), once
/// the agent serves that; the backends that stay.
fn leave(c: &Cluster, gone: &[&str]) -> Vec<&'static str> {
    let rest: Vec<&str> = ["web-1", "web-2", "web-3"]
        .into_iter()
        .filter(|n| !gone.contains(n))
        .collect();
    c.write_manifest("web.yaml", &web(c, &rest)).unwrap();
    let n = rest.len() as u32;
    wait_synced(c, 2, &[n, n]);
    rest
}

#[test]
#[ignore = "needs root"]
fn tcp_connects_go_straight_to_backends_and_getpeername_shows_the_service() {
    let (c, cg) = socket_bed(&["web-1", "web-2", "web-3"], &[]);
    let client = &c.pod("client").netns;
    let vip = SocketAddrV4::new(VIP, 80).to_string();
    let new_flows = counter_count(&c, Counter::NewFlow);

    let got = answers(&probe::run(client, Some(&cg), &["tcp", &vip, "60"]).unwrap());
    let ids: Vec<String> = got.iter().map(|a| a.identity.clone()).collect();
    let spread = spread(&ids);
    assert_eq!(spread.len(), 3, "{spread:?}");
    for a in &got {
        // kube-proxy's view: the socket is connected to the service.
        assert_eq!(a.peer, vip, "{a:?}");
        // No masquerade: the backend sees the pod.
        assert!(a.client.starts_with("198.18.2.2:"), "{a:?}");
    }
    assert_eq!(event_count(&c, Event::SockConnect), 60);
    // Translated at connect(): tc never saw a packet to the service.
    assert_eq!(counter_count(&c, Counter::NewFlow), new_flows);
    // The frontend's statistics say which path served it.
    let dump =
        String::from_utf8_lossy(&bed::kpx_dump(&c.bpffs(), &["stats", "--json"])).into_owned();
    let stats: serde_json::Value = serde_json::from_str(&dump).expect("stats JSON");
    let web = stats["services"]
        .as_array()
        .and_then(|s| s.iter().find(|r| r["frontend"] == format!("{vip}/TCP")))
        .unwrap_or_else(|| panic!("no {vip}/TCP in {dump}"));
    assert_eq!(web["socket_flows"], 60, "{web}");
    assert_eq!(web["xdp_packets"], 0, "{web}");
    // No flow of tc's: the backends' answers are no flow's reply, and the
    // reply filter (rebuilt once the agent attached) says so without a
    // conntrack lookup.
    let fill = stats["conntrack"]["reply_filter_percent"].as_f64();
    assert!(fill.is_some_and(|f| f < 0.1), "reply filter: {fill:?}");
}

#[test]
#[ignore = "needs root"]
fn a_client_outside_the_cgroup_is_translated_by_tc_with_the_same_choices() {
    let (c, _cg) = socket_bed(&["web-1", "web-2", "web-3"], &[]);
    let client = &c.pod("client").netns;
    let vip = SocketAddrV4::new(VIP, 80).to_string();
    let got = answers(&probe::run(client, None, &["tcp", &vip, "30"]).unwrap());
    assert_eq!(
        spread(&got.iter().map(|a| a.identity.clone()).collect::<Vec<_>>()).len(),
        3
    );
    assert!(got.iter().all(|a| a.peer == vip));
    assert_eq!(event_count(&c, Event::SockConnect), 0);
    assert!(counter_count(&c, Counter::NewFlow) >= 30);
}

#[test]
#[ignore = "needs root"]
fn udp_goes_to_one_backend_per_socket_and_answers_come_from_the_service() {
    let (c, cg) = socket_bed(&["web-1", "web-2", "web-3"], &[]);
    let client = &c.pod("client").netns;
    let vip = SocketAddrV4::new(VIP, 53).to_string();
    // One unconnected socket: every datagram to the same backend, every
    // answer from the service address.
    let got = answers(&probe::run(client, Some(&cg), &["udp", &vip, "20"]).unwrap());
    let ids: Vec<String> = got.iter().map(|a| a.identity.clone()).collect();
    assert_eq!(spread(&ids).len(), 1, "{ids:?}");
    assert!(got.iter().all(|a| a.peer == vip), "{got:?}");
    // Fresh sockets spread.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let a = answers(&probe::run(client, Some(&cg), &["udp", &vip, "1"]).unwrap());
        seen.insert(a[0].identity.clone());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    // Connected UDP: the peer is the service too.
    let got = answers(&probe::run(client, Some(&cg), &["udp-connected", &vip, "3"]).unwrap());
    assert!(got.iter().all(|a| a.peer == vip), "{got:?}");
    assert!(event_count(&c, Event::SockSendmsg) >= 50);
}

#[test]
#[ignore = "needs root"]
fn a_service_without_endpoints_refuses_at_connect_and_sendmsg() {
    let (c, cg) = socket_bed(&["web-1"], &[]);
    // A second service, empty.
    let empty = service_yaml(
        "empty",
        Ipv4Addr::new(198, 19, 0, 20),
        (80, 8080),
        (53, 5353),
        &[],
    );
    c.write_manifest("empty.yaml", &empty).unwrap();
    wait_synced(&c, 4, &[0, 0, 1, 1]);
    let client = &c.pod("client").netns;
    let lines = probe::run(client, Some(&cg), &["tcp", "198.19.0.20:80", "5"]).unwrap();
    for l in &lines {
        assert!(l.starts_with("err ECONNREFUSED"), "{l}");
        let us: u64 = l.rsplit("us=").next().unwrap().parse().unwrap();
        assert!(us < 10_000, "refused after {us} µs: {l}");
    }
    let lines = probe::run(client, Some(&cg), &["udp", "198.19.0.20:53", "2"]).unwrap();
    assert!(
        lines.iter().all(|l| l.starts_with("err ECONNREFUSED")),
        "{lines:?}"
    );
    assert_eq!(event_count(&c, Event::SockRefused), 7);
}

#[test]
#[ignore = "needs root"]
fn a_udp_client_on_a_fixed_port_moves_on_when_its_backend_leaves_and_tcp_stays() {
    let (c, cg) = socket_bed(&["web-1", "web-2", "web-3"], &[]);
    let client = c.pod("client").netns.shared();
    let dns = SocketAddrV4::new(VIP, 53).to_string();
    let http = SocketAddrV4::new(VIP, 80).to_string();
    let mut udp = Session::start(&client, Some(&cg), &["udp", &dns, "5300"]).unwrap();
    let mut tcp = Session::start(&client, Some(&cg), &["tcp", &http]).unwrap();
    let first = Answer::parse(&udp.ask().unwrap()).unwrap();
    let held = Answer::parse(&tcp.ask().unwrap()).unwrap();
    // Both sockets' backends leave the service (their pods keep running).
    let rest = leave(&c, &[&first.identity, &held.identity]);
    // The UDP socket's next datagram goes to a backend that serves, from
    // the same port.
    let next = Answer::parse(&udp.ask().unwrap()).unwrap();
    assert!(rest.contains(&next.identity.as_str()), "{next:?}");
    assert_eq!(next.client, first.client, "the client port changed");
    assert_eq!(next.peer, dns);
    assert_eq!(event_count(&c, Event::SockRebalanced), 1);
    // kube-proxy keeps live TCP connections to a removed, running backend.
    let again = Answer::parse(&tcp.ask().unwrap()).unwrap();
    assert_eq!(again.identity, held.identity);
}

/// As [`socket_bed`], `web`'s spec with `spec_extra` and each endpoint's
/// extra lines (`nodeName`), by pod; not waited for.
fn socket_bed_with(
    spec_extra: &str,
    endpoints: &[(&str, &str)],
    flags: &[&str],
) -> (Cluster, Cgroup) {
    let cg = Cgroup::create("socklb").unwrap();
    let mut c = start(&backends());
    let eps: Vec<(Ipv4Addr, String)> = endpoints
        .iter()
        .map(|(n, extra)| (c.pod(n).ip, format!("{}{extra}", testbed::READY)))
        .collect();
    let eps: Vec<(Ipv4Addr, &str)> = eps.iter().map(|(a, s)| (*a, s.as_str())).collect();
    let yaml = testbed::service_yaml_with("web", VIP, (80, 8080), (53, 5353), &eps, spec_extra);
    c.write_manifest("web.yaml", &yaml).unwrap();
    let mut args = vec!["--socket-lb-cgroup", cg.path.to_str().unwrap()];
    args.extend_from_slice(flags);
    c.start_agent(Path::new(KPX), &args).unwrap();
    (c, cg)
}

fn identities(got: &[Answer]) -> std::collections::BTreeMap<String, usize> {
    spread(&got.iter().map(|a| a.identity.clone()).collect::<Vec<_>>())
}

#[test]
#[ignore = "needs root"]
fn client_ip_affinity_holds_for_a_pods_sockets() {
    let three = [("web-1", ""), ("web-2", ""), ("web-3", "")];
    let (c, cg) = socket_bed_with("sessionAffinity: ClientIP", &three, &[]);
    wait_synced(&c, 2, &[3, 3]);
    wait_attached(&c);
    let client = &c.pod("client").netns;
    let vip = SocketAddrV4::new(VIP, 80).to_string();
    let got = answers(&probe::run(client, Some(&cg), &["tcp", &vip, "20"]).unwrap());
    assert_eq!(identities(&got).len(), 1, "{got:?}");
    assert_eq!(event_count(&c, Event::SockConnect), 20);
    assert_eq!(event_count(&c, Event::AffinityHit), 19);
}

#[test]
#[ignore = "needs root"]
fn internal_traffic_policy_local_uses_this_nodes_endpoints_only() {
    let local = format!("\n  nodeName: {}", testbed::Cluster::NODE_NAME);
    let elsewhere = "\n  nodeName: elsewhere";
    let (c, cg) = socket_bed_with(
        "internalTrafficPolicy: Local",
        &[
            ("web-1", &local),
            ("web-2", elsewhere),
            ("web-3", elsewhere),
        ],
        &[],
    );
    wait_synced(&c, 2, &[3, 3]);
    wait_attached(&c);
    let client = &c.pod("client").netns;
    let vip = SocketAddrV4::new(VIP, 80).to_string();
    let got = answers(&probe::run(client, Some(&cg), &["tcp", &vip, "20"]).unwrap());
    assert_eq!(
        identities(&got).keys().collect::<Vec<_>>(),
        ["web-1"],
        "{got:?}"
    );
    assert_eq!(event_count(&c, Event::SockConnect), 20);
}

#[test]
#[ignore = "needs root"]
fn the_nodes_own_processes_are_served_and_host_only_leaves_pods_to_tc() {
    let (c, cg) = socket_bed(&["web-1", "web-2", "web-3"], &["--socket-lb", "host-only"]);
    let vip = SocketAddrV4::new(VIP, 80).to_string();
    // A host process (the node's network namespace, the test's cgroup).
    let got = answers(&probe::run(&c.node, Some(&cg), &["tcp", &vip, "10"]).unwrap());
    assert!(got.iter().all(|a| a.peer == vip), "{got:?}");
    // The backend sees one of the node's addresses.
    assert!(
        got.iter().all(|a| !a.client.starts_with("198.18.2.2:")),
        "{got:?}"
    );
    assert_eq!(event_count(&c, Event::SockConnect), 10);
    // A pod's connections: the service address on the wire, tc translates.
    let new_flows = counter_count(&c, Counter::NewFlow);
    let client = &c.pod("client").netns;
    let got = answers(&probe::run(client, Some(&cg), &["tcp", &vip, "10"]).unwrap());
    assert!(got.iter().all(|a| a.client.starts_with("198.18.2.2:")));
    assert_eq!(event_count(&c, Event::SockConnect), 10);
    assert_eq!(counter_count(&c, Counter::NewFlow), new_flows + 10);
}

#[test]
#[ignore = "needs root"]
fn flows_the_reference_masquerades_are_left_to_tc_which_masquerades_them() {
    let (c, cg) = socket_bed(&["web-1", "web-2", "web-3"], &["--masquerade-all"]);
    let client = &c.pod("client").netns;
    let vip = SocketAddrV4::new(VIP, 80).to_string();
    let new_flows = counter_count(&c, Counter::NewFlow);
    let got = answers(&probe::run(client, Some(&cg), &["tcp", &vip, "10"]).unwrap());
    // Masqueraded: the backend sees the node, not the pod; tc did it.
    assert!(
        got.iter().all(|a| !a.client.starts_with("198.18.2.2:")),
        "{got:?}"
    );
    assert_eq!(event_count(&c, Event::SockConnect), 0);
    assert_eq!(event_count(&c, Event::SockToTc), 10);
    assert_eq!(counter_count(&c, Counter::NewFlow), new_flows + 10);
}

#[test]
#[ignore = "needs root"]
fn least_connections_counts_held_sockets_and_dump_lists_them() {
    let (c, cg) = socket_bed(&["web-1", "web-2", "web-3"], &["--ipvs-scheduler", "lc"]);
    let client = c.pod("client").netns.shared();
    let vip = SocketAddrV4::new(VIP, 80).to_string();
    let mut held: Vec<Session> = (0..6)
        .map(|_| Session::start(&client, Some(&cg), &["tcp", &vip]).unwrap())
        .collect();
    let mut got = Vec::new();
    for s in &mut held {
        got.push(Answer::parse(&s.ask().unwrap()).unwrap());
    }
    // Two choices among three, each taking the less loaded: six held
    // connections never pile three on one backend while another has none.
    let per = identities(&got);
    assert!(per.values().all(|n| *n <= 3), "{per:?}");
    let dump = String::from_utf8(kpx_dump(&c.bpffs(), &["backends", "--json"])).unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&dump).unwrap();
    let sum = |k: &str| rows.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("sockets"), 6, "{dump}");
    assert_eq!(sum("active_conns"), 6, "{dump}");
    let socks = String::from_utf8(kpx_dump(&c.bpffs(), &["sockets"])).unwrap();
    assert_eq!(
        socks
            .lines()
            .filter(|l| l.contains("connected") && l.contains("(counted)"))
            .count(),
        6,
        "{socks}"
    );
    // Their entries are in the TCP sockets' table, by cookie. The sweep
    // keeps every live one, and removes an entry whose socket is gone (a
    // cookie no socket has: as a release missed while no program ran).
    let mut maps = kpx::dataplane::maps::MapSet::open_pinned(&c.bpffs()).unwrap();
    let cookies =
        |m: &kpx::dataplane::maps::MapSet| m.socks_tcp.keys().filter_map(Result::ok).count();
    assert_eq!(cookies(&maps), 6);
    let some = maps
        .socks_tcp
        .iter()
        .filter_map(Result::ok)
        .next()
        .unwrap()
        .1;
    maps.socks_tcp.insert(u64::MAX, some, 0).unwrap();
    assert_eq!(kpx::dataplane::socklb::sweep_tcp(&mut maps).unwrap(), 1);
    assert_eq!(cookies(&maps), 6);
    // Closed: off the counts and out of the map.
    drop(held);
    let ok = testbed::wait_for(std::time::Duration::from_secs(5), || {
        let dump = String::from_utf8(kpx_dump(&c.bpffs(), &["backends", "--json"])).unwrap();
        let rows: Vec<serde_json::Value> = serde_json::from_str(&dump).unwrap();
        let sum = |k: &str| rows.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>();
        (sum("sockets") == 0 && sum("active_conns") == 0).then_some(())
    });
    assert!(
        ok.is_some(),
        "{}",
        String::from_utf8_lossy(&kpx_dump(&c.bpffs(), &["backends"]))
    );
    assert_eq!(cookies(&maps), 0, "released sockets leave the table");
}

#[test]
#[ignore = "needs root"]
fn a_connected_udp_socket_whose_backend_leaves_is_closed_so_the_client_rebalances() {
    let (c, cg) = socket_bed(&["web-1", "web-2", "web-3"], &[]);
    let client = c.pod("client").netns.shared();
    let dns = SocketAddrV4::new(VIP, 53).to_string();
    let mut stuck = Session::start(&client, Some(&cg), &["udp-connected", &dns]).unwrap();
    let first = Answer::parse(&stuck.ask().unwrap()).unwrap();
    assert_eq!(first.peer, dns);
    // Another connected socket, to a backend that stays: left alone.
    let mut other = None;
    for _ in 0..30 {
        let mut s = Session::start(&client, Some(&cg), &["udp-connected", &dns]).unwrap();
        if Answer::parse(&s.ask().unwrap()).unwrap().identity != first.identity {
            other = Some(s);
            break;
        }
    }
    let mut other = other.expect("no socket reached another backend in 30 tries");
    let rest = leave(&c, &[&first.identity]);
    // The agent closes the stuck socket: the application hears of it.
    wait_event(
        &c,
        Event::SockDestroyed,
        1,
        std::time::Duration::from_secs(20),
    );
    let after = stuck.ask().unwrap();
    assert!(after.starts_with("err "), "{after}");
    // A new socket reaches a serving backend; the other socket never moved.
    let mut fresh = Session::start(&client, Some(&cg), &["udp-connected", &dns]).unwrap();
    let next = Answer::parse(&fresh.ask().unwrap()).unwrap();
    assert!(rest.contains(&next.identity.as_str()), "{next:?}");
    assert!(Answer::parse(&other.ask().unwrap()).is_ok());
}

#[test]
#[ignore = "needs root"]
fn a_restarted_agent_takes_the_cgroup_over_and_cleanup_detaches_it() {
    let (mut c, cg) = socket_bed(&["web-1", "web-2", "web-3"], &[]);
    let client = c.pod("client").netns.shared();
    let vip = SocketAddrV4::new(VIP, 80).to_string();
    // A connection held across the restart: it never depended on kpx.
    let mut held = Session::start(&client, Some(&cg), &["tcp", &vip]).unwrap();
    let first = Answer::parse(&held.ask().unwrap()).unwrap();

    c.agent.as_mut().unwrap().stop().unwrap();
    c.start_agent(
        Path::new(KPX),
        &["--socket-lb-cgroup", cg.path.to_str().unwrap()],
    )
    .unwrap();
    let log = || c.agent_log();
    let ok = testbed::wait_for(std::time::Duration::from_secs(10), || {
        log()
            .contains("detached 9 socket-LB links of an earlier agent")
            .then_some(())
    });
    assert!(ok.is_some(), "{}", log());
    // The log goes on from the first agent's, whose attach line is in it:
    // wait for the second agent's own.
    let attached = testbed::wait_for(std::time::Duration::from_secs(10), || {
        (log().matches("socket-level load balancing: all").count() >= 2).then_some(())
    });
    assert!(attached.is_some(), "{}", log());
    let before = event_count(&c, Event::SockConnect);
    let got = answers(&probe::run(&client, Some(&cg), &["tcp", &vip, "5"]).unwrap());
    assert!(got.iter().all(|a| a.peer == vip));
    assert_eq!(event_count(&c, Event::SockConnect), before + 5);
    assert_eq!(
        Answer::parse(&held.ask().unwrap()).unwrap().identity,
        first.identity
    );

    // `kpx cleanup`: no program left on the cgroup. With tc gone too, a
    // connect() to the service address is no longer rewritten: it fails.
    c.agent.as_mut().unwrap().stop().unwrap();
    kpx_cleanup(&c);
    assert!(!c.bpffs().join("sock-links").exists());
    let lines = probe::run(&client, Some(&cg), &["tcp", &vip, "1"]).unwrap();
    assert!(lines[0].starts_with("err "), "{lines:?}");
}

#[test]
#[ignore = "needs root"]
fn a_udp_socket_connected_elsewhere_afterwards_is_left_alone() {
    let (c, cg) = socket_bed(&["web-1", "web-2", "web-3"], &[]);
    let client = c.pod("client").netns.shared();
    let dns = SocketAddrV4::new(VIP, 53).to_string();
    let mut s = Session::start(&client, Some(&cg), &["udp-connected", &dns]).unwrap();
    let first = Answer::parse(&s.ask().unwrap()).unwrap();
    // The same socket connected straight to that backend's pod: no longer
    // the balancer's. Its peer is the pod, not the service.
    let pod = SocketAddrV4::new(c.pod(&first.identity).ip, 5353).to_string();
    assert_eq!(s.say(&format!("connect {pod}")).unwrap(), "connected");
    let direct = Answer::parse(&s.ask().unwrap()).unwrap();
    assert_eq!(
        (direct.identity.as_str(), direct.peer.as_str()),
        (first.identity.as_str(), pod.as_str())
    );
    // A second socket, still the balancer's, on the same backend.
    let mut balanced = None;
    for _ in 0..30 {
        let mut b = Session::start(&client, Some(&cg), &["udp-connected", &dns]).unwrap();
        if Answer::parse(&b.ask().unwrap()).unwrap().identity == first.identity {
            balanced = Some(b);
            break;
        }
    }
    let mut balanced = balanced.expect("no socket reached the same backend in 30 tries");
    // That backend leaves the service: the agent closes the balancer's
    // socket, and only that one; the other keeps working.
    leave(&c, &[&first.identity]);
    wait_event(
        &c,
        Event::SockDestroyed,
        1,
        std::time::Duration::from_secs(20),
    );
    assert_eq!(event_count(&c, Event::SockDestroyed), 1);
    assert!(balanced.ask().unwrap().starts_with("err "));
    assert_eq!(
        Answer::parse(&s.ask().unwrap()).unwrap().identity,
        first.identity
    );
}

#[test]
#[ignore = "needs root"]
fn an_unconnected_udp_socket_keeps_a_backend_per_service_and_answers_from_each() {
    let (c, cg) = socket_bed(&["web-1", "web-2"], &[]);
    // A second UDP service, served by another pod: a resolver asking two
    // name servers from one socket.
    let vip2 = Ipv4Addr::new(198, 19, 0, 21);
    let other = service_yaml("dns2", vip2, (80, 8080), (53, 5353), &[c.pod("web-3").ip]);
    c.write_manifest("dns2.yaml", &other).unwrap();
    wait_synced(&c, 4, &[1, 1, 2, 2]);
    let (dns, dns2) = (
        SocketAddrV4::new(VIP, 53).to_string(),
        SocketAddrV4::new(vip2, 53).to_string(),
    );
    let client = &c.pod("client").netns;
    let mut s = Session::start(client, Some(&cg), &["udp", &dns, "5301"]).unwrap();
    resolver_keeps_a_backend_per_service(&mut s, &dns, &dns2);
    assert_eq!(event_count(&c, Event::SockRebalanced), 0);
}

/// tc egress on demand: with the socket-level load balancer taking the
/// pods' flows, a pod's veth carries no egress program (pod-to-pod
/// packets cross no hook there) until a flow tc translates comes in on
/// it; then the agent attaches it. A flow from there to a backend on the
/// node's own address (a hostNetwork one) waits for it: its first SYN is
/// dropped and counted, the retransmission is answered from the service.
#[test]
#[ignore = "needs root"]
fn a_pods_veth_gets_tc_egress_when_tc_first_translates_a_flow_from_it() {
    use aya::programs::TcAttachType::Egress;
    let (mut c, cg) = socket_bed(&["web-1", "web-2", "web-3"], &[]);
    let (client, client_if) = (
        c.pod("client").netns.shared(),
        c.pod("client").host_if.clone(),
    );
    let vip = SocketAddrV4::new(VIP, 80).to_string();
    let pod_ifs: Vec<String> = ["client", "web-1", "web-2", "web-3"]
        .iter()
        .map(|p| c.pod(p).host_if.clone())
        .collect();
    for dev in &pod_ifs {
        assert!(
            tc_programs(&c, dev, Egress).is_empty(),
            "{dev}: {}",
            c.agent_log()
        );
    }
    // Socket-balanced: pod to pod, and still no egress program anywhere.
    let got = answers(&probe::run(&client, Some(&cg), &["tcp", &vip, "10"]).unwrap());
    assert_eq!(got.len(), 10);
    for dev in &pod_ifs {
        assert!(tc_programs(&c, dev, Egress).is_empty(), "{dev}");
    }

    // A backend on the node's address, reached by a process outside the
    // cgroup: tc translates its flow, on a veth without egress yet.
    let node_vip = Ipv4Addr::new(198, 19, 0, 11);
    c.serve_on_node("node", SocketAddrV4::new(testbed::GATEWAY, 9443).into())
        .unwrap();
    c.write_manifest(
        "node.yaml",
        &service_yaml(
            "apiserver",
            node_vip,
            (443, 9443),
            (53, 5353),
            &[testbed::GATEWAY],
        ),
    )
    .unwrap();
    wait_synced(&c, 4, &[3, 3, 1, 1]);
    let to_node = SocketAddrV4::new(node_vip, 443).to_string();
    let got = answers(&probe::run(&client, None, &["tcp", &to_node, "3"]).unwrap());
    assert!(
        got.iter()
            .all(|a| a.identity == "node" && a.peer == to_node),
        "{got:?}\n{}",
        c.agent_log()
    );
    assert_eq!(
        tc_programs(&c, &client_if, Egress),
        ["kpx_tc_egress"],
        "{}",
        c.agent_log()
    );
    assert!(
        c.agent_log()
            .contains(&format!("attached tc egress to {client_if} (")),
        "{}",
        c.agent_log()
    );
    // The first SYN waited for it; none after.
    assert_eq!(drop_count(&c, proxy_common::DropReason::EgressPending), 1);
    // The backends' veths never needed it.
    for dev in &pod_ifs[1..] {
        assert!(tc_programs(&c, dev, Egress).is_empty(), "{dev}");
    }
    // `kpx dump interfaces` says so, from the pinned links.
    let dump = kpx_dump(&c.bpffs(), &["interfaces", "--json"]);
    let dump: serde_json::Value = serde_json::from_slice(&dump).expect("interfaces JSON");
    let row = |dev: &str| {
        dump.as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == dev))
            .cloned()
            .unwrap_or_else(|| panic!("{dev} not in {dump}"))
    };
    assert_eq!(row(&client_if)["tc_ingress"], true);
    assert_eq!(row(&client_if)["tc_egress"], true);
    for dev in &pod_ifs[1..] {
        assert_eq!(
            (
                row(dev)["tc_ingress"].clone(),
                row(dev)["tc_egress"].clone()
            ),
            (true.into(), false.into())
        );
    }
}
