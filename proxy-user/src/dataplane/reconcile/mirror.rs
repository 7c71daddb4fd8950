//! The maps' state with the indexes that keep a reconcile proportional to
//! the change: service ids in use, the next backend id (the backends' own
//! reverse index and reference counts live in [`MapState::backends`]).

use foldhash::HashSet;

use super::{MapState, Op};

/// The maps' state plus the indexes that let [`reconcile`] work in time
/// proportional to the change, not to the number of services.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    pub state: MapState,
    pub(super) svc_ids: HashSet<u32>,
    /// Above every backend id ever used here: new ids start there.
    pub(super) backend_next: u32,
    /// `state`'s fingerprint, kept up to date write by write.
    pub fingerprint: u64,
}

impl Mirror {
    pub fn new(mut state: MapState) -> Self {
        state.count_refs();
        Self {
            svc_ids: state.services.values().map(|v| v.svc_id).collect(),
            backend_next: state
                .backends
                .keys()
                .max()
                .map_or(0, |m| m.saturating_add(1)),
            fingerprint: state.fingerprint(),
            state,
        }
    }

    /// Records a successful write.
    pub fn record(&mut self, op: &Op) {
        match op {
            Op::PutBackend(id, _) => {
                self.backend_next = self.backend_next.max(id.saturating_add(1));
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
}
