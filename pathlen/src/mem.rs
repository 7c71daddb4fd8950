//! The interpreter's memory: regions addressed as `(index + 1) << 32 | offset`,
//! so a pointer keeps its region through any arithmetic the program does and
//! every access is bounds-checked against the region it points into.
//!
//! Region 0 is the context (`__sk_buff`, or `xdp_md` for an XDP run; its
//! fields computed from the packet), 1 the packet (an XDP frame behind
//! [`XDP_HEADROOM`] bytes, room for its metadata), 2.. one 512-byte stack
//! per call frame, and from [`FIRST_VALUE`] on, map values, which live as
//! long as the VM.

use anyhow::{bail, Result};

use crate::Skb;

const CTX: usize = 0;
const PACKET: usize = 1;
const FIRST_STACK: usize = 2;
/// Bytes in front of an XDP frame: more than metadata may take (32).
const XDP_HEADROOM: usize = 64;
/// The most metadata a frame may carry (`xdp_metalen_invalid`).
const XDP_META_MAX: usize = 32;
/// bpf-to-bpf call depth the kernel allows (8 frames).
pub const MAX_FRAMES: usize = 8;
pub const STACK_SIZE: usize = 512;
const FIRST_VALUE: usize = FIRST_STACK + MAX_FRAMES;

/// `struct xdp_md` field offsets.
mod xdp {
    pub const DATA: usize = 0;
    pub const DATA_END: usize = 4;
    pub const DATA_META: usize = 8;
    pub const INGRESS_IFINDEX: usize = 12;
    pub const SIZE: usize = 24;
}

/// `struct __sk_buff` field offsets the programs use.
mod skb {
    pub const LEN: usize = 0;
    pub const MARK: usize = 8;
    pub const PROTOCOL: usize = 16;
    pub const INGRESS_IFINDEX: usize = 36;
    pub const IFINDEX: usize = 40;
    pub const DATA: usize = 76;
    pub const DATA_END: usize = 80;
    pub const DATA_META: usize = 140;
    pub const SIZE: usize = 192;
    /// Fields a tc program may write: mark, queue_mapping, priority,
    /// tc_index, cb[5], tc_classid.
    pub fn writable(off: usize) -> bool {
        matches!(off, 8..=15 | 32..=35 | 44..=75)
    }
}

pub fn addr(region: usize, off: usize) -> u64 {
    ((region as u64 + 1) << 32) | off as u64
}

fn split(addr: u64) -> Result<(usize, usize)> {
    let region = (addr >> 32) as usize;
    if region == 0 {
        bail!("access through a non-pointer value {addr:#x}");
    }
    Ok((region - 1, (addr & 0xffff_ffff) as usize))
}

#[derive(Default)]
pub struct Memory {
    regions: Vec<Vec<u8>>,
    ifindex: u32,
    ingress_ifindex: u32,
    linear: Option<usize>,
    /// An XDP run: the context is an `xdp_md`, the frame at
    /// [`XDP_HEADROOM`] with `meta` bytes of metadata before it.
    xdp: bool,
    meta: usize,
}

impl Memory {
    pub fn start_run(&mut self, packet: &[u8], skb: Skb) {
        if self.regions.len() < FIRST_VALUE {
            self.regions.resize(FIRST_VALUE, Vec::new());
        }
        let mut ctx = vec![0u8; skb::SIZE];
        ctx[skb::MARK..skb::MARK + 4].copy_from_slice(&skb.mark.to_ne_bytes());
        self.regions[CTX] = ctx;
        self.regions[PACKET] = packet.to_vec();
        for f in 0..MAX_FRAMES {
            self.regions[FIRST_STACK + f] = vec![0u8; STACK_SIZE];
        }
        self.ifindex = skb.ifindex;
        self.ingress_ifindex = skb.ingress_ifindex;
        self.linear = skb.linear;
        self.xdp = false;
        self.meta = 0;
    }

    /// An XDP run on `frame`, received on `ingress_ifindex`.
    pub fn start_xdp(&mut self, frame: &[u8], ingress_ifindex: u32) {
        self.start_run(&[], Skb::default());
        self.regions[CTX] = vec![0u8; xdp::SIZE];
        let mut packet = vec![0u8; XDP_HEADROOM];
        packet.extend_from_slice(frame);
        self.regions[PACKET] = packet;
        self.ingress_ifindex = ingress_ifindex;
        self.xdp = true;
    }

    /// `bpf_xdp_adjust_meta`: metadata grows by `-delta` bytes (at most
    /// 32, a multiple of 4, as the kernel allows).
    pub fn adjust_meta(&mut self, delta: i32) -> bool {
        let meta = self.meta as i64 - delta as i64;
        if !self.xdp || !(0..=XDP_META_MAX as i64).contains(&meta) || meta % 4 != 0 {
            return false;
        }
        self.meta = meta as usize;
        true
    }

    /// Where the frame starts in the packet region.
    fn head(&self) -> usize {
        if self.xdp {
            XDP_HEADROOM
        } else {
            0
        }
    }

    pub fn ctx() -> u64 {
        addr(CTX, 0)
    }

    /// r10 of call frame `depth`.
    pub fn frame_pointer(depth: usize) -> u64 {
        addr(FIRST_STACK + depth, STACK_SIZE)
    }

    /// The packet (an XDP run's frame, without its headroom).
    pub fn packet(&self) -> &[u8] {
        &self.regions[PACKET][self.head()..]
    }

    /// The skb's packet, for the skb helpers (tc programs only).
    pub fn packet_mut(&mut self) -> &mut Vec<u8> {
        &mut self.regions[PACKET]
    }

    pub fn mark(&self) -> u32 {
        if self.xdp {
            return 0;
        }
        let c = &self.regions[CTX];
        u32::from_ne_bytes([c[8], c[9], c[10], c[11]])
    }

    fn xdp_ctx_load(&self, off: usize, size: usize) -> Result<u64> {
        let head = self.head();
        match (off, size) {
            (xdp::DATA, 4) => Ok(addr(PACKET, head)),
            (xdp::DATA_END, 4) => Ok(addr(PACKET, self.regions[PACKET].len())),
            (xdp::DATA_META, 4) => Ok(addr(PACKET, head - self.meta)),
            (xdp::INGRESS_IFINDEX, 4) => Ok(self.ingress_ifindex as u64),
            (16 | 20, 4) => Ok(0),
            _ => bail!("xdp_md read of {size} bytes at offset {off}"),
        }
    }

    /// A new map value region holding `bytes`.
    pub fn alloc(&mut self, bytes: &[u8]) -> usize {
        if self.regions.len() < FIRST_VALUE {
            self.regions.resize(FIRST_VALUE, Vec::new());
        }
        self.regions.push(bytes.to_vec());
        self.regions.len() - 1
    }

    pub fn region(&self, r: usize) -> &[u8] {
        &self.regions[r]
    }

    pub fn region_mut(&mut self, r: usize) -> &mut [u8] {
        &mut self.regions[r]
    }

    pub fn region_addr(r: usize) -> u64 {
        addr(r, 0)
    }

    fn ctx_load(&self, off: usize, size: usize) -> Result<u64> {
        if self.xdp {
            return self.xdp_ctx_load(off, size);
        }
        let packet_len = self.regions[PACKET].len();
        let word = |v: u32| Ok(v as u64);
        match (off, size) {
            (skb::LEN, 4) => word(packet_len as u32),
            (skb::DATA | skb::DATA_META, 4) => Ok(addr(PACKET, 0)),
            (skb::DATA_END, 4) => Ok(addr(
                PACKET,
                self.linear.map_or(packet_len, |l| l.min(packet_len)),
            )),
            (skb::IFINDEX, 4) => word(self.ifindex),
            (skb::INGRESS_IFINDEX, 4) => word(self.ingress_ifindex),
            (skb::PROTOCOL, 4) => {
                let p = &self.regions[PACKET];
                // skb->protocol: the EtherType as stored (network order).
                word(match p.get(12..14) {
                    Some(t) => u16::from_ne_bytes([t[0], t[1]]) as u32,
                    None => 0,
                })
            }
            _ if off + size <= skb::SIZE && off.is_multiple_of(size) => {
                let c = &self.regions[CTX][off..off + size];
                Ok(le(c))
            }
            _ => bail!("context read of {size} bytes at offset {off}"),
        }
    }

    pub fn load(&self, addr: u64, size: usize) -> Result<u64> {
        let (r, off) = split(addr)?;
        if r == CTX {
            return self.ctx_load(off, size);
        }
        let bytes = self.slice(r, off, size)?;
        Ok(le(bytes))
    }

    pub fn store(&mut self, addr: u64, size: usize, value: u64) -> Result<()> {
        let (r, off) = split(addr)?;
        if r == CTX && (self.xdp || !(skb::writable(off) && skb::writable(off + size - 1))) {
            bail!("context write of {size} bytes at offset {off}");
        }
        let bytes = value.to_le_bytes();
        self.slice_mut(r, off, size)?
            .copy_from_slice(&bytes[..size]);
        Ok(())
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let (r, off) = split(addr)?;
        if r == CTX {
            bail!("bulk read of the context");
        }
        Ok(self.slice(r, off, len)?.to_vec())
    }

    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<()> {
        let (r, off) = split(addr)?;
        if r == CTX {
            bail!("bulk write of the context");
        }
        self.slice_mut(r, off, bytes.len())?.copy_from_slice(bytes);
        Ok(())
    }

    fn slice(&self, r: usize, off: usize, len: usize) -> Result<&[u8]> {
        match self.regions.get(r).and_then(|m| m.get(off..off + len)) {
            Some(s) => Ok(s),
            None => bail!("out-of-bounds read of {len} bytes at region {r} offset {off}"),
        }
    }

    fn slice_mut(&mut self, r: usize, off: usize, len: usize) -> Result<&mut [u8]> {
        match self
            .regions
            .get_mut(r)
            .and_then(|m| m.get_mut(off..off + len))
        {
            Some(s) => Ok(s),
            None => bail!("out-of-bounds write of {len} bytes at region {r} offset {off}"),
        }
    }
}

fn le(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..bytes.len()].copy_from_slice(bytes);
    u64::from_le_bytes(b)
}
