//! The periodic resync: the maps re-read on a blocking thread and told
//! apart from the mirror by their fingerprints, drift repaired with a full
//! diff. The event loop only compares and, rarely, repairs: at 50,000
//! services it must not walk a million entries, nor wait for the
//! allocator while another thread frees them.

use anyhow::Result;
use tokio::sync::mpsc;

use super::{housekeeping, Agent};
use crate::dataplane::{
    maps::MapSet,
    ports::PortFilter,
    reconcile::{Digest, MapState, Mirror, Op},
};

/// What a resync reads.
#[derive(Clone, Copy, Debug)]
pub(super) enum Read {
    /// Each entry's hashes (every resync): enough to tell that nothing
    /// drifted, with no allocation per entry.
    Digest,
    /// Every entry whole: after a digest that differs, to find and repair
    /// what does.
    Whole,
}

/// What the blocking thread brings back.
pub(super) enum Readout {
    Digest(Digest),
    /// The state and its fingerprint (computed there, off the event loop).
    Whole(Box<MapState>, u64),
}

pub(super) type Done = mpsc::Sender<Result<Readout>>;

impl Agent {
    /// Reads the maps on a blocking thread (at 50,000 services a read of
    /// every entry takes a third of a second): the event loop goes on
    /// meanwhile, logging its writes so the read can be brought up to date.
    pub(super) fn start_resync(&mut self, done: &Done, what: Read) {
        if self.written_since_read.is_some() {
            return; // the last one is still reading
        }
        self.written_since_read = Some(Vec::new());
        let (dir, done) = (self.cfg.bpffs.clone(), done.clone());
        tokio::task::spawn_blocking(move || {
            let read = MapSet::open_pinned(&dir).and_then(|maps| match what {
                Read::Digest => maps.read_digest().map(Readout::Digest),
                Read::Whole => maps.read_state().map(|state| {
                    let fingerprint = state.fingerprint();
                    Readout::Whole(Box::new(state), fingerprint)
                }),
            });
            // The agent is stopping if nobody receives it.
            let _ = done.blocking_send(read);
        });
    }

    /// Brings the read up to date with the writes made since it began and
    /// compares it with the mirror: by fingerprint, so a resync of maps the
    /// agent alone wrote costs no planning and no walk of the state.
    pub(super) fn resynced(&mut self, read: Result<Readout>, done: &Done) {
        let written = self.written_since_read.take().unwrap_or_default();
        let read = match read {
            Ok(read) => read,
            Err(e) => {
                log::warn!("re-reading the maps: {e:#}; will retry at the next resync");
                return;
            }
        };
        match read {
            Readout::Digest(mut digest) => {
                for op in &written {
                    digest.record(op);
                }
                if digest.matches(self.mirror.fingerprint) {
                    log::debug!("resync: the maps hold what the agent wrote");
                    self.recheck_ports(&digest.port_words);
                    // A few large blocks, each its own mapping: freeing them
                    // takes no lock the event loop's allocations need, but
                    // unmapping tens of megabytes is not its work either.
                    tokio::task::spawn_blocking(move || drop(digest));
                    return;
                }
                log::info!(
                    "resync: the maps' fingerprint differs from what the agent wrote; reading every entry to find where"
                );
                self.start_resync(done, Read::Whole);
            }
            Readout::Whole(state, fingerprint) => self.repair(*state, fingerprint, &written),
        }
    }

    /// After a digest that differed: the maps as read whole, against the
    /// mirror, and a full diff from them where they differ.
    fn repair(&mut self, mut state: MapState, mut fingerprint: u64, written: &[Op]) {
        for op in written {
            state.record_fingerprinted(op, &mut fingerprint);
        }
        let differ = if fingerprint == self.mirror.fingerprint {
            0
        } else {
            state.differences(&self.mirror.state)
        };
        if differ == 0 {
            if fingerprint == self.mirror.fingerprint {
                // Gone by this read.
                log::info!("resync: no entry differs from what the agent wrote on a second read");
            } else {
                // Cannot happen while every write goes through the mirror.
                log::warn!(
                    "resync: the mirror's fingerprint had drifted from its entries; recomputed"
                );
                self.mirror.fingerprint = fingerprint;
            }
            match self.dp.maps.port_words() {
                Ok(words) => self.recheck_ports(&words),
                Err(e) => {
                    log::warn!("re-reading the port filter: {e}; will retry at the next resync")
                }
            }
            // Freeing a million small entries is not the event loop's work.
            tokio::task::spawn_blocking(move || {
                drop(state);
                housekeeping::release_freed_memory();
            });
            return;
        }
        log::warn!(
            "resync: {differ} map entries differ from what the agent wrote (changed behind its back?); repairing with a full diff"
        );
        self.metrics.drift_repairs.inc();
        self.mirror = Mirror::new(state);
        match PortFilter::rebuild(&self.mirror.state, &self.dp.maps) {
            Ok(ports) => self.ports = ports,
            Err(e) => log::warn!("re-reading the port filter: {e:#}"),
        }
        self.runner.resync();
    }

    /// The port filter is no part of the fingerprint: the words as `read`
    /// are compared with what the frontends need, and any that differ
    /// looked at again and rewritten.
    fn recheck_ports(&mut self, read: &[u64]) {
        let differ: Vec<u32> = (0u32..)
            .zip(read)
            .filter(|(i, w)| **w != self.ports.desired(*i))
            .map(|(i, _)| i)
            .collect();
        if differ.is_empty() {
            return;
        }
        match self.ports.repair(&mut self.dp.maps, &differ) {
            Ok(0) => {}
            Ok(n) => {
                log::warn!(
                    "resync: {n} port filter words differed from what the frontends need; rewritten"
                );
                self.metrics.drift_repairs.inc();
                self.metrics.map_writes.inc_by(n as u64);
            }
            Err(e) => {
                log::warn!("re-checking the port filter: {e}; will retry at the next resync")
            }
        }
    }
}
