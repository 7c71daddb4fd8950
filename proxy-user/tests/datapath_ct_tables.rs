//! The two conntrack tables in the kernel (BPF_PROG_TEST_RUN): a connection
//! waits for its first reply in the LRU table and moves to the established
//! table with it; nothing new can push an established connection out, and a
//! full established table refuses new connections, counted, as netfilter
//! does.

mod support;

use kpx::dataplane::{
    conntrack::FlowState,
    maps::{CtTable, Datapath, LoadOptions},
};
use proxy_common::{Counter, CtKey, CtValue, DropReason, Event, IPPROTO_TCP};
use support::*;

const OUTSIDE_CLIENT: &str = "198.18.0.3";

/// A datapath whose established table holds `flows` connections (the other
/// table its minimum, 64 entries).
fn small_datapath(flows: u32) -> Datapath {
    testbed::built(
        "the datapath",
        Datapath::load(&LoadOptions {
            pin_dir: None,
            conntrack_entries: Some(2 * flows),
            ..Default::default()
        }),
    )
}

fn count(dp: &Datapath, table: CtTable) -> usize {
    dp.maps.ct(table).keys().filter(|k| k.is_ok()).count()
}

#[test]
#[ignore = "needs root"]
fn a_connection_moves_to_the_established_table_at_its_first_reply() {
    let mut dp = datapath();
    cluster(&mut dp);
    let syn = run(&mut dp, &Pkt::new(CLIENT, 41000, VIP, 80, SYN).build());
    let seen = inspect(&syn.bytes);
    assert_eq!((count(&dp, CtTable::Any), count(&dp, CtTable::Tcp)), (2, 0));
    // The client cannot acknowledge what was never answered: netfilter's
    // INVALID (SYN_SENT, ACK from the originator), dropped.
    let early = run(&mut dp, &Pkt::new(CLIENT, 41000, VIP, 80, ACK).build());
    assert_eq!(early.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::InvalidTcp), 1);

    let synack = run(&mut dp, &reply(&seen, SYN_ACK));
    assert_eq!(synack.verdict, TC_ACT_OK);
    let back = inspect(&synack.bytes);
    assert_eq!((back.src, back.sport), (ip(VIP), 80));
    assert_eq!((count(&dp, CtTable::Any), count(&dp, CtTable::Tcp)), (0, 2));
    assert_eq!(event(&mut dp, Event::CtEstablished), 1);
    // Both entries kept what they knew: the SYN, and now the reply.
    let (_, o) = dp
        .maps
        .ct_get(&ct_key(CLIENT, 41000, VIP, 80, IPPROTO_TCP))
        .expect("original entry");
    assert_ne!(o.tcp_flags & proxy_common::TCP_SYN, 0);
    let ack = run(&mut dp, &Pkt::new(CLIENT, 41000, VIP, 80, ACK).build());
    assert_eq!(ack.verdict, TC_ACT_OK);
    assert_eq!(
        inspect(&ack.bytes),
        seen,
        "the established flow changed backend"
    );
    // A retransmitted SYN-ACK is just a reply of the established flow.
    assert_eq!(run(&mut dp, &reply(&seen, SYN_ACK)).verdict, TC_ACT_OK);
    assert_eq!(event(&mut dp, Event::CtEstablished), 1);
    assert_eq!(counter(&mut dp, Counter::NewFlow), 1);
}

#[test]
#[ignore = "needs root"]
fn a_full_established_table_refuses_new_connections_and_keeps_every_established_one() {
    const FLOWS: u16 = 4;
    let mut dp = small_datapath(FLOWS.into());
    cluster(&mut dp);
    let open: Vec<(u16, Seen)> = (0..FLOWS)
        .map(|i| {
            (
                42000 + i,
                handshake(&mut dp, &Pkt::new(CLIENT, 42000 + i, VIP, 80, SYN)),
            )
        })
        .collect();
    assert_eq!(count(&dp, CtTable::Tcp), 2 * usize::from(FLOWS));

    // One more: its SYN is forwarded, its SYN-ACK refused (the client's
    // connect does not complete), counted under its own reason.
    let syn = run(&mut dp, &Pkt::new(CLIENT, 42100, VIP, 80, SYN).build());
    assert_eq!(syn.verdict, TC_ACT_OK);
    let late = inspect(&syn.bytes);
    assert_eq!(run(&mut dp, &reply(&late, SYN_ACK)).verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::CtFull), 1);
    // Kept, marked refused: the backend's retransmitted SYN-ACK is dropped
    // too, never let through untranslated (the client would reset the
    // backend's half-open connection).
    let refused = ct_key(CLIENT, 42100, VIP, 80, IPPROTO_TCP);
    let (table, entry) = dp.maps.ct_get(&refused).expect("refused handshake kept");
    assert_eq!(table, CtTable::Any);
    assert_eq!(
        FlowState::of(&entry, None, IPPROTO_TCP),
        FlowState::TcpRefused
    );
    assert_eq!(run(&mut dp, &reply(&late, SYN_ACK)).verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::CtFull), 2);
    // A flood of UDP flows and handshakes fills the other table and evicts
    // there, never here.
    for port in 0..300u16 {
        run(
            &mut dp,
            &Pkt::new(OUTSIDE_CLIENT, 20000 + port, VIP, 53, UDP).build(),
        );
        run(
            &mut dp,
            &Pkt::new(OUTSIDE_CLIENT, 30000 + port, VIP, 80, SYN).build(),
        );
    }
    assert_eq!(count(&dp, CtTable::Tcp), 2 * usize::from(FLOWS));
    for (port, seen) in &open {
        let out = run(&mut dp, &Pkt::new(CLIENT, *port, VIP, 80, ACK).build());
        assert_eq!(out.verdict, TC_ACT_OK, "established flow {port} lost");
        assert_eq!(&inspect(&out.bytes), seen, "established flow {port} moved");
        assert_eq!(run(&mut dp, &reply(seen, ACK)).verdict, TC_ACT_OK);
    }

    // Another one refused; then a connection ends and is collected. The
    // backend's SYN-ACK alone does not take the room (its client may have
    // given up); the client's retransmitted SYN re-arms the handshake, to
    // the same backend, and its answer gets in.
    let syn = run(&mut dp, &Pkt::new(CLIENT, 42101, VIP, 80, SYN).build());
    let late = inspect(&syn.bytes);
    assert_eq!(run(&mut dp, &reply(&late, SYN_ACK)).verdict, TC_ACT_SHOT);
    let gone = ct_key(CLIENT, open[0].0, VIP, 80, IPPROTO_TCP);
    let (_, v): (CtTable, CtValue) = dp.maps.ct_get(&gone).unwrap();
    let partner: CtKey = v.partner(&gone);
    dp.maps.ct_tcp.remove(&gone).unwrap();
    dp.maps.ct_tcp.remove(&partner).unwrap();
    assert_eq!(run(&mut dp, &reply(&late, SYN_ACK)).verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::CtFull), 4);
    assert_eq!(count(&dp, CtTable::Tcp), 2 * usize::from(FLOWS) - 2);
    let again = run(&mut dp, &Pkt::new(CLIENT, 42101, VIP, 80, SYN).build());
    assert_eq!(
        inspect(&again.bytes),
        late,
        "the retried SYN changed backend"
    );
    let answer = run(&mut dp, &reply(&late, SYN_ACK));
    assert_eq!(answer.verdict, TC_ACT_OK);
    let answered = inspect(&answer.bytes);
    assert_eq!((answered.src, answered.sport), (ip(VIP), 80));
    assert_eq!(drops(&mut dp, DropReason::CtFull), 4);
    let ack = run(&mut dp, &Pkt::new(CLIENT, 42101, VIP, 80, ACK).build());
    assert_eq!(ack.verdict, TC_ACT_OK);
    assert_eq!(count(&dp, CtTable::Tcp), 2 * usize::from(FLOWS));
}

/// A client reusing its port towards the same backend through another
/// frontend: the new connection's reply tuple is the closing one's. Its
/// SYN-ACK must be translated as the new connection's (from the frontend
/// it asked), not as the closing one's, which it replaces.
#[test]
#[ignore = "needs root"]
fn a_new_connection_reusing_a_closing_ones_reply_tuple_gets_its_own_translation() {
    let mut dp = datapath();
    let (vip1, vip2) = ("198.19.0.70", "198.19.0.71");
    install_service(&mut dp, 7, vip1, 80, IPPROTO_TCP, &[(70, B1, 8080)]);
    install_service(&mut dp, 8, vip2, 80, IPPROTO_TCP, &[(70, B1, 8080)]);
    let first = handshake(&mut dp, &Pkt::new(CLIENT, 44000, vip1, 80, SYN));
    // Closed both ways, still tracked (time_wait).
    run(&mut dp, &Pkt::new(CLIENT, 44000, vip1, 80, FIN_ACK).build());
    run(&mut dp, &reply(&first, FIN_ACK));

    let second = inspect(&run(&mut dp, &Pkt::new(CLIENT, 44000, vip2, 80, SYN).build()).bytes);
    assert_eq!((second.dst, second.dport), (first.dst, first.dport));
    let synack = run(&mut dp, &reply(&second, SYN_ACK));
    assert_eq!(synack.verdict, TC_ACT_OK);
    let back = inspect(&synack.bytes);
    assert_eq!(
        (back.src, back.sport),
        (ip(vip2), 80),
        "answered as the closed connection"
    );
    let ack = run(&mut dp, &Pkt::new(CLIENT, 44000, vip2, 80, ACK).build());
    assert_eq!(inspect(&ack.bytes), second);
    // The closed connection's entries are gone, the new one's in place.
    assert!(dp
        .maps
        .ct_get(&ct_key(CLIENT, 44000, vip1, 80, IPPROTO_TCP))
        .is_none());
    assert_eq!(count(&dp, CtTable::Tcp), 2);
}
