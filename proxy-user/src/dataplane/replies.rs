//! The reply filter's agent side (`KPX_REPLIES`, `proxy_common::reply_bit`):
//! filled at load, then rebuilt one copy at a time from the conntrack
//! tables, so that bits of flows gone leave and packets from a backend's
//! port that are no flow's reply skip the conntrack lookup.
//!
//! The map is memory-mapped: the agent clears a copy's words with atomic
//! stores while the datapath sets bits in them with atomic ORs, which an
//! element-wide map update (both copies at once) would overwrite.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{Map, MapData};
use proxy_common::{capacity::REPLY_WORDS, map_names, reply_bit, Address, CtKey, PortBit};

/// Words of the map: `REPLY_WORDS` elements of two.
const WORDS: usize = 2 * REPLY_WORDS as usize;
const BYTES: usize = WORDS * size_of::<u64>();

/// The reply filter, mapped into this process.
pub struct ReplyFilter {
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
    words: NonNull<AtomicU64>,
    /// The copy [`Self::clear_next`] clears next (0 or 1).
    next: AtomicUsize,
}

// SAFETY: the mapping is shared memory reached only through atomics, valid
// until `drop`; nothing in it is tied to a thread.
unsafe impl Send for ReplyFilter {}
// SAFETY: as above.
unsafe impl Sync for ReplyFilter {}

impl ReplyFilter {
    /// Maps the filter of `map` (the object's `KPX_REPLIES`).
    pub fn new(map: Map) -> Result<Self> {
        let name = map_names::REPLIES;
        let Map::Array(map) = map else {
            bail!("{name} is not an array map");
        };
        let info = map
            .info()
            .with_context(|| format!("reading {name}'s info"))?;
        if info.max_entries() != REPLY_WORDS || info.value_size() as usize != 2 * size_of::<u64>() {
            bail!(
                "{name} has {} elements of {} bytes, not {REPLY_WORDS} of 16",
                info.max_entries(),
                info.value_size()
            );
        }
        // SAFETY: a new shared mapping of the map's whole value area (an
        // array map created with BPF_F_MMAPABLE, its size checked above);
        // no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {name} (is it BPF_F_MMAPABLE?)"));
        }
        let words = NonNull::new(p.cast::<AtomicU64>())
            .with_context(|| format!("mapping {name}: a null mapping"))?;
        Ok(Self {
            _map: map,
            words,
            next: AtomicUsize::new(0),
        })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `WORDS` 8-byte words mapped in `new` (page-aligned),
        // alive until `drop`; AtomicU64 has u64's layout.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), WORDS) }
    }

    /// Sets every bit of both copies: every packet from a backend's port
    /// is looked up, as before the filter, until two rebuilds. For a map
    /// just loaded, whose bits no datapath may have kept (new, or pinned
    /// by a kpx that did not know it).
    pub fn fill(&self) {
        for w in self.words() {
            w.store(u64::MAX, Ordering::SeqCst);
        }
    }

    /// Clears the next copy to rebuild and returns it: its bits are then
    /// to be set from a read of the conntrack tables begun after this
    /// returns ([`Self::mark`]). The other copy keeps every live reply's
    /// bit meanwhile.
    pub fn clear_next(&self) -> usize {
        let copy = self.next.fetch_xor(1, Ordering::SeqCst) & 1;
        for w in self.words().iter().skip(copy).step_by(2) {
            w.store(0, Ordering::SeqCst);
        }
        copy
    }

    /// Sets `bits` in copy `copy`.
    pub fn mark(&self, copy: usize, bits: impl IntoIterator<Item = PortBit>) {
        let words = self.words();
        for b in bits {
            if let Some(w) = words.get(2 * b.word as usize + copy) {
                w.fetch_or(b.mask, Ordering::Relaxed);
            }
        }
    }

    /// Notes reply entry `k`, just written by this process (a flow carried
    /// from netfilter), in both copies: as the datapath notes the entries
    /// it inserts, after the insert.
    pub fn note<A: Address>(&self, k: &CtKey<A>) {
        let b = reply_bit(k);
        for copy in 0..2 {
            self.mark(copy, [b]);
        }
    }

    /// Rebuilds the next copy from a read of the tables by `read` (the
    /// reply filter's bits of every reply entry in them).
    pub fn rebuild(&self, read: impl FnOnce() -> Result<Vec<PortBit>>) -> Result<()> {
        let copy = self.clear_next();
        match read() {
            Ok(bits) => {
                self.mark(copy, bits);
                Ok(())
            }
            Err(e) => {
                self.refill(copy);
                Err(e)
            }
        }
    }

    /// Sets every bit of copy `copy` again: for a rebuild whose read
    /// failed (a copy left cleared would hide live replies once the other
    /// is rebuilt).
    pub fn refill(&self, copy: usize) {
        for w in self.words().iter().skip(copy).step_by(2) {
            w.store(u64::MAX, Ordering::SeqCst);
        }
    }

    /// Whether tuple `k` is in the filter (either copy), as the datapath
    /// asks.
    pub fn has<A: Address>(&self, k: &CtKey<A>) -> bool {
        let b = reply_bit(k);
        let i = 2 * b.word as usize;
        let w = self.words();
        (w[i].load(Ordering::Relaxed) | w[i + 1].load(Ordering::Relaxed)) & b.mask != 0
    }

    /// The share of bits set in either copy: the share of packets from a
    /// backend's port, no flow's reply, that are looked up all the same.
    pub fn fill_ratio(&self) -> f64 {
        let set: u32 = self
            .words()
            .chunks(2)
            .map(|c| (c[0].load(Ordering::Relaxed) | c[1].load(Ordering::Relaxed)).count_ones())
            .sum();
        f64::from(set) / (WORDS as f64 * 32.0)
    }
}

impl Drop for ReplyFilter {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of `BYTES`, not used after.
        unsafe { libc::munmap(self.words.as_ptr().cast(), BYTES) };
    }
}
