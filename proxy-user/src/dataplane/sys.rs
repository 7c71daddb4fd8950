//! The one raw `bpf(2)` entry point, for the commands aya 0.14 does not
//! expose: batched writes (`batch`), detaching a pinned link (`attach`),
//! walking the keys of a map of unknown types (`layout`), and running a
//! program from a thread that holds only its descriptor ([`test_run`]).

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `bpf(cmd, attr, sizeof attr)`: the command's result, or its errno.
///
/// # Safety
/// `attr` must be the `#[repr(C)]` member of `union bpf_attr` that `cmd`
/// reads (zeroed where unused), and every pointer in it must name memory
/// of the size the kernel will read or write, valid for the call.
pub unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: the caller's contract above; the size passed is `attr`'s own.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `union bpf_attr`'s `test` member, up to the fields used.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `BPF_PROG_TEST_RUN` of an XDP program in live-frames mode: each
/// repetition's frame is really sent (`XDP_TX`, `XDP_REDIRECT`), as a
/// packet generator sends.
pub const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// Runs program `prog` once on the packet `data` (`BPF_PROG_TEST_RUN`);
/// returns the program's return value.
pub fn test_run(prog: BorrowedFd<'_>, data: &[u8]) -> io::Result<u32> {
    test_run_with(prog, data, None, 1, 0)
}

/// Runs `prog` `repeat` times on `data`, with the context `ctx` (for XDP,
/// a `struct xdp_md`) and test-run `flags`; no output is read back.
pub fn test_run_with(
    prog: BorrowedFd<'_>,
    data: &[u8],
    ctx: Option<&[u8]>,
    repeat: u32,
    flags: u32,
) -> io::Result<u32> {
    let ctx = ctx.unwrap_or_default();
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        repeat,
        ctx_size_in: ctx.len() as u32,
        ctx_in: if ctx.is_empty() {
            0
        } else {
            ctx.as_ptr() as u64
        },
        flags,
        ..TestRunAttr::default()
    };
    // SAFETY: the `test` member of bpf_attr, zeroed where unused; its
    // pointers name `data` and `ctx`, valid and of the sizes given, for
    // the call (no output buffer is given, so the kernel writes none).
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    Ok(attr.retval)
}
