//! The port filter (`KPX_PORTS`): bits per port telling the datapath
//! whether any frontend (a cluster, external or LoadBalancer IP; or a
//! NodePort) or any backend uses it, so that traffic on every other port is
//! known to be for no service and of no tracked flow without a hash lookup
//! (see `proxy_common::PORT_F_BACKEND`); and after them the address filter,
//! a bit per hash of a frontend's address, so that traffic to a frontend's
//! port at another address is known so too (`proxy_common::ADDR_HASH_BITS`).
//! Both are bits of one numbering, kept alike (the address filter's words
//! live in the destination filter's blocks, `dataplane::replies`): a
//! frontend uses two (its port's and its address's; a NodePort its port's
//! alone), a backend one, and each of this node's addresses its address's
//! (their NodePorts are frontends: the destination filter, which asks no
//! port, must not pass packets to them).
//!
//! Kept from the sync's own writes: each frontend and backend added or
//! removed moves a use count of its bit. A bit a plan will need is set
//! before the plan is written ([`PortFilter::prepare`]: a backend's, before
//! the slot that lets a flow pick it, so the flow's first reply already
//! meets it). A bit whose last user went is **held**: flows on its port may
//! still be tracked (kube-proxy keeps a removed service's or backend's
//! connections), and the datapath looks flows up only on marked ports. It
//! is cleared once a walk of the conntrack tables that began well after
//! that found no flow on the port ([`PortFilter::release`]). Rebuilt from
//! the mirror, and compared with the map, at start and at each full
//! resync; bits the map has beyond that are held.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    time::{Duration, Instant},
};

use aya::maps::MapError;
use proxy_common::{
    addr_bit, port_bit, wire, PortBit, ADDR_WORD0, PORT_BITS, PORT_F_BACKEND, PORT_F_FRONTEND,
    PORT_F_NODEPORT,
};

use crate::{
    control::model::FrontendKey,
    dataplane::maps::MapSet,
    dataplane::reconcile::{BackendAddr, MapState, Op},
};

/// How long after its last user went a held bit's port must have been
/// walked: far longer than a packet's run of the datapath, which may have
/// looked its frontend or backend up just before it went and creates its
/// flow just after.
const HOLD_MARGIN: Duration = Duration::from_secs(1);

/// The ports of the flows a walk of the conntrack tables found, with the
/// kind of bit each needs (`conntrack::flow_port`), and the address-filter
/// bits of their original directions' destinations
/// (`conntrack::flow_addr`).
#[derive(Clone, Debug)]
pub struct LivePorts {
    /// When the walk began.
    pub started: Instant,
    pub ports: HashSet<(u16, u64)>,
    pub addrs: HashSet<PortBit>,
}

#[derive(Debug, Default)]
pub struct PortFilter {
    /// Frontends and backends using each bit, ordered by word.
    uses: BTreeMap<PortBit, u32>,
    /// Bits no frontend or backend uses, kept set since then (see above).
    held: BTreeMap<PortBit, Instant>,
    /// Words as the map holds them (absent: zero).
    written: HashMap<u32, u64>,
    /// Words to compare and write at the next flush.
    dirty: BTreeSet<u32>,
}

/// A frontend's port bit: [`PORT_F_NODEPORT`] for a NodePort (the
/// unspecified address of either family), [`PORT_F_FRONTEND`] for any
/// other frontend, as the datapath's [`proxy_common::ServiceKey::port_bit`].
pub fn frontend_bit(k: &FrontendKey) -> PortBit {
    let kind = if k.addr.is_unspecified() {
        PORT_F_NODEPORT
    } else {
        PORT_F_FRONTEND
    };
    port_bit(k.port, kind)
}

/// Address `a`'s bit of the address filter, as the datapath computes it
/// from the address on the wire.
pub fn ip_bit(a: std::net::IpAddr) -> PortBit {
    match a {
        std::net::IpAddr::V4(a) => addr_bit(wire::addr(a)),
        std::net::IpAddr::V6(a) => addr_bit(wire::addr6(a)),
    }
}

/// Every bit a frontend uses: its port's, and its address's but for a
/// NodePort ([`proxy_common::ServiceKey::addr_bit`]).
pub fn frontend_bits(k: &FrontendKey) -> [Option<PortBit>; 2] {
    let addr = (!k.addr.is_unspecified()).then(|| ip_bit(k.addr));
    [Some(frontend_bit(k)), addr]
}

/// Whether `bit` is the address filter's.
fn is_addr_bit(bit: PortBit) -> bool {
    bit.word >= ADDR_WORD0
}

/// A backend's bit.
fn backend_bit(b: &BackendAddr) -> PortBit {
    port_bit(b.port, PORT_F_BACKEND)
}

/// The port a bit is of.
fn port_of(bit: PortBit) -> u16 {
    let per_word = 64 / PORT_BITS;
    (bit.word * per_word + bit.mask.trailing_zeros() / PORT_BITS) as u16
}

impl PortFilter {
    /// The filter for the frontends and backends in `state`, every word to
    /// be checked against the map (whose contents are unknown) at the next
    /// flush; bits the map has beyond those are held from now.
    pub fn rebuild(state: &MapState, maps: &MapSet) -> Result<Self, MapError> {
        let mut f = Self::default();
        for bit in state.services.keys().flat_map(frontend_bits).flatten() {
            *f.uses.entry(bit).or_default() += 1;
        }
        for b in state.backends.values() {
            *f.uses.entry(backend_bit(b)).or_default() += 1;
        }
        for a in state.node_addrs.keys() {
            *f.uses.entry(ip_bit(*a)).or_default() += 1;
        }
        let now = Instant::now();
        for (i, word) in (0u32..).zip(maps.port_words()?) {
            if word == 0 {
                continue;
            }
            f.written.insert(i, word);
            for shift in 0..64 {
                let bit = PortBit {
                    word: i,
                    mask: 1 << shift,
                };
                if word & bit.mask != 0 && !f.uses.contains_key(&bit) {
                    f.held.insert(bit, now);
                }
            }
        }
        f.dirty = f
            .written
            .keys()
            .copied()
            .chain(f.uses.keys().map(|b| b.word))
            .collect();
        Ok(f)
    }

    /// Holds the bits of `live`'s ports and addresses (address-filter
    /// bits) that the datapath needs to find their flows: of ports the map
    /// may lack (read at start, when the filter map may be new while the
    /// conntrack tables are not).
    pub fn hold_live(&mut self, live: &[(u16, u64)], addrs: &[PortBit]) {
        let now = Instant::now();
        let ports = live.iter().map(|&(port, kind)| port_bit(port, kind));
        for bit in ports.chain(addrs.iter().copied()) {
            if !self.uses.contains_key(&bit) {
                self.held.entry(bit).or_insert(now);
                self.dirty.insert(bit.word);
            }
        }
    }

    /// The bits `op` starts using, if it is a new use.
    fn added(op: &Op, state: &MapState) -> [Option<PortBit>; 2] {
        match op {
            Op::PutService(k, _) if !state.services.contains_key(k) => frontend_bits(k),
            Op::PutBackend(id, b) if state.backends.get(id) != Some(b) => {
                [Some(backend_bit(b)), None]
            }
            Op::PutNodeAddr(a, _) if !state.node_addrs.contains_key(a) => [Some(ip_bit(*a)), None],
            _ => [None; 2],
        }
    }

    /// Sets, before `ops` are written, the bits they will use that the map
    /// lacks: a backend's must be there before a slot holds it. Held until
    /// the plan's writes are observed (a plan that stops halfway leaves them
    /// held, not leaked).
    pub fn prepare(
        &mut self,
        ops: &[Op],
        state: &MapState,
        maps: &mut MapSet,
    ) -> Result<usize, MapError> {
        let now = Instant::now();
        for op in ops {
            for bit in Self::added(op, state).into_iter().flatten() {
                if self.desired(bit.word) & bit.mask == 0 {
                    self.held.insert(bit, now);
                    self.dirty.insert(bit.word);
                }
            }
        }
        self.flush(maps)
    }

    /// Notes a successful write of the sync, before `state` records it.
    pub fn observe(&mut self, op: &Op, state: &MapState) {
        for bit in Self::added(op, state).into_iter().flatten() {
            *self.uses.entry(bit).or_default() += 1;
            self.held.remove(&bit);
            self.dirty.insert(bit.word);
        }
        let gone = match op {
            Op::DelService(k) if state.services.contains_key(k) => frontend_bits(k),
            Op::DelNodeAddr(a) if state.node_addrs.contains_key(a) => [Some(ip_bit(*a)), None],
            Op::PutBackend(id, _) | Op::DelBackend(id) => match state.backends.get(id) {
                // A backend id given another backend: its old one goes.
                Some(old) if !matches!(op, Op::PutBackend(_, b) if b == old) => {
                    [Some(backend_bit(old)), None]
                }
                _ => return,
            },
            _ => return,
        };
        for gone in gone.into_iter().flatten() {
            if let Some(n) = self.uses.get_mut(&gone) {
                *n -= 1;
                if *n == 0 {
                    self.uses.remove(&gone);
                    self.held.insert(gone, Instant::now());
                }
            }
        }
    }

    /// Clears the held bits whose port (or address) `live`, a walk begun
    /// long enough after they lost their last user, found no flow on;
    /// returns how many were (written at the next flush). Holds what a flow
    /// it found needs and the filter lacks (none, unless the start's read
    /// failed).
    pub fn release(&mut self, live: &LivePorts) -> usize {
        let ports: HashSet<u16> = live.ports.iter().map(|(p, _)| *p).collect();
        let unused = |bit: PortBit| {
            if is_addr_bit(bit) {
                !live.addrs.contains(&bit)
            } else {
                !ports.contains(&port_of(bit))
            }
        };
        let gone: Vec<PortBit> = self
            .held
            .iter()
            .filter(|(bit, since)| live.started >= **since + HOLD_MARGIN && unused(**bit))
            .map(|(bit, _)| *bit)
            .collect();
        for bit in &gone {
            self.held.remove(bit);
            self.dirty.insert(bit.word);
        }
        let lacking: Vec<(u16, u64)> = live
            .ports
            .iter()
            .filter(|&&(p, kind)| self.lacks(p, kind))
            .copied()
            .collect();
        let lacking_addrs: Vec<PortBit> = live
            .addrs
            .iter()
            .filter(|bit| self.desired(bit.word) & bit.mask == 0)
            .copied()
            .collect();
        self.hold_live(&lacking, &lacking_addrs);
        gone.len()
    }

    /// Whether no bit of the kinds a flow of `kind` can be found by is set
    /// for `port` (an original direction's port: a frontend's or a
    /// NodePort's).
    fn lacks(&self, port: u16, kind: u64) -> bool {
        let kinds = if kind == PORT_F_BACKEND {
            PORT_F_BACKEND
        } else {
            PORT_F_FRONTEND | PORT_F_NODEPORT
        };
        let bit = port_bit(port, kinds);
        self.desired(bit.word) & bit.mask == 0
    }

    /// The word `i` should hold: the bits in use or held there.
    pub fn desired(&self, i: u32) -> u64 {
        let first = PortBit { word: i, mask: 0 };
        let last = PortBit {
            word: i,
            mask: u64::MAX,
        };
        let used = self
            .uses
            .range(first..=last)
            .fold(0, |w, (b, _)| w | b.mask);
        self.held
            .range(first..=last)
            .fold(used, |w, (b, _)| w | b.mask)
    }

    /// Words a read of the map found other than [`PortFilter::desired`],
    /// looked at again (a sync may have written them since the read) and
    /// rewritten where they still differ; returns how many were.
    pub fn repair(&mut self, maps: &mut MapSet, words: &[u32]) -> Result<usize, MapError> {
        let mut wrote = 0;
        for &i in words {
            let want = self.desired(i);
            if maps.port_word(i)? != want {
                maps.set_port_word(i, want)?;
                wrote += 1;
            }
            self.note_written(i, want);
        }
        Ok(wrote)
    }

    /// Word `i` holds `word` in the map.
    fn note_written(&mut self, i: u32, word: u64) {
        if word == 0 {
            self.written.remove(&i);
        } else {
            self.written.insert(i, word);
        }
    }

    /// Writes the words that changed; returns how many.
    pub fn flush(&mut self, maps: &mut MapSet) -> Result<usize, MapError> {
        let mut wrote = 0;
        while let Some(&i) = self.dirty.first() {
            let want = self.desired(i);
            if self.written.get(&i).copied().unwrap_or(0) != want {
                maps.set_port_word(i, want)?;
                wrote += 1;
                self.note_written(i, want);
            }
            self.dirty.remove(&i);
        }
        Ok(wrote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use proxy_common::{port_shift, port_word, ServiceValue};

    use crate::control::model::FrontendKey;

    /// A NodePort's address: any.
    const NODEPORT_ADDR: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

    fn key(addr: impl Into<Ipv4Addr>, port: u16) -> FrontendKey {
        FrontendKey {
            addr: addr.into().into(),
            port,
            proto: 6,
        }
    }

    fn backend(port: u16) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::new(198, 18, 1, 1).into(),
            port,
            proto: 6,
            local: false,
        }
    }

    fn apply(f: &mut PortFilter, st: &mut MapState, op: Op) {
        f.observe(&op, st);
        st.record(&op);
    }

    fn put(f: &mut PortFilter, st: &mut MapState, k: FrontendKey) {
        apply(f, st, Op::PutService(k, ServiceValue::default()));
    }

    fn del(f: &mut PortFilter, st: &mut MapState, k: FrontendKey) {
        apply(f, st, Op::DelService(k));
    }

    /// A walk of the conntrack tables that began `after` the bits went,
    /// finding flows on `ports`.
    fn walk(after: Duration, ports: &[u16]) -> LivePorts {
        LivePorts {
            started: Instant::now() + after,
            ports: ports.iter().map(|&p| (p, PORT_F_FRONTEND)).collect(),
            addrs: HashSet::new(),
        }
    }

    #[test]
    fn a_port_is_marked_while_any_frontend_uses_it_and_held_after() {
        let (mut f, mut st) = (PortFilter::default(), MapState::default());
        let (a, b, np) = (key(1u32, 80), key(2u32, 80), key(NODEPORT_ADDR, 30080));
        let http = PORT_F_FRONTEND << port_shift(80);
        let nodeport = PORT_F_NODEPORT << port_shift(30080);
        put(&mut f, &mut st, a);
        put(&mut f, &mut st, b);
        put(&mut f, &mut st, np);
        // Replacing a frontend's value is no new use.
        put(&mut f, &mut st, a);
        assert_eq!(f.desired(port_word(80)), http);
        assert_eq!(f.desired(port_word(30080)), nodeport);
        del(&mut f, &mut st, a);
        assert_eq!(f.desired(port_word(80)), http);
        del(&mut f, &mut st, b);
        // Deleting what is not there changes nothing.
        del(&mut f, &mut st, b);
        // No frontend uses port 80 now, but its flows may live on.
        assert_eq!(f.desired(port_word(80)), http);
        // A walk begun too soon after proves nothing...
        assert_eq!(f.release(&walk(Duration::ZERO, &[])), 0);
        // ...nor one that found a flow on the port (to neither address: the
        // addresses' bits go)...
        assert_eq!(f.release(&walk(2 * HOLD_MARGIN, &[80])), 2);
        assert_eq!(f.desired(port_word(80)), http);
        // ...one that found none clears it.
        assert_eq!(f.release(&walk(2 * HOLD_MARGIN, &[30080])), 1);
        assert_eq!(f.desired(port_word(80)), 0);
        assert_eq!(f.desired(port_word(30080)), nodeport);
    }

    #[test]
    fn a_frontend_back_before_the_release_keeps_its_bit() {
        let (mut f, mut st) = (PortFilter::default(), MapState::default());
        let a = key(1u32, 80);
        put(&mut f, &mut st, a);
        del(&mut f, &mut st, a);
        put(&mut f, &mut st, a);
        assert_eq!(f.release(&walk(2 * HOLD_MARGIN, &[])), 0);
        assert_eq!(f.desired(port_word(80)), PORT_F_FRONTEND << port_shift(80));
    }

    #[test]
    fn backends_mark_their_ports_while_any_slot_can_pick_them() {
        let (mut f, mut st) = (PortFilter::default(), MapState::default());
        let bit = PORT_F_BACKEND << port_shift(8080);
        apply(&mut f, &mut st, Op::PutBackend(1, backend(8080)));
        apply(&mut f, &mut st, Op::PutBackend(2, backend(8080)));
        // The same backend again is no new use.
        apply(&mut f, &mut st, Op::PutBackend(1, backend(8080)));
        apply(&mut f, &mut st, Op::DelBackend(1));
        assert_eq!(f.desired(port_word(8080)), bit);
        // An id given another backend leaves its old port.
        apply(&mut f, &mut st, Op::PutBackend(2, backend(9090)));
        assert_eq!(
            f.desired(port_word(9090)),
            PORT_F_BACKEND << port_shift(9090)
        );
        assert_eq!(f.release(&walk(2 * HOLD_MARGIN, &[])), 1);
        assert_eq!(f.desired(port_word(8080)), 0);
    }

    #[test]
    fn bits_the_map_has_beyond_the_state_are_held_and_live_flows_held_at_start() {
        let mut f = PortFilter::default();
        f.hold_live(&[(80, PORT_F_FRONTEND), (8080, PORT_F_BACKEND)], &[]);
        assert_eq!(f.desired(port_word(80)), PORT_F_FRONTEND << port_shift(80));
        assert_eq!(
            f.desired(port_word(8080)),
            PORT_F_BACKEND << port_shift(8080)
        );
        assert_eq!(f.release(&walk(2 * HOLD_MARGIN, &[8080])), 1);
        assert_eq!(f.desired(port_word(80)), 0);
        assert_eq!(port_of(port_bit(8080, PORT_F_BACKEND)), 8080);
        assert_eq!(port_of(port_bit(65535, PORT_F_NODEPORT)), 65535);
    }

    #[test]
    fn a_walk_holds_the_ports_of_flows_the_filter_lacks() {
        let (mut f, mut st) = (PortFilter::default(), MapState::default());
        // A NodePort's flow is found by its NodePort bit: nothing lacks.
        put(&mut f, &mut st, key(NODEPORT_ADDR, 30080));
        let live = LivePorts {
            started: Instant::now(),
            ports: [
                (80, PORT_F_FRONTEND),
                (8080, PORT_F_BACKEND),
                (30080, PORT_F_FRONTEND),
            ]
            .into(),
            addrs: HashSet::new(),
        };
        assert_eq!(f.release(&live), 0);
        assert_eq!(f.desired(port_word(80)), PORT_F_FRONTEND << port_shift(80));
        assert_eq!(
            f.desired(port_word(8080)),
            PORT_F_BACKEND << port_shift(8080)
        );
        assert_eq!(
            f.desired(port_word(30080)),
            PORT_F_NODEPORT << port_shift(30080)
        );
    }

    #[test]
    fn ports_sharing_a_word_keep_their_own_bits() {
        let (mut f, mut st) = (PortFilter::default(), MapState::default());
        put(&mut f, &mut st, key(1u32, 64));
        put(&mut f, &mut st, key(NODEPORT_ADDR, 65));
        put(&mut f, &mut st, key(1u32, 79));
        assert_eq!(port_word(64), port_word(79));
        assert_eq!(
            f.desired(port_word(64)),
            PORT_F_FRONTEND | PORT_F_NODEPORT << 4 | PORT_F_FRONTEND << 60
        );
        assert_eq!(f.desired(port_word(64) + 1), 0);
    }

    /// A walk that found flows to `addrs` (and on no port).
    fn walk_to(after: Duration, addrs: &[std::net::IpAddr]) -> LivePorts {
        LivePorts {
            started: Instant::now() + after,
            ports: HashSet::new(),
            addrs: addrs.iter().map(|&a| ip_bit(a)).collect(),
        }
    }

    #[test]
    fn a_frontends_address_is_marked_while_used_and_held_while_a_flow_to_it_lives() {
        let (mut f, mut st) = (PortFilter::default(), MapState::default());
        let vip = Ipv4Addr::new(198, 19, 0, 10);
        let bit = ip_bit(vip.into());
        assert!(bit.word >= ADDR_WORD0);
        let set = |f: &PortFilter| f.desired(bit.word) & bit.mask != 0;
        // Two ports of one address, and a NodePort (no address of its own).
        put(&mut f, &mut st, key(vip, 80));
        put(&mut f, &mut st, key(vip, 443));
        put(&mut f, &mut st, key(NODEPORT_ADDR, 30080));
        assert!(set(&f));
        assert_eq!(
            f.desired(ip_bit(NODEPORT_ADDR.into()).word) & ip_bit(NODEPORT_ADDR.into()).mask,
            0
        );
        del(&mut f, &mut st, key(vip, 80));
        assert_eq!(
            f.release(&walk_to(2 * HOLD_MARGIN, &[])),
            1,
            "port 80 alone goes"
        );
        assert!(set(&f), "port 443 still uses the address");
        del(&mut f, &mut st, key(vip, 443));
        // A flow to the address lives on: held.
        assert_eq!(f.release(&walk_to(2 * HOLD_MARGIN, &[vip.into()])), 1);
        assert!(set(&f));
        assert_eq!(f.release(&walk_to(2 * HOLD_MARGIN, &[])), 1);
        assert!(!set(&f));
        // A flow the filter lacks (a new map at start) is held.
        let v6: std::net::IpAddr = "2001:2:0:ff::10".parse().unwrap();
        f.hold_live(&[], &[ip_bit(v6)]);
        assert_ne!(f.desired(ip_bit(v6).word) & ip_bit(v6).mask, 0);
    }

    #[test]
    fn addresses_spread_over_the_address_filter() {
        use std::net::{IpAddr, Ipv6Addr};
        // Services' addresses as a cluster allocates them (consecutive, in
        // one prefix) against pods' (other prefixes, small host numbers):
        // the share of pods' addresses whose bit a service's set must be
        // about the filled share of the filter (1,000 / 2^20 bits: 0.1%),
        // not a structure of the addresses (a hash whose high bits ignore
        // an address's last byte would put every pod on a service's bit).
        let fp = |services: Vec<IpAddr>, pods: Vec<IpAddr>| {
            let set: HashSet<PortBit> = services.into_iter().map(ip_bit).collect();
            let hit = pods.iter().filter(|&&p| set.contains(&ip_bit(p))).count();
            hit as f64 / pods.len() as f64
        };
        let v4 = fp(
            (0..1000u32)
                .map(|i| Ipv4Addr::from(0xc613_0000 + i).into())
                .collect(),
            (0..65_536u32)
                .map(|i| Ipv4Addr::from(0xc612_0000 + i).into())
                .collect(),
        );
        let v6 = |net: u16, host: u16| -> IpAddr {
            Ipv6Addr::new(0x2001, 2, 0, net, 0, 0, 0, host).into()
        };
        let v6 = fp(
            (0..1000).map(|i| v6(0xff, i)).collect(),
            (0..100)
                .flat_map(|n| (1..300).map(move |h| v6(n, h)))
                .collect(),
        );
        assert!(v4 < 0.004, "IPv4: {v4}");
        assert!(v6 < 0.004, "IPv6: {v6}");
    }
}
