//! The helpers tc programs call, emulated with the kernel's semantics where a
//! path depends on them: return values, what they write, and the checksum
//! arithmetic of `net/core/filter.c` on a `CHECKSUM_NONE` skb (what
//! `BPF_PROG_TEST_RUN` gives).

use anyhow::{bail, Context as _, Result};

use crate::{interp::MAP_TAG, mem::Memory, Fib, Vm};

const EFAULT: i64 = -14;
const EINVAL: i64 = -22;
const TC_ACT_REDIRECT: u64 = 7;

const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;
const BPF_F_HDR_FIELD_MASK: u64 = 0xf;

const BPF_FIB_LKUP_RET_SUCCESS: u64 = 0;
const BPF_FIB_LKUP_RET_NOT_FWDED: u64 = 4;
const BPF_FIB_LOOKUP_SRC: u64 = 1 << 4;
/// `struct bpf_fib_lookup` offsets.
mod fib {
    pub const FAMILY: usize = 0;
    pub const IFINDEX: usize = 8;
    pub const IPV4_SRC: usize = 16;
    pub const AF_INET6: u8 = 10;
    pub const SMAC: usize = 52;
    pub const DMAC: usize = 58;
    pub const SIZE: usize = 64;
}

/// Runs helper `id` with arguments `r[1..=5]`, result in `r[0]`; returns its
/// name for the counts.
pub fn call(vm: &mut Vm, id: u32, r: &mut [u64; 11]) -> Result<&'static str> {
    let (a1, a2, a3, a4, a5) = (r[1], r[2], r[3], r[4], r[5]);
    let (name, ret): (&'static str, u64) = match id {
        1 => {
            let m = map(vm, a1)?;
            let key = vm.mem.read(a2, vm.maps[m].key_size)?;
            let found = vm.maps[m].lookup_or_create(&mut vm.mem, &key);
            ("map_lookup_elem", found.map_or(0, Memory::region_addr))
        }
        2 => {
            let m = map(vm, a1)?;
            let key = vm.mem.read(a2, vm.maps[m].key_size)?;
            let value = vm.mem.read(a3, vm.maps[m].value_size)?;
            let e = vm.maps[m].update(&mut vm.mem, &key, &value, a4);
            ("map_update_elem", e as u64)
        }
        3 => {
            let m = map(vm, a1)?;
            let key = vm.mem.read(a2, vm.maps[m].key_size)?;
            ("map_delete_elem", vm.maps[m].delete(&key) as u64)
        }
        5 => ("ktime_get_ns", tick(vm)),
        160 => ("ktime_get_coarse_ns", tick(vm)),
        7 => ("get_prandom_u32", random(vm)),
        8 => ("get_smp_processor_id", 0),
        9 => {
            let bytes = vm.mem.read(a3, a4 as usize)?;
            ("skb_store_bytes", packet_write(vm, a2, &bytes))
        }
        26 => {
            let ret = match packet_range(vm, a2, a4) {
                Some(range) => {
                    let bytes = vm.mem.packet()[range].to_vec();
                    vm.mem.write(a3, &bytes)?;
                    0
                }
                None => {
                    // The kernel zeroes the buffer on failure.
                    vm.mem.write(a3, &vec![0u8; a4 as usize])?;
                    EFAULT as u64
                }
            };
            ("skb_load_bytes", ret)
        }
        10 => ("l3_csum_replace", csum_replace(vm, a2, a3, a4, a5, false)),
        11 => ("l4_csum_replace", csum_replace(vm, a2, a3, a4, a5, true)),
        28 => {
            // Either side may be NULL with size 0.
            let read = |addr, len| match len {
                0 => Ok(Vec::new()),
                n => vm.mem.read(addr, n as usize),
            };
            let (from, to) = (read(a1, a2)?, read(a3, a4)?);
            ("csum_diff", csum_diff(&from, &to, a5 as u32) as u64)
        }
        23 => ("redirect", TC_ACT_REDIRECT),
        152 => ("redirect_neigh", TC_ACT_REDIRECT),
        39 => ("skb_pull_data", 0),
        38 => {
            // bpf_skb_change_tail(skb, len, flags): cut or zero-extend.
            let len = a2 as usize;
            let ret = if !(14..=65535).contains(&len) {
                EINVAL as u64
            } else {
                vm.mem.packet_mut().resize(len, 0);
                0
            };
            ("skb_change_tail", ret)
        }
        50 => ("skb_adjust_room", adjust_room(vm, a2 as i32, a3 as u32)),
        12 => {
            // bpf_tail_call(ctx, prog_array, index): the interpreter jumps
            // when it finds the program; else the call returns.
            let m = map(vm, a2)?;
            let key = (a3 as u32).to_ne_bytes();
            let target = vm.maps[m]
                .lookup(&key)
                .map(|v| vm.mem.region(v).to_vec())
                .and_then(|v| Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?)))
                .and_then(|id| vm.prog_ids.get(id as usize).cloned());
            vm.tail_to = target;
            ("tail_call", 0)
        }
        69 => ("fib_lookup", fib_lookup(vm, a2, a3, a4)?),
        54 => {
            let ok = vm.mem.adjust_meta(a2 as i32);
            ("xdp_adjust_meta", if ok { 0 } else { EINVAL as u64 })
        }
        _ => bail!("helper {id} is not emulated"),
    };
    r[0] = ret;
    Ok(name)
}

fn map(vm: &Vm, handle: u64) -> Result<usize> {
    if handle & MAP_TAG != MAP_TAG {
        bail!("map helper called with {handle:#x}, not a map");
    }
    let i = (handle & !MAP_TAG) as usize;
    vm.maps.get(i).map(|_| i).context("unknown map handle")
}

fn tick(vm: &mut Vm) -> u64 {
    vm.clock_ns += 1_000;
    vm.clock_ns
}

fn random(vm: &mut Vm) -> u64 {
    let mut x = vm.rand;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    vm.rand = x;
    x as u32 as u64
}

fn packet_range(vm: &Vm, off: u64, len: u64) -> Option<std::ops::Range<usize>> {
    let (off, len) = (off as usize, len as usize);
    let end = off.checked_add(len)?;
    (end <= vm.mem.packet().len()).then_some(off..end)
}

fn packet_write(vm: &mut Vm, off: u64, bytes: &[u8]) -> u64 {
    match packet_range(vm, off, bytes.len() as u64) {
        Some(range) => {
            vm.mem.packet_mut()[range].copy_from_slice(bytes);
            0
        }
        None => EFAULT as u64,
    }
}

// The kernel's ones'-complement helpers (include/net/checksum.h).
fn csum_add(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s + carry as u32
}

fn csum_sub(a: u32, b: u32) -> u32 {
    csum_add(a, !b)
}

fn csum_fold(c: u32) -> u16 {
    let s = (c & 0xffff) + (c >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// `bpf_l3_csum_replace` / `bpf_l4_csum_replace` on a `CHECKSUM_NONE` skb.
fn csum_replace(vm: &mut Vm, off: u64, from: u64, to: u64, flags: u64, l4: bool) -> u64 {
    let Some(range) = packet_range(vm, off, 2) else {
        return EFAULT as u64;
    };
    let p = &mut vm.mem.packet_mut()[range];
    let old = u16::from_ne_bytes([p[0], p[1]]);
    let mangled0 = l4 && flags & BPF_F_MARK_MANGLED_0 != 0;
    if mangled0 && old == 0 {
        return 0; // UDP without a checksum stays without one.
    }
    let sum = !(old as u32);
    let new = match flags & BPF_F_HDR_FIELD_MASK {
        0 => csum_fold(csum_add(to as u32, sum)),
        2 => csum_fold(csum_add(
            csum_sub(sum, from as u16 as u32),
            to as u16 as u32,
        )),
        4 => csum_fold(csum_add(csum_sub(sum, from as u32), to as u32)),
        _ => return EINVAL as u64,
    };
    // BPF_F_PSEUDO_HDR only changes skb->csum, which CHECKSUM_NONE lacks.
    let _ = flags & BPF_F_PSEUDO_HDR;
    let new = if mangled0 && new == 0 { 0xffff } else { new };
    p.copy_from_slice(&new.to_ne_bytes());
    0
}

/// `bpf_csum_diff`: the sum of `to` minus `from`, 32-bit words, seeded.
fn csum_diff(from: &[u8], to: &[u8], seed: u32) -> u32 {
    let words = |b: &[u8]| {
        b.chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                u32::from_ne_bytes(w)
            })
            .collect::<Vec<_>>()
    };
    let mut s = seed;
    for w in words(from) {
        s = csum_add(s, !w);
    }
    for w in words(to) {
        s = csum_add(s, w);
    }
    s
}

/// `bpf_skb_adjust_room(skb, len_diff, BPF_ADJ_ROOM_MAC, 0)`: room after
/// the Ethernet header (added as zeroes, or removed).
fn adjust_room(vm: &mut Vm, diff: i32, mode: u32) -> u64 {
    const BPF_ADJ_ROOM_MAC: u32 = 1;
    const ETH_HLEN: usize = 14;
    let p = vm.mem.packet_mut();
    if mode != BPF_ADJ_ROOM_MAC || p.len() < ETH_HLEN {
        return EINVAL as u64;
    }
    if diff >= 0 {
        let at = ETH_HLEN;
        p.splice(at..at, std::iter::repeat_n(0u8, diff as usize));
    } else {
        let n = diff.unsigned_abs() as usize;
        if p.len() < ETH_HLEN + n {
            return EINVAL as u64;
        }
        p.drain(ETH_HLEN..ETH_HLEN + n);
    }
    0
}

fn fib_lookup(vm: &mut Vm, params: u64, plen: u64, flags: u64) -> Result<u64> {
    if plen as usize != fib::SIZE {
        return Ok(EINVAL as u64);
    }
    let mut p = vm.mem.read(params, fib::SIZE)?;
    let ret = match vm.fib {
        Fib::NoRoute => BPF_FIB_LKUP_RET_NOT_FWDED,
        Fib::Forward {
            ifindex,
            src,
            src6,
            smac,
            dmac,
        } => {
            p[fib::IFINDEX..fib::IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
            if flags & BPF_FIB_LOOKUP_SRC != 0 {
                // The IPv6 source lies where the IPv4 one does, 16 bytes.
                if p[fib::FAMILY] == fib::AF_INET6 {
                    p[fib::IPV4_SRC..fib::IPV4_SRC + 16].copy_from_slice(&src6);
                } else {
                    p[fib::IPV4_SRC..fib::IPV4_SRC + 4].copy_from_slice(&src);
                }
            }
            p[fib::SMAC..fib::SMAC + 6].copy_from_slice(&smac);
            p[fib::DMAC..fib::DMAC + 6].copy_from_slice(&dmac);
            BPF_FIB_LKUP_RET_SUCCESS
        }
    };
    vm.mem.write(params, &p)?;
    Ok(ret)
}
