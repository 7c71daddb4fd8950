//! Socket-level load balancing: a `connect()` or unconnected UDP
//! `sendmsg()` to a service is sent straight to the backend the tc path
//! would have picked ([`service`], [`policy`], [`select`]: the same
//! functions), so every packet after it is plain pod-to-pod traffic that
//! the tc programs pass on their filters' word (the backend's packets on
//! the reply filter's: no flow's reply), with no conntrack lookup.
//! `recvmsg()` and `getpeername()`
//! show the service address back, as kube-proxy's conntrack does: from
//! the socket's entry, a TCP socket's in `SOCKS_TCP` (by cookie), a UDP
//! socket's in its socket storage.
//!
//! One set of functions for both families ([`SockFamily`]): `connect4`
//! and its kin serve `AF_INET` sockets with IPv4's maps, `connect6` and
//! its kin `AF_INET6` sockets with IPv6's. An `AF_INET6` socket's
//! IPv4-mapped destination (`::ffff:a.b.c.d`, a dual-stack socket
//! reaching an IPv4 service: Java's default) is looked up, selected and
//! decided in IPv4's maps ([`Lookup`]) and kept, mapped, in the socket's
//! IPv6 storage, so `getpeername6` / `recvmsg6` show it back as such. (The
//! kernel hands such a socket's unconnected datagrams to IPv4's `sendmsg`
//! hook: `sendmsg4` keeps those in IPv4's storage, where `recvmsg6` looks
//! for a mapped answer IPv6's storage does not know.)
//!
//! What a socket cannot do is left to tc, which then sees the service
//! address on the wire and translates per packet, as before: flows the
//! reference masquerades (a pod's flow to a cluster IP with
//! `--masquerade-all`, to an external address with the Cluster policy),
//! drops (source ranges, no local endpoint), and pods' flows under
//! `--socket-lb=host-only`. A flow is translated once, by one of the two.
//!
//! Map lookups per call (O(1), no loop):
//! - `connect()` / `sendmsg()` not to a service: `PORTS` (an array the
//!   verifier inlines), + `SERVICES` on a port some frontend uses;
//! - to a service: + `CONFIG`, `SLOTS` (as a first packet's
//!   selection, affinity and scheduler included), and the socket's entry:
//!   TCP, 1 `SOCKS_TCP` insert by socket cookie (+1 lookup for a socket
//!   connected again; its socket storage instead when the table is full);
//!   UDP, its own storage (`SOCKS`, socket local storage); a UDP socket
//!   that already has a backend for the service: its storage and `SLOTS`
//!   (is the backend still there?) instead of the selection; without
//!   endpoints: refused, no more;
//! - an unconnected UDP `sendmsg()` to another service than the socket's
//!   last: + 1 `SOCK_PEERS` lookup and 2 updates (the last one kept);
//! - `recvmsg()` / `getpeername()`: a TCP socket's 1 `SOCKS_TCP` lookup,
//!   then (not found) the socket's storage (a pointer test for a socket
//!   without one); + 1 `SOCK_PEERS` lookup for an unconnected UDP socket's
//!   datagram from another address than its last backend;
//! - `recvmsg6` of an IPv4-mapped address IPv6's storage does not know:
//!   + IPv4's storage;
//! - a socket's release: its storage (+ a `CONNS` atomic add for a counted
//!   socket, and a `SOCKS_UDP` delete for a UDP one); an `AF_INET6`
//!   socket's: both storages; a TCP socket connected to a backend's port
//!   (the port filter, an inlined array read) or to none: + 1 `SOCKS_TCP`
//!   lookup and, found, its delete;
//! - a UDP socket's entry written: + a `SOCKS_UDP` insert (the agent finds
//!   connected ones there when their backend leaves).

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY, BPF_NOEXIST},
    btf_maps::SkStorage,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval, bpf_sk_storage_get},
    maps::{HashMap, LruHashMap},
    programs::{SockAddrContext, SockContext},
    EbpfContext as _,
};
use proxy_common::{
    CtKey, Event, In6, ServiceValue, SockPeerKey, SockValue, CFG_F_SOCK_HOST_ONLY, IPPROTO_TCP,
    IPPROTO_UDP, SOCK_F_CONNECTED, SOCK_F_COUNTED, SVC_F_SOURCE_RANGES,
};

use crate::{
    conns,
    family::Family,
    maps::{SOCKS, SOCKS6, SOCKS_TCP, SOCKS_TCP6, SOCKS_UDP, SOCKS_UDP6, SOCK_PEERS, SOCK_PEERS6},
    policy::{self, Origin},
    select, service, stats,
};

/// What the socket hooks of a family use: its sockets' maps and the
/// call's address field.
pub trait SockFamily: Family {
    fn socks() -> &'static SkStorage<SockValue<Self>>;
    fn socks_tcp() -> &'static HashMap<u64, SockValue<Self>>;
    fn socks_udp() -> &'static LruHashMap<u64, SockValue<Self>>;
    fn peers() -> &'static LruHashMap<SockPeerKey<Self>, SockValue<Self>>;
    /// The call's address (`user_ip4`, `user_ip6`), as on the wire.
    fn user_addr(sa: *mut bpf_sock_addr) -> Self;
    fn set_user_addr(sa: *mut bpf_sock_addr, a: Self);
}

/// The family a call's destination is looked up in (`Self`), for a socket
/// of family `W`: its own, or IPv4 for an `AF_INET6` socket's IPv4-mapped
/// address.
pub trait Lookup<W>: Family {
    /// This address as the socket has it.
    fn wire(self) -> W;
    /// The socket's address `w` in this family (the caller chose this
    /// family for it).
    fn of_wire(w: W) -> Self;
    /// An address standing for the client `w` in a flow hash.
    fn of_word(w: u32) -> Self;
}

impl Lookup<u32> for u32 {
    #[inline(always)]
    fn wire(self) -> u32 {
        self
    }
    #[inline(always)]
    fn of_wire(w: u32) -> Self {
        w
    }
    #[inline(always)]
    fn of_word(w: u32) -> Self {
        w
    }
}

impl Lookup<In6> for In6 {
    #[inline(always)]
    fn wire(self) -> In6 {
        self
    }
    #[inline(always)]
    fn of_wire(w: In6) -> Self {
        w
    }
    #[inline(always)]
    fn of_word(w: u32) -> Self {
        [0, 0, 0, w]
    }
}

/// `::ffff:0:0/96`'s third word, as on the wire.
const V4_MAPPED: u32 = 0xffffu32.to_be();

impl Lookup<In6> for u32 {
    #[inline(always)]
    fn wire(self) -> In6 {
        [0, 0, V4_MAPPED, self]
    }
    #[inline(always)]
    fn of_wire(w: In6) -> Self {
        w[3]
    }
    #[inline(always)]
    fn of_word(w: u32) -> Self {
        w
    }
}

/// Whether `a` is an IPv4-mapped IPv6 address.
#[inline(always)]
fn v4_mapped(a: In6) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED
}

impl SockFamily for u32 {
    #[inline(always)]
    fn socks() -> &'static SkStorage<SockValue<Self>> {
        &SOCKS
    }
    #[inline(always)]
    fn socks_tcp() -> &'static HashMap<u64, SockValue<Self>> {
        &SOCKS_TCP
    }
    #[inline(always)]
    fn socks_udp() -> &'static LruHashMap<u64, SockValue<Self>> {
        &SOCKS_UDP
    }
    #[inline(always)]
    fn peers() -> &'static LruHashMap<SockPeerKey<Self>, SockValue<Self>> {
        &SOCK_PEERS
    }
    #[inline(always)]
    fn user_addr(sa: *mut bpf_sock_addr) -> Self {
        // SAFETY: a field projection of the program's context.
        read(unsafe { &raw mut (*sa).user_ip4 })
    }
    #[inline(always)]
    fn set_user_addr(sa: *mut bpf_sock_addr, a: Self) {
        // SAFETY: as above.
        write(unsafe { &raw mut (*sa).user_ip4 }, a);
    }
}

impl SockFamily for In6 {
    #[inline(always)]
    fn socks() -> &'static SkStorage<SockValue<Self>> {
        &SOCKS6
    }
    #[inline(always)]
    fn socks_tcp() -> &'static HashMap<u64, SockValue<Self>> {
        &SOCKS_TCP6
    }
    #[inline(always)]
    fn socks_udp() -> &'static LruHashMap<u64, SockValue<Self>> {
        &SOCKS_UDP6
    }
    #[inline(always)]
    fn peers() -> &'static LruHashMap<SockPeerKey<Self>, SockValue<Self>> {
        &SOCK_PEERS6
    }
    #[inline(always)]
    fn user_addr(sa: *mut bpf_sock_addr) -> Self {
        // SAFETY: field projections of the program's context; each word
        // is one 4-byte access, as the verifier requires of `user_ip6`.
        let w = unsafe { &raw mut (*sa).user_ip6 }.cast::<u32>();
        // SAFETY: the words of `user_ip6`.
        unsafe { [read(w), read(w.add(1)), read(w.add(2)), read(w.add(3))] }
    }
    #[inline(always)]
    fn set_user_addr(sa: *mut bpf_sock_addr, a: Self) {
        // SAFETY: as above.
        let w = unsafe { &raw mut (*sa).user_ip6 }.cast::<u32>();
        for (i, v) in a.into_iter().enumerate() {
            // SAFETY: the words of `user_ip6`.
            write(unsafe { w.add(i) }, v);
        }
    }
}

/// The call goes on (with the address as the program left it).
const PROCEED: i32 = 1;
/// The call fails with the errno given to `bpf_set_retval`.
const FAIL: i32 = 0;
const ECONNREFUSED: i32 = 111;
const AF_INET6: u32 = 10;

/// `connect4`: [`connect`] in IPv4's maps.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    connect::<u32, u32>(ctx)
}

/// `connect6`: [`connect`] in IPv6's maps, or IPv4's for an IPv4-mapped
/// destination.
#[inline(always)]
pub fn connect6(ctx: &SockAddrContext) -> i32 {
    if v4_mapped(In6::user_addr(ctx.sock_addr)) {
        connect::<In6, u32>(ctx)
    } else {
        connect::<In6, In6>(ctx)
    }
}

/// `sendmsg4`: [`sendmsg`] in IPv4's maps.
#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    sendmsg::<u32, u32>(ctx)
}

/// `sendmsg6`: [`sendmsg`] in IPv6's maps. (The kernel never runs it for
/// an IPv4-mapped destination: it sends such a datagram through IPv4's
/// `sendmsg`, and `sendmsg4` balances it.)
#[inline(always)]
pub fn sendmsg6(ctx: &SockAddrContext) -> i32 {
    sendmsg::<In6, In6>(ctx)
}

/// A `connect()` (TCP or UDP) of a socket of family `A`, its destination
/// looked up in `L`'s maps: to a service, connected to a backend.
#[inline(always)]
fn connect<A: SockFamily, L: Lookup<A>>(ctx: &SockAddrContext) -> i32 {
    let Some(req) = Request::<A, L>::of(ctx) else {
        // A UDP socket connected elsewhere now: what it had is no longer
        // its peer (a pointer test for every other socket).
        if let Some(old) = storage::<A>(ctx, false) {
            forget(ctx, old);
        }
        return PROCEED;
    };
    match req.backend(ctx, None) {
        Ok(sel) => {
            if req.proto != IPPROTO_TCP || !connect_tcp(ctx, &req, &sel) {
                let entry = storage::<A>(ctx, true);
                // A socket connected again (UDP may) leaves its earlier
                // backend.
                if let Some(old) = entry {
                    forget(ctx, old);
                }
                // Counted only where the socket has storage to take it back
                // at its release (an allocation failure leaves it uncounted).
                let counted = sel.counted && req.proto == IPPROTO_TCP && entry.is_some();
                if counted {
                    conns::opened(sel.backend_id);
                }
                if let Some(e) = entry {
                    req.remember(
                        ctx,
                        e,
                        &sel,
                        SOCK_F_CONNECTED | if counted { SOCK_F_COUNTED } else { 0 },
                    );
                }
            }
            req.send_to(ctx, &sel);
            stats::event(Event::SockConnect, 1);
            stats::socket_flow(req.svc.svc_id);
            PROCEED
        }
        Err(v) => v,
    }
}

/// A TCP socket connected to `sel`'s backend: its entry in `SOCKS_TCP`
/// (one insert; a socket connected again after a failed attempt replaces
/// its entry, leaving its earlier backend). False when the table has no
/// room: the caller keeps the entry in the socket's storage instead.
#[inline(always)]
fn connect_tcp<A: SockFamily, L: Lookup<A>>(
    ctx: &SockAddrContext,
    req: &Request<A, L>,
    sel: &select::Selected<L>,
) -> bool {
    let flags = SOCK_F_CONNECTED | if sel.counted { SOCK_F_COUNTED } else { 0 };
    let v = req.value(sel, flags);
    let cookie = cookie(ctx);
    let table = A::socks_tcp();
    if table.insert(cookie, v, BPF_NOEXIST as u64).is_err() {
        let Some(old) = table.get_ptr_mut(cookie) else {
            return false;
        };
        // SAFETY: this socket's entry, valid for the program run; only
        // this socket's own calls (serialized by its lock) write it.
        unsafe {
            leave(&*old, || cookie);
            *old = v;
        }
    }
    if sel.counted {
        conns::opened(sel.backend_id);
    }
    true
}

/// An unconnected UDP `sendmsg()` (as [`connect`]: socket family `A`,
/// lookups in `L`): to a service, sent to the socket's backend for it
/// while that backend serves, else to a new one.
#[inline(always)]
fn sendmsg<A: SockFamily, L: Lookup<A>>(ctx: &SockAddrContext) -> i32 {
    let Some(req) = Request::<A, L>::of(ctx) else {
        return PROCEED;
    };
    if req.proto != IPPROTO_UDP {
        return PROCEED;
    }
    let stored = storage::<A>(ctx, false).map(|v| {
        // SAFETY: this socket's storage, copied out.
        unsafe { *v }
    });
    let current = stored.filter(|v| v.svc_addr == req.addr && v.svc_port == req.port);
    // The socket's storage holds the service it last sent to; a switch to
    // another keeps that one in `SOCK_PEERS` (its backend for its next
    // datagram, its service for its backend's answers) and takes up the
    // new one's from there: one LRU lookup and two updates per switch,
    // none for a socket that keeps to one service.
    let known = match stored {
        Some(old) if current.is_none() && old.svc_port != 0 => {
            let cookie = cookie(ctx);
            keep_peer(cookie, &old);
            peer(cookie, req.addr, req.port, req.proto)
        }
        _ => current,
    };
    match req.backend(ctx, known.as_ref()) {
        Ok(sel) => {
            let moved = known.is_some_and(|k| k.backend_id != sel.backend_id || k.slot != sel.slot);
            if current.is_none() || moved {
                if let Some(e) = storage::<A>(ctx, true) {
                    req.remember(ctx, e, &sel, 0);
                }
            }
            if known.is_none() || moved {
                stats::socket_flow(req.svc.svc_id);
            }
            if moved {
                stats::event(Event::SockRebalanced, 1);
            }
            req.send_to(ctx, &sel);
            stats::event(Event::SockSendmsg, 1);
            PROCEED
        }
        Err(v) => v,
    }
}

/// `recvmsg4` / `getpeername4`: [`reverse`] of IPv4's storage.
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext) -> i32 {
    reverse::<u32, u32>(ctx);
    PROCEED
}

/// `recvmsg6` / `getpeername6`: [`reverse`] of IPv6's storage; for an
/// IPv4-mapped address, of IPv4's storage too: the kernel sends an
/// `AF_INET6` socket's unconnected datagrams to such an address through
/// IPv4's `sendmsg` (`sendmsg4` kept the service there), while its answers
/// come through `recvmsg6`. (One storage lookup more, only for an
/// IPv4-mapped address the IPv6 storage did not know.)
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) -> i32 {
    if !reverse::<In6, In6>(ctx) && v4_mapped(In6::user_addr(ctx.sock_addr)) {
        reverse::<In6, u32>(ctx);
    }
    PROCEED
}

/// `recvmsg()` (UDP) and `getpeername()` of a socket of family `A`: a
/// backend's address shown as the service's the socket asked for, from the
/// socket's entry in `S`'s maps ([`entry`]). Whether it was.
#[inline(always)]
fn reverse<A: SockFamily, S: SockFamily + Lookup<A>>(ctx: &SockAddrContext) -> bool {
    let Some(v) = entry::<S>(ctx) else {
        return false;
    };
    let sa = ctx.sock_addr;
    let (addr, port) = (S::of_wire(A::user_addr(sa)), read(port_field(sa)) as u16);
    let v = if addr == v.backend_addr && port == v.backend_port {
        v
    } else if v.proto == IPPROTO_UDP && v.flags & SOCK_F_CONNECTED == 0 {
        // An answer from the backend of another service this socket sent
        // to (one LRU lookup, only for a datagram from elsewhere).
        match peer(cookie(ctx), addr, port, v.proto) {
            Some(p) if p.backend_addr == addr && p.backend_port == port => p,
            _ => return false,
        }
    } else {
        return false;
    };
    A::set_user_addr(sa, v.svc_addr.wire());
    write(port_field(sa), v.svc_port as u32);
    stats::event(Event::SockRevNat, 1);
    true
}

/// This socket's entry in `S`'s maps, copied out: a TCP socket's in
/// `SOCKS_TCP` (one lookup), else (UDP, or a TCP socket connected while
/// that table was full or by an older kpx) in its storage.
#[inline(always)]
fn entry<S: SockFamily>(ctx: &SockAddrContext) -> Option<SockValue<S>> {
    // SAFETY: a field projection of the program's context.
    let proto = read(unsafe { &raw mut (*ctx.sock_addr).protocol }) as u8;
    if proto == IPPROTO_TCP {
        if let Some(v) = S::socks_tcp().get_ptr(cookie(ctx)) {
            // SAFETY: a map value pointer, copied out at once.
            return Some(unsafe { *v });
        }
    }
    // SAFETY: this socket's storage, copied out.
    storage::<S>(ctx, false).map(|v| unsafe { *v })
}

/// The socket's cookie.
#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the program's context, which the helper accepts.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// What `SOCK_PEERS` holds for the socket `cookie` and `addr:port`: the
/// entry of the service at that address, or of the service whose backend
/// it is.
#[inline(always)]
fn peer<A: SockFamily>(cookie: u64, addr: A, port: u16, proto: u8) -> Option<SockValue<A>> {
    let key = SockPeerKey::new(cookie, addr, port, proto);
    // SAFETY: a map value pointer, copied out at once.
    A::peers().get_ptr(key).map(|v| unsafe { *v })
}

/// Keeps `v`, a service the socket `cookie` sent to, in `SOCK_PEERS` under
/// both its addresses. An LRU update fails only on allocation failure:
/// the socket then balances that service afresh when it comes back to it.
#[inline(always)]
fn keep_peer<A: SockFamily>(cookie: u64, v: &SockValue<A>) {
    for (addr, port) in [(v.svc_addr, v.svc_port), (v.backend_addr, v.backend_port)] {
        let key = SockPeerKey::new(cookie, addr, port, v.proto);
        let _ = A::peers().insert(key, v, BPF_ANY as u64);
    }
}

/// A socket that no longer talks to the backend `entry` names: it leaves
/// that backend, and the entry is cleared.
#[inline(always)]
fn forget<A: SockFamily>(ctx: &SockAddrContext, entry: *mut SockValue<A>) {
    // SAFETY: this socket's storage, valid for the program run.
    leave(unsafe { &*entry }, || {
        // SAFETY: the program's context, which the helper accepts.
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
    });
    // SAFETY: as above.
    unsafe { *entry = SockValue::default() };
}

/// The socket whose entry is `v` leaves its backend: off the backend's
/// active connections if it counted there, out of `SOCKS_UDP` if UDP (its
/// cookie asked only then).
#[inline(always)]
fn leave<A: SockFamily>(v: &SockValue<A>, cookie: impl FnOnce() -> u64) {
    if v.flags & SOCK_F_COUNTED != 0 {
        conns::closed(v.backend_id);
    }
    if v.proto == IPPROTO_UDP {
        let _ = A::socks_udp().remove(cookie());
    }
}

/// A socket's release: a counted socket leaves its backend's active
/// connections. Its storage goes with the socket. The socket's family
/// (one context load) says which storage maps it can have an entry in:
/// an `AF_INET` socket IPv4's; an `AF_INET6` socket IPv6's, and IPv4's
/// too (its datagrams to IPv4-mapped addresses went through `sendmsg4`).
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    // SAFETY: readable fields of the program's socket.
    let (family, proto, port) = unsafe {
        let sk = ctx.sock;
        (
            core::ptr::read_volatile(&raw const (*sk).family),
            core::ptr::read_volatile(&raw const (*sk).protocol),
            core::ptr::read_volatile(&raw const (*sk).dst_port),
        )
    };
    // A TCP socket the balancer connected is connected to a backend's port
    // (or, its connect having failed, to none): only such a socket's
    // cookie is looked up (the port filter, an inlined array read, spares
    // every other one). One whose backend's port lost its bit, or that
    // connected elsewhere after a failed attempt, is left to the agent's
    // sweep.
    if proto == IPPROTO_TCP as u32 && (port == 0 || service::is_backend_port(port)) {
        if family == AF_INET6 {
            release_tcp::<In6>(ctx);
        } else {
            release_tcp::<u32>(ctx);
        }
    }
    if family == AF_INET6 {
        release_from::<In6>(ctx);
    }
    release_from::<u32>(ctx);
    PROCEED
}

/// A TCP socket's release: out of `SOCKS_TCP` (and off its backend's
/// active connections if it counted there).
#[inline(always)]
fn release_tcp<A: SockFamily>(ctx: &SockContext) {
    // SAFETY: the program's context, a socket the helper accepts.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let table = A::socks_tcp();
    if let Some(v) = table.get_ptr(cookie) {
        // SAFETY: a map value pointer, valid for the program run.
        leave(unsafe { &*v }, || cookie);
        let _ = table.remove(cookie);
    }
}

#[inline(always)]
fn release_from<A: SockFamily>(ctx: &SockContext) {
    // SAFETY: the map is a socket storage map and `ctx.sock` the socket
    // the program runs for, both as the helper requires; no value is
    // created.
    let v = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(A::socks()).cast_mut().cast(),
            ctx.sock.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockValue<A>>();
    if !v.is_null() {
        // SAFETY: the socket's storage, valid for the program run.
        leave(unsafe { &*v }, || {
            // SAFETY: the program's context, a socket the helper accepts.
            unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
        });
    }
}

/// This socket's entry, created (zeroed) when `create` and absent; None
/// when absent (or the allocation failed).
#[inline(always)]
fn storage<A: SockFamily>(ctx: &SockAddrContext, create: bool) -> Option<*mut SockValue<A>> {
    // SAFETY: the program's own context, whose socket the helper takes.
    let p = unsafe {
        if create {
            A::socks().get_or_insert_ptr_mut(ctx, None)
        } else {
            A::socks().get_ptr_mut(ctx)
        }
    };
    (!p.is_null()).then_some(p)
}

/// A `connect()` / `sendmsg()` to a service frontend: `addr` as the
/// socket of family `A` has it, looked up in `L`'s maps.
struct Request<A, L> {
    addr: A,
    port: u16,
    proto: u8,
    svc: ServiceValue,
    _lookup: core::marker::PhantomData<L>,
}

impl<A: SockFamily, L: Lookup<A>> Request<A, L> {
    /// The call's destination, if it is a service frontend (TCP or UDP).
    #[inline(always)]
    fn of(ctx: &SockAddrContext) -> Option<Self> {
        let sa = ctx.sock_addr;
        // SAFETY: a field projection of the program's context.
        let proto = read(unsafe { &raw mut (*sa).protocol }) as u8;
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return None;
        }
        let port = read(port_field(sa)) as u16;
        let addr = A::user_addr(sa);
        let svc = *service::lookup_dst(L::of_wire(addr), port, proto)?;
        Some(Self {
            addr,
            port,
            proto,
            svc,
            _lookup: core::marker::PhantomData,
        })
    }

    /// The backend for this call: `known`'s while its slot still holds it,
    /// else the selection's. `Err` is the program's return: the call left
    /// to tc, or refused.
    #[inline(always)]
    fn backend(
        &self,
        ctx: &SockAddrContext,
        known: Option<&SockValue<A>>,
    ) -> Result<select::Selected<L>, i32> {
        let cfg = service::config();
        // SAFETY: the program's context, which the helper accepts.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        let node = netns == cfg.host_netns_cookie();
        if !node && cfg.flags() & CFG_F_SOCK_HOST_ONLY != 0 {
            return Err(PROCEED);
        }
        let svc = &self.svc;
        if svc.count == 0 {
            // The reference's REJECT, before any packet leaves.
            // SAFETY: helper taking a value.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            stats::event(Event::SockRefused, 1);
            return Err(FAIL);
        }
        // The client's address is not known yet: a pod's is in the cluster
        // CIDR (kube-proxy's local-traffic detector), the node's is not.
        // Source ranges need the real one: tc decides those.
        let net = L::net(&cfg);
        let (origin, src) = if node {
            (Origin::Node, L::ZERO)
        } else {
            (Origin::Network, net.cluster_addr())
        };
        let choice = match policy::decide(svc, src, origin, &cfg, &net) {
            // The node's own flows keep a node address as source without
            // masquerade: the kernel picks it for the backend's route.
            Ok(c) if (node || !c.masquerade) && svc.flags & SVC_F_SOURCE_RANGES == 0 => c,
            _ => return Err(to_tc()),
        };
        let table = select::Table::of(svc, choice.local);
        if let Some(k) = known {
            if table.contains(k.slot)
                && matches!(select::slot::<L>(svc.svc_id, k.slot), Ok(s) if s.backend_id == k.backend_id)
            {
                return Ok(select::Selected {
                    backend_id: k.backend_id,
                    backend: proxy_common::Backend {
                        addr: L::of_wire(k.backend_addr),
                        port: k.backend_port,
                        ..Default::default()
                    },
                    counted: false,
                    slot: k.slot,
                });
            }
        }
        // The hashing schedulers hash the client: its namespace here.
        let flow = CtKey {
            src_addr: L::of_word((netns ^ (netns >> 32)) as u32),
            dst_addr: L::of_wire(self.addr),
            src_port: 0,
            dst_port: self.port,
            proto: self.proto,
            ..Default::default()
        };
        select::backend(svc, table, &flow, netns).map_err(|_| to_tc())
    }

    #[inline(always)]
    fn remember(
        &self,
        ctx: &SockAddrContext,
        entry: *mut SockValue<A>,
        sel: &select::Selected<L>,
        flags: u8,
    ) {
        let v = self.value(sel, flags);
        // SAFETY: this socket's storage, valid for the program run.
        unsafe { *entry = v };
        if self.proto == IPPROTO_UDP {
            // An LRU insert fails only on allocation failure: the socket
            // works, the agent just cannot find it to close it.
            // SAFETY: the program's context, which the helper accepts.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = A::socks_udp().insert(cookie, v, BPF_ANY as u64);
        }
    }

    /// The socket's entry for this call and `sel`'s backend.
    #[inline(always)]
    fn value(&self, sel: &select::Selected<L>, flags: u8) -> SockValue<A> {
        SockValue {
            svc_addr: self.addr,
            svc_port: self.port,
            proto: self.proto,
            flags,
            backend_addr: sel.backend.addr.wire(),
            backend_port: sel.backend.port,
            backend_id: sel.backend_id,
            svc_id: self.svc.svc_id,
            slot: sel.slot,
            ..Default::default()
        }
    }

    #[inline(always)]
    fn send_to(&self, ctx: &SockAddrContext, sel: &select::Selected<L>) {
        A::set_user_addr(ctx.sock_addr, sel.backend.addr.wire());
        write(port_field(ctx.sock_addr), sel.backend.port as u32);
    }
}

#[inline(always)]
fn to_tc() -> i32 {
    stats::event(Event::SockToTc, 1);
    PROCEED
}

// The `bpf_sock_addr` fields kpx reads or writes. The verifier rewrites
// each context access to the kernel's own structure, so each is one
// 4-byte load or store at the field's offset, never merged by the
// compiler (volatile).

#[inline(always)]
fn port_field(sa: *mut bpf_sock_addr) -> *mut u32 {
    // SAFETY: a field projection of the context pointer, no access.
    unsafe { &raw mut (*sa).user_port }
}

#[inline(always)]
fn read(field: *mut u32) -> u32 {
    // SAFETY: a readable 4-byte field of the program's context.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn write(field: *mut u32, v: u32) {
    // SAFETY: `user_ip4`, `user_ip6` and `user_port` are writable in the
    // hooks that call this (connect, sendmsg, recvmsg, getpeername).
    unsafe { core::ptr::write_volatile(field, v) }
}
