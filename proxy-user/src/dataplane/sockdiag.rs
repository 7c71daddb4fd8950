//! Closing sockets by cookie through the kernel's socket diagnostics
//! (`NETLINK_SOCK_DIAG`: a dump of a network namespace's IPv4 UDP sockets,
//! then `SOCK_DESTROY` for the chosen ones, as `ss -K` does; needs
//! `CONFIG_INET_DIAG_DESTROY`, in kernels since 4.5 for TCP, 4.16 for UDP).
//! The socket cookie is the one the BPF programs see
//! (`bpf_get_socket_cookie`), so the socket-level load balancer's own
//! sockets are told apart from every other socket to the same address.
//!
//! A socket lives in a network namespace and the dump sees only the
//! caller's: [`destroy_everywhere`] visits each namespace on this host on a
//! short-lived thread.

use std::{
    collections::{BTreeMap, HashSet},
    fs, io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;

/// `struct inet_diag_sockid`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct nlmsghdr` followed by the request.
#[repr(C)]
struct Message {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    req: Request,
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, kind: u16, flags: u16, req: Request) -> io::Result<()> {
    let msg = Message {
        len: std::mem::size_of::<Message>() as u32,
        kind,
        flags: NLM_F_REQUEST | flags,
        seq: 1,
        pid: 0,
        req,
    };
    // SAFETY: `msg` is a plain repr(C) value alive for the call.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (&raw const msg).cast(),
            std::mem::size_of::<Message>(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads replies until `NLMSG_DONE` or an error/ack message, calling `each`
/// with every `inet_diag_msg`'s socket id. Returns the ack's errno (0: ok).
fn receive(fd: &OwnedFd, mut each: impl FnMut(SockId)) -> io::Result<i32> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off = 0usize;
        let n = n as usize;
        while off + NLMSG_HDRLEN <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap_or_default());
            if len < NLMSG_HDRLEN || off + len > n {
                return Err(io::Error::other("truncated netlink message"));
            }
            let body = &buf[off + NLMSG_HDRLEN..off + len];
            match kind {
                NLMSG_DONE => return Ok(0),
                NLMSG_ERROR => {
                    let err = body
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()));
                    return Ok(-err);
                }
                _ => {
                    // inet_diag_msg: family, state, timer, retrans, then the id.
                    if body.len() >= 4 + std::mem::size_of::<SockId>() {
                        // SAFETY: enough bytes for a SockId (plain integers,
                        // any bit pattern valid); unaligned read.
                        let id = unsafe {
                            std::ptr::read_unaligned(body[4..].as_ptr().cast::<SockId>())
                        };
                        each(id);
                    }
                }
            }
            off += (len + 3) & !3;
        }
    }
}

fn udp_request(id: SockId) -> Request {
    Request {
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_UDP as u8,
        states: u32::MAX,
        id,
        ..Default::default()
    }
}

/// In this thread's network namespace: destroys the IPv4 UDP sockets whose
/// cookie is in `cookies`. Returns how many.
fn destroy_here(cookies: &HashSet<u64>) -> io::Result<u64> {
    let fd = socket()?;
    send(
        &fd,
        SOCK_DIAG_BY_FAMILY,
        NLM_F_DUMP,
        udp_request(SockId::default()),
    )?;
    let mut found = Vec::new();
    receive(&fd, |id| {
        let cookie = u64::from(id.cookie[0]) | (u64::from(id.cookie[1]) << 32);
        if cookies.contains(&cookie) {
            found.push(id);
        }
    })?;
    let mut n = 0;
    for id in found {
        send(&fd, SOCK_DESTROY, NLM_F_ACK, udp_request(id))?;
        match receive(&fd, |_| {})? {
            0 => n += 1,
            // Closed meanwhile.
            libc::ENOENT => {}
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
    Ok(n)
}

/// Every network namespace of this host once: those `ip netns` and CNI
/// plugins name in /run/netns, and every process's.
fn namespaces() -> Vec<PathBuf> {
    let mut seen = BTreeMap::new();
    let named = fs::read_dir("/run/netns").into_iter().flatten().flatten();
    let procs = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    for path in named.map(|e| e.path()).chain(procs) {
        if let Ok(m) = fs::metadata(&path) {
            seen.entry((m.dev(), m.ino())).or_insert(path);
        }
    }
    seen.into_values().collect()
}

/// Destroys the IPv4 UDP sockets whose cookie is in `cookies`, in every
/// network namespace of the host. Returns how many; errors of single
/// namespaces (gone meanwhile) are skipped, one that says the kernel
/// cannot destroy sockets is returned.
pub fn destroy_everywhere(cookies: &HashSet<u64>) -> io::Result<u64> {
    let mut total = 0;
    for ns in namespaces() {
        let Ok(file) = fs::File::open(&ns) else {
            continue;
        };
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this short-lived thread only; `file` is
                // an open netns file.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                destroy_here(cookies)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
        });
        match result {
            Ok(n) => total += n,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Err(e),
            Err(e) => log::debug!("sockets of {}: {e}", ns.display()),
        }
        if total as usize == cookies.len() {
            break;
        }
    }
    Ok(total)
}
