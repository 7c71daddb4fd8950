//! The reply filter's agent side (`KPX_REPLIES`, `proxy_common::reply_bit`):
//! filled at load, then rebuilt one copy at a time from the conntrack
//! tables, so that bits of flows gone leave and packets from a backend's
//! port that are no flow's reply skip the conntrack lookup. The same bits
//! are kept, by destination, in the destination filter (`KPX_DESTS`,
//! `proxy_common::dest_block`), whose blocks also hold the address
//! filter's words: the port filter (`dataplane::ports`) writes those here.
//!
//! Both maps are memory-mapped: the agent clears a copy's words with atomic
//! stores while the datapath sets bits in them with atomic ORs, which an
//! element-wide map update (both copies at once) would overwrite.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{Map, MapData};
use proxy_common::{
    capacity::{DEST_BLOCKS, REPLY_WORDS},
    map_names, reply_bit, reply_bits, Address, CtKey, PortBit, DEST_ADDRS, DEST_REPLIES,
};

/// Words of a block of `KPX_DESTS`.
const BLOCK: usize = 4;

/// An array map's values, mapped into this process as atomic words.
struct Mapped {
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
    words: NonNull<AtomicU64>,
    len: usize,
}

impl Mapped {
    /// Maps `map` (an array of `elements` values of `per` words, created
    /// with `BPF_F_MMAPABLE`) whole.
    fn new(map: Map, name: &str, elements: u32, per: usize) -> Result<Self> {
        let Map::Array(map) = map else {
            bail!("{name} is not an array map");
        };
        let info = map
            .info()
            .with_context(|| format!("reading {name}'s info"))?;
        let size = per * size_of::<u64>();
        if info.max_entries() != elements || info.value_size() as usize != size {
            bail!(
                "{name} has {} elements of {} bytes, not {elements} of {size}",
                info.max_entries(),
                info.value_size()
            );
        }
        let len = elements as usize * per;
        // SAFETY: a new shared mapping of the map's whole value area (an
        // array map created with BPF_F_MMAPABLE, its size checked above);
        // no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * size_of::<u64>(),
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
            len,
        })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `len` 8-byte words mapped in `new` (page-aligned), alive
        // until `drop`; AtomicU64 has u64's layout.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.len) }
    }

    /// Stores `v` in word `off` of every element of `per` words.
    fn store_each(&self, per: usize, off: usize, v: u64) {
        for w in self.words().iter().skip(off).step_by(per) {
            w.store(v, Ordering::SeqCst);
        }
    }

    /// Bits set in word `off` or `off + 1` (a filter's two copies) of
    /// every element of `per` words.
    fn either_copy_ones(&self, per: usize, off: usize) -> u32 {
        self.words()
            .chunks(per)
            .map(|e| {
                (e[off].load(Ordering::Relaxed) | e[off + 1].load(Ordering::Relaxed)).count_ones()
            })
            .sum()
    }

    /// ORs `mask` into word `i`, if there is one.
    fn or(&self, i: usize, mask: u64) {
        if let Some(w) = self.words().get(i) {
            w.fetch_or(mask, Ordering::Relaxed);
        }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of `len` words, not used after.
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.len * size_of::<u64>()) };
    }
}

// SAFETY: the mapping is shared memory reached only through atomics, valid
// until `drop`; nothing in it is tied to a thread.
unsafe impl Send for Mapped {}
// SAFETY: as above.
unsafe impl Sync for Mapped {}

/// The reply filter and the destination filter, mapped into this process.
pub struct ReplyFilter {
    replies: Mapped,
    dests: Mapped,
    /// The copy [`Self::clear_next`] clears next (0 or 1).
    next: AtomicUsize,
}

impl ReplyFilter {
    /// Maps the filters of `replies` and `dests` (the object's
    /// `KPX_REPLIES` and `KPX_DESTS`).
    pub fn new(replies: Map, dests: Map) -> Result<Self> {
        Ok(Self {
            replies: Mapped::new(replies, map_names::REPLIES, REPLY_WORDS, 2)?,
            dests: Mapped::new(dests, map_names::DESTS, DEST_BLOCKS, BLOCK)?,
            next: AtomicUsize::new(0),
        })
    }

    /// Stores `v` in every word of copy `copy` of both filters' reply bits.
    fn store_copy(&self, copy: usize, v: u64) {
        self.replies.store_each(2, copy, v);
        self.dests.store_each(BLOCK, DEST_REPLIES + copy, v);
    }

    /// Sets every bit of both copies: every packet from a backend's port
    /// is looked up, and no packet is passed on its destination alone, as
    /// before the filters, until two rebuilds. For maps just loaded, whose
    /// bits no datapath may have kept (new, or pinned by a kpx that did
    /// not know them). The address filter's words are the port filter's.
    pub fn fill(&self) {
        for copy in 0..2 {
            self.store_copy(copy, u64::MAX);
        }
    }

    /// Clears the next copy to rebuild and returns it: its bits are then
    /// to be set from a read of the conntrack tables begun after this
    /// returns ([`Self::mark`]). The other copy keeps every live reply's
    /// bit meanwhile.
    pub fn clear_next(&self) -> usize {
        let copy = self.next.fetch_xor(1, Ordering::SeqCst) & 1;
        self.store_copy(copy, 0);
        copy
    }

    /// Sets `bits` (of reply entries, [`proxy_common::reply_bits`]) in copy
    /// `copy` of both filters.
    pub fn mark(&self, copy: usize, bits: impl IntoIterator<Item = [PortBit; 2]>) {
        for [reply, dest] in bits {
            self.replies.or(2 * reply.word as usize + copy, reply.mask);
            self.dests
                .or(BLOCK * dest.word as usize + DEST_REPLIES + copy, dest.mask);
        }
    }

    /// Notes reply entry `k`, just written by this process (a flow carried
    /// from netfilter), in both copies: as the datapath notes the entries
    /// it inserts, after the insert.
    pub fn note<A: Address>(&self, k: &CtKey<A>) {
        let bits = reply_bits(k);
        for copy in 0..2 {
            self.mark(copy, [bits]);
        }
    }

    /// Rebuilds the next copy from a read of the tables by `read` (the
    /// filters' bits of every reply entry in them).
    pub fn rebuild(&self, read: impl FnOnce() -> Result<Vec<[PortBit; 2]>>) -> Result<()> {
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
        self.store_copy(copy, u64::MAX);
    }

    /// Whether tuple `k` is in the reply filter (either copy), as the
    /// datapath asks.
    pub fn has<A: Address>(&self, k: &CtKey<A>) -> bool {
        let b = reply_bit(k);
        let i = 2 * b.word as usize;
        let w = self.replies.words();
        (w[i].load(Ordering::Relaxed) | w[i + 1].load(Ordering::Relaxed)) & b.mask != 0
    }

    /// The share of bits set in either copy of the reply filter: the share
    /// of packets from a backend's port, no flow's reply, that are looked
    /// up all the same.
    pub fn fill_ratio(&self) -> f64 {
        f64::from(self.replies.either_copy_ones(2, 0)) / (f64::from(REPLY_WORDS) * 64.0)
    }

    /// The share of the destination filter's reply bits set (either copy,
    /// every block): of packets to no frontend's address, the share read
    /// further than their destination's block (the port filter's word, and
    /// the reply filter's from a backend's port). The same bits as the
    /// reply filter's, spread by destination: one busy destination fills
    /// its own block, not this ratio.
    pub fn dest_fill_ratio(&self) -> f64 {
        f64::from(self.dests.either_copy_ones(BLOCK, DEST_REPLIES))
            / (f64::from(DEST_BLOCKS) * 64.0)
    }

    /// Word `i` of the address filter (block `i`'s [`DEST_ADDRS`]).
    pub fn addr_word(&self, i: u32) -> Option<u64> {
        let w = self.dests.words().get(BLOCK * i as usize + DEST_ADDRS)?;
        Some(w.load(Ordering::SeqCst))
    }

    /// Stores word `i` of the address filter; false beyond the filter.
    pub fn set_addr_word(&self, i: u32, word: u64) -> bool {
        match self.dests.words().get(BLOCK * i as usize + DEST_ADDRS) {
            Some(w) => {
                w.store(word, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Words of the address filter.
    pub fn addr_words(&self) -> u32 {
        DEST_BLOCKS
    }
}
