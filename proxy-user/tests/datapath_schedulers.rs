//! Schedulers in the kernel (BPF_PROG_TEST_RUN): round robin's spread,
//! the hashing schedulers' choices (the agent's `flow_hash` and the
//! datapath's agree), least connections' choice and its counts kept exact
//! through open, close, RST and the collector's expiry, and a TCP flow
//! whose conntrack entries were lost: taken up again under a hashing
//! scheduler, dropped as invalid (counted) under the others.

mod support;

use std::collections::BTreeMap;

use kpx::dataplane::maps::{CtTable, Datapath};
use proxy_common::{
    flow_hash, wire, DropReason, Event, IPPROTO_TCP, SCHED_DH, SCHED_LC, SCHED_MH, SCHED_RR,
    SCHED_SH, SVC_F_HASH_PORT, SVC_SCHED_SHIFT,
};
use support::*;

const AFFINITY_ID: u32 = 0x5eed;

/// Sets the scheduler (and `extra` flags) of frontend `vip:80/tcp`.
fn schedule(dp: &mut Datapath, vip: &str, sched: u32, extra: u32) {
    edit_frontend(dp, (vip, 80, IPPROTO_TCP), |v| {
        v.flags = (sched << SVC_SCHED_SHIFT) | extra;
        v.affinity_id = AFFINITY_ID;
    });
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

/// Backend `id`'s active connections, as the datapath counts them.
fn active(dp: &Datapath, id: u32) -> u64 {
    dp.maps.conns.get(&id, 0).unwrap_or(0)
}

/// The standard scenario's TCP backends' ids by address.
fn backend_id(addr: &str) -> u32 {
    BACKENDS.iter().position(|b| *b == addr).unwrap() as u32 + 1
}

#[test]
#[ignore = "needs root"]
fn least_connections_counts_are_exact_through_open_close_rst_and_expiry() {
    use kpx::dataplane::conntrack::{collect, Timeouts};
    let mut dp = datapath();
    cluster(&mut dp);
    schedule(&mut dp, VIP, SCHED_LC, 0);
    let expirer = dp.expirer().unwrap();
    let rst = L4::Tcp {
        syn: false,
        ack: true,
        fin: false,
        rst: true,
    };
    let total = |dp: &Datapath| (1..=3).map(|id| active(dp, id)).sum::<u64>();

    // A handshake not answered yet is not an active connection.
    run(&mut dp, &Pkt::new(CLIENT, 48_000, VIP, 80, SYN).build());
    assert_eq!(total(&dp), 0);

    // Established: one. Closed by both sides: none, however many FINs.
    let a = handshake(&mut dp, &Pkt::new(CLIENT, 48_001, VIP, 80, SYN));
    let id_a = backend_id(&a.dst.to_string());
    assert_eq!(active(&dp, id_a), 1);
    run(&mut dp, &Pkt::new(CLIENT, 48_001, VIP, 80, ACK).build());
    assert_eq!(active(&dp, id_a), 1);
    run(&mut dp, &Pkt::new(CLIENT, 48_001, VIP, 80, FIN_ACK).build());
    assert_eq!(active(&dp, id_a), 0);
    run(&mut dp, &reply(&a, FIN_ACK));
    run(&mut dp, &Pkt::new(CLIENT, 48_001, VIP, 80, FIN_ACK).build());
    assert_eq!(total(&dp), 0);

    // Reset by the backend: none.
    let b = handshake(&mut dp, &Pkt::new(CLIENT, 48_002, VIP, 80, SYN));
    assert_eq!(total(&dp), 1);
    run(&mut dp, &reply(&b, rst));
    assert_eq!(total(&dp), 0);

    // Two open, then expired by the collector (an established timeout of
    // nothing): ended through the datapath's program, then deleted.
    handshake(&mut dp, &Pkt::new(CLIENT, 48_003, VIP, 80, SYN));
    handshake(&mut dp, &Pkt::new(CLIENT, 48_004, VIP, 80, SYN));
    assert_eq!(total(&dp), 2);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let quick = Timeouts {
        tcp_established: std::time::Duration::ZERO,
        ..Timeouts::default()
    };
    let report = collect(&mut dp.maps, &quick, &Default::default(), Some(&expirer)).unwrap();
    assert_eq!(report.conns_ended, 2);
    assert_eq!(total(&dp), 0);
    for sport in [48_003, 48_004] {
        let key = ct_key(CLIENT, sport, VIP, 80, IPPROTO_TCP);
        assert!(
            dp.maps.ct_get(&key).is_none(),
            "flow {sport} was not removed"
        );
    }

    // A random service's flows are not counted at all.
    schedule(&mut dp, VIP, 0, 0);
    handshake(&mut dp, &Pkt::new(CLIENT, 48_005, VIP, 80, SYN));
    assert_eq!(total(&dp), 0);
}

#[test]
#[ignore = "needs root"]
fn least_connections_takes_the_less_busy_of_two_backends() {
    let mut dp = datapath();
    cluster(&mut dp);
    schedule(&mut dp, VIP, SCHED_LC, 0);
    // Loads as if connections were open: B1 9, B2 none, B3 4.
    for (id, n) in [(1u32, 9u64), (2, 0), (3, 4)] {
        dp.maps.conns.insert(id, n, 0).unwrap();
    }
    let mut seen = BTreeMap::new();
    for sport in 0..60 {
        *seen
            .entry(connect(&mut dp, CLIENT, 49_000 + sport))
            .or_insert(0) += 1;
    }
    // The busiest loses every comparison; the idle one wins each it is in
    // (two pairs of three).
    assert_eq!(seen.get(B1), None, "{seen:?}");
    assert!(seen.get(B2).copied().unwrap_or(0) >= 30, "{seen:?}");

    // Two backends: always the less busy one.
    install_service(
        &mut dp,
        9,
        "198.19.0.20",
        80,
        IPPROTO_TCP,
        &[(11, B1, 8080), (12, B2, 8080)],
    );
    schedule(&mut dp, "198.19.0.20", SCHED_LC, 0);
    dp.maps.conns.insert(11, 1, 0).unwrap();
    for sport in 0..20 {
        let out = run(
            &mut dp,
            &Pkt::new(CLIENT, 50_000 + sport, "198.19.0.20", 80, SYN).build(),
        );
        assert_eq!(inspect(&out.bytes).dst.to_string(), B2);
    }
}

#[test]
#[ignore = "needs root"]
fn least_connections_spreads_connections_held_open_evenly() {
    let mut dp = datapath();
    cluster(&mut dp);
    schedule(&mut dp, VIP, SCHED_LC, 0);
    // 900 connections opened one after another and all kept open: each
    // goes to the less busy of two, so the three stay close together. In
    // 20,000 simulated runs the gap between the busiest and the idlest
    // never passed 6 (with 300 connections it passed 2 in 2% of them: this
    // test's earlier bound failed now and then); uniform random choice
    // leaves them within 6 in under 4% of runs (about 30 apart typically).
    for sport in 0..900 {
        handshake(&mut dp, &Pkt::new(CLIENT, 51_000 + sport, VIP, 80, SYN));
    }
    let counts: Vec<u64> = (1..=3).map(|id| active(&dp, id)).collect();
    assert_eq!(counts.iter().sum::<u64>(), 900);
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(max - min <= 6, "{counts:?}");
}
