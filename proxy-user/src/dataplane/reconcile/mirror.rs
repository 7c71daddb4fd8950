//! The maps' state with the indexes that keep a reconcile proportional to
//! the change: backend ids by value, references per backend, service ids.

use foldhash::{HashMap, HashSet};

use super::{BackendAddr, MapState, Op};

/// The maps' state plus the indexes that let [`reconcile`] work in time
/// proportional to the change, not to the number of services.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    pub state: MapState,
    /// Backend → its id.
    pub(super) backend_of: HashMap<BackendAddr, u32>,
    /// Backend id → slots holding it.
    pub(super) refs: HashMap<u32, u32>,
    pub(super) svc_ids: HashSet<u32>,
    /// Above every backend id ever used here: new ids start there.
    pub(super) backend_next: u32,
    /// `state`'s fingerprint, kept up to date write by write.
    pub fingerprint: u64,
}

impl Mirror {
    pub fn new(state: MapState) -> Self {
        let mut m = Self {
            backend_of: state.backends.iter().map(|(id, b)| (*b, *id)).collect(),
            svc_ids: state.services.values().map(|v| v.svc_id).collect(),
            backend_next: state
                .backends
                .keys()
                .max()
                .map_or(0, |m| m.saturating_add(1)),
            ..Self::default()
        };
        for id in state.slots.values() {
            *m.refs.entry(*id).or_default() += 1;
        }
        m.fingerprint = state.fingerprint();
        m.state = state;
        m
    }

    /// Records a successful write.
    pub fn record(&mut self, op: &Op) {
        match op {
            Op::PutBackend(id, b) => {
                if let Some(old) = self.state.backends.get(id) {
                    self.backend_of.remove(old);
                }
                self.backend_of.insert(*b, *id);
                self.backend_next = self.backend_next.max(id.saturating_add(1));
            }
            Op::DelBackend(id) => {
                if let Some(b) = self.state.backends.get(id) {
                    if self.backend_of.get(b) == Some(id) {
                        self.backend_of.remove(b);
                    }
                }
            }
            Op::PutSlot(k, id, _) => {
                if let Some(old) = self.state.slots.get(k) {
                    self.unref(*old);
                }
                *self.refs.entry(*id).or_default() += 1;
            }
            Op::DelSlot(k) => {
                if let Some(old) = self.state.slots.get(k) {
                    self.unref(*old);
                }
            }
            Op::PutService(k, v) => {
                if let Some(old) = self.state.services.get(k) {
                    self.svc_ids.remove(&old.svc_id);
                }
                self.svc_ids.insert(v.svc_id);
            }
            Op::DelService(k) => {
                if let Some(old) = self.state.services.get(k) {
                    self.svc_ids.remove(&old.svc_id);
                }
            }
            _ => {}
        }
        self.state.record_fingerprinted(op, &mut self.fingerprint);
    }

    pub(super) fn unref(&mut self, id: u32) {
        if let Some(n) = self.refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(&id);
            }
        }
    }
}
