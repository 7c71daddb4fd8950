//! The one raw `bpf(2)` entry point, for the commands aya 0.14 does not
//! expose: batched writes (`batch`), detaching a pinned link (`attach`),
//! walking the keys of a map of unknown types (`layout`).

use std::io;

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
