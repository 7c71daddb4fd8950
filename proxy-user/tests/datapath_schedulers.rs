//! Schedulers in the kernel (BPF_PROG_TEST_RUN): round robin's spread,
//! the hashing schedulers' choices (the agent's `flow_hash` and the
//! datapath's agree), and a TCP flow whose conntrack entries were lost:
//! taken up again under a hashing scheduler, dropped as invalid (counted)
//! under the others.

mod support;

use std::collections::BTreeMap;

use kpx::dataplane::maps::{CtTable, Datapath};
use proxy_common::{
    flow_hash, wire, DropReason, Event, ServiceKey, IPPROTO_TCP, SCHED_DH, SCHED_MH, SCHED_RR,
    SCHED_SH, SVC_F_HASH_PORT, SVC_SCHED_SHIFT,
};
use support::*;

const AFFINITY_ID: u32 = 0x5eed;

/// Sets the scheduler (and `extra` flags) of frontend `vip:port/tcp`.
fn schedule(dp: &mut Datapath, vip: &str, sched: u32, extra: u32) {
    let key = ServiceKey {
        addr: wire::addr(ip(vip)),
        port: wire::port(80),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    let mut v = dp.maps.services.get(&key, 0).unwrap();
    v.flags = (sched << SVC_SCHED_SHIFT) | extra;
    v.affinity_id = AFFINITY_ID;
    dp.maps.put_frontend(key, v).unwrap();
}

/// The backend a SYN from `client:sport` to the TCP frontend reaches.
fn connect(dp: &mut Datapath, client: &str, sport: u16) -> String {
    let out = run(dp, &Pkt::new(client, sport, VIP, 80, SYN).build());
    assert_eq!(out.verdict, TC_ACT_OK, "SYN from {client}:{sport}");
    inspect(&out.bytes).dst.to_string()
}

const BACKENDS: [&str; 3] = [B1, B2, B3];

/// The backend the hashing schedulers give `addr:port` (the standard
/// scenario's TCP frontend: three slots, one per backend).
fn hashed(addr: &str, port: u16) -> &'static str {
    let h = flow_hash(AFFINITY_ID, wire::addr(ip(addr)), wire::port(port));
    BACKENDS[(h % 3) as usize]
}

/// Keeps the calling thread on the CPU it is on: round robin's positions
/// are per CPU, and the test wants to see one CPU's order.
fn stay_on_this_cpu() {
    // SAFETY: plain syscalls on this thread's own affinity mask.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let r = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(r, 0, "sched_setaffinity");
    }
}

#[test]
#[ignore = "needs root"]
fn round_robin_gives_each_backend_its_turn() {
    let mut dp = datapath();
    cluster(&mut dp);
    schedule(&mut dp, VIP, SCHED_RR, 0);
    stay_on_this_cpu();
    let picks: Vec<String> = (0..300)
        .map(|i| connect(&mut dp, CLIENT, 20_000 + i))
        .collect();
    // In turn: every three consecutive flows reach the three backends.
    for w in picks.windows(3) {
        let mut w = w.to_vec();
        w.sort();
        assert_eq!(w, BACKENDS, "{picks:?}");
    }
    // Other CPUs keep their own positions (offset by the CPU number), so
    // over N flows no backend is more than one flow per CPU off N/3.
}

#[test]
#[ignore = "needs root"]
fn source_hashing_keeps_a_client_on_one_backend_and_agrees_with_the_agent() {
    for sched in [SCHED_SH, SCHED_MH] {
        let mut dp = datapath();
        cluster(&mut dp);
        schedule(&mut dp, VIP, sched, 0);
        let mut seen = BTreeMap::new();
        for c in 2..40u16 {
            let client = format!("198.18.0.{c}");
            let want = hashed(&client, 0);
            for sport in [30_000, 30_001, 41_000] {
                assert_eq!(connect(&mut dp, &client, sport), want, "{client}:{sport}");
            }
            *seen.entry(want).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "38 clients over three backends: {seen:?}");
    }
}

#[test]
#[ignore = "needs root"]
fn port_hashing_spreads_one_clients_connections() {
    let mut dp = datapath();
    cluster(&mut dp);
    schedule(&mut dp, VIP, SCHED_MH, SVC_F_HASH_PORT);
    let mut seen = BTreeMap::new();
    for sport in 30_000..30_060 {
        let b = connect(&mut dp, CLIENT, sport);
        assert_eq!(b, hashed(CLIENT, sport), "port {sport}");
        *seen.entry(b).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
#[ignore = "needs root"]
fn destination_hashing_sends_every_client_of_a_frontend_to_one_backend() {
    let mut dp = datapath();
    cluster(&mut dp);
    schedule(&mut dp, VIP, SCHED_DH, 0);
    let want = hashed(VIP, 0);
    for c in 2..30u16 {
        let client = format!("198.18.0.{c}");
        assert_eq!(connect(&mut dp, &client, 33_000 + c), want);
    }
}

/// Forgets every conntrack entry, as a table that could not be carried
/// over (or `conntrack -F`) would.
fn lose_flows(dp: &mut Datapath) {
    for (table, key, _) in dp.maps.ct_entries() {
        dp.maps.ct_mut(table).remove(&key).unwrap();
    }
}

#[test]
#[ignore = "needs root"]
fn a_lost_flow_is_taken_up_again_under_maglev_and_counted_as_invalid_otherwise() {
    let mut dp = datapath();
    cluster(&mut dp);
    schedule(&mut dp, VIP, SCHED_MH, 0);
    let first = handshake(&mut dp, &Pkt::new(CLIENT, 47_000, VIP, 80, SYN));
    lose_flows(&mut dp);
    assert!(dp.maps.ct_entries().is_empty());

    // The client's next segment reaches the same backend...
    let out = run(&mut dp, &Pkt::new(CLIENT, 47_000, VIP, 80, ACK).build());
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(inspect(&out.bytes), first);
    assert_eq!(event(&mut dp, Event::FlowRecovered), 1);
    // ...as an established flow: the backend's plain ACK is translated back.
    let entries = dp.maps.ct_entries();
    assert_eq!(entries.len(), 2);
    assert!(
        entries.iter().all(|(t, _, _)| *t == CtTable::Tcp),
        "{entries:?}"
    );
    let back = run(&mut dp, &reply(&first, ACK));
    assert_eq!(back.verdict, TC_ACT_OK);
    let seen = inspect(&back.bytes);
    assert_eq!((seen.src, seen.sport), (ip(VIP), 80));
    assert_eq!((seen.dst, seen.dport), (ip(CLIENT), 47_000));
    // A lone RST is not a reason to set a flow up.
    let rst = L4::Tcp {
        syn: false,
        ack: false,
        fin: false,
        rst: true,
    };
    let out = run(&mut dp, &Pkt::new(CLIENT, 47_001, VIP, 80, rst).build());
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::InvalidTcp), 1);

    // The default scheduler cannot know the backend: the loss is counted.
    schedule(&mut dp, VIP, 0, 0);
    handshake(&mut dp, &Pkt::new(CLIENT, 47_002, VIP, 80, SYN));
    lose_flows(&mut dp);
    let out = run(&mut dp, &Pkt::new(CLIENT, 47_002, VIP, 80, ACK).build());
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::InvalidTcp), 2);
    assert_eq!(event(&mut dp, Event::FlowRecovered), 1);
}
