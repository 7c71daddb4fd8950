//! The bpffs directory where the maps are pinned.

use std::{ffi::CString, fs, os::unix::ffi::OsStrExt, path::Path};

use anyhow::{bail, Context as _, Result};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path; `st` is written by statfs.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(at: &Path) -> Result<()> {
    mount_fs("bpf", at)
}

/// Mounts a filesystem of type `fstype` (no device, no options) at `at`.
pub fn mount_fs(fstype: &str, at: &Path) -> Result<()> {
    let target = CString::new(at.as_os_str().as_bytes())?;
    let fstype_c = CString::new(fstype)?;
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype_c.as_ptr(),
            target.as_ptr(),
            fstype_c.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting {fstype} at {}", at.display()));
    }
    log::info!("mounted {fstype} at {}", at.display());
    Ok(())
}

/// Makes sure `dir` exists on a bpffs, mounting one if needed: on
/// `/sys/fs/bpf` when `dir` is below it (as systemd would), else on `dir`.
pub fn ensure(dir: &Path) -> Result<()> {
    if is_bpffs(dir) {
        return Ok(());
    }
    // One mount at a time in this process: two threads that both found no
    // bpffs (tests, on a machine that had none mounted) would stack two,
    // the second hiding what the first one's caller had made in it.
    static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = MOUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let sys_bpf = Path::new("/sys/fs/bpf");
    if dir.starts_with(sys_bpf) && dir != sys_bpf {
        if !is_bpffs(sys_bpf) {
            mount_bpffs(sys_bpf)?;
        }
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    } else {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if !is_bpffs(dir) {
            mount_bpffs(dir)?;
        }
    }
    if !is_bpffs(dir) {
        bail!("{} is not on a bpffs", dir.display());
    }
    Ok(())
}

/// An exclusive claim on a bpffs directory: one agent at a time manages
/// its maps (two would allocate ids behind each other's back). Released
/// when dropped or when the process dies.
pub struct Lock(#[allow(dead_code)] fs::File);

/// Takes the claim on `dir` if free; Ok(None) while another process holds it.
pub fn try_lock(dir: &Path) -> Result<Option<Lock>> {
    use std::os::fd::AsRawFd as _;
    let f = fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(Lock(f)));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(e).with_context(|| format!("locking {}", dir.display()))
}

/// Removes kpx's pinned maps from `dir` (and `dir` if that empties it).
/// Returns the names removed.
pub fn unpin_all(dir: &Path) -> Result<Vec<&'static str>> {
    let mut removed = Vec::new();
    let legacy = proxy_common::legacy_map_names::ALL;
    for name in proxy_common::map_names::ALL.into_iter().chain(legacy) {
        match fs::remove_file(dir.join(name)) {
            Ok(()) => removed.push(name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("unpinning {name}")),
        }
    }
    // Only succeeds when empty; a bpffs mounted on `dir` itself stays.
    let _ = fs::remove_dir(dir);
    Ok(removed)
}
