//! `cargo xtask demo`: kpx for real, in a minute, on a namespace "cluster".
//!
//! A node namespace runs `kpx agent` on `examples/web.yaml`; three pod
//! namespaces run TCP and UDP servers; a client pod talks to the service's
//! VIP, through the tc datapath and, from a cgroup the demo creates,
//! through the socket-level load balancer. Everything is removed at the
//! end.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use kpx::dataplane::maps::MapSet;
use testbed::{tcp_ask_many, udp_ask_many, wait_for, Cluster, Conn};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const T: Duration = Duration::from_secs(3);

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut kpx = None;
    let mut manifest = None;
    let mut probe = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--kpx" => kpx = args.next().map(PathBuf::from),
            "--manifest" => manifest = args.next().map(PathBuf::from),
            "--probe" => probe = args.next().map(PathBuf::from),
            other => bail!("unknown argument {other}"),
        }
    }
    let kpx = kpx.context("--kpx PATH is required")?;
    let manifest = manifest.context("--manifest PATH is required")?;
    let probe = probe.context("--probe PATH (kpx-probe) is required")?;
    // SAFETY: set before any thread starts; read by testbed::probe.
    unsafe { std::env::set_var("KPX_PROBE", &probe) };
    let yaml = std::fs::read_to_string(&manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;

    step("Building a namespace cluster: node-1, pods web-1..3 and a client (198.18.0.0/16; VIPs in 198.19.0.0/16)");
    let mut c = Cluster::new(&[
        ("client", Ipv4Addr::new(198, 18, 2, 2)),
        ("web-1", Ipv4Addr::new(198, 18, 1, 1)),
        ("web-2", Ipv4Addr::new(198, 18, 1, 2)),
        ("web-3", Ipv4Addr::new(198, 18, 1, 3)),
    ])?;
    for pod in ["web-1", "web-2", "web-3"] {
        c.serve(pod, 8080, 5353)?;
    }
    c.write_manifest("web.yaml", &yaml)?;

    step(&format!(
        "Starting `kpx agent --manifests ...` on node-1 with {}",
        manifest.display()
    ));
    let started = Instant::now();
    // The socket-level load balancer on a cgroup of the demo's own, never
    // on the machine's root cgroup.
    let cgroup = testbed::probe::Cgroup::create("demo")?;
    let cg = cgroup.path.to_string_lossy().into_owned();
    c.start_agent(&kpx, &["--socket-lb-cgroup", &cg])?;
    // Served: the frontends written and their ports let through the port
    // filter, which the agent opens after them (`MapSet::serving`). The
    // frontends alone were not enough: a first connection could meet the
    // closed filter, reach the node's routing untranslated and fail with
    // "network is unreachable".
    let programmed = |c: &Cluster, endpoints: u32| {
        wait_for(Duration::from_secs(20), || {
            let st = MapSet::open_pinned(&c.bpffs()).ok()?.serving().ok()?;
            (st.services.len() == 2 && st.services.values().all(|v| v.count == endpoints))
                .then_some(())
        })
    };
    if programmed(&c, 3).is_none() {
        bail!(
            "the agent did not program the service; its log:\n{}",
            c.agent_log()
        );
    }
    println!(
        "   datapath attached and service programmed in {:.0?}",
        started.elapsed()
    );

    step("300 TCP connections from the client to web's VIP 198.19.0.10:80");
    let ids = tcp_ask_many(&c.pod("client").netns, SocketAddrV4::new(VIP, 80), 300, T)?;
    show(&ids);

    step("150 UDP requests to 198.19.0.10:53, each from a new socket");
    let answers = udp_ask_many(&c.pod("client").netns, SocketAddrV4::new(VIP, 53), 150, T)?;
    let from_vip = answers
        .iter()
        .all(|a| a.from == SocketAddrV4::new(VIP, 53).into());
    show(
        &answers
            .iter()
            .map(|a| a.identity.clone())
            .collect::<Vec<_>>(),
    );
    println!(
        "   every reply came from {VIP}:53: {}",
        if from_vip { "yes" } else { "NO" }
    );

    step("Removing web-3 from the EndpointSlice while a long-lived TCP connection is open");
    let mut long = Conn::open(&c.pod("client").netns, SocketAddrV4::new(VIP, 80), T)?;
    let before = long.ask()?;
    let without_web3 = yaml
        .split("- addresses: [\"198.18.1.3\"]")
        .next()
        .unwrap_or(&yaml)
        .to_string();
    c.write_manifest("web.yaml", &without_web3)?;
    programmed(&c, 2).context("the agent did not apply the edit")?;
    let ids = tcp_ask_many(&c.pod("client").netns, SocketAddrV4::new(VIP, 80), 150, T)?;
    show(&ids);
    println!(
        "   the long-lived connection was answered by {before} before the edit and by {} after it",
        long.ask()?
    );
    drop(long);

    step(&format!(
        "Socket-level load balancing: 150 TCP connections from a client process in {cg} (kpx-probe)"
    ));
    let vip = SocketAddrV4::new(VIP, 80).to_string();
    let lines = testbed::probe::run(&c.pod("client").netns, Some(&cgroup), &["tcp", &vip, "150"])?;
    let answers: Vec<testbed::probe::Answer> = lines
        .iter()
        .filter_map(|l| testbed::probe::Answer::parse(l).ok())
        .collect();
    show(
        &answers
            .iter()
            .map(|a| a.identity.clone())
            .collect::<Vec<_>>(),
    );
    let maps = MapSet::open_pinned(&c.bpffs())?;
    let connects = maps
        .events()?
        .into_iter()
        .find(|(e, _)| *e == proxy_common::Event::SockConnect)
        .map_or(0, |(_, n)| n);
    println!(
        "   connected straight to a backend at connect(): {connects}; getpeername() still says {vip}: {}",
        if answers.iter().all(|a| a.peer == vip) { "yes" } else { "NO" }
    );
    let mut held =
        testbed::probe::Session::start(&c.pod("client").netns, Some(&cgroup), &["tcp", &vip])?;
    held.ask()?;

    step("kpx dump sockets (one connection held open)");
    print!("{}", kpx_dump(&kpx, &c.bpffs(), "sockets")?);
    drop(held);

    step("kpx dump services");
    print!("{}", kpx_dump(&kpx, &c.bpffs(), "services")?);

    step("kpx dump interfaces (tc egress only where a flow tc translated came in: the client's veth)");
    print!("{}", kpx_dump(&kpx, &c.bpffs(), "interfaces")?);

    step("Cleaning up: agent stopped, pinned maps removed, namespaces deleted");
    if let Some(agent) = c.agent.as_mut() {
        agent.stop()?;
    }
    Command::new(&kpx)
        .args(["cleanup", "--bpffs"])
        .arg(c.bpffs())
        .output()?;
    drop(c);
    drop(cgroup);
    println!("   done.");
    Ok(())
}

fn step(s: &str) {
    println!("\n== {s}");
}

fn show(ids: &[String]) {
    let mut m: BTreeMap<&str, usize> = BTreeMap::new();
    for id in ids {
        *m.entry(id).or_default() += 1;
    }
    for (id, n) in m {
        println!("   {id:<8} {n:>4}  {}", "#".repeat(n / 5));
    }
}

/// What `kpx dump WHAT` prints for the bed's pinned maps and links.
fn kpx_dump(kpx: &Path, bpffs: &Path, what: &str) -> Result<String> {
    let out = Command::new(kpx)
        .args(["dump", what, "--bpffs"])
        .arg(bpffs)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
