//! The instruction loop: the eBPF instruction set (RFC 9669) as clang and
//! bpf-linker emit it for the kernel, with bpf-to-bpf calls, counting every
//! instruction executed.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use aya_obj::generated::bpf_insn;

use crate::{
    helpers,
    mem::{Memory, MAX_FRAMES},
    Vm,
};

/// A run that executes more than this is looping: an error, not a count.
const MAX_INSNS: u64 = 1_000_000;

/// Map handles in registers: `MAP_TAG | map index` (never a valid address,
/// whose top 32 bits are a small region number).
pub const MAP_TAG: u64 = 0xffff_0000_0000_0000;

#[derive(Default)]
pub struct Counts {
    pub insns: u64,
    pub by_helper: BTreeMap<&'static str, u64>,
}

// Instruction classes.
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const JMP32: u8 = 0x06;
const ALU64: u8 = 0x07;

// Memory modes.
const IMM: u8 = 0x00;
const MEM: u8 = 0x60;
const MEMSX: u8 = 0x80;
const ATOMIC: u8 = 0xc0;

struct Frame {
    ret_pc: usize,
    saved: [u64; 4],
    fp: u64,
}

fn size_of(code: u8) -> usize {
    match code & 0x18 {
        0x00 => 4,
        0x08 => 2,
        0x10 => 1,
        _ => 8,
    }
}

fn sign_extend(v: u64, bytes: usize) -> u64 {
    let shift = 64 - bytes * 8;
    (((v << shift) as i64) >> shift) as u64
}

pub fn execute(vm: &mut Vm, code: &[bpf_insn], counts: &mut Counts) -> Result<u64> {
    // A tail call replaces the program being run.
    let mut tail: Vec<bpf_insn>;
    let mut code = code;
    let mut r = [0u64; 11];
    r[1] = Memory::ctx();
    r[10] = Memory::frame_pointer(0);
    let mut frames: Vec<Frame> = Vec::new();
    let mut pc = 0usize;
    loop {
        let insn = code
            .get(pc)
            .with_context(|| format!("jumped outside the program, to {pc}"))?;
        counts.insns += 1;
        if counts.insns > MAX_INSNS {
            bail!("more than {MAX_INSNS} instructions: a loop that does not end");
        }
        let (op, dst, src) = (insn.code, insn.dst_reg() as usize, insn.src_reg() as usize);
        if dst > 10 || src > 10 {
            bail!("bad register in instruction {pc}");
        }
        let imm = insn.imm as i64 as u64;
        let off = insn.off as i64;
        let at = |base: u64| base.wrapping_add(off as u64);
        pc += 1;
        match op & 0x07 {
            ALU | ALU64 => {
                let wide = op & 0x07 == ALU64;
                let operand = if op & 0x08 != 0 { r[src] } else { imm };
                r[dst] = alu(op, insn.off, wide, r[dst], operand, insn.imm)
                    .with_context(|| format!("instruction {}", pc - 1))?;
            }
            JMP | JMP32 => {
                let wide = op & 0x07 == JMP;
                match op & 0xf0 {
                    0x00 => {
                        // ja (JMP32's gotol takes its offset from imm).
                        let d = if wide { off } else { insn.imm as i64 };
                        pc = (pc as i64 + d) as usize;
                    }
                    0x80 => {
                        if src == 1 {
                            // bpf-to-bpf call.
                            if frames.len() + 1 >= MAX_FRAMES {
                                bail!("call depth above {MAX_FRAMES}");
                            }
                            frames.push(Frame {
                                ret_pc: pc,
                                saved: [r[6], r[7], r[8], r[9]],
                                fp: r[10],
                            });
                            r[10] = Memory::frame_pointer(frames.len());
                            pc = (pc as i64 + insn.imm as i64) as usize;
                        } else if src == 0 {
                            let name = helpers::call(vm, insn.imm as u32, &mut r)
                                .with_context(|| format!("helper {} at {}", insn.imm, pc - 1))?;
                            *counts.by_helper.entry(name).or_default() += 1;
                            if let Some(next) = vm.tail_to.take() {
                                // A tail call that found its program: it
                                // starts afresh on the same context, and
                                // never returns here.
                                tail = vm.programs[&next].clone();
                                code = &tail;
                                frames.clear();
                                r = [0u64; 11];
                                r[1] = Memory::ctx();
                                r[10] = Memory::frame_pointer(0);
                                pc = 0;
                                continue;
                            }
                            // r1-r5 are clobbered by a call.
                            for reg in &mut r[1..=5] {
                                *reg = 0xdead_beef_0000_0000;
                            }
                        } else {
                            bail!("kfunc or unknown call kind {src} at {}", pc - 1);
                        }
                    }
                    0x90 => match frames.pop() {
                        None => return Ok(r[0]),
                        Some(f) => {
                            r[6..=9].copy_from_slice(&f.saved);
                            r[10] = f.fp;
                            pc = f.ret_pc;
                        }
                    },
                    cond => {
                        let b = if op & 0x08 != 0 { r[src] } else { imm };
                        let a = r[dst];
                        let (a, b) = if wide {
                            (a, b)
                        } else {
                            (a as u32 as u64, b as u32 as u64)
                        };
                        let (sa, sb) = if wide {
                            (a as i64, b as i64)
                        } else {
                            (a as u32 as i32 as i64, b as u32 as i32 as i64)
                        };
                        let taken = match cond {
                            0x10 => a == b,
                            0x20 => a > b,
                            0x30 => a >= b,
                            0x40 => a & b != 0,
                            0x50 => a != b,
                            0x60 => sa > sb,
                            0x70 => sa >= sb,
                            0xa0 => a < b,
                            0xb0 => a <= b,
                            0xc0 => sa < sb,
                            0xd0 => sa <= sb,
                            _ => bail!("unknown jump {op:#x} at {}", pc - 1),
                        };
                        if taken {
                            pc = (pc as i64 + off) as usize;
                        }
                    }
                }
            }
            LDX => {
                let size = size_of(op);
                let v = vm.mem.load(at(r[src]), size)?;
                r[dst] = match op & 0xe0 {
                    MEM => v,
                    MEMSX => sign_extend(v, size),
                    _ => bail!("unknown load {op:#x} at {}", pc - 1),
                };
            }
            ST => {
                if op & 0xe0 != MEM {
                    bail!("unknown store {op:#x} at {}", pc - 1);
                }
                vm.mem.store(at(r[dst]), size_of(op), imm)?;
            }
            STX => {
                let size = size_of(op);
                match op & 0xe0 {
                    MEM => vm.mem.store(at(r[dst]), size, r[src])?,
                    ATOMIC => atomic(vm, insn.imm, at(r[dst]), size, &mut r, src)?,
                    _ => bail!("unknown store {op:#x} at {}", pc - 1),
                }
            }
            LD => {
                if op != (LD | IMM | 0x18) {
                    bail!("legacy packet load {op:#x} at {} is not supported", pc - 1);
                }
                let next = code.get(pc).context("ld_imm64 without its second half")?;
                pc += 1;
                let hi = next.imm as u32 as u64;
                r[dst] = match src {
                    0 => (insn.imm as u32 as u64) | (hi << 32),
                    // BPF_PSEUDO_MAP_FD: a map handle.
                    1 => MAP_TAG | map_index(insn.imm)?,
                    // BPF_PSEUDO_MAP_VALUE: an address in element 0.
                    2 => {
                        let i = map_index(insn.imm)? as usize;
                        let key = 0u32.to_ne_bytes();
                        let region = vm.maps[i]
                            .lookup_or_create(&mut vm.mem, &key)
                            .context("global data map without its value")?;
                        Memory::region_addr(region) + hi
                    }
                    _ => bail!("ld_imm64 of kind {src} at {}", pc - 2),
                };
            }
            _ => unreachable!("three bits"),
        }
    }
}

fn map_index(fd: i32) -> Result<u64> {
    match fd.checked_sub(crate::MAP_FD_BASE) {
        Some(i) if i >= 0 => Ok(i as u64),
        _ => bail!("map reference {fd} was not relocated"),
    }
}

fn alu(op: u8, off: i16, wide: bool, a: u64, b: u64, imm: i32) -> Result<u64> {
    let w = |v: u64| if wide { v } else { v as u32 as u64 };
    let (a32, b32) = (a as u32, b as u32);
    let sh = if wide { b & 63 } else { b & 31 };
    let signed = off == 1;
    Ok(match op & 0xf0 {
        0x00 => w(a.wrapping_add(b)),
        0x10 => w(a.wrapping_sub(b)),
        0x20 => w(a.wrapping_mul(b)),
        0x30 => match (wide, signed) {
            (_, _) if w(b) == 0 => 0,
            (true, false) => a / b,
            (false, false) => (a32 / b32) as u64,
            (true, true) => (a as i64).wrapping_div(b as i64) as u64,
            (false, true) => (a32 as i32).wrapping_div(b32 as i32) as u32 as u64,
        },
        0x40 => w(a | b),
        0x50 => w(a & b),
        0x60 => w(if wide { a << sh } else { (a32 << sh) as u64 }),
        0x70 => w(if wide { a >> sh } else { (a32 >> sh) as u64 }),
        0x80 => w(a.wrapping_neg()),
        0x90 => match (wide, signed) {
            (_, _) if w(b) == 0 => w(a),
            (true, false) => a % b,
            (false, false) => (a32 % b32) as u64,
            (true, true) => (a as i64).wrapping_rem(b as i64) as u64,
            (false, true) => (a32 as i32).wrapping_rem(b32 as i32) as u32 as u64,
        },
        0xa0 => w(a ^ b),
        0xb0 => match off {
            // mov, or movsx from 8/16/32 bits.
            8 | 16 | 32 => w(sign_extend(b, off as usize / 8)),
            _ => w(b),
        },
        0xc0 => {
            if wide {
                ((a as i64) >> sh) as u64
            } else {
                ((a32 as i32) >> sh) as u32 as u64
            }
        }
        0xd0 => {
            // Byte swaps: ALU's to_le (a no-op on this little-endian target
            // but for the truncation) and to_be; ALU64's unconditional bswap.
            let swap = wide || op & 0x08 != 0;
            match (imm, swap) {
                (16, false) => a as u16 as u64,
                (32, false) => a as u32 as u64,
                (64, false) => a,
                (16, true) => (a as u16).swap_bytes() as u64,
                (32, true) => (a as u32).swap_bytes() as u64,
                (64, true) => a.swap_bytes(),
                _ => bail!("byte swap of {imm} bits"),
            }
        }
        _ => bail!("unknown ALU operation {op:#x}"),
    })
}

fn atomic(
    vm: &mut Vm,
    imm: i32,
    addr: u64,
    size: usize,
    r: &mut [u64; 11],
    src: usize,
) -> Result<()> {
    let old = vm.mem.load(addr, size)?;
    let v = r[src];
    let trunc = |x: u64| if size == 4 { x as u32 as u64 } else { x };
    let fetch = imm & 0x01 != 0;
    let new = match imm & !0x01 {
        0x00 => old.wrapping_add(v),
        0x40 => old | v,
        0x50 => old & v,
        0xa0 => old ^ v,
        0xe0 => v,
        0xf0 => {
            // cmpxchg: compare with r0, old value to r0.
            let new = if trunc(old) == trunc(r[0]) { v } else { old };
            vm.mem.store(addr, size, new)?;
            r[0] = trunc(old);
            return Ok(());
        }
        _ => bail!("unknown atomic operation {imm:#x}"),
    };
    vm.mem.store(addr, size, new)?;
    if fetch || imm & !0x01 == 0xe0 {
        r[src] = trunc(old);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::alu;

    const ADD: u8 = 0x00;
    const DIV: u8 = 0x30;
    const LSH: u8 = 0x60;
    const MOD: u8 = 0x90;
    const MOV: u8 = 0xb0;
    const ARSH: u8 = 0xc0;
    const END: u8 = 0xd0;

    #[test]
    fn thirty_two_bit_operations_zero_extend() {
        assert_eq!(alu(ADD, 0, false, u32::MAX as u64, 1, 0).unwrap(), 0);
        assert_eq!(alu(ADD, 0, true, u32::MAX as u64, 1, 0).unwrap(), 1 << 32);
        assert_eq!(
            alu(LSH, 0, false, 1, 33, 0).unwrap(),
            2,
            "shift masked to 5 bits"
        );
    }

    #[test]
    fn division_by_zero_is_defined_as_bpf_says() {
        assert_eq!(alu(DIV, 0, true, 7, 0, 0).unwrap(), 0);
        assert_eq!(alu(MOD, 0, true, 7, 0, 0).unwrap(), 7);
        assert_eq!(
            alu(DIV, 1, true, (-7i64) as u64, 2, 0).unwrap(),
            (-3i64) as u64
        );
    }

    #[test]
    fn sign_extension_and_byte_swaps() {
        assert_eq!(alu(MOV, 8, true, 0, 0x80, 0).unwrap(), (-128i64) as u64);
        assert_eq!(
            alu(ARSH, 0, false, 0x8000_0000, 31, 0).unwrap(),
            u32::MAX as u64
        );
        // to_be on ALU (0x08 set), 16 bits.
        assert_eq!(alu(END | 0x08, 0, false, 0x1234, 0, 16).unwrap(), 0x3412);
        // to_le truncates.
        assert_eq!(alu(END, 0, false, 0x1_2345, 0, 16).unwrap(), 0x2345);
        // ALU64 bswap.
        assert_eq!(alu(END, 0, true, 0x1122, 0, 16).unwrap(), 0x2211);
    }
}
