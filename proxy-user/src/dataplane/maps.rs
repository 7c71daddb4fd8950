//! The eBPF datapath as userspace sees it: the embedded object, loading it
//! (optionally with pinned maps), and typed access to its maps.

use std::{
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues, ProgramArray,
    },
    programs::{SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};

use crate::{
    control::cidr::{Cidr, Family},
    control::model::FrontendKey,
    dataplane::reconcile::{BackendAddr, Backends, Digest, MapState, NodeConfig, Op},
    dataplane::{batch, layout, replies::ReplyFilter},
};
use proxy_common::{
    map_names, prog_names, wire, Address, AffinityKey, AffinityValue, Backend, Counter, CtKey,
    CtTuple, CtValue, DatapathConfig, DropReason, Event, In6, Net6, ServiceKey, ServiceName,
    ServiceStats, ServiceValue, Slot, SlotKey, SockValue, SrcRange, ADDR_WORD0, BACKEND_F_LOCAL,
    PROG_DSR, PROG_EGRESS6, PROG_INGRESS6, PROG_NEW6, PROG_NEW6_NODE, SERVICE_NAME_LEN,
    XDP_PROG_NEW6, XDP_PROG_SERVICE6,
};

/// Every element of a hash map, to `f`: in batches, or one at a time
/// where the kernel cannot batch.
pub fn each_hash<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    mut f: impl FnMut(K, V),
) -> Result<()> {
    use aya::maps::IterableMap as _;
    let mut seen = false;
    match batch::lookup_each(map.map(), |k, v| {
        seen = true;
        f(k, v)
    }) {
        Ok(()) => Ok(()),
        // An entry deleted between two steps of the walk is skipped.
        Err(e) if batch::unsupported(&e) && !seen => {
            map.iter().filter_map(Result::ok).for_each(|(k, v)| f(k, v));
            Ok(())
        }
        Err(e) => Err(anyhow!("BPF_MAP_LOOKUP_BATCH: {e}")),
    }
}

/// Every element of a hash map: in batches, or one at a time where the
/// kernel cannot batch.
pub fn read_hash<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    each_hash(map, |k, v| out.push((k, v)))?;
    Ok(out)
}

/// The datapath object built by build.rs from proxy-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpx-ebpf"));

#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    /// Pin (or reuse already pinned) maps in this bpffs directory.
    pub pin_dir: Option<PathBuf>,
    /// Established TCP conntrack capacity in entries (two per flow), the
    /// other table half of it; default in `proxy_common::capacity`.
    pub conntrack_entries: Option<u32>,
    /// Size IPv6's conntrack and affinity tables as IPv4's. Without it
    /// they get [`IPV6_OFF_ENTRIES`] each: they are preallocated, and a
    /// node that serves no IPv6 should not pay their memory.
    pub ipv6: bool,
}

/// IPv6's preallocated tables' capacity on a node that serves no IPv6.
pub const IPV6_OFF_ENTRIES: u32 = 1_024;

/// IPv6's preallocated tables, sized at load by `LoadOptions::ipv6`:
/// conntrack, affinity, and the socket-level load balancer's per-socket
/// tables.
pub const IPV6_SIZED: [&str; 5] = [
    map_names::CT6_TCP,
    map_names::CT6_ANY,
    map_names::AFFINITY6,
    map_names::SOCKS_UDP6,
    map_names::SOCK_PEERS6,
];

/// The capacity of `CT_ANY` (UDP, TCP handshakes) that goes with an
/// established-TCP capacity of `tcp` entries: half, as Cilium sizes its
/// non-TCP table (most of a node's long-lived flows are TCP; DNS's short
/// UDP flows come and go).
pub fn ct_any_capacity(tcp: u32) -> u32 {
    (tcp / 2).max(64)
}

/// The two conntrack tables (`proxy_common::map_names::CT_TCP`, `CT_ANY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CtTable {
    /// Established TCP: never evicted; full means new connections refused.
    Tcp,
    /// UDP and TCP handshakes: LRU.
    Any,
}

impl CtTable {
    pub const ALL: [CtTable; 2] = [CtTable::Tcp, CtTable::Any];

    pub fn map_name(self) -> &'static str {
        match self {
            CtTable::Tcp => map_names::CT_TCP,
            CtTable::Any => map_names::CT_ANY,
        }
    }

    /// The table the datapath keeps the flow of `key` in once it is
    /// established (`replied`): where a migrated entry belongs.
    pub fn of<A>(key: &CtKey<A>, replied: bool) -> Self {
        if key.proto == proxy_common::IPPROTO_TCP && replied {
            CtTable::Tcp
        } else {
            CtTable::Any
        }
    }
}

/// A conntrack entry and the table it is in.
pub type CtEntry<A = u32> = (CtTable, CtKey<A>, CtValue<A>);

/// A family's two conntrack tables, read and written by [`CtKey`]: the
/// established table is keyed by the key's tuple alone ([`CtTuple`], all
/// TCP), which this hides.
pub struct CtTables<A> {
    pub tcp: HashMap<MapData, CtTuple<A>, CtValue<A>>,
    pub any: HashMap<MapData, CtKey<A>, CtValue<A>>,
}

impl<A: Copy> CtTables<A>
where
    CtTuple<A>: aya::Pod,
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    fn build(tcp: Map, any: Map) -> Result<Self> {
        Ok(Self {
            tcp: tcp.try_into()?,
            any: any.try_into()?,
        })
    }

    /// `key`'s entry in table `t`.
    pub fn get(&self, t: CtTable, key: &CtKey<A>) -> Option<CtValue<A>> {
        match t {
            CtTable::Tcp => self.tcp.get(key.tuple(), 0).ok(),
            CtTable::Any => self.any.get(key, 0).ok(),
        }
    }

    /// The entry of `key` in either table (established first, as the
    /// datapath looks), and the table.
    pub fn lookup(&self, key: &CtKey<A>) -> Option<(CtTable, CtValue<A>)> {
        CtTable::ALL
            .into_iter()
            .find_map(|t| self.get(t, key).map(|v| (t, v)))
    }

    /// Writes `key` → `value` into table `t` (a key of the established
    /// table is a TCP flow's).
    pub fn insert(
        &mut self,
        t: CtTable,
        key: &CtKey<A>,
        value: &CtValue<A>,
    ) -> Result<(), MapError> {
        match t {
            CtTable::Tcp => self.tcp.insert(key.tuple(), value, 0),
            CtTable::Any => self.any.insert(key, value, 0),
        }
    }

    /// Removes `key` from table `t`; whether it was there.
    pub fn remove(&mut self, t: CtTable, key: &CtKey<A>) -> bool {
        match t {
            CtTable::Tcp => self.tcp.remove(key.tuple()).is_ok(),
            CtTable::Any => self.any.remove(key).is_ok(),
        }
    }

    /// Every entry of table `t`, to `f` ([`each_hash`]: batched).
    pub fn each(&self, t: CtTable, mut f: impl FnMut(CtKey<A>, CtValue<A>)) -> Result<()> {
        match t {
            CtTable::Tcp => each_hash(&self.tcp, |k, v| f(k.key(), v)),
            CtTable::Any => each_hash(&self.any, f),
        }
    }

    /// Table `t`'s entries (batched).
    pub fn read(&self, t: CtTable) -> Result<Vec<(CtKey<A>, CtValue<A>)>> {
        let mut out = Vec::new();
        self.each(t, |k, v| out.push((k, v)))?;
        Ok(out)
    }

    /// Every entry of both tables, one at a time (entries deleted during
    /// the walk are skipped).
    pub fn entries(&self) -> Vec<CtEntry<A>> {
        let tcp = self.tcp.iter().filter_map(|kv| kv.ok());
        let any = self.any.iter().filter_map(|kv| kv.ok());
        tcp.map(|(k, v)| (CtTable::Tcp, k.key(), v))
            .chain(any.map(|(k, v)| (CtTable::Any, k, v)))
            .collect()
    }

    /// Table `t`'s capacity in entries (two per flow).
    pub fn capacity(&self, t: CtTable) -> Result<u32> {
        use aya::maps::IterableMap as _;
        let map = match t {
            CtTable::Tcp => self.tcp.map(),
            CtTable::Any => self.any.map(),
        };
        Ok(map.info()?.max_entries())
    }
}

/// Every map of the datapath, typed, owning its file descriptor.
pub struct MapSet {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub service_addrs: HashMap<MapData, u32, u32>,
    pub slots: HashMap<MapData, SlotKey, Slot>,
    /// `KPX_CT_TCP` and `KPX_CT_ANY`.
    pub ct: CtTables<u32>,
    pub layout: Array<MapData, u32>,
    pub counters: PerCpuArray<MapData, u64>,
    pub drops: PerCpuArray<MapData, u64>,
    pub service_stats: PerCpuArray<MapData, ServiceStats>,
    pub service_names: HashMap<MapData, u32, ServiceName>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub events: PerCpuArray<MapData, u64>,
    pub node_addrs: HashMap<MapData, u32, u32>,
    pub src_ranges: LpmTrie<MapData, SrcRange, u32>,
    pub config: Array<MapData, DatapathConfig>,
    pub ports: Array<MapData, u64>,
    /// The reply filter, memory-mapped.
    pub replies: ReplyFilter,
    /// Active connections per backend id (least-connection schedulers).
    pub conns: HashMap<MapData, u32, u64>,
    /// The socket-level load balancer's UDP sockets, by cookie.
    pub socks_udp: HashMap<MapData, u64, SockValue>,
    /// Its TCP sockets, by cookie.
    pub socks_tcp: HashMap<MapData, u64, SockValue>,
    /// Which interfaces have tc egress (`proxy_common::egress_bit`).
    pub egress: Array<MapData, u64>,
    /// Interfaces new flows asked tc egress for.
    pub egress_wanted: HashMap<MapData, u32, u32>,
    /// IPv6's own maps.
    pub v6: Maps6,
}

/// IPv6's maps: the same layouts as IPv4's, with IPv6 addresses.
pub struct Maps6 {
    pub services: HashMap<MapData, ServiceKey<In6>, ServiceValue>,
    pub service_addrs: HashMap<MapData, In6, u32>,
    pub slots: HashMap<MapData, SlotKey, Slot<In6>>,
    /// `KPX_CT6_TCP` and `KPX_CT6_ANY`.
    pub ct: CtTables<In6>,
    pub affinity: HashMap<MapData, AffinityKey<In6>, AffinityValue>,
    pub node_addrs: HashMap<MapData, In6, u32>,
    pub src_ranges: LpmTrie<MapData, SrcRange<In6>, u32>,
    pub config: Array<MapData, Net6>,
    /// The socket-level load balancer's `AF_INET6` UDP sockets.
    pub socks_udp: HashMap<MapData, u64, SockValue<In6>>,
    /// Its `AF_INET6` TCP sockets.
    pub socks_tcp: HashMap<MapData, u64, SockValue<In6>>,
}

impl MapSet {
    /// Builds the set from a source of maps by name.
    fn build(mut get: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            services: get(map_names::SERVICES)?.try_into()?,
            service_addrs: get(map_names::SERVICE_ADDRS)?.try_into()?,
            slots: get(map_names::SLOTS)?.try_into()?,
            ct: CtTables::build(get(map_names::CT_TCP)?, get(map_names::CT_ANY)?)?,
            layout: get(map_names::LAYOUT)?.try_into()?,
            counters: get(map_names::COUNTERS)?.try_into()?,
            drops: get(map_names::DROPS)?.try_into()?,
            service_stats: get(map_names::SERVICE_STATS)?.try_into()?,
            service_names: get(map_names::SERVICE_NAMES)?.try_into()?,
            affinity: get(map_names::AFFINITY)?.try_into()?,
            events: get(map_names::EVENTS)?.try_into()?,
            node_addrs: get(map_names::NODE_ADDRS)?.try_into()?,
            src_ranges: get(map_names::SRC_RANGES)?.try_into()?,
            config: get(map_names::CONFIG)?.try_into()?,
            ports: get(map_names::PORTS)?.try_into()?,
            replies: ReplyFilter::new(get(map_names::REPLIES)?, get(map_names::DESTS)?)?,
            conns: get(map_names::CONNS)?.try_into()?,
            socks_udp: get(map_names::SOCKS_UDP)?.try_into()?,
            socks_tcp: get(map_names::SOCKS_TCP)?.try_into()?,
            egress: get(map_names::EGRESS)?.try_into()?,
            egress_wanted: get(map_names::EGRESS_WANTED)?.try_into()?,
            v6: Maps6 {
                services: get(map_names::SERVICES6)?.try_into()?,
                service_addrs: get(map_names::SERVICE_ADDRS6)?.try_into()?,
                slots: get(map_names::SLOTS6)?.try_into()?,
                ct: CtTables::build(get(map_names::CT6_TCP)?, get(map_names::CT6_ANY)?)?,
                affinity: get(map_names::AFFINITY6)?.try_into()?,
                node_addrs: get(map_names::NODE_ADDRS6)?.try_into()?,
                src_ranges: get(map_names::SRC_RANGES6)?.try_into()?,
                config: get(map_names::CONFIG6)?.try_into()?,
                socks_udp: get(map_names::SOCKS_UDP6)?.try_into()?,
                socks_tcp: get(map_names::SOCKS_TCP6)?.try_into()?,
            },
        })
    }

    /// Takes the maps out of a loaded object (its programs keep using them).
    fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        Self::build(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        })
    }

    /// Opens the maps an agent pinned under `dir` (for `kpx dump`, `kpx cleanup`).
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        Self::build(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| {
                format!(
                    "opening {} (is a kpx agent running with --bpffs {}?)",
                    path.display(),
                    dir.display()
                )
            })?;
            Ok(Map::from_map_data(data)?)
        })
    }

    /// Each hash map's name and capacity (max entries), as the kernel has it.
    pub fn capacities(&self) -> Result<Vec<(&'static str, u32)>> {
        use aya::maps::IterableMap;
        let cap = |m: &MapData| -> Result<u32> { Ok(m.info()?.max_entries()) };
        Ok(vec![
            (map_names::SERVICES, cap(IterableMap::map(&self.services))?),
            (
                map_names::SERVICE_ADDRS,
                cap(IterableMap::map(&self.service_addrs))?,
            ),
            (map_names::SLOTS, cap(IterableMap::map(&self.slots))?),
            (
                map_names::SERVICE_NAMES,
                cap(IterableMap::map(&self.service_names))?,
            ),
            (map_names::CT_TCP, self.ct.capacity(CtTable::Tcp)?),
            (map_names::CT_ANY, self.ct.capacity(CtTable::Any)?),
            (map_names::AFFINITY, cap(IterableMap::map(&self.affinity))?),
            (
                map_names::NODE_ADDRS,
                cap(IterableMap::map(&self.node_addrs))?,
            ),
            (
                map_names::SRC_RANGES,
                cap(IterableMap::map(&self.src_ranges))?,
            ),
            (
                map_names::SOCKS_UDP,
                cap(IterableMap::map(&self.socks_udp))?,
            ),
            (
                map_names::SOCKS_UDP6,
                cap(IterableMap::map(&self.v6.socks_udp))?,
            ),
            (
                map_names::SOCKS_TCP,
                cap(IterableMap::map(&self.socks_tcp))?,
            ),
            (
                map_names::SOCKS_TCP6,
                cap(IterableMap::map(&self.v6.socks_tcp))?,
            ),
        ])
    }

    /// Global counters summed over CPUs, in `Counter::ALL` order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|&c| Ok((c, self.counters.get(&(c as u32), 0)?.iter().sum())))
            .collect()
    }

    /// Drop counters summed over CPUs, in `DropReason::ALL` order.
    pub fn drops(&self) -> Result<Vec<(DropReason, u64)>> {
        DropReason::ALL
            .iter()
            .map(|&r| Ok((r, self.drops.get(&(r as u32), 0)?.iter().sum())))
            .collect()
    }

    /// Event counters summed over CPUs, in `Event::ALL` order.
    pub fn events(&self) -> Result<Vec<(Event, u64)>> {
        Event::ALL
            .iter()
            .map(|&e| Ok((e, self.events.get(&(e as u32), 0)?.iter().sum())))
            .collect()
    }

    /// Sets an agent-owned event counter (`Event::Gc*`) to `total`.
    pub fn set_event(&mut self, event: Event, total: u64) -> Result<()> {
        let mut values = vec![0u64; nr_cpus()?];
        values[0] = total;
        self.events
            .set(event as u32, PerCpuValues::try_from(values)?, 0)?;
        Ok(())
    }

    /// Statistics of one service frontend summed over CPUs.
    pub fn service_stats(&self, svc_id: u32) -> Result<ServiceStats> {
        Ok(self
            .service_stats
            .get(&svc_id, 0)?
            .iter()
            .fold(ServiceStats::default(), |a, s| ServiceStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
                new_flows: a.new_flows + s.new_flows,
                reply_packets: a.reply_packets + s.reply_packets,
                reply_bytes: a.reply_bytes + s.reply_bytes,
                xdp_packets: a.xdp_packets + s.xdp_packets,
                socket_flows: a.socket_flows + s.socket_flows,
            }))
    }

    /// The control-plane maps' contents, as the sync engine models them.
    /// Hash maps are read in batches (`dataplane::batch`).
    pub fn read_state(&self) -> Result<MapState> {
        let mut slots = read_hash(&self.slots)?
            .into_iter()
            .map(|(k, s)| (k, s.backend_id, backend_addr(&s.backend)))
            .collect::<Vec<_>>();
        slots.extend(
            read_hash(&self.v6.slots)?
                .into_iter()
                .map(|(k, s)| (k, s.backend_id, backend_addr(&s.backend))),
        );
        // The backends are the ones the slots hold.
        let backends: Backends = slots.iter().map(|(_, id, b)| (*id, *b)).collect();
        // A slot holding another backend than the one its id names in the
        // other slots (no write of the agent's makes one) reads as holding
        // no backend (an id never allocated): a resync sees it differ from
        // the mirror, and rewrites or removes it.
        let slots = slots
            .iter()
            .map(|(k, id, b)| {
                let same = backends.get(id) == Some(b);
                (*k, if same { *id } else { u32::MAX })
            })
            .collect();
        let mut services: foldhash::HashMap<FrontendKey, ServiceValue> = Default::default();
        let mut addrs: foldhash::HashMap<IpAddr, u32> = Default::default();
        let mut node_addrs: foldhash::HashMap<IpAddr, u32> = Default::default();
        let mut ranges: foldhash::HashMap<u32, std::collections::BTreeSet<Cidr>> =
            Default::default();
        self.each_keyed(
            &mut |k, v| {
                services.insert(k, v);
            },
            &mut |a, n| {
                addrs.insert(a, n);
            },
            &mut |id, r| {
                ranges.entry(id).or_default().insert(r);
            },
            &mut |a, f| {
                node_addrs.insert(a, f);
            },
        )?;
        Ok(MapState {
            services,
            slots,
            backends,
            addrs,
            names: read_hash(&self.service_names)?
                .into_iter()
                .map(|(id, n)| (id, name_from_bytes(&n).into()))
                .collect(),
            ranges,
            node_addrs,
            config: Some(self.node_config()?),
        })
    }

    /// Both families' frontends, frontend addresses, source ranges and node
    /// addresses, each to its function, in host form.
    fn each_keyed(
        &self,
        service: &mut dyn FnMut(FrontendKey, ServiceValue),
        addr: &mut dyn FnMut(IpAddr, u32),
        range: &mut dyn FnMut(u32, Cidr),
        node_addr: &mut dyn FnMut(IpAddr, u32),
    ) -> Result<()> {
        each_hash(&self.services, |k, v| service(frontend_key(&k), v))?;
        each_hash(&self.v6.services, |k, v| service(frontend_key(&k), v))?;
        each_hash(&self.service_addrs, |a, n| addr(a.to_ip(), n))?;
        each_hash(&self.v6.service_addrs, |a, n| addr(a.to_ip(), n))?;
        for key in self.src_ranges.keys() {
            let (id, cidr) = range_from_key(&key?);
            range(id, cidr);
        }
        for key in self.v6.src_ranges.keys() {
            let (id, cidr) = range_from_key(&key?);
            range(id, cidr);
        }
        each_hash(&self.node_addrs, |a, f| node_addr(a.to_ip(), f))?;
        each_hash(&self.v6.node_addrs, |a, f| node_addr(a.to_ip(), f))?;
        Ok(())
    }

    /// Both families' node-wide settings.
    pub fn node_config(&self) -> Result<NodeConfig, MapError> {
        Ok(NodeConfig {
            v4: self.config.get(&0, 0)?,
            v6: self.v6.config.get(&0, 0)?,
        })
    }

    /// What a resync compares with the mirror: every entry [`read_state`]
    /// reads, as hashes in one vector (see [`Digest`]), and the port filter.
    ///
    /// [`read_state`]: MapSet::read_state
    pub fn read_digest(&self) -> Result<Digest> {
        let mut entries = Vec::new();
        let mut backends = Vec::new();
        {
            let mut put = |op: Op| entries.extend(op.fingerprint_entry());
            let mut slot = |k: SlotKey, id: u32, b: BackendAddr| {
                put(Op::PutSlot(k, id, b));
                backends.push((id, b));
            };
            each_hash(&self.slots, |k, s| {
                slot(k, s.backend_id, backend_addr(&s.backend))
            })?;
            each_hash(&self.v6.slots, |k, s| {
                slot(k, s.backend_id, backend_addr(&s.backend))
            })?;
        }
        let mut put = |op: Op| entries.extend(op.fingerprint_entry());
        // The backends are the ones the slots hold: each id once, and the
        // same backend in every slot naming it.
        backends.sort_unstable();
        let inconsistent = backends
            .windows(2)
            .any(|w| w[0].0 == w[1].0 && w[0] != w[1]);
        backends.dedup_by_key(|b| b.0);
        for (id, b) in backends {
            put(Op::PutBackend(id, b));
        }
        for (id, n) in read_hash(&self.service_names)? {
            put(Op::PutName(id, name_from_bytes(&n).into()));
        }
        let put = std::cell::RefCell::new(put);
        self.each_keyed(
            &mut |k, v| put.borrow_mut()(Op::PutService(k, v)),
            &mut |a, n| put.borrow_mut()(Op::PutAddr(a, n)),
            &mut |id, r| put.borrow_mut()(Op::PutRange(id, r)),
            &mut |a, f| put.borrow_mut()(Op::PutNodeAddr(a, f)),
        )?;
        put.into_inner()(Op::SetConfig(self.node_config()?));
        Ok(Digest::new(entries, inconsistent, self.port_words()?))
    }

    /// What the datapath serves: the control-plane maps' contents with only
    /// the frontends whose port and address the filter lets through (the
    /// sync writes the filter last, so a frontend is served from then on).
    pub fn serving(&self) -> Result<MapState> {
        let mut st = self.read_state()?;
        let words = self.port_words()?;
        st.services.retain(|k, _| {
            crate::dataplane::ports::frontend_bits(k)
                .into_iter()
                .flatten()
                .all(|bit| {
                    words
                        .get(bit.word as usize)
                        .is_some_and(|w| w & bit.mask != 0)
                })
        });
        Ok(st)
    }

    /// Performs one write of a sync plan, to the maps of its family.
    pub fn write(&mut self, op: &Op) -> Result<(), MapError> {
        self.mark_node_addrs(std::slice::from_ref(op))?;
        let v6 = &mut self.v6;
        match op {
            // Ids only: the slots hold the backends.
            Op::PutBackend(..) => Ok(()),
            Op::ResetStats(id) => {
                let zeros = PerCpuValues::try_from(vec![ServiceStats::default(); nr_cpus()?])?;
                self.service_stats.set(*id, zeros, 0)
            }
            Op::PutSlot(k, id, b) => match b.addr {
                IpAddr::V4(_) => self.slots.insert(k, slot(*id, b), 0),
                IpAddr::V6(_) => v6.slots.insert(k, slot(*id, b), 0),
            },
            Op::PutService(k, v) => match k.family() {
                Family::V4 => self.services.insert(service_key(k), v, 0),
                Family::V6 => v6.services.insert(service_key(k), v, 0),
            },
            Op::PutAddr(a, n) => match *a {
                IpAddr::V4(a) => self.service_addrs.insert(wire::addr(a), n, 0),
                IpAddr::V6(a) => v6.service_addrs.insert(wire::addr6(a), n, 0),
            },
            Op::PutName(id, name) => self.service_names.insert(id, name_to_bytes(name), 0),
            Op::DelService(k) => ignore_missing(match k.family() {
                Family::V4 => self.services.remove(&service_key(k)),
                Family::V6 => v6.services.remove(&service_key(k)),
            }),
            // A slot key names no family (service ids are one space for
            // both): it goes from both maps, where it is.
            Op::DelSlot(k) => {
                ignore_missing(self.slots.remove(k))?;
                ignore_missing(v6.slots.remove(k))
            }
            Op::DelBackend(id) => ignore_missing(self.conns.remove(id)),
            Op::DelAddr(a) => ignore_missing(match *a {
                IpAddr::V4(a) => self.service_addrs.remove(&wire::addr(a)),
                IpAddr::V6(a) => v6.service_addrs.remove(&wire::addr6(a)),
            }),
            Op::DelName(id) => ignore_missing(self.service_names.remove(id)),
            Op::PutRange(id, r) => match r {
                Cidr::V4(_) => self.src_ranges.insert(&range_key(*id, r), 1, 0),
                Cidr::V6(_) => v6.src_ranges.insert(&range_key(*id, r), 1, 0),
            },
            Op::DelRange(id, r) => ignore_missing(match r {
                Cidr::V4(_) => self.src_ranges.remove(&range_key(*id, r)),
                Cidr::V6(_) => v6.src_ranges.remove(&range_key(*id, r)),
            }),
            Op::PutNodeAddr(a, f) => match *a {
                IpAddr::V4(a) => self.node_addrs.insert(wire::addr(a), f, 0),
                IpAddr::V6(a) => v6.node_addrs.insert(wire::addr6(a), f, 0),
            },
            Op::DelNodeAddr(a) => ignore_missing(match *a {
                IpAddr::V4(a) => self.node_addrs.remove(&wire::addr(a)),
                IpAddr::V6(a) => v6.node_addrs.remove(&wire::addr6(a)),
            }),
            // IPv6's first: IPv4's holds the flags that make a change take
            // effect for both.
            Op::SetConfig(c) => {
                v6.config.set(0, c.v6, 0)?;
                self.config.set(0, c.v4, 0)
            }
        }
    }

    /// Performs a sync plan in order, runs of the same write to the same
    /// map in one batched call each (`dataplane::batch`). On failure,
    /// returns how many writes were done: a prefix of the plan, which is a
    /// consistent datapath.
    pub fn write_all(&mut self, ops: &[Op]) -> Result<(), (usize, MapError)> {
        let mut i = 0;
        while i < ops.len() {
            let class = batch_class(&ops[i]);
            let end = match class {
                Some(c) => {
                    i + ops[i..]
                        .iter()
                        .take_while(|op| batch_class(op) == Some(c))
                        .count()
                }
                None => i + 1,
            };
            if end - i > 1 {
                // A run's node addresses marked here, a single write's by
                // `write`: each once.
                self.mark_node_addrs(&ops[i..end]).map_err(|e| (i, e))?;
                match self.write_run(&ops[i..end]) {
                    Ok(()) => {
                        i = end;
                        continue;
                    }
                    Err(p) if p.done == 0 && batch::unsupported(&p.error) => {}
                    Err(p) => {
                        return Err((
                            i + p.done,
                            MapError::SyscallError(aya::sys::SyscallError {
                                call: "BPF_MAP_UPDATE_BATCH",
                                io_error: p.error,
                            }),
                        ))
                    }
                }
            }
            // One at a time: a write that does not batch, or a kernel that
            // cannot.
            for (n, op) in ops[i..end].iter().enumerate() {
                self.write(op).map_err(|e| (i + n, e))?;
            }
            i = end;
        }
        Ok(())
    }

    /// As [`MapSet::write_all`], from a thread of its own, `chunk` writes
    /// at a time: each chunk written is handed to `written` (on this
    /// thread) while the next is being written. Returns how many writes
    /// were done, and the error that stopped the rest.
    pub fn write_all_pipelined(
        &mut self,
        ops: &[Op],
        chunk: usize,
        written: &mut dyn FnMut(&[Op]),
    ) -> (usize, Option<MapError>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        let threaded = std::thread::scope(|s| {
            let maps = &mut *self;
            let writer = std::thread::Builder::new()
                .name("kpx-writer".into())
                .spawn_scoped(s, move || {
                    let mut done = 0;
                    for c in ops.chunks(chunk.max(1)) {
                        let failed = maps.write_all(c).err();
                        done += failed.as_ref().map_or(c.len(), |f| f.0);
                        if tx.send(done).is_err() || failed.is_some() {
                            return failed.map(|f| f.1);
                        }
                    }
                    None
                })?;
            let mut recorded = 0;
            for upto in rx {
                written(&ops[recorded..upto]);
                recorded = upto;
            }
            let failed = writer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            Ok::<_, std::io::Error>((recorded, failed))
        });
        threaded.unwrap_or_else(|e| {
            log::warn!("no thread to write from ({e}); writing from this one");
            let (done, failed) = match self.write_all(ops) {
                Ok(()) => (ops.len(), None),
                Err((done, e)) => (done, Some(e)),
            };
            written(&ops[..done]);
            (done, failed)
        })
    }

    /// A run of writes of one class (`batch_class`: one operation on one
    /// family's map) in one batched call.
    fn write_run(&mut self, run: &[Op]) -> Result<(), batch::Partial> {
        use aya::maps::IterableMap as _;
        fn pairs<K, V>(run: &[Op], f: impl Fn(&Op) -> Option<(K, V)>) -> (Vec<K>, Vec<V>) {
            run.iter().filter_map(f).unzip()
        }
        fn keys<K>(run: &[Op], f: impl Fn(&Op) -> Option<K>) -> Vec<K> {
            run.iter().filter_map(f).collect()
        }
        let v6 = op_family(&run[0]) == Some(Family::V6);
        // The run's family's map, and its keys and values in that family's
        // wire form.
        // Typed by the map, so that each family's expansion of the macros'
        // closure gets its own key and value types.
        fn update<K: aya::Pod, V: aya::Pod>(
            map: &HashMap<MapData, K, V>,
            run: &[Op],
            f: impl Fn(&Op) -> Option<(K, V)>,
        ) -> Result<(), batch::Partial> {
            let (k, v) = pairs(run, f);
            batch::update(map.map(), &k, &v)
        }
        fn delete<K: aya::Pod, V: aya::Pod>(
            map: &HashMap<MapData, K, V>,
            run: &[Op],
            f: impl Fn(&Op) -> Option<K>,
        ) -> Result<(), batch::Partial> {
            batch::delete(map.map(), &keys(run, f))
        }
        macro_rules! update {
            ($v4:expr, $v6:expr, $f:expr) => {
                if v6 {
                    update(&$v6, run, $f)
                } else {
                    update(&$v4, run, $f)
                }
            };
        }
        macro_rules! delete {
            ($v4:expr, $v6:expr, $f:expr) => {
                if v6 {
                    delete(&$v6, run, $f)
                } else {
                    delete(&$v4, run, $f)
                }
            };
        }
        match &run[0] {
            Op::PutSlot(..) => update!(self.slots, self.v6.slots, |op| match op {
                Op::PutSlot(k, id, b) => Some((*k, slot(*id, b))),
                _ => None,
            }),
            Op::PutService(..) => update!(self.services, self.v6.services, |op| match op {
                Op::PutService(k, v) => Some((service_key(k), *v)),
                _ => None,
            }),
            Op::PutAddr(..) => update!(self.service_addrs, self.v6.service_addrs, |op| match op {
                Op::PutAddr(a, n) => Some((WireAddr::from_ip(*a), *n)),
                _ => None,
            }),
            Op::PutName(..) => {
                let (k, v) = pairs(run, |op| match op {
                    Op::PutName(id, name) => Some((*id, name_to_bytes(name))),
                    _ => None,
                });
                batch::update(self.service_names.map(), &k, &v)
            }
            Op::PutNodeAddr(..) => update!(self.node_addrs, self.v6.node_addrs, |op| match op {
                Op::PutNodeAddr(a, f) => Some((WireAddr::from_ip(*a), *f)),
                _ => None,
            }),
            Op::ResetStats(_) => {
                let ids = keys(run, |op| match op {
                    Op::ResetStats(id) => Some(*id),
                    _ => None,
                });
                // Per-CPU: one zeroed value for every possible CPU.
                let cpus = nr_cpus().map_err(|e| batch::Partial {
                    done: 0,
                    error: std::io::Error::other(e.to_string()),
                })?;
                let zeros = vec![ServiceStats::default(); ids.len() * cpus];
                batch::update_per_key(self.service_stats.map(), &ids, &zeros, cpus)
            }
            Op::DelService(_) => delete!(self.services, self.v6.services, |op| match op {
                Op::DelService(k) => Some(service_key(k)),
                _ => None,
            }),
            // From both families' maps, as a single `DelSlot` (a delete
            // batch steps over missing keys).
            Op::DelSlot(_) => {
                let k = keys(run, |op| match op {
                    Op::DelSlot(k) => Some(*k),
                    _ => None,
                });
                batch::delete(self.slots.map(), &k)?;
                batch::delete(self.v6.slots.map(), &k)
            }
            Op::DelBackend(_) => {
                // Their connection counters, where they have one (only the
                // backends of least-connection services do): one by one,
                // as a batch stops at the first missing key.
                for (done, op) in run.iter().enumerate() {
                    if let Op::DelBackend(id) = op {
                        ignore_missing(self.conns.remove(id)).map_err(|e| batch::Partial {
                            done,
                            error: std::io::Error::other(e.to_string()),
                        })?;
                    }
                }
                Ok(())
            }
            Op::DelAddr(_) => delete!(self.service_addrs, self.v6.service_addrs, |op| match op {
                Op::DelAddr(a) => Some(WireAddr::from_ip(*a)),
                _ => None,
            }),
            Op::DelName(_) => batch::delete(
                self.service_names.map(),
                &keys(run, |op| match op {
                    Op::DelName(id) => Some(*id),
                    _ => None,
                }),
            ),
            Op::DelNodeAddr(_) => delete!(self.node_addrs, self.v6.node_addrs, |op| match op {
                Op::DelNodeAddr(a) => Some(WireAddr::from_ip(*a)),
                _ => None,
            }),
            // Ids only: the slots hold the backends.
            Op::PutBackend(..) => Ok(()),
            // Never a run: `batch_class` keeps them single.
            _ => Ok(()),
        }
    }

    /// Every word of the port filter, the address filter's after the
    /// ports' (`proxy_common::ADDR_WORD0`).
    pub fn port_words(&self) -> Result<Vec<u64>, MapError> {
        let words = self.ports.len() + self.replies.addr_words();
        (0..words).map(|i| self.port_word(i)).collect()
    }

    /// Word `i` of the port filter: a port's (`KPX_PORTS`) below
    /// `proxy_common::ADDR_WORD0`, the address filter's (in `KPX_DESTS`'s
    /// blocks) from there.
    pub fn port_word(&self, i: u32) -> Result<u64, MapError> {
        match i.checked_sub(ADDR_WORD0) {
            Some(a) => self.replies.addr_word(a).ok_or(MapError::OutOfBounds {
                index: i,
                max_entries: ADDR_WORD0 + self.replies.addr_words(),
            }),
            None => self.ports.get(&i, 0),
        }
    }

    /// Writes a frontend of either family ([`MapSet::write`]) and marks
    /// its port and address in the filter (for tools and tests that write frontends by
    /// hand; the agent's sync keeps the filter itself, see
    /// [`crate::dataplane::ports`]).
    pub fn put_frontend(&mut self, key: &FrontendKey, value: ServiceValue) -> Result<(), MapError> {
        for bit in crate::dataplane::ports::frontend_bits(key)
            .into_iter()
            .flatten()
        {
            self.mark_port(bit)?;
        }
        self.write(&Op::PutService(*key, value))
    }

    /// Writes a slot holding backend `id` at `b` (its family's map) and
    /// marks the backend's port in the filter, as [`MapSet::put_frontend`].
    pub fn put_slot(&mut self, key: SlotKey, id: u32, b: &BackendAddr) -> Result<(), MapError> {
        self.mark_port(proxy_common::port_bit(b.port, proxy_common::PORT_F_BACKEND))?;
        self.write(&Op::PutSlot(key, id, *b))
    }

    /// The entry of frontend `key`, from its family's map.
    pub fn frontend(&self, key: &FrontendKey) -> Result<ServiceValue, MapError> {
        match key.family() {
            Family::V4 => self.services.get(&service_key(key), 0),
            Family::V6 => self.v6.services.get(&service_key(key), 0),
        }
    }

    /// Sets `bit` in the port and address filter (it serves both
    /// families), for tools and tests that write by hand (see
    /// [`MapSet::put_frontend`]).
    pub fn mark_port(&mut self, bit: proxy_common::PortBit) -> Result<(), MapError> {
        let word = self.port_word(bit.word)? | bit.mask;
        self.set_port_word(bit.word, word)
    }

    /// Writes word `i` of the port filter (as [`MapSet::port_word`] reads).
    pub fn set_port_word(&mut self, i: u32, word: u64) -> Result<(), MapError> {
        match i.checked_sub(ADDR_WORD0) {
            Some(a) if self.replies.set_addr_word(a, word) => Ok(()),
            Some(_) => Err(MapError::OutOfBounds {
                index: i,
                max_entries: ADDR_WORD0 + self.replies.addr_words(),
            }),
            None => self.ports.set(i, word, 0),
        }
    }

    /// Marks the node addresses `ops` put in the address filter, before
    /// they are written (for tools and tests that write by hand; the
    /// agent's port filter holds them itself): the destination filter must
    /// not pass a packet to a NodePort.
    fn mark_node_addrs(&mut self, ops: &[Op]) -> Result<(), MapError> {
        for op in ops {
            if let Op::PutNodeAddr(a, _) = op {
                self.mark_port(crate::dataplane::ports::ip_bit(*a))?;
            }
        }
        Ok(())
    }

    /// The entry of `key` in either of IPv4's conntrack tables
    /// ([`CtTables::lookup`]).
    pub fn ct_get(&self, key: &CtKey) -> Option<(CtTable, CtValue)> {
        self.ct.lookup(key)
    }

    /// Every entry of IPv4's conntrack tables ([`CtTables::entries`]).
    pub fn ct_entries(&self) -> Vec<CtEntry> {
        self.ct.entries()
    }

    /// The node-wide settings the datapath reads (IPv4's, with the flags
    /// and ports both families use).
    pub fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), MapError> {
        self.config.set(0, cfg, 0)
    }
}

/// The family of the map an operation writes; None for the maps both
/// families share (and for a slot's delete, which goes to both).
fn op_family(op: &Op) -> Option<Family> {
    match op {
        Op::PutSlot(_, _, b) => Some(Family::of(&b.addr)),
        Op::PutService(k, _) | Op::DelService(k) => Some(k.family()),
        Op::PutAddr(a, _) | Op::DelAddr(a) | Op::PutNodeAddr(a, _) | Op::DelNodeAddr(a) => {
            Some(Family::of(a))
        }
        Op::PutRange(_, r) | Op::DelRange(_, r) => Some(Family::of_net(r)),
        _ => None,
    }
}

/// Which writes go together into one batched call: the same operation on
/// the same map (so the same family). The LPM tries (no batch operations)
/// and the config arrays are written one at a time.
fn batch_class(op: &Op) -> Option<u8> {
    let family = match op_family(op) {
        Some(Family::V6) => 16,
        _ => 0,
    };
    Some(
        family
            + match op {
                Op::PutBackend(..) => 0,
                Op::PutSlot(..) => 1,
                Op::PutService(..) => 2,
                Op::PutAddr(..) => 3,
                Op::PutName(..) => 4,
                Op::PutNodeAddr(..) => 5,
                Op::DelService(_) => 6,
                Op::DelSlot(_) => 7,
                Op::DelBackend(_) => 8,
                Op::DelAddr(_) => 9,
                Op::DelName(_) => 10,
                Op::DelNodeAddr(_) => 11,
                Op::ResetStats(_) => 12,
                Op::PutRange(..) | Op::DelRange(..) | Op::SetConfig(_) => return None,
            },
    )
}

/// An address in the datapath's form (`u32` for IPv4, [`In6`] for IPv6):
/// the map boundary's conversions, one code path for both families.
pub trait WireAddr: Address + aya::Pod {
    /// `ip` in this form; an address of the other family (which the
    /// callers' family dispatch never passes) gives the unspecified one.
    fn from_ip(ip: IpAddr) -> Self;
    fn to_ip(self) -> IpAddr;
}

impl WireAddr for u32 {
    fn from_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => wire::addr(a),
            IpAddr::V6(_) => Self::ZERO,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V4(wire::to_addr(self))
    }
}

impl WireAddr for In6 {
    fn from_ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V6(a) => wire::addr6(a),
            IpAddr::V4(_) => Self::ZERO,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V6(wire::to_addr6(self))
    }
}

/// A frontend's map key (wire order; `A` is its family's) and back: the
/// map boundary.
pub fn service_key<A: WireAddr>(k: &FrontendKey) -> ServiceKey<A> {
    ServiceKey {
        addr: A::from_ip(k.addr),
        port: wire::port(k.port),
        proto: k.proto,
        _pad: 0,
    }
}

fn frontend_key<A: WireAddr>(k: &ServiceKey<A>) -> FrontendKey {
    FrontendKey {
        addr: k.addr.to_ip(),
        port: wire::to_port(k.port),
        proto: k.proto,
    }
}

/// A slot's map value: backend id `id`, which is `b`.
fn slot<A: WireAddr>(id: u32, b: &BackendAddr) -> Slot<A> {
    Slot {
        backend_id: id,
        backend: Backend {
            addr: A::from_ip(b.addr),
            port: wire::port(b.port),
            proto: b.proto,
            flags: if b.local { BACKEND_F_LOCAL } else { 0 },
        },
    }
}

fn backend_addr<A: WireAddr>(b: &Backend<A>) -> BackendAddr {
    BackendAddr {
        addr: b.addr.to_ip(),
        port: wire::to_port(b.port),
        proto: b.proto,
        local: b.flags & BACKEND_F_LOCAL != 0,
    }
}

/// The LPM key of source range `r` of frontend `svc_id` (`A` is `r`'s
/// family's): the whole id, then the range's prefix.
pub fn range_key<A: WireAddr>(svc_id: u32, r: &Cidr) -> LpmKey<SrcRange<A>>
where
    SrcRange<A>: aya::Pod,
{
    LpmKey::new(
        32 + u32::from(r.prefix_len()),
        SrcRange {
            svc_id_be: svc_id.to_be(),
            addr: A::from_ip(r.network()),
        },
    )
}

fn range_from_key<A: WireAddr>(k: &LpmKey<SrcRange<A>>) -> (u32, Cidr)
where
    SrcRange<A>: aya::Pod,
{
    let data = k.data();
    let addr = data.addr.to_ip();
    let max = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let len = k.prefix_len().saturating_sub(32).min(max) as u8;
    (
        u32::from_be(data.svc_id_be),
        // `len` is at most the family's length, so `new` cannot fail.
        Cidr::new(addr, len).unwrap_or_else(|_| Cidr::from(addr)),
    )
}

/// Deleting what is already gone (by hand, or by an earlier interrupted
/// sync) is success.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn nr_cpus() -> Result<usize, MapError> {
    aya::util::nr_cpus().map_err(|(_, error)| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error: error,
        })
    })
}

pub fn name_to_bytes(name: &str) -> ServiceName {
    let mut out = [0u8; SERVICE_NAME_LEN];
    let n = name.len().min(SERVICE_NAME_LEN);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

pub fn name_from_bytes(b: &ServiceName) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The loaded datapath: its program and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: MapSet,
    /// What loading over pinned maps found and carried (None: not pinned).
    pub upgrade: Option<layout::Upgrade>,
    /// An old layout's tables, to read again once attached ([`Datapath::carry_late`]).
    late: layout::Late,
    /// [`Datapath::xdp_marks`].
    xdp_marks: bool,
}

impl Datapath {
    /// After an upgrade from another layout, once this build's programs
    /// are attached: carries the established flows the old programs set up
    /// while this one loaded ([`layout::carry_late`]), into `upgrade`.
    /// Returns how many entries; later calls do nothing.
    pub fn carry_late(&mut self) -> u64 {
        let late = std::mem::take(&mut self.late);
        match self.upgrade.as_mut() {
            Some(up) => layout::carry_late(&mut self.maps, late, up),
            None => 0,
        }
    }

    /// Loads the object and its tc program into the kernel (the verifier runs here).
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        let mut pending = None;
        if let Some(dir) = &opts.pin_dir {
            pending = Some(layout::prepare(dir)?);
            if opts.ipv6 {
                layout::grow_ipv6(dir, IPV6_OFF_ENTRIES)?;
            }
            for name in map_names::ALL {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        if let Some(n) = opts.conntrack_entries {
            loader.map_max_entries(map_names::CT_TCP, n);
            loader.map_max_entries(map_names::CT_ANY, ct_any_capacity(n));
        }
        match (opts.ipv6, opts.conntrack_entries) {
            (true, Some(n)) => {
                loader.map_max_entries(map_names::CT6_TCP, n);
                loader.map_max_entries(map_names::CT6_ANY, ct_any_capacity(n));
            }
            (true, None) => {}
            (false, _) => {
                for name in IPV6_SIZED {
                    loader.map_max_entries(name, IPV6_OFF_ENTRIES);
                }
            }
        }
        let xdp_marks = xdp_marks_supported();
        let marks = u8::from(xdp_marks);
        loader.override_global("XDP_MARKS", &marks, true);
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the kpx eBPF object (needs root: CAP_BPF and CAP_NET_ADMIN)")?;
        for name in [
            prog_names::TC_INGRESS,
            prog_names::TC_EGRESS,
            prog_names::CONNS_EXPIRE,
            prog_names::CONNS_EXPIRE6,
            prog_names::TC_DSR,
            prog_names::TC_INGRESS6,
            prog_names::TC_EGRESS6,
            prog_names::TC_NEW6,
            prog_names::TC_NEW6_NODE,
        ] {
            program(&mut ebpf, name)?
                .load()
                .with_context(|| format!("the kernel rejected {name}"))?;
        }
        // tc ingress and egress tail-call these; the (pinned) array keeps
        // them for the attached programs while an agent restarts. The
        // programs IPv6's entries hand over to go in first, so no entry of
        // this build hands over to an older build's.
        fill_prog_array(
            &mut ebpf,
            map_names::PROGS,
            &[
                (PROG_DSR, prog_names::TC_DSR),
                (PROG_NEW6, prog_names::TC_NEW6),
                (PROG_NEW6_NODE, prog_names::TC_NEW6_NODE),
                (PROG_INGRESS6, prog_names::TC_INGRESS6),
                (PROG_EGRESS6, prog_names::TC_EGRESS6),
            ],
        )?;
        let mut maps = MapSet::from_ebpf(&mut ebpf)?;
        let (upgrade, late) = match pending {
            Some(p) => {
                let (up, late) = layout::finish(&mut maps, p)?;
                (Some(up), late)
            }
            None => (None, layout::Late::default()),
        };
        // The programs attached (an earlier agent's, or kpx's before the
        // filter) may not have kept it: every tuple is in it until the
        // collector's first rebuilds, after these programs are attached.
        maps.replies.fill();
        Ok(Self {
            ebpf,
            maps,
            upgrade,
            late,
            xdp_marks,
        })
    }

    /// Whether XDP marks the frames it translates for the stack (the
    /// kernel lets XDP programs call `bpf_xdp_adjust_meta`). Without it,
    /// XDP translates only what it sends back out of its interface and
    /// leaves the rest, and every flow's first packet, untouched to tc.
    pub fn xdp_marks(&self) -> bool {
        self.xdp_marks
    }

    /// The tc ingress classifier (loaded).
    pub fn ingress(&mut self) -> Result<&mut SchedClassifier> {
        program(&mut self.ebpf, prog_names::TC_INGRESS)
    }

    /// The tc egress classifier (loaded): ICMP errors the node sends.
    pub fn egress(&mut self) -> Result<&mut SchedClassifier> {
        program(&mut self.ebpf, prog_names::TC_EGRESS)
    }

    /// The XDP program, loaded on first use (the verifier's time is spent
    /// only where `--xdp` asks for it, and by tests).
    pub fn xdp(&mut self) -> Result<&mut Xdp> {
        if self
            .ebpf
            .program(prog_names::XDP)
            .is_some_and(|p| p.fd().is_err())
        {
            if !self.xdp_marks {
                log::warn!(
                    "XDP: this kernel refuses XDP programs bpf_xdp_adjust_meta: XDP \
                     translates only the packets it sends back out of their interface; \
                     the rest, and every flow's first packet, go to tc untouched"
                );
            }
            // The programs it tail-calls go in first (IPv6's first packets).
            let tail = [
                (XDP_PROG_SERVICE6, prog_names::XDP_SERVICE6),
                (XDP_PROG_NEW6, prog_names::XDP_NEW6),
            ];
            for (_, name) in tail {
                xdp_program(&mut self.ebpf, name)?;
            }
            fill_prog_array(&mut self.ebpf, map_names::XDP_PROGS, &tail)?;
        }
        xdp_program(&mut self.ebpf, prog_names::XDP)
    }

    /// The empty XDP program (the benchmark's floor), loaded on first use.
    pub fn xdp_floor(&mut self) -> Result<&mut Xdp> {
        xdp_program(&mut self.ebpf, prog_names::XDP_FLOOR)
    }

    /// The program that ends expired established flows' connection counts
    /// (`conntrack::Expirer`), for the collector's thread: its own
    /// descriptor.
    pub fn expirer(&mut self) -> Result<crate::dataplane::conntrack::Expirer> {
        let mut fd = |name| -> Result<std::os::fd::OwnedFd> {
            let prog = program(&mut self.ebpf, name)?;
            Ok(prog.fd()?.as_fd().try_clone_to_owned()?)
        };
        use crate::dataplane::conntrack::CtFamily;
        let v4 = fd(<u32 as CtFamily>::EXPIRE_PROG)?;
        let v6 = fd(<proxy_common::In6 as CtFamily>::EXPIRE_PROG)?;
        Ok(crate::dataplane::conntrack::Expirer::new(v4, v6))
    }

    /// Loads the socket-level load balancer's programs and attaches them
    /// to `cgroup` (`socklb::attach`).
    pub fn attach_socket_lb(&mut self, cgroup: &Path, bpffs: &Path) -> Result<usize> {
        crate::dataplane::socklb::attach(&mut self.ebpf, cgroup, bpffs)
    }

    /// An empty classifier (loaded on first use): the floor the benchmark
    /// measures `BPF_PROG_TEST_RUN` itself with.
    pub fn floor(&mut self) -> Result<&mut SchedClassifier> {
        self.bench_program(prog_names::TC_FLOOR)
    }

    /// The established table's lookup alone (loaded on first use): the
    /// kernel's share of an established packet, for the benchmark.
    pub fn floor_ct(&mut self) -> Result<&mut SchedClassifier> {
        self.bench_program(prog_names::TC_FLOOR_CT)
    }

    /// One of the benchmark's classifiers, loaded on first use.
    fn bench_program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        let prog = program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load()
                .with_context(|| format!("the kernel rejected {name}"))?;
        }
        Ok(prog)
    }
}

/// XDP program `name`, loaded if it was not.
/// Puts the loaded programs `programs` (index, name) into the program
/// array `map`, for the programs that tail-call them.
fn fill_prog_array(ebpf: &mut Ebpf, map: &str, programs: &[(u32, &str)]) -> Result<()> {
    let mut fds = Vec::new();
    for &(index, name) in programs {
        let fd = ebpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?
            .fd()?
            .try_clone()
            .with_context(|| format!("duplicating {name}'s descriptor"))?;
        fds.push((index, name, fd));
    }
    let mut progs: ProgramArray<&mut MapData> = ebpf
        .map_mut(map)
        .ok_or_else(|| anyhow!("map {map} missing from the object"))?
        .try_into()?;
    for (index, name, fd) in &fds {
        progs
            .set(*index, fd, 0)
            .with_context(|| format!("putting {name} in {map}"))?;
    }
    Ok(())
}

/// Whether this kernel lets XDP programs call `bpf_xdp_adjust_meta`
/// (some builds refuse it: "program of this type cannot use helper").
/// A probe that fails says no: XDP then hands tc nothing translated.
pub fn xdp_marks_supported() -> bool {
    use aya::{
        programs::ProgramType,
        sys::{is_helper_supported, BpfHelper},
    };
    match is_helper_supported(ProgramType::Xdp, BpfHelper::BPF_FUNC_xdp_adjust_meta) {
        Ok(yes) => yes,
        Err(e) => {
            log::warn!("XDP: probing bpf_xdp_adjust_meta failed ({e}); taken as unavailable");
            false
        }
    }
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("the kernel rejected {name}"))?;
    }
    Ok(prog)
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()?)
}
