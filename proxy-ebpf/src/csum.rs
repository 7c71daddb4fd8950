//! Internet checksum arithmetic (RFC 1071, RFC 1624) done in the program:
//! a header the program rewrites in one block gets its checksum updated
//! here, with no helper call. Words are summed as they lie in memory; the
//! one's-complement sum is byte-order independent.

/// Accumulates one's-complement sums of 32-bit words in 64 bits: no carry
/// is lost before [`Sum::fold`].
#[derive(Clone, Copy)]
pub struct Sum(u64);

impl Sum {
    /// Starts from an existing checksum field (`~checksum`).
    #[inline(always)]
    pub fn of_checksum(check: u16) -> Self {
        Self(!check as u64)
    }

    /// Starts from zero.
    #[inline(always)]
    pub fn zero() -> Self {
        Self(0)
    }

    /// Replaces `old` by `new` in the summed data (RFC 1624: `~m + m'`).
    #[inline(always)]
    pub fn replace(self, old: u32, new: u32) -> Self {
        Self(self.0 + (!old) as u64 + new as u64)
    }

    /// Adds a difference [`Sum::diff`] gave.
    #[inline(always)]
    pub fn add(self, diff: u32) -> Self {
        Self(self.0 + diff as u64)
    }

    /// Folded to 32 bits with end-around carries: the `diff` argument of
    /// `bpf_l4_csum_replace` with size 0.
    #[inline(always)]
    pub fn diff(self) -> u32 {
        let s = (self.0 & 0xffff_ffff) + (self.0 >> 32);
        ((s & 0xffff_ffff) + (s >> 32)) as u32
    }

    /// The checksum field for the summed data (folded, complemented).
    #[inline(always)]
    pub fn checksum(self) -> u16 {
        fold(self.diff())
    }
}

/// Folds a 32-bit one's-complement sum to 16 bits and complements it.
#[inline(always)]
pub fn fold(sum: u32) -> u16 {
    let mut s = sum;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
