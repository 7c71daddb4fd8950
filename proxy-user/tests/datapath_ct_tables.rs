//! The two conntrack tables in the kernel (BPF_PROG_TEST_RUN): a connection
//! waits for its first reply in the LRU table and moves to the established
//! table with it; nothing new can push an established connection out, and a
//! full established table refuses new connections, counted, as netfilter
//! does. Each test runs on IPv4 and on IPv6 (`support::fam`), each
//! family's tables sized as the agent sizes them.

mod support;

use kpx::dataplane::{conntrack::CtFamily, conntrack::FlowState, maps::CtTable};
use proxy_common::{Counter, DropReason, Event, IPPROTO_TCP};
use support::{
    fam::{self, count, Fam, Flow, V4, V6},
    *,
};

crate::both_families!(
    a_connection_moves_to_the_established_table_at_its_first_reply,
    a_full_established_table_refuses_new_connections_and_keeps_every_established_one,
    a_new_connection_reusing_a_closing_ones_reply_tuple_gets_its_own_translation,
);

/// The translated packet of `frame`, which must pass.
fn through<F: Fam>(dp: &mut kpx::dataplane::maps::Datapath, frame: &[u8]) -> Flow {
    let out = run(dp, frame);
    assert_eq!(out.verdict, TC_ACT_OK, "{}", F::NAME);
    F::flow(&out.bytes)
}

fn a_connection_moves_to_the_established_table_at_its_first_reply<F: Fam>() {
    let mut dp = F::datapath();
    F::cluster(&mut dp);
    let to_vip = |l4| F::frame(F::CLIENT, 41000, F::VIP, 80, l4);
    let seen = through::<F>(&mut dp, &to_vip(SYN));
    let tables = |dp: &_| (count::<F>(dp, CtTable::Any), count::<F>(dp, CtTable::Tcp));
    assert_eq!(tables(&dp), (2, 0));
    // The client cannot acknowledge what was never answered: netfilter's
    // INVALID (SYN_SENT, ACK from the originator), dropped.
    let early = run(&mut dp, &to_vip(ACK));
    assert_eq!(early.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&mut dp, DropReason::InvalidTcp), 1);

    let back = through::<F>(&mut dp, &fam::answer::<F>(&seen, SYN_ACK));
    assert_eq!((back.src.to_string(), back.sport), (F::VIP.to_string(), 80));
    assert_eq!(tables(&dp), (0, 2));
    assert_eq!(event(&mut dp, Event::CtEstablished), 1);
    // Both entries kept what they knew: the SYN, and now the reply.
    let key = fam::key::<F>(F::CLIENT, 41000, F::VIP, 80, IPPROTO_TCP);
    let (_, o) = fam::ct_get::<F>(&dp, &key).expect("original entry");
    assert_ne!(o.tcp_flags & proxy_common::TCP_SYN, 0);
    let ack = through::<F>(&mut dp, &to_vip(ACK));
    assert_eq!(ack, seen, "the established flow changed backend");
    // A retransmitted SYN-ACK is just a reply of the established flow.
    let again = run(&mut dp, &fam::answer::<F>(&seen, SYN_ACK));
    assert_eq!(again.verdict, TC_ACT_OK);
    assert_eq!(event(&mut dp, Event::CtEstablished), 1);
    assert_eq!(counter(&mut dp, Counter::NewFlow), 1);
}

fn a_full_established_table_refuses_new_connections_and_keeps_every_established_one<F: Fam>() {
    const FLOWS: u16 = 4;
    // An established table for FLOWS connections (the other table its
    // minimum, 64 entries).
    let mut dp = F::datapath_with(Some(2 * u32::from(FLOWS)));
    F::cluster(&mut dp);
    let outside = F::client(1);
    let to_vip = |sport, l4| F::frame(F::CLIENT, sport, F::VIP, 80, l4);
    let open: Vec<(u16, Flow)> = (0..FLOWS)
        .map(|i| (42000 + i, fam::open::<F>(&mut dp, F::CLIENT, 42000 + i)))
        .collect();
    assert_eq!(count::<F>(&dp, CtTable::Tcp), 2 * usize::from(FLOWS));

    // One more: its SYN is forwarded, its SYN-ACK refused (the client's
    // connect does not complete), counted under its own reason.
    let late = through::<F>(&mut dp, &to_vip(42100, SYN));
    let refuse = |dp: &mut _, late: &Flow| {
        let out = run(dp, &fam::answer::<F>(late, SYN_ACK));
        assert_eq!(out.verdict, TC_ACT_SHOT, "{}", F::NAME);
    };
    refuse(&mut dp, &late);
    assert_eq!(drops(&mut dp, DropReason::CtFull), 1);
    // Kept, marked refused: the backend's retransmitted SYN-ACK is dropped
    // too, never let through untranslated (the client would reset the
    // backend's half-open connection).
    let refused = fam::key::<F>(F::CLIENT, 42100, F::VIP, 80, IPPROTO_TCP);
    let (table, entry) = fam::ct_get::<F>(&dp, &refused).expect("refused handshake kept");
    assert_eq!(table, CtTable::Any);
    assert_eq!(
        FlowState::of(&entry, None, IPPROTO_TCP),
        FlowState::TcpRefused
    );
    refuse(&mut dp, &late);
    assert_eq!(drops(&mut dp, DropReason::CtFull), 2);
    // A flood of UDP flows and handshakes fills the other table and evicts
    // there, never here.
    for port in 0..300u16 {
        run(&mut dp, &F::frame(&outside, 20000 + port, F::VIP, 53, UDP));
        run(&mut dp, &F::frame(&outside, 30000 + port, F::VIP, 80, SYN));
    }
    assert_eq!(count::<F>(&dp, CtTable::Tcp), 2 * usize::from(FLOWS));
    for (port, seen) in &open {
        let out = run(&mut dp, &to_vip(*port, ACK));
        assert_eq!(out.verdict, TC_ACT_OK, "established flow {port} lost");
        assert_eq!(&F::flow(&out.bytes), seen, "established flow {port} moved");
        let back = run(&mut dp, &fam::answer::<F>(seen, ACK));
        assert_eq!(back.verdict, TC_ACT_OK);
    }

    // Another one refused; then a connection ends and is collected. The
    // backend's SYN-ACK alone does not take the room (its client may have
    // given up); the client's retransmitted SYN re-arms the handshake, to
    // the same backend, and its answer gets in.
    let late = through::<F>(&mut dp, &to_vip(42101, SYN));
    refuse(&mut dp, &late);
    let gone = fam::key::<F>(F::CLIENT, open[0].0, F::VIP, 80, IPPROTO_TCP);
    let (_, v) = fam::ct_get::<F>(&dp, &gone).expect("an open flow");
    let partner = v.partner(&gone);
    assert!(F::A::remove(&mut dp.maps, CtTable::Tcp, &gone));
    assert!(F::A::remove(&mut dp.maps, CtTable::Tcp, &partner));
    refuse(&mut dp, &late);
    assert_eq!(drops(&mut dp, DropReason::CtFull), 4);
    assert_eq!(count::<F>(&dp, CtTable::Tcp), 2 * usize::from(FLOWS) - 2);
    let again = through::<F>(&mut dp, &to_vip(42101, SYN));
    assert_eq!(again, late, "the retried SYN changed backend");
    let answered = through::<F>(&mut dp, &fam::answer::<F>(&late, SYN_ACK));
    assert_eq!(
        (answered.src.to_string(), answered.sport),
        (F::VIP.to_string(), 80)
    );
    assert_eq!(drops(&mut dp, DropReason::CtFull), 4);
    through::<F>(&mut dp, &to_vip(42101, ACK));
    assert_eq!(count::<F>(&dp, CtTable::Tcp), 2 * usize::from(FLOWS));
}

/// A client reusing its port towards the same backend through another
/// frontend: the new connection's reply tuple is the closing one's. Its
/// SYN-ACK must be translated as the new connection's (from the frontend
/// it asked), not as the closing one's, which it replaces.
fn a_new_connection_reusing_a_closing_ones_reply_tuple_gets_its_own_translation<F: Fam>() {
    let mut dp = F::datapath();
    let (vip1, vip2) = (F::vip(0x70), F::vip(0x71));
    let b1 = F::BACKENDS[0];
    install_service(&mut dp, 7, &vip1, 80, IPPROTO_TCP, &[(70, b1, 8080)]);
    install_service(&mut dp, 8, &vip2, 80, IPPROTO_TCP, &[(70, b1, 8080)]);
    let to = |vip: &str, l4| F::frame(F::CLIENT, 44000, vip, 80, l4);
    let first = through::<F>(&mut dp, &to(&vip1, SYN));
    through::<F>(&mut dp, &fam::answer::<F>(&first, SYN_ACK));
    // Closed both ways, still tracked (time_wait).
    run(&mut dp, &to(&vip1, FIN_ACK));
    run(&mut dp, &fam::answer::<F>(&first, FIN_ACK));

    let second = through::<F>(&mut dp, &to(&vip2, SYN));
    assert_eq!((second.dst, second.dport), (first.dst, first.dport));
    let back = through::<F>(&mut dp, &fam::answer::<F>(&second, SYN_ACK));
    assert_eq!(
        (back.src.to_string(), back.sport),
        (vip2.clone(), 80),
        "answered as the closed connection"
    );
    assert_eq!(through::<F>(&mut dp, &to(&vip2, ACK)), second);
    // The closed connection's entries are gone, the new one's in place.
    let closed = fam::key::<F>(F::CLIENT, 44000, &vip1, 80, IPPROTO_TCP);
    assert!(!fam::tracked::<F>(&dp, &closed));
    assert_eq!(count::<F>(&dp, CtTable::Tcp), 2);
}
