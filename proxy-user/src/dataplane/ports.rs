//! The frontend-port filter (`KPX_PORTS`): two bits per destination port
//! telling the datapath whether any frontend (a cluster, external or
//! LoadBalancer IP; or a NodePort) uses it, so that traffic to every other
//! port is known not to be for a service without a hash lookup.
//!
//! Kept from the sync's own writes: each frontend added or removed moves a
//! use count of its bit (`ServiceKey::port_bit`), and only words whose bits
//! changed are written, after the frontends themselves (a new frontend
//! becomes reachable once its bit is set; a port stays marked while any
//! frontend uses it). Rebuilt from the mirror, and compared with the map, at
//! start and at each full resync.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aya::maps::MapError;
use proxy_common::PortBit;

use crate::{
    dataplane::maps::{service_key, MapSet},
    dataplane::reconcile::{MapState, Op},
};

#[derive(Debug, Default)]
pub struct PortFilter {
    /// Frontends using each bit, ordered by word.
    uses: BTreeMap<PortBit, u32>,
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
            *f.uses.entry(service_key(key).port_bit()).or_default() += 1;
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
            .chain(f.uses.keys().map(|b| b.word))
            .collect();
        Ok(f)
    }

    /// Notes a successful write of the sync, before `state` records it.
    pub fn observe(&mut self, op: &Op, state: &MapState) {
        match op {
            Op::PutService(k, _) if !state.services.contains_key(k) => {
                let b = service_key(k).port_bit();
                *self.uses.entry(b).or_default() += 1;
                self.dirty.insert(b.word);
            }
            Op::DelService(k) if state.services.contains_key(k) => {
                let b = service_key(k).port_bit();
                if let Some(n) = self.uses.get_mut(&b) {
                    *n -= 1;
                    if *n == 0 {
                        self.uses.remove(&b);
                    }
                }
                self.dirty.insert(b.word);
            }
            _ => {}
        }
    }

    /// The word `i` should hold: the bits in use there.
    pub fn desired(&self, i: u32) -> u64 {
        let first = PortBit { word: i, mask: 0 };
        let last = PortBit {
            word: i,
            mask: u64::MAX,
        };
        self.uses
            .range(first..=last)
            .fold(0, |w, (b, _)| w | b.mask)
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

    use proxy_common::{port_shift, port_word, ServiceValue, PORT_F_FRONTEND, PORT_F_NODEPORT};

    use crate::control::model::FrontendKey;

    /// A NodePort's address: any.
    const NODEPORT_ADDR: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

    fn key(addr: impl Into<Ipv4Addr>, port: u16) -> FrontendKey {
        FrontendKey {
            addr: addr.into(),
            port,
            proto: 6,
        }
    }

    fn put(f: &mut PortFilter, st: &mut MapState, k: FrontendKey) {
        let op = Op::PutService(k, ServiceValue::default());
        f.observe(&op, st);
        st.record(&op);
    }

    fn del(f: &mut PortFilter, st: &mut MapState, k: FrontendKey) {
        let op = Op::DelService(k);
        f.observe(&op, st);
        st.record(&op);
    }

    #[test]
    fn a_port_is_marked_while_any_frontend_uses_it() {
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
        assert_eq!(f.desired(port_word(80)), 0);
        assert_eq!(f.desired(port_word(30080)), nodeport);
    }

    #[test]
    fn ports_sharing_a_word_keep_their_own_bits() {
        let (mut f, mut st) = (PortFilter::default(), MapState::default());
        put(&mut f, &mut st, key(1u32, 64));
        put(&mut f, &mut st, key(NODEPORT_ADDR, 65));
        put(&mut f, &mut st, key(1u32, 95));
        assert_eq!(port_word(64), port_word(95));
        assert_eq!(
            f.desired(port_word(64)),
            PORT_F_FRONTEND | PORT_F_NODEPORT << 2 | PORT_F_FRONTEND << 62
        );
        assert_eq!(f.desired(port_word(64) + 1), 0);
    }
}
