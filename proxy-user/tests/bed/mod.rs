//! Shared by the end-to-end tests: the standard test bed (a node, a client
//! and three web pods), the agent started on it, and waiting for its syncs.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    path::Path,
    time::Duration,
};

use kpx::dataplane::maps::MapSet;
use testbed::{service_yaml, wait_for, Cluster};

pub const KPX: &str = env!("CARGO_BIN_EXE_kpx");
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
pub const T: Duration = Duration::from_secs(3);

pub fn backends() -> [(&'static str, Ipv4Addr); 4] {
    [
        ("client", Ipv4Addr::new(198, 18, 2, 2)),
        ("web-1", Ipv4Addr::new(198, 18, 1, 1)),
        ("web-2", Ipv4Addr::new(198, 18, 1, 2)),
        ("web-3", Ipv4Addr::new(198, 18, 1, 3)),
    ]
}

/// A fresh bed (root-only: the tests that call it are ignored without root).
pub fn cluster(pods: &[(&str, Ipv4Addr)]) -> Cluster {
    testbed::built("the test bed", Cluster::new(pods))
}

/// The agent serves `n` frontends with `backends` endpoints each.
pub fn wait_synced(c: &Cluster, frontends: usize, endpoints: &[u32]) {
    let ok = wait_for(Duration::from_secs(20), || {
        let maps = MapSet::open_pinned(&c.bpffs()).ok()?;
        let st = maps.serving().ok()?;
        let mut counts: Vec<u32> = st.services.values().map(|v| v.count).collect();
        counts.sort();
        let mut want = endpoints.to_vec();
        want.sort();
        (st.services.len() == frontends && counts == want).then_some(())
    });
    assert!(
        ok.is_some(),
        "agent did not sync in time; log:\n{}",
        c.agent_log()
    );
}

/// `kpx dump ARGS --bpffs BPFFS`: its standard output (the command must succeed).
pub fn kpx_dump(bpffs: &Path, args: &[&str]) -> Vec<u8> {
    succeeded(
        std::process::Command::new(KPX)
            .arg("dump")
            .args(args)
            .arg("--bpffs")
            .arg(bpffs),
    )
}

/// Runs `cmd`, which must succeed (else its standard error is the
/// failure); its standard output.
fn succeeded(cmd: &mut std::process::Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn web(c: &Cluster, endpoints: &[&str]) -> String {
    let ips: Vec<Ipv4Addr> = endpoints.iter().map(|n| c.pod(n).ip).collect();
    service_yaml("web", VIP, (80, 8080), (53, 5353), &ips)
}

pub fn spread(ids: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for id in ids {
        *m.entry(id.clone()).or_default() += 1;
    }
    m
}

pub fn start(pods: &[(&str, Ipv4Addr)]) -> Cluster {
    let mut c = cluster(pods);
    for (name, _) in pods.iter().filter(|(n, _)| n.starts_with("web")) {
        c.serve(name, 8080, 5353).unwrap();
    }
    c
}

/// The standard bed with `web` served by `endpoints`, the agent running and synced.
pub fn running(endpoints: &[&str]) -> Cluster {
    running_with(endpoints, &[])
}

/// [`running`], the agent started with `flags`.
pub fn running_with(endpoints: &[&str], flags: &[&str]) -> Cluster {
    let mut c = start(&backends());
    let yaml = web(&c, endpoints);
    c.write_manifest("web.yaml", &yaml).unwrap();
    c.start_agent(Path::new(KPX), flags).unwrap();
    let n = endpoints.len() as u32;
    wait_synced(&c, 2, &[n, n]);
    c
}

/// `GET path` from `addr` inside the node namespace: (status, body).
pub fn http_get(c: &Cluster, addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let addr = addr.to_string();
    let req = format!("GET {path} HTTP/1.0\r\nHost: kpx\r\n\r\n");
    c.node
        .enter(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(T))?;
            s.write_all(req.as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .map_err(std::io::Error::other)?
        .map(|raw| {
            let status = raw
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = raw
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            (status, body)
        })
}

/// `GET /metrics` from the agent, inside the node namespace.
pub fn metrics(c: &Cluster) -> String {
    metrics_at(c, "127.0.0.1:10249")
}

pub fn metrics_at(c: &Cluster, addr: &str) -> String {
    match http_get(c, addr, "/metrics") {
        Ok((200, body)) => body,
        other => panic!("metrics on {addr}: {other:?}\n{}", c.agent_log()),
    }
}

/// The value of the first sample named exactly `name` (with any labels, or
/// with `name` including them).
pub fn metric(text: &str, name: &str) -> f64 {
    try_metric(text, name).unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

pub fn try_metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = if rest.starts_with('{') {
            &rest[rest.find('}')? + 1..]
        } else {
            rest
        };
        rest.strip_prefix(' ')?.split(' ').next()?.parse().ok()
    })
}

/// "verb resource" for every grant of a ClusterRole (API groups aside:
/// kpx's resources have distinct names).
pub fn rbac_grants(
    role: &k8s_openapi::api::rbac::v1::ClusterRole,
) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for res in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                out.insert(format!("{verb} {res}"));
            }
        }
    }
    out
}

/// The ClusterRole shipped in deploy/rbac.yaml.
pub fn deploy_role() -> k8s_openapi::api::rbac::v1::ClusterRole {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rbac.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let role = serde_norway::Deserializer::from_str(&text)
        .map(|d| <serde_json::Value as serde::Deserialize>::deserialize(d).unwrap())
        .find(|v| v["kind"] == "ClusterRole")
        .map(|v| serde_json::from_value(v).unwrap());
    role.expect("a ClusterRole in deploy/rbac.yaml")
}

/// The datapath's total for `which` in the counter list `read` gives.
fn total<K: PartialEq>(
    c: &Cluster,
    read: impl FnOnce(&MapSet) -> anyhow::Result<Vec<(K, u64)>>,
    which: K,
) -> u64 {
    let maps = MapSet::open_pinned(&c.bpffs()).unwrap();
    read(&maps)
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == which)
        .map_or(0, |(_, n)| n)
}

/// The datapath's count of `which` (an event counter), from the pinned maps.
pub fn event_count(c: &Cluster, which: proxy_common::Event) -> u64 {
    total(c, MapSet::events, which)
}

/// Waits up to `within` until the datapath's count of `which` reaches
/// `at_least` (the agent writes some counters after its work, e.g. the
/// collector's after its walk); fails with the count and the agent's log.
pub fn wait_event(c: &Cluster, which: proxy_common::Event, at_least: u64, within: Duration) {
    let reached = wait_for(within, || (event_count(c, which) >= at_least).then_some(()));
    assert!(
        reached.is_some(),
        "{} {} (want {at_least})\n{}",
        which.name(),
        event_count(c, which),
        c.agent_log()
    );
}

/// Packets the datapath dropped for `reason`, from the pinned counters.
pub fn drop_count(c: &Cluster, reason: proxy_common::DropReason) -> u64 {
    total(c, MapSet::drops, reason)
}

/// Packets that ended in verdict `which`, from the pinned counters.
pub fn counter_count(c: &Cluster, which: proxy_common::Counter) -> u64 {
    total(c, MapSet::counters, which)
}

/// Path MTU discovery through `vip` (web-1 its only backend): the node's
/// link to web-1 carries `mtu` bytes while web-1 advertises a larger MSS,
/// so only the node's ICMP error about client → backend, translated back
/// to the VIP, can teach the client. A bulk transfer must get through, and
/// the client's kernel must have learnt the MTU for the VIP.
pub fn pmtu_through(c: &Cluster, vip: std::net::SocketAddr, mtu: u32) {
    let link = c.pod("web-1").host_if.clone();
    let mtu = mtu.to_string();
    c.node
        .ip(&["link", "set", "dev", &link, "mtu", &mtu])
        .unwrap();
    let client = &c.pod("client").netns;
    let mut conn = testbed::Conn::open(client, vip, Duration::from_secs(10)).unwrap();
    let id = conn.ask_bulk(512 * 1024).unwrap_or_else(|e| {
        panic!(
            "bulk transfer through {vip} stalled: {e:#}\n{}",
            c.agent_log()
        )
    });
    assert_eq!(id, "web-1");
    assert!(counter_count(c, proxy_common::Counter::IcmpTranslated) >= 1);
    let family = if vip.is_ipv6() { "-6" } else { "-4" };
    let route = std::process::Command::new("ip")
        .args([
            "-n",
            &client.name,
            family,
            "route",
            "get",
            &vip.ip().to_string(),
        ])
        .output()
        .unwrap();
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(route.contains(&format!("mtu {mtu}")), "{route}");
}

/// The drills' check: none of `held`'s connections broke or moved
/// (`what` names them; `context`, the agent's log or a command's output,
/// explains a failure).
pub fn none_broken(held: &mut testbed::Held, what: &str, context: &str) {
    let broken = held.broken();
    assert!(
        broken.is_empty(),
        "{what}: {} of {} broken: {broken:?}\n{context}",
        broken.len(),
        held.len()
    );
}

/// `kpx cleanup --bpffs` for the bed, in its node namespace; must succeed.
/// Returns what it printed.
pub fn kpx_cleanup(c: &Cluster) -> String {
    let mut cmd = c.node.command(Path::new(KPX)).unwrap();
    let out = succeeded(cmd.args(["cleanup", "--bpffs"]).arg(c.bpffs()));
    String::from_utf8_lossy(&out).into_owned()
}

/// The agent says its socket programs are attached.
pub fn wait_attached(c: &Cluster) {
    let ok = testbed::wait_for(std::time::Duration::from_secs(10), || {
        c.agent_log()
            .contains("socket-level load balancing: ")
            .then_some(())
    });
    assert!(ok.is_some(), "{}", c.agent_log());
    assert!(
        !c.agent_log()
            .contains("socket-level load balancing unavailable"),
        "{}",
        c.agent_log()
    );
}

pub fn answers(lines: &[String]) -> Vec<testbed::probe::Answer> {
    lines
        .iter()
        .map(|l| testbed::probe::Answer::parse(l).unwrap_or_else(|e| panic!("probe failed: {e}")))
        .collect()
}

/// An unconnected UDP socket (the session `s`, to `dns`) asking two
/// services in turn, then both at once (`dns2` served by web-3 only, `dns`
/// by others): each service keeps the backend it first gave the socket,
/// and each answer shows the service it answers for, whichever the socket
/// sent to last.
pub fn resolver_keeps_a_backend_per_service(
    s: &mut testbed::probe::Session,
    dns: &str,
    dns2: &str,
) {
    use testbed::probe::Answer;
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        first.push(Answer::parse(&s.ask().unwrap()).unwrap());
        second.push(Answer::parse(&s.say(&format!("to {dns2}")).unwrap()).unwrap());
    }
    let ids = |got: &[Answer]| spread(&got.iter().map(|a| a.identity.clone()).collect::<Vec<_>>());
    assert!(first.iter().all(|a| a.peer == dns), "{first:?}");
    assert!(second.iter().all(|a| a.peer == dns2), "{second:?}");
    assert_eq!(ids(&first).len(), 1, "{first:?}");
    assert_eq!(ids(&second).len(), 1, "{second:?}");
    assert_eq!(second[0].identity, "web-3");
    for _ in 0..5 {
        let line = s.say(&format!("pair {dns2}")).unwrap();
        let got: Vec<Answer> = line
            .split(" | ")
            .map(|l| Answer::parse(l).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect();
        assert_eq!(got.len(), 2, "{line}");
        for a in &got {
            let want = if a.identity == "web-3" { dns2 } else { dns };
            assert_eq!(a.peer, want, "{line}");
        }
    }
}

/// The names of the TCX programs on the node's interface `dev` at `at`, in
/// the order they run.
pub fn tc_programs(c: &Cluster, dev: &str, at: aya::programs::TcAttachType) -> Vec<String> {
    let dev = dev.to_string();
    c.node
        .enter(move || {
            let (_, progs) =
                aya::programs::SchedClassifier::query_tcx(&dev, at).expect("query_tcx");
            progs
                .iter()
                .map(|p| p.name_as_str().unwrap_or("?").to_string())
                .collect()
        })
        .expect("enter the node")
}
