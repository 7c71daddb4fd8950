//! The frontend-port filter (`KPX_PORTS`): two bits per destination port
//! telling the datapath whether any frontend (a cluster, external or
//! LoadBalancer IP; or a NodePort) uses it, so that traffic to every other
//! port is known not to be for a service without a hash lookup.
//!
//! Kept from the sync's own writes: each frontend added or removed moves a
//! use count, and only words whose bits changed are written, after the
//! frontends themselves (a new frontend becomes reachable once its bit is
//! set; a port stays marked while any frontend uses it). Rebuilt from the
//! mirror, and compared with the map, at start and at each full resync.

use std::collections::{BTreeSet, HashMap};

use aya::maps::MapError;
use proxy_common::{
    port_shift, port_word, ServiceKey, NODEPORT_ADDR, PORT_F_FRONTEND, PORT_F_NODEPORT,
};

use crate::{
    datapath::MapSet,
    sync::{MapState, Op},
};

/// The filter bit a frontend sets: (host-order port, `PORT_F_*`).
fn bit(key: &ServiceKey) -> (u16, u64) {
    let kind = if key.addr == NODEPORT_ADDR {
        PORT_F_NODEPORT
    } else {
        PORT_F_FRONTEND
    };
    (u16::from_be(key.port), kind)
}

#[derive(Debug, Default)]
pub struct PortFilter {
    /// Frontends using each (port, kind).
    uses: HashMap<(u16, u64), u32>,
    /// Words as the map holds them (absent: zero).
    written: HashMap<u32, u64>,
    /// Words to compare and write at the next flush.
    dirty: BTreeSet<u32>,
}

impl PortFilter {
    /// The filter for the frontends in `state`, every word to be checked
    /// against the map (whose contents are unknown) at the next flush.
    pub fn rebuild(state: &MapState, maps: &MapSet) -> Result<Self, MapError> {
        let mut f = Self::default();
        for key in state.services.keys() {
            *f.uses.entry(bit(key)).or_default() += 1;
        }
        for (i, word) in maps.port_words()?.into_iter().enumerate() {
            if word != 0 {
                f.written.insert(i as u32, word);
            }
        }
        f.dirty = f
            .written
            .keys()
            .copied()
            .chain(f.uses.keys().map(|(port, _)| port_word(*port)))
            .collect();
        Ok(f)
    }

    /// Notes a successful write of the sync, before `state` records it.
    pub fn observe(&mut self, op: &Op, state: &MapState) {
        match op {
            Op::PutService(k, _) if !state.services.contains_key(k) => {
                *self.uses.entry(bit(k)).or_default() += 1;
                self.dirty.insert(port_word(bit(k).0));
            }
            Op::DelService(k) if state.services.contains_key(k) => {
                let b = bit(k);
                if let Some(n) = self.uses.get_mut(&b) {
                    *n -= 1;
                    if *n == 0 {
                        self.uses.remove(&b);
                    }
                }
                self.dirty.insert(port_word(b.0));
            }
            _ => {}
        }
    }

    /// The word `i` should hold.
    fn desired(&self, i: u32) -> u64 {
        (0..32u32)
            .map(|j| (i * 32 + j) as u16)
            .flat_map(|port| {
                [PORT_F_FRONTEND, PORT_F_NODEPORT].map(|kind| {
                    if self.uses.contains_key(&(port, kind)) {
                        kind << port_shift(port)
                    } else {
                        0
                    }
                })
            })
            .fold(0, |w, b| w | b)
    }

    /// Writes the words that changed; returns how many.
    pub fn flush(&mut self, maps: &mut MapSet) -> Result<usize, MapError> {
        let mut wrote = 0;
        while let Some(&i) = self.dirty.first() {
            let want = self.desired(i);
            if self.written.get(&i).copied().unwrap_or(0) != want {
                maps.set_port_word(i, want)?;
                wrote += 1;
                if want == 0 {
                    self.written.remove(&i);
                } else {
                    self.written.insert(i, want);
                }
            }
            self.dirty.remove(&i);
        }
        Ok(wrote)
    }

    /// Ports in use, for tests and `kpx dump`: (port, `PORT_F_*` bits).
    pub fn ports(&self) -> Vec<(u16, u64)> {
        let mut out: HashMap<u16, u64> = HashMap::new();
        for (port, kind) in self.uses.keys() {
            *out.entry(*port).or_default() |= kind;
        }
        let mut v: Vec<_> = out.into_iter().collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::ServiceValue;

    fn key(addr: u32, port: u16) -> ServiceKey {
        ServiceKey {
            addr,
            port: port.to_be(),
            proto: 6,
            _pad: 0,
        }
    }

    fn put(f: &mut PortFilter, st: &mut MapState, k: ServiceKey) {
        let op = Op::PutService(k, ServiceValue::default());
        f.observe(&op, st);
        st.record(&op);
    }

    fn del(f: &mut PortFilter, st: &mut MapState, k: ServiceKey) {
        let op = Op::DelService(k);
        f.observe(&op, st);
        st.record(&op);
    }

    #[test]
    fn a_port_is_marked_while_any_frontend_uses_it() {
        let (mut f, mut st) = (PortFilter::default(), MapState::default());
        let (a, b, np) = (key(1, 80), key(2, 80), key(NODEPORT_ADDR, 30080));
        put(&mut f, &mut st, a);
        put(&mut f, &mut st, b);
        put(&mut f, &mut st, np);
        // Replacing a frontend's value is no new use.
        put(&mut f, &mut st, a);
        assert_eq!(
            f.ports(),
            vec![(80, PORT_F_FRONTEND), (30080, PORT_F_NODEPORT)]
        );
        assert_eq!(f.desired(port_word(80)), PORT_F_FRONTEND << port_shift(80));
        del(&mut f, &mut st, a);
        assert_eq!(
            f.ports(),
            vec![(80, PORT_F_FRONTEND), (30080, PORT_F_NODEPORT)]
        );
        del(&mut f, &mut st, b);
        // Deleting what is not there changes nothing.
        del(&mut f, &mut st, b);
        assert_eq!(f.ports(), vec![(30080, PORT_F_NODEPORT)]);
        assert_eq!(f.desired(port_word(80)), 0);
        assert_eq!(
            f.desired(port_word(30080)),
            PORT_F_NODEPORT << port_shift(30080)
        );
    }

    #[test]
    fn ports_sharing_a_word_keep_their_own_bits() {
        let (mut f, mut st) = (PortFilter::default(), MapState::default());
        put(&mut f, &mut st, key(1, 64));
        put(&mut f, &mut st, key(NODEPORT_ADDR, 65));
        put(&mut f, &mut st, key(1, 95));
        assert_eq!(port_word(64), port_word(95));
        assert_eq!(
            f.desired(port_word(64)),
            PORT_F_FRONTEND | PORT_F_NODEPORT << 2 | PORT_F_FRONTEND << 62
        );
    }
}
