//! kpx beside another tool's tc program on the same interface: kpx attaches
//! last in the TCX chain, so a program attached before it (a firewall, an
//! observer) sees every packet as it arrived; kpx never detaches what it did
//! not attach, not even on `kpx cleanup`.

mod bed;

use std::{net::SocketAddrV4, path::Path};

use aya::programs::{tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType};
use bed::*;
use testbed::tcp_ask_many;

/// The names of the TCX ingress programs on `dev`, in the order they run.
fn chain(c: &testbed::Cluster, dev: &str) -> Vec<String> {
    tc_programs(c, dev, TcAttachType::Ingress)
}

#[test]
#[ignore = "needs root"]
fn a_foreign_tc_program_keeps_its_place_and_is_left_alone() {
    let mut c = running(&["web-1", "web-2", "web-3"]);
    let dev = c.pod("client").host_if.clone();
    // Another tool's program, attached first: a no-op classifier loaded on
    // its own, with its own maps (kpx's never-attached floor program,
    // standing in for anyone's).
    let foreign_dev = dev.clone();
    let (_foreign_obj, _foreign_link) = c
        .node
        .enter(move || -> anyhow::Result<_> {
            let mut obj = aya::Ebpf::load(kpx::dataplane::maps::OBJECT)?;
            let prog: &mut SchedClassifier = obj
                .program_mut(proxy_common::prog_names::TC_FLOOR)
                .ok_or_else(|| anyhow::anyhow!("no floor program"))?
                .try_into()?;
            prog.load()?;
            let id = prog.attach_with_options(
                &foreign_dev,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )?;
            let link = prog.take_link(id)?;
            Ok((obj, link))
        })
        .expect("enter the node")
        .expect("the foreign program attaches");
    let before = chain(&c, &dev);
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(before[0].starts_with("kpx_tc_floor"), "{before:?}");

    // kpx still serves every connection through the VIP.
    let ids = tcp_ask_many(&c.pod("client").netns, SocketAddrV4::new(VIP, 80), 30, T)
        .expect("the VIP answers with a foreign program first");
    assert_eq!(spread(&ids).len(), 3, "{:?}", spread(&ids));

    // A restarted agent takes its own link over and leaves the other alone.
    c.agent.as_mut().expect("agent").stop().expect("stop");
    c.start_agent(Path::new(KPX), &[]).expect("restart");
    wait_synced(&c, 2, &[3, 3]);
    assert_eq!(chain(&c, &dev), before, "the chain changed over a restart");

    // `kpx cleanup` removes kpx's programs only.
    c.agent.as_mut().expect("agent").stop().expect("stop");
    kpx_cleanup(&c);
    // The kernel releases an unpinned link once its last reference goes,
    // a moment later: wait for kpx's program to leave the chain.
    let only_foreign = vec![before[0].clone()];
    let after = testbed::wait_for(std::time::Duration::from_secs(10), || {
        let now = chain(&c, &dev);
        (now.len() < 2).then_some(now)
    })
    .unwrap_or_else(|| chain(&c, &dev));
    assert_eq!(
        after, only_foreign,
        "cleanup must detach kpx's program and leave the foreign one"
    );

    // An agent starting beside a program already there attaches after it.
    c.start_agent(Path::new(KPX), &[]).expect("start again");
    wait_synced(&c, 2, &[3, 3]);
    let last = chain(&c, &dev);
    assert_eq!(last.len(), 2, "{last:?}");
    assert_eq!(last[0], before[0], "{last:?}");
    assert!(last[1].starts_with("kpx_tc_ingress"), "{last:?}");
    let ids = tcp_ask_many(&c.pod("client").netns, SocketAddrV4::new(VIP, 80), 30, T)
        .expect("the VIP answers");
    assert_eq!(spread(&ids).len(), 3, "{:?}", spread(&ids));
}
