//! The socket-level load balancer's sockets, found through the kernel's
//! socket diagnostics (`NETLINK_SOCK_DIAG`): a dump of a network
//! namespace's IPv4 or IPv6 TCP or UDP sockets with their value in a socket storage
//! map (`INET_DIAG_REQ_SK_BPF_STORAGES`, kernel ≥ 5.2), as `ss` shows
//! them; the ones chosen are closed with `SOCK_DESTROY`, as `ss -K` does
//! (`CONFIG_INET_DIAG_DESTROY`; UDP since 4.16).
//!
//! A socket lives in a network namespace and the dump sees only the
//! caller's: [`walk`] visits each namespace on this host on a short-lived
//! thread.

use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
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

/// A dump request asking for one socket storage map's values:
/// `INET_DIAG_REQ_SK_BPF_STORAGES { SK_DIAG_BPF_STORAGE_REQ_MAP_FD: fd }`.
#[repr(C)]
struct DumpMessage {
    msg: Message,
    storages_len: u16,
    storages_kind: u16,
    fd_len: u16,
    fd_kind: u16,
    fd: u32,
}

const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `struct inet_diag_msg`: family, state, timer, retrans, the id, then
/// expires, rqueue, wqueue, uid, inode; attributes follow.
const INET_DIAG_MSG_LEN: usize = 4 + std::mem::size_of::<SockId>() + 20;

/// A socket of a dump, with its value `V` in the storage map asked for
/// (the kernel reports storage with TCP sockets only: UDP's comes from
/// `KPX_SOCKS_UDP`).
#[derive(Clone, Debug)]
pub struct DiagSocket<V> {
    pub cookie: u64,
    pub proto: u8,
    pub value: Option<V>,
}

/// What [`walk`] is asked: the socket family, a storage map to read (its
/// values of type `V`), which sockets to keep and which to destroy.
pub struct Query<'a, V> {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    pub map: Option<BorrowedFd<'a>>,
    pub protos: &'a [u8],
    pub keep: &'a (dyn Fn(&DiagSocket<V>) -> bool + Sync),
    pub destroy: &'a (dyn Fn(&DiagSocket<V>) -> bool + Sync),
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
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // An answer that never comes (a request the kernel dropped) must not
    // stall the caller, the agent's housekeeping thread.
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: a valid socket and option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn message(kind: u16, flags: u16, req: Request) -> Message {
    Message {
        len: std::mem::size_of::<Message>() as u32,
        kind,
        flags: NLM_F_REQUEST | flags,
        seq: 1,
        pid: 0,
        req,
    }
}

fn send<T>(fd: &OwnedFd, msg: &T) -> io::Result<()> {
    // SAFETY: `msg` is a plain repr(C) value alive for the call.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            std::ptr::from_ref(msg).cast(),
            std::mem::size_of::<T>(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads replies until `NLMSG_DONE` or an error/ack message, calling `each`
/// with every `inet_diag_msg`'s socket id and attributes. Returns the ack's
/// errno (0: ok).
fn receive(fd: &OwnedFd, mut each: impl FnMut(SockId, &[u8])) -> io::Result<i32> {
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
                    if body.len() >= INET_DIAG_MSG_LEN {
                        // SAFETY: enough bytes for a SockId (plain integers,
                        // any bit pattern valid); unaligned read.
                        let id = unsafe {
                            std::ptr::read_unaligned(body[4..].as_ptr().cast::<SockId>())
                        };
                        each(id, &body[INET_DIAG_MSG_LEN..]);
                    }
                }
            }
            off += (len + 3) & !3;
        }
    }
}

fn request(family: u8, proto: u8, id: SockId) -> Request {
    Request {
        family,
        protocol: proto,
        states: u32::MAX,
        id,
        ..Default::default()
    }
}

/// Netlink attributes: (type without flags, payload).
fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((kind, payload))
    })
}

/// The socket's value in the requested storage map, if it has one.
fn stored_value<V: aya::Pod>(attrs: &[u8]) -> Option<V> {
    let (_, storages) = attributes(attrs).find(|(k, _)| *k == INET_DIAG_SK_BPF_STORAGES)?;
    let (_, storage) = attributes(storages).find(|(k, _)| *k == SK_DIAG_BPF_STORAGE)?;
    let (_, value) = attributes(storage).find(|(k, _)| *k == SK_DIAG_BPF_STORAGE_MAP_VALUE)?;
    (value.len() >= std::mem::size_of::<V>()).then(|| {
        // SAFETY: enough bytes for a `V` (plain data, any bit pattern
        // valid); unaligned read.
        unsafe { std::ptr::read_unaligned(value.as_ptr().cast::<V>()) }
    })
}

/// In this thread's network namespace: the sockets of `q.family` and
/// `proto` (with their value in `q.map`, if given) that `q.keep` keeps;
/// those `q.destroy` picks are destroyed. Returns them and how many were
/// destroyed.
fn walk_here<V: aya::Pod>(q: &Query<'_, V>, proto: u8) -> io::Result<(Vec<DiagSocket<V>>, u64)> {
    let fd = socket()?;
    let req = message(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_DUMP,
        request(q.family, proto, SockId::default()),
    );
    match q.map {
        Some(m) => send(
            &fd,
            &DumpMessage {
                msg: Message {
                    len: std::mem::size_of::<DumpMessage>() as u32,
                    ..req
                },
                storages_len: 12,
                storages_kind: INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED,
                fd_len: 8,
                fd_kind: SK_DIAG_BPF_STORAGE_REQ_MAP_FD,
                fd: m.as_raw_fd() as u32,
            },
        )?,
        None => send(&fd, &req)?,
    }
    let mut found = Vec::new();
    let errno = receive(&fd, |id, attrs| {
        let s = DiagSocket {
            cookie: u64::from(id.cookie[0]) | (u64::from(id.cookie[1]) << 32),
            proto,
            value: stored_value(attrs),
        };
        if (q.keep)(&s) {
            found.push((id, s));
        }
    })?;
    if errno != 0 {
        return Err(io::Error::from_raw_os_error(errno));
    }
    let mut destroyed = 0;
    for (id, s) in &found {
        if !(q.destroy)(s) {
            continue;
        }
        let req = request(q.family, proto, *id);
        send(&fd, &message(SOCK_DESTROY, NLM_F_ACK, req))?;
        match receive(&fd, |_, _| {})? {
            0 => destroyed += 1,
            // Closed meanwhile.
            libc::ENOENT => {}
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
    Ok((found.into_iter().map(|(_, s)| s).collect(), destroyed))
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

/// In every network namespace of the host: the sockets of `q.family` and
/// `q.protos` (with their value in the socket storage map `q.map`, if
/// given) that `q.keep` keeps; those `q.destroy` picks are destroyed.
/// Namespaces that vanish meanwhile are skipped; a kernel that cannot dump
/// storage or destroy sockets is an error.
pub fn walk<V: aya::Pod + Send>(q: &Query<'_, V>) -> io::Result<(Vec<DiagSocket<V>>, u64)> {
    let (mut all, mut destroyed) = (Vec::new(), 0);
    for ns in namespaces() {
        let Ok(file) = fs::File::open(&ns) else {
            continue;
        };
        for &proto in q.protos {
            let result = std::thread::scope(|s| {
                s.spawn(|| {
                    // SAFETY: setns on this short-lived thread only; `file`
                    // is an open netns file.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        // Not a namespace (any more, or not yet: `ip netns
                        // add` creates the file before it mounts on it).
                        return Ok(None);
                    }
                    walk_here(q, proto).map(Some)
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
            });
            match result {
                Ok(None) => break,
                Ok(Some((found, n))) => {
                    all.extend(found);
                    destroyed += n;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::EPERM)
                    ) =>
                {
                    return Err(e)
                }
                Err(e) => log::debug!("sockets of {}: {e}", ns.display()),
            }
        }
    }
    Ok((all, destroyed))
}
