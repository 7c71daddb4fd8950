//! What a resync needs of the maps to tell whether they still hold what
//! the agent wrote: each entry as two hashes (its key's, and its own share
//! of [`MapState::fingerprint`]) in one flat vector, not a [`MapState`].
//!
//! A resync reads every entry while the event loop goes on writing. Read
//! into a `MapState`, the hundreds of thousands of small allocations a
//! state holds at 50,000 services, freed and trimmed afterwards, kept the
//! allocator's lock busy for tens of milliseconds: the event loop's own
//! allocations waited, and one endpoint change in 40 took over 12 ms to
//! reach the maps. A digest is one large allocation (its own mapping,
//! returned whole), and only when it disagrees with the mirror is the
//! state read whole to find and repair what differs.

use foldhash::HashMap;

use super::{MapState, Op};

/// The maps' entries as `(key hash, entry hash)`, sorted by key hash, with
/// the writes made since the read recorded on top.
#[derive(Debug, Default)]
pub struct Digest {
    entries: Vec<(u64, u64)>,
    /// Entries written since the read: key hash → entry hash (0: deleted).
    written: HashMap<u64, u64>,
    fingerprint: u64,
    /// The read found two slots naming one backend id with different
    /// backends (no write of the agent's makes them): it matches no
    /// mirror, and the whole read that follows tells such slots apart.
    inconsistent: bool,
    /// The frontend-port filter's words, read with the entries.
    pub port_words: Vec<u64>,
}

impl Digest {
    /// From the entries of a read, in any order.
    pub fn new(mut entries: Vec<(u64, u64)>, inconsistent: bool, port_words: Vec<u64>) -> Self {
        entries.sort_unstable_by_key(|e| e.0);
        let fingerprint = entries.iter().fold(0u64, |fp, e| fp.wrapping_add(e.1));
        Self {
            entries,
            written: HashMap::default(),
            fingerprint,
            inconsistent,
            port_words,
        }
    }

    /// Records a write made after the read started (whether or not the
    /// read saw it: the entry ends as written either way).
    pub fn record(&mut self, op: &Op) {
        let Some((key, after)) = op.fingerprint_entry() else {
            return;
        };
        let before = match self.written.get(&key) {
            Some(h) => *h,
            None => self
                .entries
                .binary_search_by_key(&key, |e| e.0)
                .map_or(0, |i| self.entries[i].1),
        };
        self.fingerprint = self.fingerprint.wrapping_sub(before).wrapping_add(after);
        self.written.insert(key, after);
    }

    /// Whether the maps hold what `state` (with `fingerprint`) says.
    pub fn matches(&self, fingerprint: u64) -> bool {
        !self.inconsistent && self.fingerprint == fingerprint
    }
}

impl MapState {
    /// This state as a read of the maps holding it would digest it.
    pub fn digest(&self) -> Digest {
        Digest::new(self.fingerprint_entries().collect(), false, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::cidr::Cidr;
    use crate::control::model::FrontendKey;
    use crate::dataplane::reconcile::BackendAddr;
    use proptest::prelude::*;
    use proxy_common::{DatapathConfig, ServiceValue, SlotKey};
    use std::net::Ipv4Addr;

    fn cidr(len: u8) -> Cidr {
        Cidr::new(Ipv4Addr::new(198, 18, 0, 0).into(), len).expect("len <= 32")
    }

    fn op() -> impl Strategy<Value = Op> {
        let key = (0u8..4, 0u16..3).prop_map(|(a, port)| FrontendKey {
            addr: Ipv4Addr::new(198, 18, 0, a).into(),
            port,
            proto: 6,
        });
        let slot = (0u32..3, 0u32..4).prop_map(|(svc_id, slot)| SlotKey { svc_id, slot });
        let backend = (0u8..4).prop_map(|a| BackendAddr {
            addr: Ipv4Addr::new(198, 19, 0, a).into(),
            port: 80,
            proto: 6,
            local: a == 0,
        });
        prop_oneof![
            (key.clone(), 0u32..3, 0u32..4).prop_map(|(k, svc_id, count)| Op::PutService(
                k,
                ServiceValue {
                    svc_id,
                    count,
                    ..Default::default()
                }
            )),
            key.prop_map(Op::DelService),
            (0u32..4, backend.clone()).prop_map(|(id, b)| Op::PutBackend(id, b)),
            (slot.clone(), 0u32..4, backend).prop_map(|(k, id, b)| Op::PutSlot(k, id, b)),
            slot.prop_map(Op::DelSlot),
            (0u32..4).prop_map(Op::DelBackend),
            (0u32..3).prop_map(|id| Op::PutName(id, format!("p{id}").into())),
            (0u32..3).prop_map(Op::DelName),
            (0u32..3).prop_map(Op::ResetStats),
            (0u32..3, 8u8..10).prop_map(|(id, len)| Op::PutRange(id, cidr(len))),
            (0u32..3, 8u8..10).prop_map(|(id, len)| Op::DelRange(id, cidr(len))),
            (0u8..3, 0u32..3)
                .prop_map(|(a, n)| Op::PutAddr(Ipv4Addr::new(198, 18, 0, a).into(), n)),
            (0u8..3).prop_map(|a| Op::DelAddr(Ipv4Addr::new(198, 18, 0, a).into())),
            (0u8..3, 0u32..3)
                .prop_map(|(a, f)| Op::PutNodeAddr(Ipv4Addr::new(198, 18, 1, a).into(), f)),
            (0u8..3).prop_map(|a| Op::DelNodeAddr(Ipv4Addr::new(198, 18, 1, a).into())),
            (0u32..3).prop_map(|n| Op::SetConfig(crate::dataplane::reconcile::NodeConfig {
                v4: DatapathConfig {
                    snat_addr: n,
                    ..Default::default()
                },
                v6: Default::default(),
            })),
        ]
    }

    proptest! {
        /// A digest with writes recorded on top tells the same as the
        /// state with those writes recorded: the resync's cheap path and
        /// the mirror agree on every sequence of writes.
        #[test]
        fn writes_on_a_digest_keep_it_equal_to_the_state_they_make(
            before in proptest::collection::vec(op(), 0..30),
            after in proptest::collection::vec(op(), 0..30),
        ) {
            let mut state = MapState::default();
            let mut fingerprint = state.fingerprint();
            for op in &before {
                state.record_fingerprinted(op, &mut fingerprint);
            }
            let mut digest = state.digest();
            prop_assert!(digest.matches(fingerprint));
            for op in &after {
                digest.record(op);
                state.record_fingerprinted(op, &mut fingerprint);
            }
            prop_assert!(digest.matches(fingerprint));
            prop_assert!(digest.matches(state.fingerprint()));
        }
    }

    #[test]
    fn a_changed_entry_is_told_apart() {
        let k = FrontendKey {
            addr: Ipv4Addr::new(198, 18, 0, 1).into(),
            port: 80,
            proto: 6,
        };
        let mut state = MapState::default();
        state.record(&Op::PutService(k, ServiceValue::default()));
        let digest = state.digest();
        state.record(&Op::PutService(
            k,
            ServiceValue {
                count: 1,
                ..Default::default()
            },
        ));
        assert!(!digest.matches(state.fingerprint()));
    }
}
