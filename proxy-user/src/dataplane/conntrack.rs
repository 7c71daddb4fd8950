//! Conntrack lifetime, owned by the agent: per-state timeouts, the garbage
//! collector that expires flows, and the flush of UDP flows whose backend
//! left (the reference's `conntrack -D`).
//!
//! The datapath records what it sees in each entry (last packet, reply seen,
//! TCP flags); the collector judges a flow by both of its entries, so a flow
//! busy in one direction only is never expired.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    os::fd::{AsFd as _, OwnedFd},
    time::Duration,
};

use anyhow::Result;
use proxy_common::{
    addr_bit, wire, Address, CtKey, CtValue, In6, PortBit, CT_DIR_ORIGINAL, CT_F_CLOSING,
    CT_F_COUNTED, CT_F_DSR_ENCAP, CT_F_REFUSED, CT_F_SEEN_REPLY, EXPIRE_PER_RUN, IPPROTO_TCP,
    PORT_F_BACKEND, PORT_F_FRONTEND, TCP_ACK, TCP_FIN, TCP_RST,
};

use crate::dataplane::{
    maps::{CtTable, CtTables, MapSet, WireAddr},
    sys,
};

/// How long a flow may stay idle, by state. Defaults: kube-proxy's for the
/// states it configures (established 24h, close-wait 1h), the kernel's for
/// the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP, SYN sent and not answered yet.
    pub tcp_syn: Duration,
    pub tcp_established: Duration,
    /// TCP, FIN seen in one direction (half closed).
    pub tcp_close_wait: Duration,
    /// TCP, FIN seen in both directions.
    pub tcp_time_wait: Duration,
    /// TCP, RST seen.
    pub tcp_close: Duration,
    /// UDP, no reply seen.
    pub udp: Duration,
    /// UDP, replies seen.
    pub udp_stream: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn: Duration::from_secs(60),
            tcp_established: Duration::from_secs(86_400),
            tcp_close_wait: Duration::from_secs(3_600),
            tcp_time_wait: Duration::from_secs(120),
            tcp_close: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
        }
    }
}

/// A flow's state as the collector (and `kpx dump conntrack`) sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowState {
    TcpSynSent,
    /// A handshake whose SYN-ACK found the established table full, waiting
    /// for the client's retransmitted SYN.
    TcpRefused,
    TcpEstablished,
    TcpCloseWait,
    TcpTimeWait,
    TcpClose,
    UdpUnreplied,
    UdpStream,
}

impl FlowState {
    /// The state of a flow from its entries (`reply` absent when evicted).
    pub fn of<A>(original: &CtValue<A>, reply: Option<&CtValue<A>>, proto: u8) -> Self {
        let reply_flags = reply.map_or(0, |r| r.tcp_flags);
        // A direct-server-return flow's replies never cross the node that
        // balanced it: the client's ACK tells the handshake completed.
        let replied = reply.is_some_and(|r| r.flags & CT_F_SEEN_REPLY != 0)
            || (original.flags & CT_F_DSR_ENCAP != 0 && original.tcp_flags & TCP_ACK != 0);
        if proto != IPPROTO_TCP {
            return if replied {
                FlowState::UdpStream
            } else {
                FlowState::UdpUnreplied
            };
        }
        let flags = original.tcp_flags | reply_flags;
        if flags & TCP_RST != 0 {
            FlowState::TcpClose
        } else if original.tcp_flags & TCP_FIN != 0 && reply_flags & TCP_FIN != 0 {
            FlowState::TcpTimeWait
        } else if flags & TCP_FIN != 0 {
            FlowState::TcpCloseWait
        } else if original.flags & CT_F_REFUSED != 0 {
            FlowState::TcpRefused
        } else if replied {
            FlowState::TcpEstablished
        } else {
            FlowState::TcpSynSent
        }
    }

    pub fn timeout(self, t: &Timeouts) -> Duration {
        match self {
            FlowState::TcpSynSent | FlowState::TcpRefused => t.tcp_syn,
            FlowState::TcpEstablished => t.tcp_established,
            FlowState::TcpCloseWait => t.tcp_close_wait,
            FlowState::TcpTimeWait => t.tcp_time_wait,
            FlowState::TcpClose => t.tcp_close,
            FlowState::UdpUnreplied => t.udp,
            FlowState::UdpStream => t.udp_stream,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FlowState::TcpSynSent => "syn_sent",
            FlowState::TcpRefused => "refused",
            FlowState::TcpEstablished => "established",
            FlowState::TcpCloseWait => "close_wait",
            FlowState::TcpTimeWait => "time_wait",
            FlowState::TcpClose => "close",
            FlowState::UdpUnreplied => "unreplied",
            FlowState::UdpStream => "stream",
        }
    }
}

/// The datapath's clock (CLOCK_MONOTONIC) in nanoseconds. The datapath reads
/// it with `bpf_ktime_get_coarse_ns()`, at most a tick behind this.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A backend of one service frontend: (svc_id, address, port).
pub type ServiceBackend = (u32, IpAddr, u16);

/// A family's conntrack tables in the map set: the collector, the dump and
/// the takeover read either family's flows with the same code.
pub trait CtFamily: WireAddr {
    /// The datapath's program that ends this family's established flows.
    const EXPIRE_PROG: &'static str;
    /// That program's descriptor in `x`.
    fn expiry(x: &Expirer) -> &OwnedFd;
    fn tables(maps: &MapSet) -> &CtTables<Self>;
    fn tables_mut(maps: &mut MapSet) -> &mut CtTables<Self>;
    /// Removes `key` from the table; whether it was there.
    fn remove(maps: &mut MapSet, t: CtTable, key: &CtKey<Self>) -> bool;
    /// `key`'s entry in the table.
    fn get(maps: &MapSet, t: CtTable, key: &CtKey<Self>) -> Option<CtValue<Self>>;
    /// Writes `key` → `value` into the table (a reply entry noted in the
    /// reply filter, [`noted`]).
    fn insert(
        maps: &mut MapSet,
        t: CtTable,
        key: &CtKey<Self>,
        value: &CtValue<Self>,
    ) -> Result<(), aya::maps::MapError>;
    /// The table's entries (a batched read, `maps::each_hash`).
    fn read(maps: &MapSet, t: CtTable) -> Result<Vec<(CtKey<Self>, CtValue<Self>)>>;
    /// Every entry of the table, to `f` (batched).
    fn each(maps: &MapSet, t: CtTable, f: impl FnMut(CtKey<Self>, CtValue<Self>)) -> Result<()>;
}

/// `written`, a reply entry (`key` → `value`) noted in the reply filter
/// once written: the agent's collector may have read the tables already
/// (`dataplane::replies`).
fn noted<A: Address>(
    maps: &MapSet,
    key: &CtKey<A>,
    value: &CtValue<A>,
    written: Result<(), aya::maps::MapError>,
) -> Result<(), aya::maps::MapError> {
    if written.is_ok() && value.dir != CT_DIR_ORIGINAL {
        maps.replies.note(key);
    }
    written
}

/// [`CtFamily`]'s operations, the same for both families: each a call of
/// the family's [`CtTables`] (whose bounds hold for either concrete type).
macro_rules! ct_family_ops {
    () => {
        fn get(maps: &MapSet, t: CtTable, key: &CtKey<Self>) -> Option<CtValue<Self>> {
            Self::tables(maps).get(t, key)
        }
        fn remove(maps: &mut MapSet, t: CtTable, key: &CtKey<Self>) -> bool {
            Self::tables_mut(maps).remove(t, key)
        }
        fn insert(
            maps: &mut MapSet,
            t: CtTable,
            key: &CtKey<Self>,
            value: &CtValue<Self>,
        ) -> Result<(), aya::maps::MapError> {
            let written = Self::tables_mut(maps).insert(t, key, value);
            noted(maps, key, value, written)
        }
        fn read(maps: &MapSet, t: CtTable) -> Result<Vec<(CtKey<Self>, CtValue<Self>)>> {
            Self::tables(maps).read(t)
        }
        fn each(
            maps: &MapSet,
            t: CtTable,
            f: impl FnMut(CtKey<Self>, CtValue<Self>),
        ) -> Result<()> {
            Self::tables(maps).each(t, f)
        }
    };
}

impl CtFamily for u32 {
    const EXPIRE_PROG: &'static str = proxy_common::prog_names::CONNS_EXPIRE;
    fn expiry(x: &Expirer) -> &OwnedFd {
        &x.v4
    }
    fn tables(maps: &MapSet) -> &CtTables<Self> {
        &maps.ct
    }
    fn tables_mut(maps: &mut MapSet) -> &mut CtTables<Self> {
        &mut maps.ct
    }
    ct_family_ops!();
}

impl CtFamily for In6 {
    const EXPIRE_PROG: &'static str = proxy_common::prog_names::CONNS_EXPIRE6;
    fn expiry(x: &Expirer) -> &OwnedFd {
        &x.v6
    }
    fn tables(maps: &MapSet) -> &CtTables<Self> {
        &maps.v6.ct
    }
    fn tables_mut(maps: &mut MapSet) -> &mut CtTables<Self> {
        &mut maps.v6.ct
    }
    ct_family_ops!();
}

/// One flow of the tables, both directions paired.
pub struct Flow<A = u32> {
    /// The table both entries are in.
    pub table: CtTable,
    pub key: CtKey<A>,
    pub original: CtValue<A>,
    pub reply_key: CtKey<A>,
    pub reply: Option<CtValue<A>>,
}

impl<A: Copy> Flow<A> {
    pub fn state(&self) -> FlowState {
        FlowState::of(&self.original, self.reply.as_ref(), self.key.proto)
    }

    /// Nanoseconds since the last packet in either direction.
    pub fn idle_ns(&self, now_ns: u64) -> u64 {
        let last = self.reply.map_or(self.original.last_seen_ns, |r| {
            r.last_seen_ns.max(self.original.last_seen_ns)
        });
        now_ns.saturating_sub(last)
    }
}

/// The conntrack tables as flows, plus reply entries whose original entry is
/// gone (evicted under LRU pressure).
pub struct Table<A = u32> {
    pub flows: Vec<Flow<A>>,
    pub orphans: Vec<(CtTable, CtKey<A>, CtValue<A>)>,
    /// Entries read, by table.
    pub entries: HashMap<CtTable, usize>,
}

impl<A> Table<A> {
    /// Entries read in both tables.
    pub fn total(&self) -> usize {
        self.entries.values().sum()
    }
}

/// IPv4's flows ([`read_table_of`]).
pub fn read_table(maps: &MapSet) -> Result<Table> {
    read_table_of::<u32>(maps)
}

/// Family `A`'s flows, both directions paired.
pub fn read_table_of<A: CtFamily>(maps: &MapSet) -> Result<Table<A>> {
    // A connection caught while the datapath moves it to the established
    // table is in both for an instant: the established copy is the one.
    let mut all: HashMap<CtKey<A>, (CtTable, CtValue<A>)> = HashMap::new();
    let mut entries = HashMap::new();
    for table in CtTable::ALL {
        let read = A::read(maps, table)?;
        entries.insert(table, read.len());
        for (k, v) in read {
            all.entry(k).or_insert((table, v));
        }
    }
    let mut flows = Vec::new();
    let mut paired = HashSet::new();
    for (k, (table, v)) in &all {
        if v.dir != CT_DIR_ORIGINAL {
            continue;
        }
        let reply_key = v.partner(k);
        let reply = all
            .get(&reply_key)
            .filter(|(t, _)| t == table)
            .map(|(_, r)| *r);
        if reply.is_some() {
            paired.insert(reply_key);
        }
        flows.push(Flow {
            table: *table,
            key: *k,
            original: *v,
            reply_key,
            reply,
        });
    }
    let orphans = all
        .into_iter()
        .filter(|(k, (_, v))| v.dir != CT_DIR_ORIGINAL && !paired.contains(k))
        .map(|(k, (t, v))| (t, k, v))
        .collect();
    Ok(Table {
        flows,
        orphans,
        entries,
    })
}

/// What one collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Entries in each table when it was read.
    pub entries: HashMap<CtTable, usize>,
    /// Entries removed because their flow expired.
    pub expired: u64,
    /// Entries removed because their UDP backend left the service.
    pub stale_udp: u64,
    /// Expired established flows taken off their backend's active
    /// connections (least-connection services).
    pub conns_ended: u64,
    /// The ports of the flows read (see [`flow_port`]), for the port
    /// filter's held bits.
    pub ports: HashSet<(u16, u64)>,
    /// The address-filter bits of the flows read ([`flow_addr`]).
    pub addrs: HashSet<PortBit>,
    /// The reply-filter and destination-filter bits of the flows read
    /// ([`reply_bits`]).
    pub replies: Vec<[PortBit; 2]>,
}

/// The ports the datapath must find a tracked entry's packets on, with
/// their port-filter kind (host order): an original direction's frontend
/// port (its destination), a reply's backend port (its source).
pub fn flow_port<A>(k: &CtKey<A>, v: &CtValue<A>) -> (u16, u64) {
    if v.dir == CT_DIR_ORIGINAL {
        (u16::from_be(k.dst_port), PORT_F_FRONTEND)
    } else {
        (u16::from_be(k.src_port), PORT_F_BACKEND)
    }
}

/// The address-filter bit the datapath must find a tracked entry's packets
/// by: an original direction's destination's (its frontend's address; a
/// reply is found by its port alone).
pub fn flow_addr<A: Address>(k: &CtKey<A>, v: &CtValue<A>) -> Option<PortBit> {
    (v.dir == CT_DIR_ORIGINAL && k.dst_addr != A::ZERO).then(|| addr_bit(k.dst_addr))
}

/// What the filter must hold for the tracked flows: their ports with their
/// kind ([`flow_port`]), and their address bits ([`flow_addr`]).
pub type FlowNeeds = (Vec<(u16, u64)>, Vec<PortBit>);

/// [`flow_port`] and [`flow_addr`] of every entry in both families'
/// tables (a batched read, as the collector's).
pub fn flow_ports(maps: &MapSet) -> Result<FlowNeeds> {
    let (mut ports, mut addrs) = (HashSet::new(), HashSet::new());
    fn walk<A: CtFamily>(
        maps: &MapSet,
        ports: &mut HashSet<(u16, u64)>,
        addrs: &mut HashSet<PortBit>,
    ) -> Result<()> {
        for table in CtTable::ALL {
            A::each(maps, table, |k, v| {
                ports.insert(flow_port(&k, &v));
                addrs.extend(flow_addr(&k, &v));
            })?;
        }
        Ok(())
    }
    walk::<u32>(maps, &mut ports, &mut addrs)?;
    walk::<In6>(maps, &mut ports, &mut addrs)?;
    Ok((ports.into_iter().collect(), addrs.into_iter().collect()))
}

/// The reply filter's and destination filter's bits
/// ([`proxy_common::reply_bits`]) of every reply entry in both families'
/// tables (a batched read, as the collector's).
pub fn reply_bits(maps: &MapSet) -> Result<Vec<[PortBit; 2]>> {
    let mut bits = Vec::new();
    fn walk<A: CtFamily>(maps: &MapSet, bits: &mut Vec<[PortBit; 2]>) -> Result<()> {
        for table in CtTable::ALL {
            A::each(maps, table, |k, v| {
                if v.dir != CT_DIR_ORIGINAL {
                    bits.push(proxy_common::reply_bits(&k));
                }
            })?;
        }
        Ok(())
    }
    walk::<u32>(maps, &mut bits)?;
    walk::<In6>(maps, &mut bits)?;
    Ok(bits)
}

/// Ends established flows the way a FIN does, before the collector
/// deletes them: through the datapath's `kpx_conns_expire` program, so
/// that a least-connection service's backend count drops exactly once,
/// by the same atomic mark the datapath uses, whatever packet races it.
pub struct Expirer {
    v4: OwnedFd,
    v6: OwnedFd,
}

impl Expirer {
    /// The two families' programs (`CtFamily::EXPIRE_PROG`).
    pub fn new(v4: OwnedFd, v6: OwnedFd) -> Self {
        Self { v4, v6 }
    }

    /// Marks the flows of `keys` (original directions, in family `A`'s
    /// `CT_TCP`) closing; returns how many were still open.
    pub fn end<A: CtFamily>(&self, keys: &[CtKey<A>]) -> std::io::Result<u64> {
        let prog = A::expiry(self);
        let mut ended = 0;
        for chunk in keys.chunks(EXPIRE_PER_RUN) {
            // A frame: a zeroed Ethernet header, then the keys.
            let mut frame = vec![0u8; 14];
            for k in chunk {
                frame.extend_from_slice(key_bytes(k));
            }
            ended += u64::from(sys::test_run(prog.as_fd(), &frame)?);
        }
        Ok(ended)
    }
}

fn key_bytes<A: aya::Pod>(k: &CtKey<A>) -> &[u8] {
    // SAFETY: CtKey is #[repr(C)] plain integers with explicit padding
    // (zeroed by `CtKey::new`): every byte is initialised.
    unsafe {
        std::slice::from_raw_parts((k as *const CtKey<A>).cast::<u8>(), size_of::<CtKey<A>>())
    }
}

/// Whether the collector must end `v` (an original entry of `table`)
/// through the [`Expirer`] before deleting it: an established flow that
/// counts in its backend's connections and is not closing yet.
fn counted_open<A>(table: CtTable, v: &CtValue<A>) -> bool {
    table == CtTable::Tcp
        && v.dir == CT_DIR_ORIGINAL
        && v.flags & (CT_F_COUNTED | CT_F_CLOSING) == CT_F_COUNTED
}

/// Removes expired flows, and the UDP flows to a backend in `stale`, of
/// both families. Expired established flows that count in a backend's
/// connections are first ended through `expirer` (without one, their
/// counts stay up).
pub fn collect(
    maps: &mut MapSet,
    timeouts: &Timeouts,
    stale: &HashSet<ServiceBackend>,
    expirer: Option<&Expirer>,
) -> Result<GcReport> {
    let mut report = collect_of::<u32>(maps, timeouts, stale, expirer)?;
    let v6 = collect_of::<In6>(maps, timeouts, stale, expirer)?;
    for (t, n) in v6.entries {
        *report.entries.entry(t).or_default() += n;
    }
    report.expired += v6.expired;
    report.stale_udp += v6.stale_udp;
    report.conns_ended += v6.conns_ended;
    report.ports.extend(v6.ports);
    report.addrs.extend(v6.addrs);
    report.replies.extend(v6.replies);
    Ok(report)
}

/// [`collect`] for family `A`.
fn collect_of<A: CtFamily>(
    maps: &mut MapSet,
    timeouts: &Timeouts,
    stale: &HashSet<ServiceBackend>,
    expirer: Option<&Expirer>,
) -> Result<GcReport> {
    let table = read_table_of::<A>(maps)?;
    let now = monotonic_ns();
    let ports = table
        .flows
        .iter()
        .flat_map(|f| {
            // The reply's port even if its entry is gone: holding more
            // than needed only costs lookups.
            [
                flow_port(&f.key, &f.original),
                (u16::from_be(f.reply_key.src_port), PORT_F_BACKEND),
            ]
        })
        .chain(table.orphans.iter().map(|(_, k, v)| flow_port(k, v)))
        .collect();
    let addrs = table
        .flows
        .iter()
        .filter_map(|f| flow_addr(&f.key, &f.original))
        .chain(table.orphans.iter().filter_map(|(_, k, v)| flow_addr(k, v)))
        .collect();
    // A flow's reply key even if its entry is gone, as its port above.
    let replies = table
        .flows
        .iter()
        .map(|f| proxy_common::reply_bits(&f.reply_key))
        .chain(
            table
                .orphans
                .iter()
                .map(|(_, k, _)| proxy_common::reply_bits(k)),
        )
        .collect();
    let mut report = GcReport {
        entries: table.entries.clone(),
        ports,
        addrs,
        replies,
        ..Default::default()
    };
    let is_expired =
        |idle_ns: u64, state: FlowState| Duration::from_nanos(idle_ns) > state.timeout(timeouts);
    if let Some(x) = expirer {
        let open: Vec<CtKey<A>> = table
            .flows
            .iter()
            .filter(|f| counted_open(f.table, &f.original) && is_expired(f.idle_ns(now), f.state()))
            .map(|f| f.key)
            .chain(table.orphans.iter().filter_map(|(t, k, v)| {
                let idle = now.saturating_sub(v.last_seen_ns);
                (counted_open(*t, v) && is_expired(idle, FlowState::of(v, Some(v), k.proto)))
                    .then_some(*k)
            }))
            .collect();
        if !open.is_empty() {
            // Failing, the flows still go (a full table is worse than a
            // least-connection count left too high).
            match x.end(&open) {
                Ok(n) => report.conns_ended = n,
                Err(e) => log::warn!(
                    "ending {} expired flows' connection counts: {e}; their backends keep counting them",
                    open.len()
                ),
            }
        }
    }
    for f in &table.flows {
        let o = &f.original;
        let is_stale = f.key.proto != IPPROTO_TCP
            && stale.contains(&(
                o.svc_id,
                o.new_dst_addr.to_ip(),
                wire::to_port(o.new_dst_port),
            ));
        let expired = Duration::from_nanos(f.idle_ns(now)) > f.state().timeout(timeouts);
        if !(is_stale || expired) {
            continue;
        }
        let mut n = remove(maps, f.table, &f.key);
        if f.reply.is_some() {
            n += remove(maps, f.table, &f.reply_key);
        }
        if is_stale {
            report.stale_udp += n;
        } else {
            report.expired += n;
        }
    }
    for (t, k, v) in &table.orphans {
        let state = FlowState::of(v, Some(v), k.proto);
        let stale_backend = k.proto != IPPROTO_TCP
            && stale.contains(&(v.svc_id, k.src_addr.to_ip(), wire::to_port(k.src_port)));
        if stale_backend {
            report.stale_udp += remove(maps, *t, k);
        } else if Duration::from_nanos(now.saturating_sub(v.last_seen_ns)) > state.timeout(timeouts)
        {
            report.expired += remove(maps, *t, k);
        }
    }
    Ok(report)
}

fn remove<A: CtFamily>(maps: &mut MapSet, table: CtTable, key: &CtKey<A>) -> u64 {
    // Already gone (the datapath replaced it, LRU evicted it) is fine.
    A::remove(maps, table, key) as u64
}

/// Conntrack entries lost to LRU eviction (only `CT_ANY` evicts), derived
/// from the event counters: inserted minus every removal minus what is
/// still there, in both tables. Approximate while
/// traffic runs (the counters and the table are not read atomically), exact
/// when the table is quiet.
pub fn evicted(inserted: u64, removed: u64, live: usize) -> u64 {
    inserted.saturating_sub(removed).saturating_sub(live as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{CT_DIR_REPLY, IPPROTO_UDP, TCP_ACK, TCP_SYN};

    fn entry(dir: u8, tcp_flags: u8, seen: bool) -> CtValue {
        CtValue {
            dir,
            tcp_flags,
            flags: if seen { CT_F_SEEN_REPLY } else { 0 },
            ..Default::default()
        }
    }

    #[test]
    fn flow_states_follow_what_both_directions_saw() {
        let o = |f| entry(CT_DIR_ORIGINAL, f, false);
        let r = |f, seen| entry(CT_DIR_REPLY, f, seen);
        let tcp = |a: CtValue, b: Option<CtValue>| FlowState::of(&a, b.as_ref(), IPPROTO_TCP);
        assert_eq!(tcp(o(TCP_SYN), Some(r(0, false))), FlowState::TcpSynSent);
        let est = Some(r(TCP_SYN | TCP_ACK, true));
        assert_eq!(tcp(o(TCP_SYN | TCP_ACK), est), FlowState::TcpEstablished);
        assert_eq!(tcp(o(TCP_ACK | TCP_FIN), est), FlowState::TcpCloseWait);
        let both = Some(r(TCP_ACK | TCP_FIN, true));
        assert_eq!(tcp(o(TCP_ACK | TCP_FIN), both), FlowState::TcpTimeWait);
        assert_eq!(tcp(o(TCP_ACK | TCP_RST), est), FlowState::TcpClose);
        // The reply entry evicted: judged by the original alone.
        assert_eq!(tcp(o(TCP_SYN), None), FlowState::TcpSynSent);
        let refused = CtValue {
            flags: CT_F_REFUSED,
            ..o(TCP_SYN)
        };
        assert_eq!(tcp(refused, Some(r(0, false))), FlowState::TcpRefused);
        assert_eq!(
            FlowState::TcpRefused.timeout(&Timeouts::default()),
            Duration::from_secs(60)
        );
        let udp = |b: Option<CtValue>| FlowState::of(&o(0), b.as_ref(), IPPROTO_UDP);
        assert_eq!(udp(Some(r(0, false))), FlowState::UdpUnreplied);
        assert_eq!(udp(Some(r(0, true))), FlowState::UdpStream);
        let t = Timeouts::default();
        assert_eq!(
            FlowState::TcpEstablished.timeout(&t),
            Duration::from_secs(86_400)
        );
        assert_eq!(FlowState::UdpUnreplied.timeout(&t), Duration::from_secs(30));
    }

    #[test]
    fn evictions_are_what_was_inserted_and_neither_removed_nor_live() {
        assert_eq!(evicted(100, 30, 50), 20);
        // Counters read while traffic runs may be behind the table.
        assert_eq!(evicted(10, 5, 50), 0);
    }
}
