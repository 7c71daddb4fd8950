//! Control-plane convergence: how long an EndpointSlice change takes from
//! the API server to the datapath maps, at 1,000 and 10,000 Services of 10
//! endpoints each, and what the agent costs in memory.
//!
//! The real `kpx agent` watches the API server stand-in (real HTTP list and
//! watch) inside a node namespace; the benchmark changes one Service's slice
//! at the stand-in and spins on the pinned maps until the datapath would
//! select the new endpoint. `cargo xtask bench` runs it (root needed);
//! `KPX_BENCH_QUICK=1` runs 1,000 Services only. Figures, not assertions.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use kpx::{
    datapath::MapSet,
    model::FrontendKey,
    sync::service_key,
    testbed::{apiserver::ApiServer, Cluster},
};
use proxy_common::{wire, SlotKey, IPPROTO_TCP};
use serde_json::{json, Value};

const KPX: &str = env!("CARGO_BIN_EXE_kpx");
const ENDPOINTS: u32 = 10;
const CHANGES: u32 = 50;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 200, 0)) + i)
}

fn endpoint(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + k)
}

fn service(i: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": format!("s{i}"), "namespace": "bench" },
        "spec": { "type": "ClusterIP", "clusterIP": vip(i).to_string(), "clusterIPs": [vip(i).to_string()],
                  "ports": [{ "name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080 }] },
    })
}

/// The slice of service `i`, its last endpoint replaced by `last` if given.
fn slice(i: u32, last: Option<Ipv4Addr>) -> Value {
    let eps: Vec<Value> = (0..ENDPOINTS)
        .map(|j| {
            let a = match last {
                Some(a) if j == ENDPOINTS - 1 => a,
                _ => endpoint(i * ENDPOINTS + j),
            };
            json!({ "addresses": [a.to_string()], "conditions": { "ready": true, "serving": true, "terminating": false },
                    "nodeName": format!("node-{}", j % 3) })
        })
        .collect();
    let trigger = k8s_openapi::jiff::Timestamp::now().to_string();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": format!("s{i}-1"), "namespace": "bench",
                      "labels": { "kubernetes.io/service-name": format!("s{i}") },
                      "annotations": { "endpoints.kubernetes.io/last-change-trigger-time": trigger } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "protocol": "TCP", "port": 8080 }],
        "endpoints": eps,
    })
}

/// Whether the datapath would pick `addr` for service `i` (count lookups).
fn selects(maps: &MapSet, i: u32, addr: Option<Ipv4Addr>) -> bool {
    let key = service_key(&FrontendKey {
        addr: vip(i),
        port: 80,
        proto: IPPROTO_TCP,
    });
    let Ok(v) = maps.services.get(&key, 0) else {
        return false;
    };
    if v.count != ENDPOINTS {
        return false;
    }
    let Some(addr) = addr else { return true };
    (0..v.count).any(|slot| {
        maps.slots
            .get(
                &SlotKey {
                    svc_id: v.svc_id,
                    slot,
                },
                0,
            )
            .and_then(|id| maps.backends.get(&id, 0))
            .is_ok_and(|b| b.addr == wire::addr(addr))
    })
}

fn spin(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return Some(t0.elapsed());
        }
        std::hint::spin_loop();
    }
    None
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

struct Row {
    services: u32,
    initial: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    rss_mib: f64,
}

fn run(n: u32) -> Result<Row> {
    let mut c = Cluster::new(&[])?;
    let api = ApiServer::start_with(c.binder("127.0.0.1:6443".parse()?))?;
    for i in 0..n {
        api.apply(service(i))?;
        api.apply(slice(i, None))?;
    }
    let started = Instant::now();
    c.start_agent_kube(Path::new(KPX), &api, &["--metrics-bind-address", ""])?;
    let maps = loop {
        if let Ok(m) = MapSet::open_pinned(&c.bpffs()) {
            break m;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("agent did not pin its maps:\n{}", c.agent_log());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    // The first and last services present: everything was listed and written.
    let Some(_) = spin(Duration::from_secs(120), || {
        selects(&maps, n - 1, None) && selects(&maps, 0, None)
    }) else {
        bail!("no initial sync:\n{}", c.agent_log());
    };
    let initial = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let pid = c.agent.as_ref().map(|a| a.pid()).context("no agent")?;
    let rss = rss_kib(pid)?;
    let mut lat = Vec::new();
    for r in 0..CHANGES {
        let i = (r * 7919) % n;
        let fresh = endpoint(n * ENDPOINTS + 1000 + r);
        let s = slice(i, Some(fresh));
        // Spaced past --min-sync-period, so each change is measured alone.
        std::thread::sleep(Duration::from_millis(150));
        let t0 = Instant::now();
        api.apply(s)?;
        let Some(_) = spin(Duration::from_secs(10), || selects(&maps, i, Some(fresh))) else {
            bail!("change {r} never reached the maps:\n{}", c.agent_log());
        };
        lat.push(t0.elapsed());
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    Ok(Row {
        services: n,
        initial,
        p50: pct(0.5),
        p99: pct(0.99),
        max: *lat.last().context("no samples")?,
        rss_mib: rss as f64 / 1024.0,
    })
}

fn main() -> Result<()> {
    let quick = std::env::var_os("KPX_BENCH_QUICK").is_some();
    let sizes: &[u32] = if quick { &[1000] } else { &[1000, 10_000] };
    println!(
        "kpx control-plane convergence (API server stand-in over HTTP, {ENDPOINTS} endpoints per service, {CHANGES} single-slice changes)"
    );
    println!("| services | initial list to maps | change to maps p50 | p99 | max | agent RSS |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &n in sizes {
        let r = run(n)?;
        println!(
            "| {} | {:.0} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} MiB |",
            r.services,
            r.initial.as_secs_f64() * 1e3,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.max.as_secs_f64() * 1e3,
            r.rss_mib
        );
    }
    Ok(())
}
