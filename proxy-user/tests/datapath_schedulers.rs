//! Schedulers in the kernel (BPF_PROG_TEST_RUN): round robin's spread,
//! the hashing schedulers' choices (the agent's `flow_hash` and the
//! datapath's agree), least connections' choice and its counts kept exact
//! through open, close, RST and the collector's expiry, and a TCP flow
//! whose conntrack entries were lost: taken up again under a hashing
//! scheduler, dropped as invalid (counted) under the others. Each test
//! runs on IPv4 and on IPv6 (`support::fam`).

mod support;

use std::collections::BTreeMap;

use kpx::dataplane::maps::{CtTable, Datapath};
use proxy_common::{
    flow_hash, wire, DropReason, Event, IPPROTO_TCP, SCHED_DH, SCHED_LC, SCHED_MH, SCHED_RR,
    SCHED_SH, SVC_F_HASH_PORT, SVC_SCHED_SHIFT,
};
use support::{
    fam::{self, Fam, V4, V6},
    *,
};

const AFFINITY_ID: u32 = 0x5eed;

crate::both_families!(
    round_robin_gives_each_backend_its_turn,
    source_hashing_keeps_a_client_on_one_backend_and_agrees_with_the_agent,
    port_hashing_spreads_one_clients_connections,
    destination_hashing_sends_every_client_of_a_frontend_to_one_backend,
    a_lost_flow_is_taken_up_again_under_maglev_and_counted_as_invalid_otherwise,
    least_connections_counts_are_exact_through_open_close_rst_and_expiry,
    least_connections_takes_the_less_busy_of_two_backends,
    least_connections_spreads_connections_held_open_evenly,
);

/// Sets the scheduler (and `extra` flags) of frontend `vip:80/tcp`.
fn schedule<F: Fam>(dp: &mut Datapath, vip: &str, sched: u32, extra: u32) {
    fam::edit_tcp(dp, vip, |v| {
        v.flags = (sched << SVC_SCHED_SHIFT) | extra;
        v.affinity_id = AFFINITY_ID;
    });
}

/// The backend a SYN from `client:sport` to the TCP frontend reaches.
fn connect<F: Fam>(dp: &mut Datapath, client: &str, sport: u16) -> String {
    fam::connect_to::<F>(dp, client, sport, F::VIP)
}

/// The backend the hashing schedulers give `addr:port` (the standard
/// scenario's TCP frontend: three slots, one per backend).
fn hashed<F: Fam>(addr: &str, port: u16) -> &'static str {
    let h = flow_hash(AFFINITY_ID, fam::word::<F>(addr), wire::port(port));
    F::BACKENDS[(h % 3) as usize]
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

fn round_robin_gives_each_backend_its_turn<F: Fam>() {
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    schedule::<F>(&mut dp, F::VIP, SCHED_RR, 0);
    stay_on_this_cpu();
    let picks: Vec<String> = (0..300)
        .map(|i| connect::<F>(&mut dp, F::CLIENT, 20_000 + i))
        .collect();
    // In turn: every three consecutive flows reach the three backends.
    let mut all = F::BACKENDS;
    all.sort();
    for w in picks.windows(3) {
        let mut w = w.to_vec();
        w.sort();
        assert_eq!(w, all, "{picks:?}");
    }
    // Other CPUs keep their own positions (offset by the CPU number), so
    // over N flows no backend is more than one flow per CPU off N/3.
}

fn source_hashing_keeps_a_client_on_one_backend_and_agrees_with_the_agent<F: Fam>() {
    for sched in [SCHED_SH, SCHED_MH] {
        let mut dp = F::datapath();
        F::cluster(&mut dp);
        schedule::<F>(&mut dp, F::VIP, sched, 0);
        let mut seen = BTreeMap::new();
        for c in 0..38u16 {
            let client = F::client(c);
            let want = hashed::<F>(&client, 0);
            for sport in [30_000, 30_001, 41_000] {
                let got = connect::<F>(&mut dp, &client, sport);
                assert_eq!(got, want, "{client}:{sport}");
            }
            *seen.entry(want).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "38 clients over three backends: {seen:?}");
    }
}

fn port_hashing_spreads_one_clients_connections<F: Fam>() {
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    schedule::<F>(&mut dp, F::VIP, SCHED_MH, SVC_F_HASH_PORT);
    let mut seen = BTreeMap::new();
    for sport in 30_000..30_060 {
        let b = connect::<F>(&mut dp, F::CLIENT, sport);
        assert_eq!(b, hashed::<F>(F::CLIENT, sport), "port {sport}");
        *seen.entry(b).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

fn destination_hashing_sends_every_client_of_a_frontend_to_one_backend<F: Fam>() {
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    schedule::<F>(&mut dp, F::VIP, SCHED_DH, 0);
    let want = hashed::<F>(F::VIP, 0);
    for c in 0..28u16 {
        let client = F::client(c);
        assert_eq!(connect::<F>(&mut dp, &client, 33_000 + c), want);
    }
}

fn a_lost_flow_is_taken_up_again_under_maglev_and_counted_as_invalid_otherwise<F: Fam>() {
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    schedule::<F>(&mut dp, F::VIP, SCHED_MH, 0);
    let first = fam::open::<F>(&mut dp, F::CLIENT, 47_000);
    fam::lose_flows::<F>(&mut dp);
    assert!(fam::entries::<F>(&dp).is_empty());

    // The client's next segment reaches the same backend...
    let out = run(&mut dp, &F::frame(F::CLIENT, 47_000, F::VIP, 80, ACK));
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(F::flow(&out.bytes), first);
    assert_eq!(event(&mut dp, Event::FlowRecovered), 1);
    // ...as an established flow: the backend's plain ACK is translated back.
    let entries = fam::entries::<F>(&dp);
    assert_eq!(entries.len(), 2);
    assert!(
        entries.iter().all(|(t, _)| *t == CtTable::Tcp),
        "{entries:?}"
    );
    let back = run(&mut dp, &fam::answer::<F>(&first, ACK));
    assert_eq!(back.verdict, TC_ACT_OK);
    let seen = F::flow(&back.bytes);
    assert_eq!((seen.src.to_string(), seen.sport), (F::VIP.to_string(), 80));
    assert_eq!(
        (seen.dst.to_string(), seen.dport),
        (F::CLIENT.to_string(), 47_000)
    );
    // A lone RST is not a reason to set a flow up.
    let rst = L4::Tcp {
        syn: false,
        ack: false,
        fin: false,
        rst: true,
    };
    let out = run(&mut dp, &F::frame(F::CLIENT, 47_001, F::VIP, 80, rst));
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::InvalidTcp), 1);

    // The default scheduler cannot know the backend: the loss is counted.
    schedule::<F>(&mut dp, F::VIP, 0, 0);
    fam::open::<F>(&mut dp, F::CLIENT, 47_002);
    fam::lose_flows::<F>(&mut dp);
    let out = run(&mut dp, &F::frame(F::CLIENT, 47_002, F::VIP, 80, ACK));
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::InvalidTcp), 2);
    assert_eq!(event(&mut dp, Event::FlowRecovered), 1);
}

/// Backend `id`'s active connections, as the datapath counts them.
fn active(dp: &Datapath, id: u32) -> u64 {
    dp.maps.conns.get(&id, 0).unwrap_or(0)
}

/// The standard scenario's TCP backends' ids by address.
fn backend_id<F: Fam>(addr: &str) -> u32 {
    let i = F::BACKENDS.iter().position(|b| *b == addr).unwrap();
    F::TCP_IDS[i]
}

fn least_connections_counts_are_exact_through_open_close_rst_and_expiry<F: Fam>() {
    use kpx::dataplane::conntrack::{collect, Timeouts};
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    schedule::<F>(&mut dp, F::VIP, SCHED_LC, 0);
    let expirer = dp.expirer().unwrap();
    let rst = L4::Tcp {
        syn: false,
        ack: true,
        fin: false,
        rst: true,
    };
    let total = |dp: &Datapath| F::TCP_IDS.iter().map(|id| active(dp, *id)).sum::<u64>();
    let to_vip = |sport, l4| F::frame(F::CLIENT, sport, F::VIP, 80, l4);

    // A handshake not answered yet is not an active connection.
    run(&mut dp, &to_vip(48_000, SYN));
    assert_eq!(total(&dp), 0);

    // Established: one. Closed by both sides: none, however many FINs.
    let a = fam::open::<F>(&mut dp, F::CLIENT, 48_001);
    let id_a = backend_id::<F>(&a.dst.to_string());
    assert_eq!(active(&dp, id_a), 1);
    run(&mut dp, &to_vip(48_001, ACK));
    assert_eq!(active(&dp, id_a), 1);
    run(&mut dp, &to_vip(48_001, FIN_ACK));
    assert_eq!(active(&dp, id_a), 0);
    run(&mut dp, &fam::answer::<F>(&a, FIN_ACK));
    run(&mut dp, &to_vip(48_001, FIN_ACK));
    assert_eq!(total(&dp), 0);

    // Reset by the backend: none.
    let b = fam::open::<F>(&mut dp, F::CLIENT, 48_002);
    assert_eq!(total(&dp), 1);
    run(&mut dp, &fam::answer::<F>(&b, rst));
    assert_eq!(total(&dp), 0);

    // Two open, then expired by the collector (an established timeout of
    // nothing): ended through the datapath's program, then deleted.
    fam::open::<F>(&mut dp, F::CLIENT, 48_003);
    fam::open::<F>(&mut dp, F::CLIENT, 48_004);
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
        let key = fam::key::<F>(F::CLIENT, sport, F::VIP, 80, IPPROTO_TCP);
        assert!(
            !fam::tracked::<F>(&dp, &key),
            "flow {sport} was not removed"
        );
    }

    // A random service's flows are not counted at all.
    schedule::<F>(&mut dp, F::VIP, 0, 0);
    fam::open::<F>(&mut dp, F::CLIENT, 48_005);
    assert_eq!(total(&dp), 0);
}

fn least_connections_takes_the_less_busy_of_two_backends<F: Fam>() {
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    schedule::<F>(&mut dp, F::VIP, SCHED_LC, 0);
    // Loads as if connections were open: the first 9, the second none,
    // the third 4.
    for (id, n) in F::TCP_IDS.into_iter().zip([9u64, 0, 4]) {
        dp.maps.conns.insert(id, n, 0).unwrap();
    }
    let [b1, b2, _] = F::BACKENDS;
    let mut seen = BTreeMap::new();
    for sport in 0..60 {
        *seen
            .entry(connect::<F>(&mut dp, F::CLIENT, 49_000 + sport))
            .or_insert(0) += 1;
    }
    // The busiest loses every comparison; the idle one wins each it is in
    // (two pairs of three: 40 of 60 expected, binomial, σ 3.7; at least
    // 25 is four σ below, a chance of 1 in 100,000 to fail for nothing:
    // 30, three σ, failed a full run once).
    assert_eq!(seen.get(b1), None, "{seen:?}");
    assert!(seen.get(b2).copied().unwrap_or(0) >= 25, "{seen:?}");

    // Two backends: always the less busy one.
    let vip2 = F::vip(20);
    install_service(
        &mut dp,
        9,
        &vip2,
        80,
        IPPROTO_TCP,
        &[(31, b1, 8080), (32, b2, 8080)],
    );
    schedule::<F>(&mut dp, &vip2, SCHED_LC, 0);
    dp.maps.conns.insert(31, 1, 0).unwrap();
    for sport in 0..20 {
        let got = fam::connect_to::<F>(&mut dp, F::CLIENT, 50_000 + sport, &vip2);
        assert_eq!(got, b2);
    }
}

fn least_connections_spreads_connections_held_open_evenly<F: Fam>() {
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    schedule::<F>(&mut dp, F::VIP, SCHED_LC, 0);
    // 900 connections opened one after another and all kept open: each
    // goes to the less busy of two, so the three stay close together. In
    // 20,000 simulated runs the gap between the busiest and the idlest
    // never passed 6 (with 300 connections it passed 2 in 2% of them: this
    // test's earlier bound failed now and then); uniform random choice
    // leaves them within 6 in under 4% of runs (about 30 apart typically).
    for sport in 0..900 {
        fam::open::<F>(&mut dp, F::CLIENT, 51_000 + sport);
    }
    let counts: Vec<u64> = F::TCP_IDS.iter().map(|id| active(&dp, *id)).collect();
    assert_eq!(counts.iter().sum::<u64>(), 900);
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(max - min <= 6, "{counts:?}");
}
