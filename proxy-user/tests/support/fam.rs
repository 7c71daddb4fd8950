//! The datapath tests' standard scenario on either family ([`Fam`]): one
//! test body, run on IPv4 ([`V4`]) and on IPv6 ([`V6`]), so every such test
//! has its IPv6 counterpart by construction. The scenario is the same on
//! both: a TCP (port 80 → 8080) and a UDP (53 → 5353) frontend on one VIP,
//! three backends each.

use std::net::IpAddr;

use kpx::dataplane::{
    conntrack::CtFamily,
    maps::{CtTable, Datapath, LoadOptions, WireAddr as _},
};
use proxy_common::{wire, Address, CtKey, CtValue, In6, ServiceValue, IPPROTO_TCP};

use super::{v6::*, *};

/// Declares each test body `$body::<F: Fam>` (a function of the calling
/// module) as two ignored-without-root tests, `ipv4::$body` and
/// `ipv6::$body`; the caller has `V4` and `V6` in scope.
#[macro_export]
macro_rules! both_families {
    ($($body:ident),* $(,)?) => {
        mod ipv4 {
            $(
                #[test]
                #[ignore = "needs root"]
                fn $body() {
                    super::$body::<super::V4>();
                }
            )*
        }
        mod ipv6 {
            $(
                #[test]
                #[ignore = "needs root"]
                fn $body() {
                    super::$body::<super::V6>();
                }
            )*
        }
    };
}

/// A packet's addresses and ports as the datapath left them (checksums
/// verified).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

pub trait Fam {
    /// The family's map address (`u32`, `In6`).
    type A: CtFamily;
    const NAME: &'static str;
    const CLIENT: &'static str;
    const VIP: &'static str;
    const BACKENDS: [&'static str; 3];
    /// The standard scenario's TCP frontend's service id and its backends'
    /// ids (slot order).
    const TCP_SVC: u32;
    const TCP_IDS: [u32; 3];

    /// A fresh datapath sized for the family, as the agent loads it on a
    /// node that serves it; `conntrack_entries` as the agent's flag.
    fn datapath_with(conntrack_entries: Option<u32>) -> Datapath;
    fn datapath() -> Datapath {
        Self::datapath_with(None)
    }
    /// The `i`-th of many client addresses (`i` < 256).
    fn client(i: u16) -> String;
    /// Service address number `n` (the standard VIP is 16).
    fn vip(n: u8) -> String;
    /// An Ethernet frame carrying a TCP/UDP packet.
    fn frame(src: &str, sport: u16, dst: &str, dport: u16, l4: L4) -> Vec<u8>;
    /// What the datapath left of a frame.
    fn flow(frame: &[u8]) -> Flow;
    /// The standard scenario.
    fn cluster(dp: &mut Datapath);
    /// How many ClientIP affinity records the family's table holds.
    fn affinity_records(dp: &Datapath) -> usize;
}

/// IPv4: 198.18.0.0/15.
pub struct V4;

/// IPv6: 2001:2::/48.
pub struct V6;

impl Fam for V4 {
    type A = u32;
    const NAME: &'static str = "IPv4";
    const CLIENT: &'static str = CLIENT;
    const VIP: &'static str = VIP;
    const BACKENDS: [&'static str; 3] = [B1, B2, B3];
    const TCP_SVC: u32 = 1;
    const TCP_IDS: [u32; 3] = [1, 2, 3];

    fn datapath_with(conntrack_entries: Option<u32>) -> Datapath {
        load(LoadOptions {
            conntrack_entries,
            ..LoadOptions::default()
        })
    }
    fn client(i: u16) -> String {
        format!("198.18.0.{}", i + 2)
    }
    fn vip(n: u8) -> String {
        format!("198.19.0.{n}")
    }
    fn frame(src: &str, sport: u16, dst: &str, dport: u16, l4: L4) -> Vec<u8> {
        Pkt::new(src, sport, dst, dport, l4).build()
    }
    fn flow(frame: &[u8]) -> Flow {
        let s = inspect(frame);
        Flow {
            src: s.src.into(),
            sport: s.sport,
            dst: s.dst.into(),
            dport: s.dport,
        }
    }
    fn cluster(dp: &mut Datapath) {
        cluster(dp);
    }
    fn affinity_records(dp: &Datapath) -> usize {
        dp.maps.affinity.keys().count()
    }
}

impl Fam for V6 {
    type A = In6;
    const NAME: &'static str = "IPv6";
    const CLIENT: &'static str = CLIENT6;
    const VIP: &'static str = VIP6;
    const BACKENDS: [&'static str; 3] = [B6_1, B6_2, B6_3];
    const TCP_SVC: u32 = 21;
    const TCP_IDS: [u32; 3] = [11, 12, 13];

    fn datapath_with(conntrack_entries: Option<u32>) -> Datapath {
        load(LoadOptions {
            conntrack_entries,
            ipv6: true,
            ..LoadOptions::default()
        })
    }
    fn client(i: u16) -> String {
        format!("2001:2::{:x}", i + 2)
    }
    fn vip(n: u8) -> String {
        format!("2001:2:0:ff::{n:x}")
    }
    fn frame(src: &str, sport: u16, dst: &str, dport: u16, l4: L4) -> Vec<u8> {
        Pkt6::new(src, sport, dst, dport, l4).build()
    }
    fn flow(frame: &[u8]) -> Flow {
        let s = inspect6(frame);
        Flow {
            src: s.src.into(),
            sport: s.sport,
            dst: s.dst.into(),
            dport: s.dport,
        }
    }
    fn cluster(dp: &mut Datapath) {
        cluster6(dp);
    }
    fn affinity_records(dp: &Datapath) -> usize {
        dp.maps.v6.affinity.keys().count()
    }
}

fn load(opts: LoadOptions) -> Datapath {
    armed(testbed::built("the datapath", Datapath::load(&opts)))
}

/// `s` as the family's map address.
pub fn addr<F: Fam>(s: &str) -> F::A {
    F::A::from_ip(s.parse().expect("test address"))
}

/// The conntrack key of a tuple.
pub fn key<F: Fam>(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> CtKey<F::A> {
    CtKey::new(
        addr::<F>(src),
        addr::<F>(dst),
        wire::port(sport),
        wire::port(dport),
        proto,
    )
}

/// The address word the hashing schedulers hash (`Address::word`).
pub fn word<F: Fam>(s: &str) -> u32 {
    addr::<F>(s).word()
}

/// The backend's reply, with `l4`, to a packet translated to `f`.
pub fn answer<F: Fam>(f: &Flow, l4: L4) -> Vec<u8> {
    F::frame(&f.dst.to_string(), f.dport, &f.src.to_string(), f.sport, l4)
}

/// The backend a SYN from `client:sport` to `vip:80` reaches.
pub fn connect_to<F: Fam>(dp: &mut Datapath, client: &str, sport: u16, vip: &str) -> String {
    let out = run(dp, &F::frame(client, sport, vip, 80, SYN));
    assert_eq!(
        out.verdict,
        TC_ACT_OK,
        "{}: SYN from {client}:{sport}",
        F::NAME
    );
    F::flow(&out.bytes).dst.to_string()
}

/// A TCP connection from `client:sport` to the VIP opened as a real one
/// opens: the SYN, then the chosen backend's SYN-ACK (which moves the flow
/// to the established table). Returns the SYN as translated.
pub fn open<F: Fam>(dp: &mut Datapath, client: &str, sport: u16) -> Flow {
    let out = run(dp, &F::frame(client, sport, F::VIP, 80, SYN));
    assert_eq!(
        out.verdict,
        TC_ACT_OK,
        "{}: the SYN was not translated",
        F::NAME
    );
    let seen = F::flow(&out.bytes);
    let back = run(dp, &answer::<F>(&seen, SYN_ACK));
    assert_eq!(
        back.verdict,
        TC_ACT_OK,
        "{}: the SYN-ACK was not translated",
        F::NAME
    );
    seen
}

/// The family's conntrack entries: (table, key).
pub fn entries<F: Fam>(dp: &Datapath) -> Vec<(CtTable, CtKey<F::A>)> {
    CtTable::ALL
        .into_iter()
        .flat_map(|t| {
            F::A::read(&dp.maps, t)
                .expect("reading conntrack")
                .into_iter()
                .map(move |(k, _)| (t, k))
        })
        .collect()
}

/// Forgets every conntrack entry of the family, as a table that could not
/// be carried over (or `conntrack -F`) would.
pub fn lose_flows<F: Fam>(dp: &mut Datapath) {
    for (t, k) in entries::<F>(dp) {
        F::A::remove(&mut dp.maps, t, &k);
    }
}

/// Where the family's tables hold `key`, and its entry.
pub fn ct_get<F: Fam>(dp: &Datapath, key: &CtKey<F::A>) -> Option<(CtTable, CtValue<F::A>)> {
    CtTable::ALL
        .into_iter()
        .find_map(|t| F::A::get(&dp.maps, t, key).map(|v| (t, v)))
}

/// Whether the family's tables hold `key`.
pub fn tracked<F: Fam>(dp: &Datapath, key: &CtKey<F::A>) -> bool {
    ct_get::<F>(dp, key).is_some()
}

/// How many entries the family's table `t` holds.
pub fn count<F: Fam>(dp: &Datapath, t: CtTable) -> usize {
    F::A::read(&dp.maps, t).expect("reading conntrack").len()
}

/// Rewrites the TCP frontend (port 80) at `vip` with `edit`.
pub fn edit_tcp(dp: &mut Datapath, vip: &str, edit: impl FnOnce(&mut ServiceValue)) {
    edit_frontend(dp, (vip, 80, IPPROTO_TCP), edit);
}
