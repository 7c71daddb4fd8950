//! `kpx dump`: what the datapath's maps hold, read from the pinned maps (so
//! it works from another process while the agent runs), as aligned tables in
//! the spirit of `ipvsadm -Ln`, or JSON.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::Result;
use proxy_common::{
    wire, CtKey, CtValue, Event, In6, ServiceStats, CT_DIR_ORIGINAL, CT_F_DSR_DECAP,
    CT_F_DSR_ENCAP, CT_F_FROM_NODE, CT_F_SNAT, IPPROTO_TCP, IPPROTO_UDP, LOCAL_SLOTS,
    SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_NODEPORT, SVC_F_SOURCE_RANGES, TCP_ACK, TCP_FIN, TCP_RST,
    TCP_SYN,
};
use serde::Serialize;

use crate::{
    dataplane::conntrack::{self as ct, monotonic_ns, FlowState},
    dataplane::maps::{name_from_bytes, CtTable, MapSet},
    dataplane::reconcile::MapState,
    dataplane::socklb,
};

/// A socket the socket-level load balancer gave a backend (`kpx dump
/// sockets`).
#[derive(Debug, Serialize)]
pub struct SocketRow {
    pub cookie: u64,
    pub protocol: String,
    /// The service address the socket asked for.
    pub service: String,
    pub name: String,
    pub backend: String,
    pub backend_id: u32,
    /// "connected" (`connect()`) or "unconnected" (UDP `sendmsg()`).
    pub mode: &'static str,
    /// In its backend's active connections (a least-connection service).
    pub counted: bool,
}

pub fn sockets(maps: &MapSet, dir: &Path) -> Result<Vec<SocketRow>> {
    let names = crate::dataplane::maps::read_hash(&maps.service_names)?;
    let name = |id: u32| {
        names
            .iter()
            .find(|(k, _)| *k == id)
            .map_or_else(|| format!("svc {id}"), |(_, n)| name_from_bytes(n))
    };
    let mut rows: Vec<SocketRow> = socklb::sockets(maps, dir)?
        .into_iter()
        .map(|s| SocketRow {
            cookie: s.cookie,
            protocol: proto_name(s.proto),
            service: s.service.to_string(),
            name: name(s.svc_id),
            backend: s.backend.to_string(),
            backend_id: s.backend_id,
            mode: if s.connected() {
                "connected"
            } else {
                "unconnected"
            },
            counted: s.counted(),
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.service, &a.backend, a.cookie).cmp(&(&b.service, &b.backend, b.cookie))
    });
    Ok(rows)
}

pub fn sockets_table(rows: &[SocketRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:<5} {:<22} {:<22} {:<12}  Service",
        "Cookie", "Prot", "Frontend", "Backend", "Mode"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:>12} {:<5} {:<22} {:<22} {:<12}  {}{}",
            r.cookie,
            r.protocol,
            r.service,
            r.backend,
            r.mode,
            r.name,
            if r.counted { " (counted)" } else { "" }
        );
    }
    out
}

/// An interface kpx's programs are attached to, as pinned (`kpx dump
/// interfaces`).
#[derive(Debug, Default, Serialize)]
pub struct InterfaceRow {
    pub ifindex: u32,
    pub name: String,
    pub tc_ingress: bool,
    /// tc egress: with `--socket-lb=all`, on a pod's veth only once a flow
    /// tc translates came in there.
    pub tc_egress: bool,
    /// XDP's mode there (`native`, `generic`), if attached.
    pub xdp: Option<String>,
}

/// The interfaces with kpx's links pinned under `dir` (tc's in `links`,
/// XDP's in `links-xdp`; an agent without TCX owns its filters and pins
/// none), by ifindex.
pub fn interfaces(dir: &Path) -> Result<Vec<InterfaceRow>> {
    use crate::dataplane::{attach, xdp};
    let mut rows: BTreeMap<(u32, String), InterfaceRow> = BTreeMap::new();
    for (links, tc) in [(attach::links_dir(dir), true), (xdp::links_dir(dir), false)] {
        let entries = match std::fs::read_dir(&links) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("reading {}", links.display())))
            }
        };
        for entry in entries {
            let file = entry?.file_name().to_string_lossy().into_owned();
            let Some((ifindex, how, name)) = attach::parse_link_pin_name(&file) else {
                continue;
            };
            let row = rows
                .entry((ifindex, name.clone()))
                .or_insert_with(|| InterfaceRow {
                    ifindex,
                    name,
                    ..Default::default()
                });
            match (tc, how) {
                (true, "ingress") => row.tc_ingress = true,
                (true, "egress") => row.tc_egress = true,
                (false, mode) => row.xdp = Some(mode.to_string()),
                _ => {}
            }
        }
    }
    Ok(rows.into_values().collect())
}

pub fn interfaces_table(rows: &[InterfaceRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>7} {:<16} {:<10} {:<10} XDP",
        "Ifindex", "Interface", "tc in", "tc out"
    );
    let yes = |b: bool, no: &'static str| if b { "yes" } else { no };
    for r in rows {
        let _ = writeln!(
            out,
            "{:>7} {:<16} {:<10} {:<10} {}",
            r.ifindex,
            r.name,
            yes(r.tc_ingress, "-"),
            // With the socket-level balancer, a pod's veth gets egress
            // when a flow tc translates first arrives there.
            yes(r.tc_egress, "on demand"),
            r.xdp.as_deref().unwrap_or("-")
        );
    }
    out
}

pub fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        other => format!("proto-{other}"),
    }
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendRow {
    pub id: u32,
    pub addr: IpAddr,
    pub port: u16,
    /// "active": new flows may pick it; "removed": no longer an endpoint,
    /// but flows it already had still reach it.
    pub state: &'static str,
    /// Flows (conntrack, original direction) currently pointing at it.
    pub flows: u64,
    /// "cluster" (the service's endpoints) or "local" (this node's, for a
    /// Local traffic policy).
    pub table: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub protocol: String,
    /// The frontend address; 0.0.0.0 or :: for a NodePort (any NodePort
    /// address of that family).
    pub vip: IpAddr,
    pub port: u16,
    /// `vip:port` (`[vip]:port` for IPv6), with `*` (`[::]` for IPv6) for
    /// a NodePort's address.
    pub frontend: String,
    /// "cluster-ip", "nodeport" or "external" (an external or LB IP).
    pub kind: &'static str,
    /// "local" (Local traffic policy), "source-ranges".
    pub policy: Vec<&'static str>,
    /// With "source-ranges": the clients admitted.
    pub source_ranges: Vec<String>,
    pub name: String,
    pub svc_id: u32,
    /// ClientIP session affinity timeout in seconds; 0 when off.
    pub affinity_timeout: u32,
    pub backends: Vec<BackendRow>,
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Which path served the frontend: of `packets`, those translated at
    /// XDP (the rest at tc); and the flows the socket-level balancer sent
    /// to a backend at `connect()`/`sendmsg()` (of `new_flows`).
    pub xdp_packets: u64,
    pub socket_flows: u64,
}

/// (service id, backend id) → (flows, backend address and port as the flows
/// know them).
pub type FlowCounts = BTreeMap<(u32, u32), (u64, IpAddr, u16)>;

/// Flows per service and backend, from one pass over conntrack (the
/// ipvsadm view's active and inactive ones together).
fn flow_counts(maps: &MapSet) -> Result<FlowCounts> {
    let conns = super::ipvsadm::read_conns(maps);
    Ok(conns
        .into_iter()
        .map(|(k, (active, inactive, addr, port))| (k, (active + inactive, addr, port)))
        .collect())
}

pub fn services(maps: &MapSet) -> Result<Vec<ServiceRow>> {
    let state = maps.read_state()?;
    let flows = flow_counts(maps)?;
    service_rows(&state, &flows, |id| maps.service_stats(id))
}

/// The rows of `kpx dump services` for what `state` holds, `flows` per
/// service and backend, and each service's statistics: pure, so the same
/// rendering is tested without maps.
pub fn service_rows(
    state: &MapState,
    flows: &FlowCounts,
    stats_of: impl Fn(u32) -> Result<ServiceStats>,
) -> Result<Vec<ServiceRow>> {
    let mut rows = Vec::new();
    for (k, v) in &state.services {
        let mut backends = Vec::new();
        for slot in crate::dataplane::reconcile::slot_numbers(v) {
            let key = proxy_common::SlotKey {
                svc_id: v.svc_id,
                slot,
            };
            let Some(id) = state.slots.get(&key) else {
                continue;
            };
            let Some(b) = state.backends.get(id) else {
                continue;
            };
            backends.push(BackendRow {
                id: *id,
                addr: b.addr,
                port: b.port,
                state: "active",
                flows: flows.get(&(v.svc_id, *id)).map_or(0, |f| f.0),
                table: if slot < LOCAL_SLOTS {
                    "cluster"
                } else {
                    "local"
                },
            });
        }
        for ((_, id), (n, addr, port)) in flows.range((v.svc_id, 0)..=(v.svc_id, u32::MAX)) {
            if !backends.iter().any(|b| b.id == *id) {
                backends.push(BackendRow {
                    id: *id,
                    addr: *addr,
                    port: *port,
                    state: "removed",
                    flows: *n,
                    table: "cluster",
                });
            }
        }
        backends.sort_by_key(|b| (b.table, b.state, b.addr, b.port));
        let stats = stats_of(v.svc_id)?;
        let (vip, port) = (k.addr, k.port);
        let mut policy = Vec::new();
        if v.flags & SVC_F_LOCAL != 0 {
            policy.push("local");
        }
        if v.flags & SVC_F_SOURCE_RANGES != 0 {
            policy.push("source-ranges");
        }
        rows.push(ServiceRow {
            protocol: proto_name(k.proto),
            vip,
            port,
            frontend: if vip == IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED) {
                format!("*:{port}")
            } else {
                SocketAddr::new(vip, port).to_string()
            },
            kind: if v.flags & SVC_F_NODEPORT != 0 {
                "nodeport"
            } else if v.flags & SVC_F_EXTERNAL != 0 {
                "external"
            } else {
                "cluster-ip"
            },
            policy,
            source_ranges: state
                .ranges
                .get(&v.svc_id)
                .into_iter()
                .flatten()
                .map(|r| r.to_string())
                .collect(),
            name: state
                .names
                .get(&v.svc_id)
                .map(|n| n.to_string())
                .unwrap_or_default(),
            svc_id: v.svc_id,
            affinity_timeout: v.affinity_timeout,
            flows: flows
                .range((v.svc_id, 0)..=(v.svc_id, u32::MAX))
                .map(|(_, f)| f.0)
                .sum(),
            backends,
            packets: stats.packets,
            bytes: stats.bytes,
            new_flows: stats.new_flows,
            xdp_packets: stats.xdp_packets,
            socket_flows: stats.socket_flows,
        });
    }
    rows.sort_by_key(|r| (r.vip, r.port, r.protocol.clone()));
    Ok(rows)
}

pub fn services_table(rows: &[ServiceRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<22} {:<32} {:>8} {:>10} {:>10}  Kind",
        "Prot", "Frontend", "Service", "Flows", "Packets", "NewFlows"
    );
    let _ = writeln!(
        out,
        "  -> {:<22} {:<32} {:>8}",
        "Backend", "Id, state", "Flows"
    );
    for r in rows {
        let mut kind = r.kind.to_string();
        for p in &r.policy {
            kind.push(' ');
            kind.push_str(p);
        }
        if !r.source_ranges.is_empty() {
            let _ = write!(kind, " [{}]", r.source_ranges.join(", "));
        }
        if r.affinity_timeout > 0 {
            let _ = write!(kind, " affinity {}s", r.affinity_timeout);
        }
        let _ = writeln!(
            out,
            "{:<5} {:<22} {:<32} {:>8} {:>10} {:>10}  {kind}",
            r.protocol, r.frontend, r.name, r.flows, r.packets, r.new_flows
        );
        if r.backends.is_empty() {
            let _ = writeln!(out, "  -> (no endpoints)");
        }
        for b in &r.backends {
            let state = if b.table == "local" {
                format!("{} {} (local)", b.id, b.state)
            } else {
                format!("{} {}", b.id, b.state)
            };
            let _ = writeln!(
                out,
                "  -> {:<22} {:<32} {:>8}",
                SocketAddr::new(b.addr, b.port).to_string(),
                state,
                b.flows
            );
        }
    }
    out
}

#[derive(Debug, Serialize)]
pub struct BackendEntry {
    pub id: u32,
    pub protocol: String,
    pub addr: IpAddr,
    pub port: u16,
    /// Service port names whose slots point at this backend.
    pub services: Vec<String>,
    pub flows: u64,
    /// Its active connections as the least-connection schedulers count
    /// them (established TCP of such services, not closing; 0 for a
    /// backend of no such service).
    pub active_conns: u64,
    /// Sockets the socket-level load balancer connected (or sends) to it:
    /// flows that never cross the tc translation, so not in `flows`.
    pub sockets: u64,
}

pub fn backends(maps: &MapSet, dir: &Path) -> Result<Vec<BackendEntry>> {
    let state = maps.read_state()?;
    let flows = flow_counts(maps)?;
    let mut sockets: BTreeMap<u32, u64> = BTreeMap::new();
    for s in socklb::sockets(maps, dir)? {
        *sockets.entry(s.backend_id).or_default() += 1;
    }
    let mut users: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for v in state.services.values() {
        for slot in 0..v.count {
            if let Some(id) = state.slots.get(&proxy_common::SlotKey {
                svc_id: v.svc_id,
                slot,
            }) {
                let name = state
                    .names
                    .get(&v.svc_id)
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| format!("svc {}", v.svc_id));
                let list = users.entry(*id).or_default();
                if !list.contains(&name) {
                    list.push(name);
                }
            }
        }
    }
    let mut rows: Vec<BackendEntry> = state
        .backends
        .iter()
        .map(|(id, b)| BackendEntry {
            id: *id,
            protocol: proto_name(b.proto),
            addr: b.addr,
            port: b.port,
            services: users.remove(id).unwrap_or_default(),
            // Signed in the datapath: a counter a moment below zero is 0.
            active_conns: maps
                .conns
                .get(id, 0)
                .map_or(0, |n| (n as i64).max(0) as u64),
            flows: flows
                .iter()
                .filter(|((_, bid), _)| bid == id)
                .map(|(_, f)| f.0)
                .sum(),
            sockets: sockets.get(id).copied().unwrap_or(0),
        })
        .collect();
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

pub fn backends_table(rows: &[BackendEntry]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6} {:<5} {:<22} {:>8} {:>8} {:>8}  Services",
        "Id", "Prot", "Backend", "Flows", "Active", "Sockets"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:>6} {:<5} {:<22} {:>8} {:>8} {:>8}  {}",
            r.id,
            r.protocol,
            SocketAddr::new(r.addr, r.port).to_string(),
            r.flows,
            r.active_conns,
            r.sockets,
            if r.services.is_empty() {
                "(unused)".to_string()
            } else {
                r.services.join(", ")
            }
        );
    }
    out
}

#[derive(Debug, Serialize)]
pub struct CtRow {
    /// The table the entry is in: "tcp" (established TCP, never evicted) or
    /// "any" (UDP and TCP handshakes, LRU).
    pub table: &'static str,
    pub protocol: String,
    /// "original" (client → frontend) or "reply" (backend → client).
    pub direction: &'static str,
    /// "dnat", or "masq" for a masqueraded flow (source rewritten too); with
    /// "+node" for a flow the node itself started, "+dsr" for a direct
    /// server return flow balanced here (its replies leave from the
    /// backend's node), "+dsr-backend" for one another node balanced to a
    /// backend here.
    pub nat: String,
    /// The tuple as the packet arrives.
    pub src: String,
    pub dst: String,
    /// The tuple after translation.
    pub translated_src: String,
    pub translated_dst: String,
    /// The flow's state (both directions considered), which picks its timeout.
    pub state: &'static str,
    pub tcp_flags: String,
    pub age_seconds: f64,
    pub idle_seconds: f64,
    pub service: String,
    pub backend_id: u32,
}

pub fn tcp_flags(f: u8) -> String {
    let names = [
        (TCP_SYN, "SYN"),
        (TCP_ACK, "ACK"),
        (TCP_FIN, "FIN"),
        (TCP_RST, "RST"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect();
    v.join(",")
}

/// Both families' flows, IPv6's endpoints as `[address]:port`.
pub fn conntrack(maps: &MapSet) -> Result<Vec<CtRow>> {
    let now = monotonic_ns();
    let mut names = BTreeMap::new();
    for kv in maps.service_names.iter() {
        let (id, n) = kv?;
        names.insert(id, name_from_bytes(&n));
    }
    let mut rows = Vec::new();
    conntrack_of::<u32>(maps, &names, now, &mut rows)?;
    conntrack_of::<In6>(maps, &names, now, &mut rows)?;
    rows.sort_by(|a, b| (a.direction, &a.src, &a.dst).cmp(&(b.direction, &b.src, &b.dst)));
    Ok(rows)
}

fn conntrack_of<A: ct::CtFamily>(
    maps: &MapSet,
    names: &BTreeMap<u32, String>,
    now: u64,
    rows: &mut Vec<CtRow>,
) -> Result<()> {
    let table = ct::read_table_of::<A>(maps)?;
    let mut row = |table: CtTable, k: &CtKey<A>, v: &CtValue<A>, state: FlowState| {
        let ep = |a: A, p: u16| std::net::SocketAddr::new(a.to_ip(), wire::to_port(p)).to_string();
        let t = v.translate(k);
        rows.push(CtRow {
            table: match table {
                CtTable::Tcp => "tcp",
                CtTable::Any => "any",
            },
            protocol: proto_name(k.proto),
            direction: if v.dir == CT_DIR_ORIGINAL {
                "original"
            } else {
                "reply"
            },
            nat: format!(
                "{}{}",
                if v.flags & CT_F_SNAT != 0 {
                    "masq"
                } else {
                    "dnat"
                },
                if v.flags & CT_F_FROM_NODE != 0 {
                    "+node"
                } else if v.flags & CT_F_DSR_ENCAP != 0 {
                    // Balanced here, answered by the backend's node.
                    "+dsr"
                } else if v.flags & CT_F_DSR_DECAP != 0 {
                    // Another node balanced it: replies leave from here.
                    "+dsr-backend"
                } else {
                    ""
                }
            ),
            src: ep(k.src_addr, k.src_port),
            dst: ep(k.dst_addr, k.dst_port),
            translated_src: ep(t.src_addr, t.src_port),
            translated_dst: ep(t.dst_addr, t.dst_port),
            state: state.name(),
            tcp_flags: tcp_flags(v.tcp_flags),
            age_seconds: now.saturating_sub(v.created_ns) as f64 / 1e9,
            idle_seconds: now.saturating_sub(v.last_seen_ns) as f64 / 1e9,
            service: names
                .get(&v.svc_id)
                .cloned()
                .unwrap_or_else(|| format!("svc {}", v.svc_id)),
            backend_id: v.backend_id,
        });
    };
    for f in &table.flows {
        row(f.table, &f.key, &f.original, f.state());
        if let Some(r) = &f.reply {
            row(f.table, &f.reply_key, r, f.state());
        }
    }
    for (t, k, v) in &table.orphans {
        row(*t, k, v, FlowState::of(v, Some(v), k.proto));
    }
    Ok(())
}

pub fn conntrack_table(rows: &[CtRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<4} {:<5} {:<8} {:<9} {:<44} {:<44} {:<11} {:<12} {:>8} {:>8}  Service",
        "Map",
        "Prot",
        "Dir",
        "NAT",
        "Tuple (as received)",
        "Translated to",
        "State",
        "TCP flags",
        "Age",
        "Idle"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<4} {:<5} {:<8} {:<9} {:<44} {:<44} {:<11} {:<12} {:>7.1}s {:>7.1}s  {}",
            r.table,
            r.protocol,
            r.direction,
            r.nat,
            format!("{} -> {}", r.src, r.dst),
            format!("{} -> {}", r.translated_src, r.translated_dst),
            r.state,
            r.tcp_flags,
            r.age_seconds,
            r.idle_seconds,
            r.service
        );
    }
    let _ = writeln!(
        out,
        "{} entries ({} flows)",
        rows.len(),
        rows.iter().filter(|r| r.direction == "original").count()
    );
    out
}

#[derive(Debug, Serialize)]
pub struct ServiceStatsRow {
    pub name: String,
    pub frontend: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Of `packets`, translated at XDP; of `new_flows`, balanced at the
    /// socket.
    pub xdp_packets: u64,
    pub socket_flows: u64,
}

#[derive(Debug, Serialize)]
pub struct CtTableStats {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u32,
}

#[derive(Debug, Serialize)]
pub struct ConntrackStats {
    /// Both tables: established TCP, then UDP and handshakes.
    pub tables: Vec<CtTableStats>,
    /// Entries lost to LRU eviction (derived: inserted − removed − live).
    pub evicted: u64,
    /// Flows by state.
    pub flows: BTreeMap<&'static str, u64>,
    /// The reply filter's bits set, in percent: of a backend's packets to
    /// clients that reached it directly, the share still looked up (100
    /// until the agent first rebuilds it).
    pub reply_filter_percent: f64,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub counters: BTreeMap<&'static str, u64>,
    pub drops: BTreeMap<&'static str, u64>,
    /// Conntrack and affinity events (not per packet).
    pub events: BTreeMap<&'static str, u64>,
    pub conntrack: ConntrackStats,
    pub services: Vec<ServiceStatsRow>,
}

pub fn stats(maps: &MapSet) -> Result<Stats> {
    let mut counters: BTreeMap<&'static str, u64> = maps
        .counters()?
        .into_iter()
        .map(|(c, n)| (c.name(), n))
        .collect();
    // Every packet ends in exactly one verdict counter.
    let packets = counters.values().sum();
    counters.insert("packets", packets);
    let drops = maps
        .drops()?
        .into_iter()
        .map(|(r, n)| (r.name(), n))
        .collect();
    let events: BTreeMap<&'static str, u64> = maps
        .events()?
        .into_iter()
        .map(|(e, n)| (e.name(), n))
        .collect();
    let table = ct::read_table(maps)?;
    let table6 = ct::read_table_of::<In6>(maps)?;
    let mut flows = BTreeMap::new();
    for state in table
        .flows
        .iter()
        .map(|f| f.state())
        .chain(table6.flows.iter().map(|f| f.state()))
    {
        *flows.entry(state.name()).or_insert(0) += 1;
    }
    let removed: u64 = [Event::CtRemoved, Event::GcExpired, Event::GcStaleUdp]
        .iter()
        .map(|e| events[e.name()])
        .sum();
    let conntrack = ConntrackStats {
        tables: CtTable::ALL
            .into_iter()
            .map(|t| {
                Ok(CtTableStats {
                    map: t.map_name(),
                    entries: table.entries.get(&t).copied().unwrap_or(0) as u64,
                    capacity: maps.ct.capacity(t)?,
                })
            })
            .collect::<Result<_>>()?,
        // The event counters count both families' entries.
        evicted: ct::evicted(
            events[Event::CtInserted.name()],
            removed,
            table.total() + table6.total(),
        ),
        flows,
        reply_filter_percent: maps.replies.fill_ratio() * 100.0,
    };
    let services = services(maps)?
        .into_iter()
        .map(|r| ServiceStatsRow {
            frontend: format!("{}/{}", r.frontend, r.protocol),
            name: r.name,
            packets: r.packets,
            bytes: r.bytes,
            new_flows: r.new_flows,
            xdp_packets: r.xdp_packets,
            socket_flows: r.socket_flows,
        })
        .collect();
    Ok(Stats {
        counters,
        drops,
        events,
        conntrack,
        services,
    })
}

pub fn stats_table(s: &Stats) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Datapath counters");
    for (k, v) in &s.counters {
        let _ = writeln!(out, "  {k:<24} {v:>12}");
    }
    let _ = writeln!(out, "Drops by reason");
    for (k, v) in &s.drops {
        let _ = writeln!(out, "  {k:<24} {v:>12}");
    }
    let _ = writeln!(out, "Events");
    for (k, v) in &s.events {
        let _ = writeln!(out, "  {k:<24} {v:>12}");
    }
    let c = &s.conntrack;
    let _ = writeln!(out, "Conntrack");
    for t in &c.tables {
        let _ = writeln!(
            out,
            "  {:<24} {:>12} of {} ({:.1}% used)",
            t.map,
            t.entries,
            t.capacity,
            t.entries as f64 * 100.0 / f64::from(t.capacity.max(1))
        );
    }
    let _ = writeln!(out, "  {:<24} {:>12}", "evicted", c.evicted);
    for (k, v) in &c.flows {
        let _ = writeln!(out, "  {:<24} {v:>12}", format!("flows {k}"));
    }
    let _ = writeln!(
        out,
        "  {:<24} {:>11.2}% of its bits set",
        "reply filter", c.reply_filter_percent
    );
    let _ = writeln!(out, "Services");
    let _ = writeln!(
        out,
        "  {:<32} {:<26} {:>10} {:>12} {:>10} {:>10} {:>10}",
        "Service", "Frontend", "Packets", "Bytes", "NewFlows", "AtXDP", "AtSocket"
    );
    for r in &s.services {
        let _ = writeln!(
            out,
            "  {:<32} {:<26} {:>10} {:>12} {:>10} {:>10} {:>10}",
            r.name, r.frontend, r.packets, r.bytes, r.new_flows, r.xdp_packets, r.socket_flows
        );
    }
    out
}
