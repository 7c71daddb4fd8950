//! `kpx dump services --ipvsadm`: the datapath's services in the layout
//! IPVS users read every day (`ipvsadm -Ln`, `--stats`, `--rate`), so their
//! eyes, runbooks and scripts keep working after the move off IPVS mode.
//!
//! What maps onto what:
//! - a virtual service per frontend; a NodePort once per node address
//!   that serves NodePorts, as kube-proxy's IPVS mode creates them;
//! - Scheduler: the frontend's; `persistent T` for ClientIP affinity;
//! - a real server per backend of the table new flows use (the node-local
//!   one under a Local traffic policy), weight 1; a backend that left but
//!   still has flows is listed with weight 0, as IPVS keeps a terminating
//!   real server until its connections end;
//! - Forward is always `Masq`: kpx translates addresses (IPVS's NAT mode);
//! - ActiveConn: established TCP flows, not closing; InActConn: the rest
//!   (handshakes, closing TCP, UDP), as IPVS counts them;
//! - statistics are kept per service, not per backend: `--stats` and
//!   `--rate` give the virtual service's figures and `-` for its real
//!   servers. Numbers are exact (ipvsadm's `--exact`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use anyhow::Result;
use proxy_common::{
    CtValue, In6, ServiceStats, SlotKey, CT_DIR_ORIGINAL, CT_F_CLOSING, IPPROTO_TCP, LOCAL_SLOTS,
    NODE_F_NODEPORT, SVC_F_LOCAL,
};
use serde::Serialize;

use super::dump::proto_name;
use crate::{
    control::scheduler::Scheduler,
    dataplane::reconcile::MapState,
    dataplane::{
        conntrack::CtFamily,
        maps::{CtTable, MapSet},
    },
};

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RealServer {
    pub addr: IpAddr,
    pub port: u16,
    /// 1 for a backend new flows may pick, 0 for one that left but still
    /// has flows.
    pub weight: u32,
    pub active_conns: u64,
    pub inactive_conns: u64,
}

#[derive(Debug, Serialize)]
pub struct VirtualService {
    pub protocol: String,
    pub addr: IpAddr,
    pub port: u16,
    pub scheduler: String,
    /// ipvsadm's scheduler flags kpx acts on (`mh-port`).
    pub flags: Vec<String>,
    /// ClientIP affinity timeout in seconds (IPVS persistence).
    pub persistent: Option<u32>,
    pub svc_id: u32,
    pub name: String,
    pub real_servers: Vec<RealServer>,
    pub stats: Stats,
}

/// A service's statistics as ipvsadm splits them.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq)]
pub struct Stats {
    pub conns: u64,
    pub in_packets: u64,
    pub out_packets: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
}

impl From<ServiceStats> for Stats {
    fn from(s: ServiceStats) -> Self {
        Self {
            conns: s.new_flows,
            in_packets: s.packets.saturating_sub(s.reply_packets),
            out_packets: s.reply_packets,
            in_bytes: s.bytes.saturating_sub(s.reply_bytes),
            out_bytes: s.reply_bytes,
        }
    }
}

/// (service id, backend id) → (active, inactive, backend address, port).
type Conns = BTreeMap<(u32, u32), (u64, u64, IpAddr, u16)>;

/// Active and inactive flows per service and backend, from one pass over
/// one family's conntrack tables (original directions only: one per flow).
pub fn conns<A: CtFamily>(entries: impl IntoIterator<Item = (CtTable, CtValue<A>)>) -> Conns {
    let mut out = Conns::new();
    add_conns(&mut out, entries);
    out
}

fn add_conns<A: CtFamily>(
    out: &mut Conns,
    entries: impl IntoIterator<Item = (CtTable, CtValue<A>)>,
) {
    for (table, v) in entries {
        if v.dir != CT_DIR_ORIGINAL {
            continue;
        }
        let e = out.entry((v.svc_id, v.backend_id)).or_insert((
            0,
            0,
            v.new_dst_addr.to_ip(),
            proxy_common::wire::to_port(v.new_dst_port),
        ));
        if table == CtTable::Tcp && v.flags & CT_F_CLOSING == 0 {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
}

/// [`conns`] over both families' tables (service and backend ids are one
/// space for both). A table that cannot be read counts no flows, logged.
pub fn read_conns(maps: &MapSet) -> Conns {
    let mut out = Conns::new();
    add_conns(
        &mut out,
        maps.ct_entries().into_iter().map(|(t, _, v)| (t, v)),
    );
    for t in CtTable::ALL {
        match In6::read(maps, t) {
            Ok(entries) => add_conns(&mut out, entries.into_iter().map(|(_, v)| (t, v))),
            Err(e) => log::warn!("reading IPv6's conntrack table {t:?}: {e:#}"),
        }
    }
    out
}

pub fn read(maps: &MapSet) -> Result<Vec<VirtualService>> {
    let state = maps.read_state()?;
    let conns = read_conns(maps);
    virtual_services(&state, &conns, |id| Ok(maps.service_stats(id)?.into()))
}

/// The virtual services of what `state` holds: pure, so the rendering is
/// tested without maps.
pub fn virtual_services(
    state: &MapState,
    conns: &Conns,
    stats_of: impl Fn(u32) -> Result<Stats>,
) -> Result<Vec<VirtualService>> {
    let nodeport_addrs: BTreeSet<IpAddr> = state
        .node_addrs
        .iter()
        .filter(|(_, f)| *f & NODE_F_NODEPORT != 0)
        .map(|(a, _)| *a)
        .collect();
    let mut out = Vec::new();
    for (k, v) in &state.services {
        let (base, count) = if v.flags & SVC_F_LOCAL != 0 {
            (LOCAL_SLOTS, v.local_count)
        } else {
            (0, v.count)
        };
        // A Maglev table holds each backend many times: list it once.
        let ids: BTreeSet<u32> = (0..count)
            .filter_map(|i| {
                state
                    .slots
                    .get(&SlotKey {
                        svc_id: v.svc_id,
                        slot: base + i,
                    })
                    .copied()
            })
            .collect();
        let mut real_servers: Vec<RealServer> = ids
            .iter()
            .filter_map(|id| {
                let b = state.backends.get(id)?;
                let c = conns.get(&(v.svc_id, *id));
                Some(RealServer {
                    addr: b.addr,
                    port: b.port,
                    weight: 1,
                    active_conns: c.map_or(0, |c| c.0),
                    inactive_conns: c.map_or(0, |c| c.1),
                })
            })
            .collect();
        for ((_, id), (active, inactive, addr, port)) in
            conns.range((v.svc_id, 0)..=(v.svc_id, u32::MAX))
        {
            if !ids.contains(id) {
                real_servers.push(RealServer {
                    addr: *addr,
                    port: *port,
                    weight: 0,
                    active_conns: *active,
                    inactive_conns: *inactive,
                });
            }
        }
        real_servers.sort_by_key(|r| (r.addr, r.port, std::cmp::Reverse(r.weight)));
        let sched = Scheduler::of_flags(v.flags);
        let stats = stats_of(v.svc_id)?;
        // A NodePort is listed on its family's NodePort addresses.
        let on: Vec<IpAddr> = nodeport_addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == k.addr.is_ipv4())
            .collect();
        let addrs: Vec<IpAddr> = if k.addr.is_unspecified() && !on.is_empty() {
            on
        } else {
            vec![k.addr]
        };
        for addr in addrs {
            out.push(VirtualService {
                protocol: proto_name(k.proto),
                addr,
                port: k.port,
                scheduler: sched.kind.name().into(),
                flags: if sched.hash_port && sched.hashing() {
                    vec![format!("{}-port", sched.kind.name())]
                } else {
                    Vec::new()
                },
                persistent: (v.affinity_timeout > 0).then_some(v.affinity_timeout),
                svc_id: v.svc_id,
                name: state
                    .names
                    .get(&v.svc_id)
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                real_servers: real_servers.clone(),
                stats,
            });
        }
    }
    out.sort_by_key(|s| (s.protocol != proto_name(IPPROTO_TCP), s.addr, s.port));
    Ok(out)
}

const HEADER: &str = "IP Virtual Server version 1.2.1 (size=4096), as kpx's datapath serves it";

fn service_name(s: &VirtualService) -> String {
    format!("{}  {}", s.protocol, SocketAddr::new(s.addr, s.port))
}

/// `ipvsadm -Ln`.
pub fn table(services: &[VirtualService]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{HEADER}");
    let _ = writeln!(out, "Prot LocalAddress:Port Scheduler Flags");
    let _ = writeln!(
        out,
        "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn"
    );
    for s in services {
        let _ = write!(out, "{} {}", service_name(s), s.scheduler);
        if !s.flags.is_empty() {
            let _ = write!(out, " ({})", s.flags.join(","));
        }
        if let Some(t) = s.persistent {
            let _ = write!(out, " persistent {t}");
        }
        out.push('\n');
        for r in &s.real_servers {
            let _ = writeln!(
                out,
                "  -> {:<28} {:<7} {:<6} {:<10} {:<10}",
                SocketAddr::new(r.addr, r.port).to_string(),
                "Masq",
                r.weight,
                r.active_conns,
                r.inactive_conns
            );
        }
    }
    out
}

/// `ipvsadm -Ln --stats --exact`.
pub fn stats_table(services: &[VirtualService]) -> String {
    figures_table(
        services,
        ["Conns", "InPkts", "OutPkts", "InBytes", "OutBytes"],
    )
}

/// `ipvsadm -Ln --rate --exact`: `services` carry the per-second rates
/// ([`rates`]).
pub fn rate_table(services: &[VirtualService]) -> String {
    figures_table(services, ["CPS", "InPPS", "OutPPS", "InBPS", "OutBPS"])
}

/// `services`' statistics (totals, or rates once [`rates`] made them so)
/// under `columns`.
fn figures_table(services: &[VirtualService], columns: [&str; 5]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{HEADER}");
    let [a, b, c, d, e] = columns;
    let _ = writeln!(
        out,
        "{:<33} {a:>8} {b:>8} {c:>8} {d:>8} {e:>8}",
        "Prot LocalAddress:Port"
    );
    let _ = writeln!(out, "  -> RemoteAddress:Port");
    for s in services {
        let f = s.stats;
        let _ = writeln!(
            out,
            "{:<33} {:>8} {:>8} {:>8} {:>8} {:>8}",
            service_name(s),
            f.conns,
            f.in_packets,
            f.out_packets,
            f.in_bytes,
            f.out_bytes
        );
        for r in &s.real_servers {
            let _ = writeln!(
                out,
                "  -> {:<28} {:>8} {:>8} {:>8} {:>8} {:>8}",
                SocketAddr::new(r.addr, r.port).to_string(),
                "-",
                "-",
                "-",
                "-",
                "-"
            );
        }
    }
    out
}

/// `later`'s statistics turned into rates per second against `earlier`
/// (the same services read `secs` seconds before).
pub fn rates(earlier: &[VirtualService], later: &mut [VirtualService], secs: f64) {
    let before: BTreeMap<(String, IpAddr, u16), Stats> = earlier
        .iter()
        .map(|s| ((s.protocol.clone(), s.addr, s.port), s.stats))
        .collect();
    let per_sec = |now: u64, then: u64| (now.saturating_sub(then) as f64 / secs).round() as u64;
    for s in later {
        let b = before
            .get(&(s.protocol.clone(), s.addr, s.port))
            .copied()
            .unwrap_or(s.stats);
        s.stats = Stats {
            conns: per_sec(s.stats.conns, b.conns),
            in_packets: per_sec(s.stats.in_packets, b.in_packets),
            out_packets: per_sec(s.stats.out_packets, b.out_packets),
            in_bytes: per_sec(s.stats.in_bytes, b.in_bytes),
            out_bytes: per_sec(s.stats.out_bytes, b.out_bytes),
        };
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::{ServiceValue, CT_DIR_REPLY};

    use super::*;
    use crate::{
        control::{model::FrontendKey, scheduler::Kind},
        dataplane::reconcile::BackendAddr,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn flow(
        svc_id: u32,
        backend_id: u32,
        backend: &str,
        table: CtTable,
        flags: u16,
    ) -> (CtTable, CtValue) {
        let v = CtValue {
            svc_id,
            backend_id,
            new_dst_addr: proxy_common::wire::addr(backend.parse().unwrap()),
            new_dst_port: proxy_common::wire::port(8080),
            flags,
            dir: CT_DIR_ORIGINAL,
            ..CtValue::default()
        };
        (table, v)
    }

    /// A Maglev-scheduled TCP service with two backends and persistence,
    /// as a NodePort on two node addresses and a cluster IP.
    fn state() -> MapState {
        let mut s = MapState::default();
        let mh = Scheduler {
            kind: Kind::Mh,
            hash_port: true,
        };
        for (id, addr) in [(1, "198.18.1.1"), (2, "198.18.1.2")] {
            s.backends.insert(
                id,
                BackendAddr {
                    addr: ip(addr),
                    port: 8080,
                    proto: IPPROTO_TCP,
                    local: false,
                },
            );
        }
        for (svc_id, addr, port) in [(10, "198.19.0.10", 80), (11, "0.0.0.0", 30080)] {
            // Each backend in many slots, as a Maglev table has it.
            for slot in 0..401 {
                s.slots.insert(SlotKey { svc_id, slot }, 1 + slot % 2);
            }
            s.services.insert(
                FrontendKey {
                    addr: ip(addr),
                    port,
                    proto: IPPROTO_TCP,
                },
                ServiceValue {
                    svc_id,
                    count: 401,
                    flags: mh.flags(),
                    affinity_timeout: 600,
                    ..ServiceValue::default()
                },
            );
            s.names.insert(svc_id, "default/web:http".into());
        }
        s.node_addrs.insert(ip("198.18.128.1"), NODE_F_NODEPORT | 1);
        s.node_addrs.insert(ip("198.18.128.2"), NODE_F_NODEPORT | 1);
        s.node_addrs.insert(ip("127.0.0.1"), 1);
        s
    }

    #[test]
    fn the_layout_ipvs_users_read() {
        let flows = [
            flow(10, 1, "198.18.1.1", CtTable::Tcp, 0),
            flow(10, 1, "198.18.1.1", CtTable::Tcp, CT_F_CLOSING),
            flow(10, 2, "198.18.1.2", CtTable::Any, 0),
            // A backend that left, one flow still on it.
            flow(10, 3, "198.18.1.3", CtTable::Tcp, 0),
            // Reply entries are not flows of their own.
            (
                CtTable::Tcp,
                CtValue {
                    dir: CT_DIR_REPLY,
                    svc_id: 10,
                    backend_id: 1,
                    ..CtValue::default()
                },
            ),
        ];
        let c = conns(flows);
        let vs = virtual_services(&state(), &c, |_| Ok(Stats::default())).unwrap();
        let text = table(&vs);
        let want = "\
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  198.18.128.1:30080 mh (mh-port) persistent 600
  -> 198.18.1.1:8080              Masq    1      0          0         
  -> 198.18.1.2:8080              Masq    1      0          0         
TCP  198.18.128.2:30080 mh (mh-port) persistent 600
  -> 198.18.1.1:8080              Masq    1      0          0         
  -> 198.18.1.2:8080              Masq    1      0          0         
TCP  198.19.0.10:80 mh (mh-port) persistent 600
  -> 198.18.1.1:8080              Masq    1      1          1         
  -> 198.18.1.2:8080              Masq    1      0          1         
  -> 198.18.1.3:8080              Masq    0      1          0         
";
        assert_eq!(text.split_once('\n').unwrap().1, want, "{text}");
    }

    #[test]
    fn statistics_split_by_direction_and_rates_per_second() {
        let s = ServiceStats {
            packets: 100,
            bytes: 10_000,
            new_flows: 4,
            reply_packets: 40,
            reply_bytes: 6_000,
            ..Default::default()
        };
        let stats = Stats::from(s);
        assert_eq!(
            stats,
            Stats {
                conns: 4,
                in_packets: 60,
                out_packets: 40,
                in_bytes: 4_000,
                out_bytes: 6_000
            }
        );
        let mut st = state();
        st.services.retain(|k, _| k.port == 80);
        let earlier = virtual_services(&st, &Conns::new(), |_| Ok(Stats::default())).unwrap();
        let mut later = virtual_services(&st, &Conns::new(), |_| Ok(stats)).unwrap();
        rates(&earlier, &mut later, 2.0);
        assert_eq!(later[0].stats.in_packets, 30);
        assert_eq!(later[0].stats.out_bytes, 3_000);
        let text = stats_table(&later);
        let row = text.lines().find(|l| l.starts_with("TCP")).unwrap();
        let f: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            f,
            ["TCP", "198.19.0.10:80", "2", "30", "20", "2000", "3000"]
        );
    }
}
