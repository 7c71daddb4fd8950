//! Datapath cost per packet in the kernel, from BPF_PROG_TEST_RUN.
//!
//! `cargo xtask bench` runs it (root needed). Figures, not assertions.
//!
//! `repeat` re-runs the program on the *same* skb, so after one translation
//! the packet would no longer be addressed to the service. Established and
//! reply packets are therefore measured with a ping-pong pair of conntrack
//! entries (A rewrites to B's tuple, B rewrites back to A's): every iteration
//! is a real conntrack hit with a rewrite and checksum update. First packets
//! cannot repeat at all, so each is one run with a fresh source port, and
//! the established path is measured the same way for comparison.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use aya::programs::{TestRun, TestRunOptions};
use kpx::datapath::Datapath;
use proxy_common::{
    wire, CtKey, CtValue, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_F_REWRITE_DST, CT_F_REWRITE_SRC,
    IPPROTO_TCP,
};
use support::{install_service, ip, Pkt, ACK, SYN};

const CLIENT: &str = "198.18.0.2";
const ENDPOINTS: u32 = 10;

fn main() -> anyhow::Result<()> {
    println!("kpx datapath cost per packet (BPF_PROG_TEST_RUN, tc ingress program)");
    println!(
        "{:>9}  {:>14} {:>13} {:>13} {:>13} {:>16} {:>16}",
        "services",
        "not-IPv4 floor",
        "no service",
        "established",
        "reply",
        "1st pkt (1 run)",
        "estab. (1 run)"
    );
    for n in [1u32, 10_000, 50_000] {
        let mut dp = Datapath::load(&Default::default())?;
        let t = Instant::now();
        let last_vip = install(&mut dp, n);
        let programmed = t.elapsed();
        let floor = repeat_ns(&mut dp, &arp_frame())?;
        let miss = repeat_ns(
            &mut dp,
            &Pkt::new(CLIENT, 40000, "198.18.3.3", 80, ACK).build(),
        )?;
        let (est, reply) = ping_pong(&mut dp, &last_vip)?;
        let (first, single_est) = single_runs(&mut dp, &last_vip)?;
        println!(
            "{n:>9}  {floor:>11.1} ns {miss:>10.1} ns {est:>10.1} ns {reply:>10.1} ns {first:>13} ns {single_est:>13} ns   (programmed in {programmed:.2?})"
        );
    }
    println!("established/reply/no-service/floor: mean of 200,000 repeats; 1-run columns: median of 20,000 single runs (includes the test harness's timer overhead).");
    Ok(())
}

fn arp_frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0u8; 20]);
    f
}

/// `n` TCP services on port 80, 10 endpoints each; returns the last VIP.
fn install(dp: &mut Datapath, n: u32) -> String {
    let mut vip = String::new();
    for s in 0..n {
        vip = format!("198.19.{}.{}", s / 256, s % 256);
        let addrs: Vec<(u32, String)> = (0..ENDPOINTS)
            .map(|e| {
                let id = s * ENDPOINTS + e;
                (
                    id,
                    format!("198.18.{}.{}", 16 + id / 65536 % 64, id % 65536 / 256),
                )
            })
            .collect();
        let backends: Vec<(u32, &str, u16)> = addrs
            .iter()
            .map(|(id, a)| (*id, a.as_str(), 8080))
            .collect();
        install_service(dp, s, &vip, 80, IPPROTO_TCP, &backends);
    }
    vip
}

fn test_run(
    dp: &mut Datapath,
    frame: &[u8],
    repeat: u32,
) -> anyhow::Result<aya::programs::TestRunResult> {
    let mut out = vec![0u8; frame.len() + 256];
    Ok(dp.ingress()?.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    })?)
}

fn repeat_ns(dp: &mut Datapath, frame: &[u8]) -> anyhow::Result<f64> {
    const REPEAT: u32 = 200_000;
    // The kernel reports the mean per repetition.
    let r = test_run(dp, frame, REPEAT)?;
    Ok(r.duration.as_nanos() as f64)
}

fn entry(flags: u16, dir: u8, addr: &str, port: u16) -> CtValue {
    let (a, p) = (wire::addr(ip(addr)), wire::port(port));
    CtValue {
        new_src_addr: if flags == CT_F_REWRITE_SRC { a } else { 0 },
        new_dst_addr: if flags == CT_F_REWRITE_DST { a } else { 0 },
        new_src_port: if flags == CT_F_REWRITE_SRC { p } else { 0 },
        new_dst_port: if flags == CT_F_REWRITE_DST { p } else { 0 },
        flags,
        dir,
        ..Default::default()
    }
}

fn key(src: &str, sport: u16, dst: &str, dport: u16) -> CtKey {
    CtKey {
        src_addr: wire::addr(ip(src)),
        dst_addr: wire::addr(ip(dst)),
        src_port: wire::port(sport),
        dst_port: wire::port(dport),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// Mean ns of an established original-direction packet and of a reply.
fn ping_pong(dp: &mut Datapath, vip: &str) -> anyhow::Result<(f64, f64)> {
    let backend = "198.18.200.1";
    {
        let ct = &mut dp.maps.conntrack;
        ct.insert(
            key(CLIENT, 45000, vip, 80),
            entry(CT_F_REWRITE_DST, CT_DIR_ORIGINAL, backend, 8080),
            0,
        )?;
        ct.insert(
            key(CLIENT, 45000, backend, 8080),
            entry(CT_F_REWRITE_DST, CT_DIR_ORIGINAL, vip, 80),
            0,
        )?;
        ct.insert(
            key(backend, 8080, CLIENT, 45000),
            entry(CT_F_REWRITE_SRC, CT_DIR_REPLY, vip, 80),
            0,
        )?;
        ct.insert(
            key(vip, 80, CLIENT, 45000),
            entry(CT_F_REWRITE_SRC, CT_DIR_REPLY, backend, 8080),
            0,
        )?;
    }
    let est = repeat_ns(dp, &Pkt::new(CLIENT, 45000, vip, 80, ACK).build())?;
    let reply = repeat_ns(dp, &Pkt::new(backend, 8080, CLIENT, 45000, ACK).build())?;
    Ok((est, reply))
}

/// Medians of single runs: first packets (fresh flows), and established ones.
fn single_runs(dp: &mut Datapath, vip: &str) -> anyhow::Result<(u128, u128)> {
    const RUNS: u32 = 20_000;
    let mut first = Vec::with_capacity(RUNS as usize);
    let mut est = Vec::with_capacity(RUNS as usize);
    for i in 0..RUNS {
        let src = format!("198.18.{}.{}", 100 + i / 65536, i % 65536 / 256);
        let sport = 1024 + (i % 256) as u16;
        first.push(
            test_run(dp, &Pkt::new(&src, sport, vip, 80, SYN).build(), 1)?
                .duration
                .as_nanos(),
        );
        est.push(
            test_run(dp, &Pkt::new(&src, sport, vip, 80, ACK).build(), 1)?
                .duration
                .as_nanos(),
        );
    }
    first.sort_unstable();
    est.sort_unstable();
    Ok((first[first.len() / 2], est[est.len() / 2]))
}
