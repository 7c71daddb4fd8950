//! Small raw XDP programs for the beds: a fixed verdict (a sink that drops,
//! a reflector, a pass-through that puts a veth in NAPI mode), and a
//! packet generator's program (restores a frame's headers and sends it;
//! run in live-frames mode). Loaded from instructions: the beds need
//! no object file of their own.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, Result};

/// `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
/// `attr` must be the `union bpf_attr` member `cmd` reads, its pointers
/// naming memory of the sizes given, alive for the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: the caller's contract; the size passed is `attr`'s own.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;

/// One BPF instruction.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst | (src << 4)) << 8
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

/// A two-instruction XDP program (`r0 = action; exit`).
pub fn raw_xdp(action: i32) -> Result<OwnedFd> {
    load_xdp(&[insn(0xb7, 0, 0, 0, action), insn(0x95, 0, 0, 0, 0)])
}

/// The generator's program: writes `head` over the frame's start, then
/// `XDP_TX`. Live-frames mode recycles its pages without restoring them,
/// and the node translates the frames it gets in place (a veth hands the
/// page itself over): each send must put the original headers back.
pub fn generator(head: &[u8]) -> Result<OwnedFd> {
    let mut p = vec![
        insn(0x61, 2, 1, 0, 0),                 // r2 = ctx->data
        insn(0x61, 3, 1, 4, 0),                 // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),                 // r4 = r2
        insn(0x07, 4, 0, 0, head.len() as i32), // r4 += len
    ];
    let mut stores = Vec::new();
    let mut off = 0;
    while off + 4 <= head.len() {
        let w = i32::from_ne_bytes([head[off], head[off + 1], head[off + 2], head[off + 3]]);
        stores.push(insn(0x62, 2, 0, off as i16, w)); // *(u32 *)(r2 + off) = w
        off += 4;
    }
    while off < head.len() {
        stores.push(insn(0x72, 2, 0, off as i16, i32::from(head[off]))); // *(u8 *)
        off += 1;
    }
    // if r4 > r3 goto drop (past the stores and the XDP_TX exit)
    p.push(insn(0x2d, 4, 3, stores.len() as i16 + 2, 0));
    p.extend(stores);
    p.extend([
        insn(0xb7, 0, 0, 0, XDP_TX),
        insn(0x95, 0, 0, 0, 0),
        insn(0xb7, 0, 0, 0, XDP_DROP),
        insn(0x95, 0, 0, 0, 0),
    ]);
    load_xdp(&p)
}

/// Loads raw XDP instructions: no object file for the bed's own tools.
fn load_xdp(insns: &[u64]) -> Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    let license = c"GPL";
    #[repr(C)]
    #[derive(Default)]
    struct Load {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let mut attr = Load {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    attr.prog_name[..7].copy_from_slice(b"kpx_gen");
    // SAFETY: PROG_LOAD's bpf_attr, its pointers naming `insns` and
    // `license`, alive for the call.
    let fd = unsafe { bpf(BPF_PROG_LOAD, &mut attr)? };
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches `prog` to `ifindex` of the calling thread's namespace in native
/// mode (a bpf link: detached when the returned descriptor closes).
pub fn attach_native(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    let mut attr: [u32; 4] = [
        prog.as_raw_fd() as u32,
        ifindex,
        BPF_XDP,
        XDP_FLAGS_DRV_MODE,
    ];
    // SAFETY: LINK_CREATE's bpf_attr: descriptors and numbers only.
    let fd = unsafe { bpf(BPF_LINK_CREATE, &mut attr) }.context("native XDP on a veth")?;
    // SAFETY: as in `raw_xdp`.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A test run's XDP context (`struct xdp_md`: data, data_end, data_meta,
/// ingress_ifindex, rx_queue_index, egress_ifindex) for a frame of `len`
/// bytes arriving on `ifindex` (0: the test run's default, loopback).
pub fn xdp_md(len: usize, ifindex: u32) -> Vec<u8> {
    [0, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|w: &u32| w.to_ne_bytes())
        .collect()
}
