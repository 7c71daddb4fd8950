//! Handover between kube-proxy and kpx without breaking a connection, both
//! ways. Taking over: the service flows kube-proxy's DNAT established
//! (netfilter's conntrack entries) are carried into kpx's conntrack at
//! start, each on the backend netfilter chose. Handing back (`kpx cleanup`):
//! kpx's flows become netfilter conntrack entries with the same NAT, so they
//! survive kpx's programs going away.
//!
//! Without this, the first packet of such a flow that meets kpx's tc program
//! is mid-stream TCP to a service kpx does not track: dropped as invalid, as
//! the reference drops it, and the connection is gone. With it, kpx
//! translates the flow exactly as netfilter did (DNAT, and the masquerade
//! where netfilter also rewrote the source), so its packets never need
//! netfilter again, and removing kube-proxy's rules changes nothing for them.
//!
//! Both families: netfilter's IPv4 and IPv6 tables are read (and written
//! back) in turn, each flow into its family's tables.
//!
//! What cannot be carried, counted by reason: flows to a frontend kpx does
//! not serve (a Service deleted meanwhile), protocols other than TCP and UDP,
//! and flows with no room in the table.
//! Flows netfilter did not DNAT are not service flows and are left alone.
//! Handing back carries established TCP and UDP flows (half-open and
//! closing connections are left to end), with netfilter's liberal TCP
//! window tracking, as it would pick up a connection mid-stream.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use anyhow::{bail, Context as _, Result};
use netlink_packet_core::{
    DefaultNla, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLA_F_NESTED, NLM_F_ACK,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
        Protocol, Status, TCPFlags, Tuple,
    },
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use proxy_common::{
    wire, CtKey, CtValue, In6, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_CLOSING, CT_F_REWRITE_DST,
    CT_F_REWRITE_SRC, CT_F_SEEN_REPLY, CT_F_SNAT, IPPROTO_TCP, IPPROTO_UDP, NODE_F_NODEPORT,
    TCP_ACK, TCP_FIN, TCP_SYN,
};

use crate::{
    control::{cidr::Family, model::FrontendKey},
    dataplane::{
        conntrack::{monotonic_ns, read_table_of, CtFamily, Flow, FlowState},
        maps::{CtEntry, CtTable, MapSet},
        reconcile::{BackendAddr, MapState},
    },
};

/// netfilter's TCP states (`enum tcp_conntrack`) that matter here.
const TCP_CONNTRACK_ESTABLISHED: u8 = 3;
const TCP_CONNTRACK_CLOSE: u8 = 8;

/// One direction's tuple: (source, source port, destination, destination
/// port), host order; both addresses of one family.
pub type Tuple4 = (IpAddr, u16, IpAddr, u16);

/// A netfilter conntrack entry, as much of it as a takeover needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NfFlow {
    pub proto: u8,
    pub original: Tuple4,
    pub reply: Tuple4,
    pub dnat: bool,
    pub snat: bool,
    pub seen_reply: bool,
    /// netfilter's TCP state (`tcp_conntrack`), for TCP.
    pub tcp_state: Option<u8>,
}

/// What a takeover carried and what it left, by reason.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Service flows carried into kpx's conntrack.
    pub carried: u64,
    /// Service flows not carried, by reason.
    pub skipped: BTreeMap<&'static str, u64>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} service flows carried", self.carried)?;
        for (why, n) in &self.skipped {
            write!(f, ", {n} not ({why})")?;
        }
        Ok(())
    }
}

/// Reads netfilter's conntrack table (this network namespace's) and carries
/// its service flows into `maps`. Runs once the first sync has written the
/// frontends in `state`.
pub fn take_over(maps: &mut MapSet, state: &MapState) -> Result<Report> {
    let mut report = Report::default();
    let ids = backend_ids(state);
    for family in [NetfilterProtoFamily::IPv4, NetfilterProtoFamily::IPv6] {
        // One family's table unreadable (IPv6 conntrack not in this
        // kernel, say) leaves the other's takeover as it is.
        let (flows, unreadable) = match dump(family) {
            Ok(d) => d,
            Err(e) => {
                log::warn!("reading netfilter's {family:?} conntrack table: {e:#}");
                *report
                    .skipped
                    .entry("netfilter table unreadable")
                    .or_insert(0) += 1;
                continue;
            }
        };
        if unreadable > 0 {
            *report.skipped.entry("not TCP/UDP").or_insert(0) += unreadable;
        }
        for f in &flows {
            let carried = match f.original.0 {
                IpAddr::V4(_) => carry::<u32>(maps, f, state, &ids),
                IpAddr::V6(_) => carry::<In6>(maps, f, state, &ids),
            };
            match carried {
                Outcome::Carry => report.carried += 1,
                Outcome::NotAServiceFlow => {}
                Outcome::Skip(why) => *report.skipped.entry(why).or_insert(0) += 1,
            }
        }
    }
    Ok(report)
}

/// Carries one netfilter flow into family `A`'s tables: what became of it.
fn carry<A: CtFamily>(
    maps: &mut MapSet,
    f: &NfFlow,
    state: &MapState,
    ids: &HashMap<BackendAddr, u32>,
) -> Outcome {
    let (entries, outcome) = entries::<A>(f, state, ids, monotonic_ns());
    if outcome != Outcome::Carry {
        return outcome;
    }
    let mut written = true;
    for (table, k, v) in &entries {
        // A flow kpx already tracks (a restart of kpx itself) keeps its entry.
        if CtTable::ALL
            .into_iter()
            .any(|t| A::get(maps, t, k).is_some())
        {
            continue;
        }
        if let Err(e) = A::insert(maps, *table, k, v) {
            log::debug!("carrying netfilter flow {k:?}: {e}");
            written = false;
        }
    }
    if written {
        Outcome::Carry
    } else {
        Outcome::Skip("conntrack table full")
    }
}

/// What becomes of one netfilter entry.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Carry,
    NotAServiceFlow,
    Skip(&'static str),
}

/// Backend id by address, built once per takeover.
/// Keyed without the backend's locality, which netfilter's flows do not
/// tell (`local` is false in every key).
pub fn backend_ids(state: &MapState) -> HashMap<BackendAddr, u32> {
    state
        .backends
        .iter()
        .map(|(id, b)| (BackendAddr { local: false, ..*b }, *id))
        .collect()
}

/// kpx's two entries for the netfilter flow `f`, if it is a flow to one of
/// `state`'s frontends (`ids`: [`backend_ids`]), created at `now`.
pub fn entries<A: CtFamily>(
    f: &NfFlow,
    state: &MapState,
    ids: &HashMap<BackendAddr, u32>,
    now: u64,
) -> (Vec<CtEntry<A>>, Outcome) {
    if !f.dnat {
        return (Vec::new(), Outcome::NotAServiceFlow);
    }
    if f.proto != IPPROTO_TCP && f.proto != IPPROTO_UDP {
        return (Vec::new(), Outcome::Skip("not TCP/UDP"));
    }
    let (src, sport, dst, dport) = f.original;
    let Some(svc) = frontend(state, dst, dport, f.proto) else {
        return (Vec::new(), Outcome::Skip("no such frontend"));
    };
    // netfilter's reply tuple names the backend (its source) and where the
    // backend answers (the client, or the masquerade address).
    let (backend, backend_port, answer_to, answer_port) = f.reply;
    let backend_key = BackendAddr {
        addr: backend,
        port: backend_port,
        proto: f.proto,
        local: false,
    };
    let backend_id = ids.get(&backend_key).copied().unwrap_or(0);
    let (tcp_flags, closing) = match f.tcp_state {
        Some(s) if s > TCP_CONNTRACK_ESTABLISHED && s <= TCP_CONNTRACK_CLOSE => {
            (TCP_SYN | TCP_ACK | TCP_FIN, CT_F_CLOSING)
        }
        Some(_) if f.seen_reply => (TCP_SYN | TCP_ACK, 0),
        Some(_) => (TCP_SYN, 0),
        None => (0, 0),
    };
    let key = |(s, sp, d, dp): Tuple4| {
        CtKey::new(
            A::from_ip(s),
            A::from_ip(d),
            wire::port(sp),
            wire::port(dp),
            f.proto,
        )
    };
    let snat = if f.snat { CT_F_SNAT } else { 0 };
    let entry = |dir: u8, flags: u16| CtValue {
        dir,
        flags: flags | closing,
        tcp_flags,
        backend_id,
        svc_id: svc,
        created_ns: now,
        last_seen_ns: now,
        ..Default::default()
    };
    let mut original = entry(CT_DIR_ORIGINAL, CT_F_REWRITE_DST | snat);
    original.new_dst_addr = A::from_ip(backend);
    original.new_dst_port = wire::port(backend_port);
    let mut reply = entry(
        CT_DIR_REPLY,
        CT_F_REWRITE_SRC | if f.seen_reply { CT_F_SEEN_REPLY } else { 0 },
    );
    reply.new_src_addr = A::from_ip(dst);
    reply.new_src_port = wire::port(dport);
    if f.snat {
        original.flags |= CT_F_REWRITE_SRC;
        original.new_src_addr = A::from_ip(answer_to);
        original.new_src_port = wire::port(answer_port);
        reply.flags |= CT_F_REWRITE_DST;
        reply.new_dst_addr = A::from_ip(src);
        reply.new_dst_port = wire::port(sport);
    }
    let table = CtTable::of(&key(f.original), f.seen_reply);
    (
        vec![
            (table, key(f.original), original),
            (table, key(f.reply), reply),
        ],
        Outcome::Carry,
    )
}

/// The service id of the frontend a packet to `addr:port` reaches.
fn frontend(state: &MapState, addr: IpAddr, port: u16, proto: u8) -> Option<u32> {
    let at = |addr| state.services.get(&FrontendKey { addr, port, proto });
    at(addr)
        .or_else(|| {
            let nodeport = state
                .node_addrs
                .get(&addr)
                .is_some_and(|f| f & NODE_F_NODEPORT != 0);
            nodeport.then(|| at(Family::of(&addr).any())).flatten()
        })
        .map(|v| v.svc_id)
}

/// A netlink socket to netfilter (ctnetlink), connected to the kernel.
fn socket() -> Result<Socket> {
    let mut socket =
        Socket::new(NETLINK_NETFILTER).context("opening a netfilter netlink socket")?;
    socket.bind_auto().context("binding it")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting it to the kernel")?;
    Ok(socket)
}

/// Sends one ctnetlink request about `family` with `flags`.
fn send(
    socket: &Socket,
    family: NetfilterProtoFamily,
    flags: u16,
    message: ConntrackMessage,
) -> Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            message,
        )),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).context("sending to netfilter")?;
    Ok(())
}

/// netfilter's conntrack entries of `family` (ctnetlink dump), and how
/// many were of no use here (other protocols, no ports).
fn dump(family: NetfilterProtoFamily) -> Result<(Vec<NfFlow>, u64)> {
    let socket = socket()?;
    send(
        &socket,
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        ConntrackMessage::Get(vec![]),
    )
    .context("asking for the conntrack table")?;
    let (mut flows, mut unreadable) = (Vec::new(), 0);
    let mut recv = vec![0; 1 << 16];
    loop {
        let n = socket
            .recv(&mut &mut recv[..], 0)
            .context("reading the conntrack table")?;
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&recv[off..n])
                .context("parsing a conntrack message")?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok((flows, unreadable)),
                NetlinkPayload::Error(e) => bail!("the kernel refused the conntrack dump: {e}"),
                NetlinkPayload::InnerMessage(m) => match parse(&m) {
                    Some(f) => flows.push(f),
                    None => unreadable += 1,
                },
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

/// netfilter's idle timeouts for what is handed back: kube-proxy's
/// established TCP timeout, the kernel's UDP ones.
const HANDED_TCP_TIMEOUT_S: u32 = 86_400;
const HANDED_UDP_STREAM_TIMEOUT_S: u32 = 120;
const HANDED_UDP_TIMEOUT_S: u32 = 30;
/// `IP_CT_TCP_FLAG_BE_LIBERAL`: netfilter does not know the windows of a
/// connection it did not see open, so it must not judge segments by them.
const IP_CT_TCP_FLAG_BE_LIBERAL: u8 = 0x08;
/// ctnetlink's NAT attributes (`CTA_NAT_*`), which the crate leaves raw.
const CTA_NAT_SRC: u16 = 6;
const CTA_NAT_DST: u16 = 13;
const CTA_NAT_V4_MINIP: u16 = 1;
const CTA_NAT_V4_MAXIP: u16 = 2;
const CTA_NAT_PROTO: u16 = 3;
const CTA_NAT_V6_MINIP: u16 = 4;
const CTA_NAT_V6_MAXIP: u16 = 5;
const CTA_PROTONAT_PORT_MIN: u16 = 1;
const CTA_PROTONAT_PORT_MAX: u16 = 2;

/// Hands kpx's service flows to netfilter: each becomes a conntrack entry
/// whose NAT is kpx's translation, so that once kpx's programs are gone
/// netfilter carries the connection on (the way back to kube-proxy).
/// Returns what was handed back and what was not, by reason.
pub fn hand_back(maps: &MapSet) -> Result<Report> {
    let socket = socket()?;
    let mut report = Report::default();
    hand_back_of::<u32>(maps, &socket, NetfilterProtoFamily::IPv4, &mut report)?;
    hand_back_of::<In6>(maps, &socket, NetfilterProtoFamily::IPv6, &mut report)?;
    Ok(report)
}

/// [`hand_back`] of family `A`'s flows.
fn hand_back_of<A: CtFamily>(
    maps: &MapSet,
    socket: &Socket,
    family: NetfilterProtoFamily,
    report: &mut Report,
) -> Result<()> {
    let table = read_table_of::<A>(maps)?;
    let mut recv = vec![0; 1 << 16];
    for f in &table.flows {
        let Some(message) = handed(f) else {
            *report
                .skipped
                .entry("closing or not yet answered")
                .or_insert(0) += 1;
            continue;
        };
        // netfilter loads its NAT module on first use and asks to retry.
        let mut outcome = Err(libc::EAGAIN);
        for _ in 0..3 {
            send(
                socket,
                family,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                message.clone(),
            )?;
            outcome = ack(socket, &mut recv)?;
            if outcome != Err(libc::EAGAIN) {
                break;
            }
        }
        match outcome {
            Ok(()) => report.carried += 1,
            Err(libc::EEXIST) => *report.skipped.entry("already in netfilter").or_insert(0) += 1,
            Err(code) => {
                log::debug!("handing {:?} to netfilter: errno {code}", f.key);
                *report.skipped.entry("refused by netfilter").or_insert(0) += 1;
            }
        }
    }
    Ok(())
}

/// The answer to one request: Ok, or the errno netfilter gave.
fn ack(socket: &Socket, recv: &mut [u8]) -> Result<std::result::Result<(), i32>> {
    let n = socket
        .recv(&mut &mut recv[..], 0)
        .context("reading netfilter's answer")?;
    let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&recv[..n])
        .context("parsing netfilter's answer")?;
    Ok(match msg.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(-code.get()),
        },
        _ => Ok(()),
    })
}

/// The ctnetlink request that recreates `f` in netfilter, if it is a flow
/// to hand back: the original tuple, its inverse as the reply (netfilter
/// derives the translated reply from the NAT), the NAT, and the state.
pub fn handed<A: CtFamily>(f: &Flow<A>) -> Option<ConntrackMessage> {
    let replied = match f.state() {
        FlowState::TcpEstablished | FlowState::UdpStream => true,
        FlowState::UdpUnreplied => false,
        _ => return None,
    };
    let o = &f.original;
    let k = &f.key;
    let (src, dst) = (k.src_addr.to_ip(), k.dst_addr.to_ip());
    let (sport, dport) = (wire::to_port(k.src_port), wire::to_port(k.dst_port));
    let tuple = |s: IpAddr, sp: u16, d: IpAddr, dp: u16| {
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(s),
                IPTuple::DestinationAddress(d),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::from(k.proto)),
                ProtoTuple::SourcePort(sp),
                ProtoTuple::DestinationPort(dp),
            ]),
        ]
    };
    let mut attrs = vec![
        ConntrackAttribute::CtaTupleOrig(tuple(src, sport, dst, dport)),
        ConntrackAttribute::CtaTupleReply(tuple(dst, dport, src, sport)),
        nat(CTA_NAT_DST, o.new_dst_addr.to_ip(), o.new_dst_port),
    ];
    if o.flags & CT_F_SNAT != 0 {
        attrs.push(nat(CTA_NAT_SRC, o.new_src_addr.to_ip(), o.new_src_port));
    }
    // No CTA_STATUS: netfilter refuses one beside a NAT binding (EBUSY);
    // the flow's next reply marks it seen-reply and assured anyway.
    let timeout = match (k.proto, replied) {
        (IPPROTO_TCP, _) => HANDED_TCP_TIMEOUT_S,
        (_, true) => HANDED_UDP_STREAM_TIMEOUT_S,
        (_, false) => HANDED_UDP_TIMEOUT_S,
    };
    attrs.push(ConntrackAttribute::CtaTimeout(timeout));
    if k.proto == IPPROTO_TCP {
        let mut tcp = vec![ProtoInfoTCP::State(TCP_CONNTRACK_ESTABLISHED)];
        // (flags, mask): two bytes, always parsed.
        if let Ok(liberal) = TCPFlags::parse(&[IP_CT_TCP_FLAG_BE_LIBERAL; 2]) {
            tcp.push(ProtoInfoTCP::OriginalFlags(liberal.clone()));
            tcp.push(ProtoInfoTCP::ReplyFlags(liberal));
        }
        attrs.push(ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(tcp)]));
    }
    Some(ConntrackMessage::New(attrs))
}

/// A `CTA_NAT_*` attribute mapping to exactly `addr:port` (the port in
/// wire order), of `addr`'s family.
fn nat(kind: u16, addr: IpAddr, port: u16) -> ConntrackAttribute {
    let ports = [
        nla(CTA_PROTONAT_PORT_MIN, &port.to_ne_bytes()),
        nla(CTA_PROTONAT_PORT_MAX, &port.to_ne_bytes()),
    ]
    .concat();
    let (min, max, bytes) = match addr {
        IpAddr::V4(a) => (CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP, a.octets().to_vec()),
        IpAddr::V6(a) => (CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP, a.octets().to_vec()),
    };
    let value = [
        nla(min, &bytes),
        nla(max, &bytes),
        nla(CTA_NAT_PROTO | NLA_F_NESTED, &ports),
    ]
    .concat();
    ConntrackAttribute::Other(DefaultNla::new(kind | NLA_F_NESTED, value))
}

/// One netlink attribute: length, type, value, padded to 4 bytes.
fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// One dumped entry, if it is TCP or UDP with both tuples.
fn parse(m: &NetfilterMessage) -> Option<NfFlow> {
    let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) = &m.inner else {
        return None;
    };
    let (mut original, mut reply, mut status, mut tcp_state) = (None, None, Status::empty(), None);
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => original = tuple(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = tuple(t),
            ConntrackAttribute::CtaStatus(s) => status = *s,
            ConntrackAttribute::CtaProtoInfo(infos) => {
                for info in infos {
                    if let ProtoInfo::TCP(tcp) = info {
                        for t in tcp {
                            if let ProtoInfoTCP::State(s) = t {
                                tcp_state = Some(*s);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let ((proto, original), (_, reply)) = (original?, reply?);
    Some(NfFlow {
        proto,
        original,
        reply,
        dnat: status.contains(Status::DstNat),
        snat: status.contains(Status::SrcNat),
        seen_reply: status.contains(Status::SeenReply),
        tcp_state: if proto == IPPROTO_TCP {
            tcp_state
        } else {
            None
        },
    })
}

/// (protocol, tuple) of one direction, if it has ports and both addresses
/// are of one family.
fn tuple(t: &[Tuple]) -> Option<(u8, Tuple4)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for part in t {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(p) => proto = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(port) => sport = Some(*port),
                        ProtoTuple::DestinationPort(port) => dport = Some(*port),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let (src, dst) = (src?, dst?);
    if src.is_ipv4() != dst.is_ipv4() {
        return None;
    }
    Some((proto?, (src, sport?, dst, dport?)))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::dataplane::maps::WireAddr as _;
    use proxy_common::ServiceValue;

    const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10));
    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    const BACKEND: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2));
    const NODE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0xff, 0, 0, 0, 0x10));
    const CLIENT6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 2));
    const BACKEND6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2));
    const NODE6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1));

    fn state() -> MapState {
        let mut s = MapState::default();
        let v = |svc_id| ServiceValue {
            svc_id,
            ..Default::default()
        };
        s.services.insert(
            FrontendKey {
                addr: VIP,
                port: 80,
                proto: IPPROTO_TCP,
            },
            v(3),
        );
        s.services.insert(
            FrontendKey {
                addr: Ipv4Addr::UNSPECIFIED.into(),
                port: 30080,
                proto: IPPROTO_TCP,
            },
            v(4),
        );
        s.backends.insert(
            9,
            BackendAddr {
                addr: BACKEND,
                port: 8080,
                proto: IPPROTO_TCP,
                local: false,
            },
        );
        s.node_addrs.insert(NODE, NODE_F_NODEPORT);
        // IPv6's: the same Service's frontends and a backend of its own.
        s.services.insert(
            FrontendKey {
                addr: VIP6,
                port: 80,
                proto: IPPROTO_TCP,
            },
            v(5),
        );
        s.services.insert(
            FrontendKey {
                addr: Family::V6.any(),
                port: 30080,
                proto: IPPROTO_TCP,
            },
            v(6),
        );
        s.backends.insert(
            10,
            BackendAddr {
                addr: BACKEND6,
                port: 8080,
                proto: IPPROTO_TCP,
                local: false,
            },
        );
        s.node_addrs.insert(NODE6, NODE_F_NODEPORT);
        s
    }

    fn flow(original: Tuple4, reply: Tuple4, snat: bool) -> NfFlow {
        NfFlow {
            proto: IPPROTO_TCP,
            original,
            reply,
            dnat: true,
            snat,
            seen_reply: true,
            tcp_state: Some(TCP_CONNTRACK_ESTABLISHED),
        }
    }

    /// The entries translate exactly as netfilter did, and pair up as the
    /// datapath's own do (each one's partner is the other's key).
    #[test]
    fn a_dnat_flow_becomes_the_entries_the_datapath_would_have_made() {
        let f = flow(
            (CLIENT, 40000, VIP, 80),
            (BACKEND, 8080, CLIENT, 40000),
            false,
        );
        let (e, outcome) = entries::<u32>(&f, &state(), &backend_ids(&state()), 7);
        assert_eq!(outcome, Outcome::Carry);
        let [(t1, k1, o), (t2, k2, r)] = e.as_slice() else {
            panic!("{e:?}")
        };
        assert_eq!((*t1, *t2), (CtTable::Tcp, CtTable::Tcp));
        assert_eq!((o.svc_id, o.backend_id), (3, 9));
        let to = o.translate(k1);
        assert_eq!(
            (to.dst_addr.to_ip(), wire::to_port(to.dst_port)),
            (BACKEND, 8080)
        );
        assert_eq!(to.src_addr.to_ip(), CLIENT);
        assert_eq!(o.partner(k1), *k2);
        assert_eq!(r.partner(k2), *k1);
        let back = r.translate(k2);
        assert_eq!(
            (back.src_addr.to_ip(), wire::to_port(back.src_port)),
            (VIP, 80)
        );
        assert_ne!(r.flags & CT_F_SEEN_REPLY, 0);
    }

    #[test]
    fn a_masqueraded_nodeport_flow_keeps_its_masquerade_port() {
        let f = flow(
            (CLIENT, 40001, NODE, 30080),
            (BACKEND, 8080, NODE, 61000),
            true,
        );
        let (e, outcome) = entries::<u32>(&f, &state(), &backend_ids(&state()), 7);
        assert_eq!(outcome, Outcome::Carry);
        let [(_, k1, o), (_, k2, r)] = e.as_slice() else {
            panic!("{e:?}")
        };
        assert_eq!(o.svc_id, 4);
        let to = o.translate(k1);
        assert_eq!(
            (to.src_addr.to_ip(), wire::to_port(to.src_port)),
            (NODE, 61000)
        );
        assert_eq!(o.partner(k1), *k2);
        let back = r.translate(k2);
        assert_eq!(
            (back.dst_addr.to_ip(), wire::to_port(back.dst_port)),
            (CLIENT, 40001)
        );
        assert_eq!(
            (back.src_addr.to_ip(), wire::to_port(back.src_port)),
            (NODE, 30080)
        );
    }

    #[test]
    fn what_cannot_be_carried_is_said_and_other_flows_are_not_touched() {
        let s = state();
        let mut f = flow(
            (CLIENT, 40002, VIP, 81),
            (BACKEND, 8080, CLIENT, 40002),
            false,
        );
        assert_eq!(
            entries::<u32>(&f, &s, &backend_ids(&s), 7).1,
            Outcome::Skip("no such frontend")
        );
        f.dnat = false;
        assert_eq!(
            entries::<u32>(&f, &s, &backend_ids(&s), 7).1,
            Outcome::NotAServiceFlow
        );
        let mut sctp = flow((CLIENT, 1, VIP, 80), (BACKEND, 8080, CLIENT, 1), false);
        sctp.proto = 132;
        assert_eq!(
            entries::<u32>(&sctp, &s, &backend_ids(&s), 7).1,
            Outcome::Skip("not TCP/UDP")
        );
        // A handshake in progress waits in the other table; a closing one
        // is marked so that a new SYN on its tuple starts afresh.
        let mut syn = flow(
            (CLIENT, 40003, VIP, 80),
            (BACKEND, 8080, CLIENT, 40003),
            false,
        );
        syn.seen_reply = false;
        syn.tcp_state = Some(1);
        assert_eq!(
            entries::<u32>(&syn, &s, &backend_ids(&s), 7).0[0].0,
            CtTable::Any
        );
        let mut fin = flow(
            (CLIENT, 40004, VIP, 80),
            (BACKEND, 8080, CLIENT, 40004),
            false,
        );
        fin.tcp_state = Some(7);
        assert_ne!(
            entries::<u32>(&fin, &s, &backend_ids(&s), 7).0[0].2.flags & CT_F_CLOSING,
            0
        );
    }

    /// IPv6's flows become IPv6's entries, translated as netfilter did:
    /// DNAT to the backend, and a NodePort's masquerade kept.
    #[test]
    fn ipv6_flows_become_ipv6_entries() {
        let s = state();
        let f = flow(
            (CLIENT6, 40000, VIP6, 80),
            (BACKEND6, 8080, CLIENT6, 40000),
            false,
        );
        let (e, outcome) = entries::<In6>(&f, &s, &backend_ids(&s), 7);
        assert_eq!(outcome, Outcome::Carry);
        let [(_, k1, o), (_, k2, r)] = e.as_slice() else {
            panic!("{e:?}")
        };
        assert_eq!((o.svc_id, o.backend_id), (5, 10));
        let to = o.translate(k1);
        assert_eq!(
            (to.dst_addr.to_ip(), wire::to_port(to.dst_port)),
            (BACKEND6, 8080)
        );
        assert_eq!(o.partner(k1), *k2);
        assert_eq!(r.translate(k2).src_addr.to_ip(), VIP6);
        let np = flow(
            (CLIENT6, 40001, NODE6, 30080),
            (BACKEND6, 8080, NODE6, 61000),
            true,
        );
        let (e, outcome) = entries::<In6>(&np, &s, &backend_ids(&s), 7);
        assert_eq!(outcome, Outcome::Carry);
        let (_, k, o) = &e[0];
        assert_eq!(o.svc_id, 6);
        let to = o.translate(k);
        assert_eq!(
            (to.src_addr.to_ip(), wire::to_port(to.src_port)),
            (NODE6, 61000)
        );
    }
}
