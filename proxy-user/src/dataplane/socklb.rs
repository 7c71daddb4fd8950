//! The socket-level load balancer's attachment: the cgroup programs
//! (`connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`, their `6` twins
//! for `AF_INET6` sockets, `sock_release`) on
//! one cgroup v2 directory, whose processes (and their descendants') get
//! service connections straight to a backend.
//!
//! Links are pinned in `<bpffs>/sock-links`, so, like the tc links, they
//! outlive the agent. A starting agent detaches an earlier agent's links
//! before attaching its own: for that moment a `connect()` to a service is
//! translated per packet by tc, which stays attached, so nothing fails.
//! `kpx cleanup` removes them.

use std::{
    collections::HashSet,
    fmt, fs,
    net::SocketAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::MapData;
use aya::programs::{links::FdLink, CgroupAttachMode, CgroupSock, CgroupSockAddr};
use proxy_common::{
    map_names, prog_names, wire, In6, SockValue, IPPROTO_TCP, IPPROTO_UDP, SOCK_F_CONNECTED,
    SOCK_F_COUNTED,
};

use crate::dataplane::{
    conntrack::ServiceBackend,
    maps::{read_hash, MapSet, WireAddr},
    sockdiag::{self, DiagSocket, Query},
};

/// `--socket-lb`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Every socket of the cgroup: pods' and the node's.
    #[default]
    All,
    /// The node's own sockets (its network namespace) only: pods' flows
    /// keep the service address on the wire, for a service mesh to see.
    HostOnly,
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            "host-only" => Ok(Self::HostOnly),
            "off" => Ok(Self::Off),
            other => Err(format!("{other:?}: want all, host-only or off")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::All => "all",
            Self::HostOnly => "host-only",
            Self::Off => "off",
        })
    }
}

/// A cgroup link takes no attach flags (EINVAL): it always runs alongside
/// the cgroup's other programs, as `BPF_F_ALLOW_MULTI` would. aya calls
/// that flag-less mode `Single`; on kernels before links (< 5.7) it would
/// mean exclusive, which kpx then is.
const MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The socket-address programs (each pinned under its own name), beside
/// `prog_names::SOCK_RELEASE`, a socket program.
const ADDR_PROGRAMS: [&str; 8] = [
    prog_names::SOCK_CONNECT4,
    prog_names::SOCK_SENDMSG4,
    prog_names::SOCK_RECVMSG4,
    prog_names::SOCK_GETPEERNAME4,
    prog_names::SOCK_CONNECT6,
    prog_names::SOCK_SENDMSG6,
    prog_names::SOCK_RECVMSG6,
    prog_names::SOCK_GETPEERNAME6,
];

pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("sock-links")
}

/// Where kpx mounts a cgroup v2 hierarchy when the host has none mounted
/// (a cgroup v1 host: the v2 hierarchy still exists, unmounted, and every
/// socket belongs to it).
const OWN_CGROUP2: &str = "/run/kpx/cgroupv2";

/// The root of the host's cgroup v2 hierarchy: its mount point in PID 1's
/// mount namespace (reached through `/proc/1/root`, so an agent in a
/// container with the host's PID namespace finds the host's), else in
/// this process's, else one kpx mounts at [`OWN_CGROUP2`]. On hybrid hosts
/// that is `/sys/fs/cgroup/unified`, not `/sys/fs/cgroup`.
pub fn default_cgroup() -> Result<PathBuf> {
    // PID 1's mount namespace, if it is not this process's.
    let ns = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let host = if ns("1").is_some() && ns("1") != ns("self") {
        Some(("/proc/1/mounts", "/proc/1/root"))
    } else {
        None
    };
    for (mounts, root) in host.into_iter().chain([("/proc/self/mounts", "/")]) {
        let Ok(text) = fs::read_to_string(mounts) else {
            continue;
        };
        if let Some(at) = cgroup2_mount(&text) {
            let path = Path::new(root).join(at.trim_start_matches('/'));
            if path.join("cgroup.procs").exists() {
                return Ok(path);
            }
        }
    }
    let own = Path::new(OWN_CGROUP2);
    if !own.join("cgroup.procs").exists() {
        fs::create_dir_all(own).with_context(|| format!("creating {OWN_CGROUP2}"))?;
        crate::dataplane::bpffs::mount_fs("cgroup2", own).context(
            "no cgroup v2 hierarchy is mounted and none could be (give --socket-lb-cgroup, or --socket-lb=off)",
        )?;
    }
    Ok(own.to_path_buf())
}

/// The first cgroup2 mount point in a mounts table.
fn cgroup2_mount(mounts: &str) -> Option<String> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, at, fstype) = (f.next()?, f.next()?, f.next()?);
        // Mount points escape spaces as \040.
        (fstype == "cgroup2").then(|| at.replace("\\040", " "))
    })
}

/// This process's network namespace cookie (`SO_NETNS_COOKIE`, kernel ≥
/// 5.14): the node's, for an agent on the host network.
pub fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").context("a socket to ask with")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_NETNS_COOKIE");
    }
    Ok(cookie)
}

/// The cgroup v2 directory `path` names: itself, or on a hybrid host's
/// `/sys/fs/cgroup` (v1 controllers, v2 at `unified/`), its `unified/`.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("cgroup.procs").exists() && !path.join("tasks").exists() {
        return Ok(path.to_path_buf());
    }
    let unified = path.join("unified");
    if unified.join("cgroup.procs").exists() {
        return Ok(unified);
    }
    bail!("{} is not a cgroup v2 directory", path.display())
}

/// Loads the programs and attaches them to `cgroup`, pinning the links in
/// `bpffs` (replacing an earlier agent's). Returns how many were attached.
/// All or none: a failure detaches what was attached, so a socket is never
/// translated at `connect()` without `getpeername()` showing it back.
pub fn attach(ebpf: &mut aya::Ebpf, cgroup: &Path, bpffs: &Path) -> Result<usize> {
    let cg = fs::File::open(cgroup)
        .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    let removed = unpin(bpffs)?;
    if removed > 0 {
        log::info!("detached {removed} socket-LB links of an earlier agent");
    }
    attach_all(ebpf, &cg, cgroup, &links_dir(bpffs)).inspect_err(|_| {
        let _ = unpin(bpffs);
    })
}

fn attach_all(ebpf: &mut aya::Ebpf, cg: &fs::File, cgroup: &Path, dir: &Path) -> Result<usize> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The same steps for both program types, which share no trait for
    // `attach`: load, attach to the cgroup, pin the link.
    macro_rules! attach_one {
        ($ty:ty, $name:expr) => {{
            let name = $name;
            let prog: &mut $ty = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel rejected {name}"))?;
            let id = prog
                .attach(cg.as_fd(), MODE)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            link.pin(dir.join(name))
                .with_context(|| format!("pinning {name}"))?;
        }};
    }
    for name in ADDR_PROGRAMS {
        attach_one!(CgroupSockAddr, name);
    }
    attach_one!(CgroupSock, prog_names::SOCK_RELEASE);
    Ok(ADDR_PROGRAMS.len() + 1)
}

/// A socket the load balancer gave a backend, of either family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbSocket {
    pub cookie: u64,
    pub proto: u8,
    /// The socket's family: `AF_INET6` for an IPv6 socket, whose service
    /// and backend may be IPv4 ones (an IPv4-mapped destination, shown
    /// here as the IPv4 address it maps).
    pub family: i32,
    /// The service address it asked for.
    pub service: SocketAddr,
    pub backend: SocketAddr,
    pub backend_id: u32,
    pub svc_id: u32,
    /// `SOCK_F_*`.
    pub flags: u8,
}

impl LbSocket {
    fn of<A: WireAddr>(cookie: u64, proto: u8, v: &SockValue<A>) -> Self {
        let at = |a: A, p: u16| SocketAddr::new(a.to_ip().to_canonical(), wire::to_port(p));
        let family = match A::ZERO.to_ip() {
            std::net::IpAddr::V4(_) => libc::AF_INET,
            std::net::IpAddr::V6(_) => libc::AF_INET6,
        };
        Self {
            cookie,
            proto,
            family,
            service: at(v.svc_addr, v.svc_port),
            backend: at(v.backend_addr, v.backend_port),
            backend_id: v.backend_id,
            svc_id: v.svc_id,
            flags: v.flags,
        }
    }

    /// Connected by `connect()`, not steered per `sendmsg()`.
    pub fn connected(&self) -> bool {
        self.flags & SOCK_F_CONNECTED != 0
    }

    /// In its backend's active connections.
    pub fn counted(&self) -> bool {
        self.flags & SOCK_F_COUNTED != 0
    }
}

/// The UDP sockets of both families the load balancer gave a backend
/// (`SOCKS_UDP`, `SOCKS_UDP6`).
fn udp_sockets(maps: &MapSet) -> Result<Vec<LbSocket>> {
    let v4 = read_hash(&maps.socks_udp)?;
    let v6 = read_hash(&maps.v6.socks_udp)?;
    let v4 = v4.iter().map(|(c, v)| LbSocket::of(*c, IPPROTO_UDP, v));
    let v6 = v6.iter().map(|(c, v)| LbSocket::of(*c, IPPROTO_UDP, v));
    Ok(v4.chain(v6).collect())
}

/// Closes the connected UDP sockets the load balancer gave a backend that
/// has left the service (`stale`, from the sync that removed it), in
/// whichever network namespace they are: the reference flushes such flows'
/// conntrack entries so the client's next datagram is balanced anew; a
/// connected socket has no next balancing without this. The application
/// sees ECONNABORTED and opens a new socket. TCP sockets stay, as
/// kube-proxy keeps established connections to a removed backend.
/// Unconnected UDP sockets need nothing: their next `sendmsg()` moves.
/// Returns how many were closed.
pub fn destroy_stale(maps: &MapSet, stale: &HashSet<ServiceBackend>) -> Result<u64> {
    if stale.is_empty() {
        return Ok(0);
    }
    let udp = udp_sockets(maps)?;
    let mut closed = 0;
    for family in [libc::AF_INET, libc::AF_INET6] {
        let cookies: HashSet<u64> = udp
            .iter()
            .filter(|s| {
                s.family == family
                    && s.connected()
                    && stale.contains(&(s.svc_id, s.backend.ip(), s.backend.port()))
            })
            .map(|s| s.cookie)
            .collect();
        if cookies.is_empty() {
            continue;
        }
        let pick = |s: &DiagSocket<SockValue>| cookies.contains(&s.cookie);
        let (_, n) = sockdiag::walk(&Query {
            family: family as u8,
            map: None,
            protos: &[IPPROTO_UDP],
            keep: &pick,
            destroy: &pick,
        })
        .context("closing sockets (sock_diag SOCK_DESTROY)")?;
        closed += n;
    }
    Ok(closed)
}

/// Every socket the load balancer gave a backend, in every network
/// namespace of the host, of both families. TCP ones are in
/// `SOCKS_TCP`/`SOCKS_TCP6`, or (connected while those were full, or by an
/// older kpx) carry their socket storage in the kernel's dump; UDP ones
/// are in `SOCKS_UDP`/`SOCKS_UDP6`.
pub fn sockets(maps: &MapSet, bpffs: &Path) -> Result<Vec<LbSocket>> {
    let v4 = read_hash(&maps.socks_tcp)?;
    let v6 = read_hash(&maps.v6.socks_tcp)?;
    let mut all: Vec<LbSocket> = v4
        .iter()
        .map(|(c, v)| LbSocket::of(*c, IPPROTO_TCP, v))
        .chain(v6.iter().map(|(c, v)| LbSocket::of(*c, IPPROTO_TCP, v)))
        .collect();
    all.extend(stored_tcp_sockets::<u32>(
        bpffs,
        map_names::SOCKS,
        libc::AF_INET,
    )?);
    all.extend(stored_tcp_sockets::<In6>(
        bpffs,
        map_names::SOCKS6,
        libc::AF_INET6,
    )?);
    all.extend(udp_sockets(maps)?);
    Ok(all)
}

/// Removes the entries of `SOCKS_TCP`/`SOCKS_TCP6` whose socket is gone:
/// its release ran while no program was attached (an agent's restart), or
/// passed it by (its backend's port no longer a backend's, a socket that
/// connected elsewhere after a failed attempt). The tables' cookies are
/// read before the kernel's socket dump, so a socket that connects meanwhile
/// is not taken for dead (a cookie is never reused). Returns how many were
/// removed.
pub fn sweep_tcp(maps: &mut MapSet) -> Result<u64> {
    let v4: Vec<u64> = read_hash(&maps.socks_tcp)?
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    let v6: Vec<u64> = read_hash(&maps.v6.socks_tcp)?
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    if v4.is_empty() && v6.is_empty() {
        return Ok(0);
    }
    let mut live = HashSet::new();
    for (family, empty) in [
        (libc::AF_INET, v4.is_empty()),
        (libc::AF_INET6, v6.is_empty()),
    ] {
        if empty {
            continue;
        }
        let (found, _) = sockdiag::walk::<SockValue>(&Query {
            family: family as u8,
            map: None,
            protos: &[IPPROTO_TCP],
            keep: &|_| true,
            destroy: &|_| false,
        })
        .context("listing TCP sockets (sock_diag)")?;
        live.extend(found.into_iter().map(|s| s.cookie));
    }
    let mut removed = 0;
    for c in v4.into_iter().filter(|c| !live.contains(c)) {
        // Gone meanwhile (its release ran): nothing to do.
        if maps.socks_tcp.remove(&c).is_ok() {
            removed += 1;
        }
    }
    for c in v6.into_iter().filter(|c| !live.contains(c)) {
        if maps.v6.socks_tcp.remove(&c).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// The TCP sockets of `family` with an entry in the socket storage map
/// `name`.
fn stored_tcp_sockets<A: WireAddr + Send>(
    bpffs: &Path,
    name: &str,
    family: i32,
) -> Result<Vec<LbSocket>>
where
    SockValue<A>: aya::Pod,
{
    let path = bpffs.join(name);
    let map = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let stored = |s: &DiagSocket<SockValue<A>>| s.value.is_some();
    let (tcp, _) = sockdiag::walk(&Query {
        family: family as u8,
        map: Some(map.fd().as_fd()),
        protos: &[IPPROTO_TCP],
        keep: &stored,
        destroy: &|_| false,
    })
    .context("listing sockets (sock_diag)")?;
    Ok(tcp
        .into_iter()
        .filter_map(|s| Some(LbSocket::of(s.cookie, s.proto, &s.value?)))
        .collect())
}

/// Detaches and unpins every socket-LB link under `bpffs`. Returns how
/// many there were.
pub fn unpin(bpffs: &Path) -> Result<usize> {
    crate::dataplane::attach::unpin_dir(&links_dir(bpffs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(hybrid).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(cgroup2_mount(unified).as_deref(), Some("/sys/fs/cgroup"));
        assert_eq!(
            cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
        let spaced = "cgroup2 /run/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(spaced).as_deref(), Some("/run/my cg"));
    }

    #[test]
    fn a_hybrid_hosts_cgroup_root_resolves_to_its_unified_hierarchy() {
        let dir = std::env::temp_dir().join(format!("kpx-cg-{}", std::process::id()));
        let v2 = dir.join("v2");
        let hybrid = dir.join("hybrid");
        for d in [&v2, &hybrid.join("unified"), &hybrid.join("cpu")] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(v2.join("cgroup.procs"), "").unwrap();
        fs::write(hybrid.join("unified/cgroup.procs"), "").unwrap();
        assert_eq!(resolve(&v2).unwrap(), v2);
        assert_eq!(resolve(&hybrid).unwrap(), hybrid.join("unified"));
        assert!(resolve(&hybrid.join("cpu")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modes_parse_and_print() {
        for m in ["all", "host-only", "off"] {
            assert_eq!(m.parse::<Mode>().unwrap().to_string(), m);
        }
        assert!("on".parse::<Mode>().is_err());
    }
}
