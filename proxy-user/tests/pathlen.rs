//! Path lengths of the datapath: every path of the tc programs held to a
//! budget of BPF instructions executed and helper calls, counted exactly by
//! running the real eBPF object in `pathlen`'s interpreter. No root and no
//! clock: the same object gives the same counts on any machine, so a change
//! that makes a path much longer fails here, naming the path and its budget
//! (`cargo xtask bench --packet` shows what the nanoseconds did). The
//! interpreter does not verify: that the kernel accepts the object is what
//! the in-kernel tests (`tests/datapath*.rs`) show.

mod support;

use proxy_common::MARK_TRANSLATED;
use support::{inspect, paths, reply};

/// (path, instructions, helper calls) at most. Before this budget existed
/// (the datapath of 3584e31) "established" was 693 instructions and 23
/// helper calls, "no service" 168 and 7, "first packet" 974 and 32.
const BUDGETS: &[(&str, u64, u64)] = &[
    // tc egress on demand: a new flow reads its interface's bit of
    // `KPX_EGRESS` (an array: a helper call here, inlined by the verifier
    // in the kernel), +11 to +21 instructions ("N, M (egress bit)").
    // Set at the measured counts plus about 5% of instructions; helper
    // calls exact (each is a real cost: a new one must be a decision).
    // First packets: one helper call fewer since a slot holds its backend
    // (layout 3); least connections copies two 12-byte slots: +7.
    // Every tc ingress path: +5 to look for XDP's "translated" metadata.
    // Direct server return (DSR): a tracked flow's entry is checked for it
    // (+8), a first packet's policy and backend (+12 to +17); DSR's own
    // work is tail-called, so the rest pays one compare.
    // Since issue 20 (IPv6): the path is generic over the family, IPv4's
    // instance unchanged but for memset/memmove now expanded inline (a
    // REJECT's zeroed quote was a byte-wise loop: 797 → 387), a flow's
    // entries moved to the established table from where they lie (no
    // copies: first reply 789 → 718) and read in place by the
    // established path. Each comment: now (before issue 20).
    // The port filter gates the conntrack lookup (a packet neither to a
    // frontend's port nor from a backend's skips it): the destination
    // port's word is read first (the service lookup reuses it), the
    // source's only for a packet to no frontend's port. An array read is a
    // helper call here, but inlined by the verifier in the kernel; the
    // hash lookup it saves is not.
    // The address filter (bits of frontends' addresses, in the same map)
    // gates them further: a packet to a frontend's port at an address no
    // frontend has ("no service": a pod's to a pod on port 80) skips both
    // hash lookups for two array reads and the address's hash; a packet at
    // a frontend's address pays those beside its lookups (+1 "helper",
    // about +30 instructions here, fewer in the kernel).
    // The reply filter (bits of the tuples of flows' replies, set by the
    // datapath as it inserts a reply entry) gates the conntrack lookup of
    // a packet from a backend's port: a backend's packet to a client that
    // reached it directly ("from a backend's port": a pod's, a
    // socket-balanced flow's) skips it for the tuple's hash and an array
    // read (+1 "helper" here); a flow's reply pays those beside its lookup
    // (+37 instructions); a flow's creation notes the bit (+1 array read,
    // two atomic ORs), its establishment again (an array read: the bit is
    // there). In parentheses: before the reply filter.
    // Since tc ingress's and XDP's entries sort IPv4 as they sort IPv6
    // (`sort4`: one read of the Ethernet type to the ports, the transport
    // header checked, the filters; a plain packet's parse made from that
    // read, the filters not asked again), a packet no service or flow
    // concerns is passed 30 instructions sooner, a flow's packet 20 to 55;
    // what the sort sends to the whole path (ICMP, fragments, Geneve,
    // other Ethernet types) pays its reads and compares (+11 to +48), and
    // IPv6's paths its Ethernet type's (−1 to +11 against IPv4's parse).
    // "now < before; " or "now > before; " leads those comments.
    ("not IPv4", 50, 1),    // 45 > 34; 36, 1 (36, 1)
    ("no service", 175, 2), // 155 < 162; 196, 4 (195, 4)
    ("no service, a frontend's port and address", 245, 5), // 231 > 203; 213, 5 (211, 5)
    ("no service, port no frontend uses", 165, 2), // 155 > 137; 167, 3 (168, 3)
    ("no service, to the node", 205, 4), // 191 > 137; 167, 3 (168, 3)
    ("no service, from a backend's port", 165, 2), // 155 < 178; 205, 4
    ("first packet", 1040, 25), // 1026, 25 (egress bit); 1010 > 959; 1007, 23 (951, 22)
    // Once per connection: moved to the established table.
    ("first reply: connection established", 805, 27), // 795 > 749; 794, 25 (716, 23)
    ("established, FIB to the stack", 580, 12),       // 562 > 542; 597, 12 (589, 12)
    // The FIB's "the stack" is cached in the flow entry as a next hop is
    // (before: each such packet asked the FIB, as "FIB to the stack" does):
    ("established, to the stack (cached)", 510, 10), // 497 > 479; 534, 10 (526, 10)
    ("established, next hop looked up", 665, 13),    // 644 > 625; 666, 13 (658, 13)
    ("established", 570, 11),                        // 556 > 537; 591, 11 (583, 11)
    ("reply, next hop looked up", 695, 15),          // 689 > 663; 686, 14 (643, 13)
    ("reply", 615, 13),                              // 601 > 575; 611, 12 (568, 11)
    ("ICMP error about a flow", 350, 11),            // 344 > 342; 307, 11 (304, 11)
    ("first packet, masqueraded", 1175, 29), // 1161, 29 (egress bit); 1145 > 1094; 1142, 27 (1082, 26)
    ("first packet, NodePort", 1185, 30), // 1173, 30 (egress bit); 1155 > 1083; 1126, 27 (1068, 26)
    ("first packet, ClientIP affinity", 1090, 29), // 1075, 29 (egress bit); 1057 > 1006; 1057, 27 (1001, 26)
    ("first packet, round robin", 1050, 26), // 1037, 26 (egress bit); 1021 > 970; 1018, 24 (962, 23)
    ("first packet, Maglev", 1070, 24), // 1055, 24 (egress bit); 1039 > 988; 1036, 22 (980, 21)
    ("first packet, least connections", 1090, 28), // 1077, 28 (egress bit); 1066 > 1013; 1063, 26 (1007, 25)
    // A mid-stream segment whose flow entries were lost: set up again and
    // moved to the established table at once.
    ("lost flow taken up (Maglev)", 1295, 37), // 1278, 37 (egress bit); 1262 > 1191; 1239, 34 (1144, 32)
    ("no endpoints: REJECT", 465, 16),         // 455 > 426; 431, 16 (429, 16)
    ("fragment to a service", 115, 3),         // 111 < 112; 80, 3 (80, 3)
    // Direct server return: the tail call into DSR's program, a second
    // parse there, two FIB lookups (route, outer source), the Geneve header.
    // (Since IPv6's DSR: 1181, 896, 807 before.)
    ("DSR: first packet, in Geneve", 1270, 30), // 1255, 30 (egress bit); 1239 > 1167; 1155, 27 (1121, 26)
    ("DSR: a datagram in Geneve again", 960, 19), // 946 > 890; 908, 18 (881, 18)
    ("DSR: Geneve received, to a backend here", 890, 21), // 873 > 852; 804, 20 (759, 19)
    // Egress passes a forwarded packet (it came in on an interface, where
    // ingress had it) without asking whether its source is the node's; the
    // node's own packets still ask (the earlier "a pod's packet" figures).
    // A forwarded TCP/UDP one is passed on its protocol's byte, unparsed.
    ("egress: a pod's packet", 35, 0), // 27 < 90; 90, 0 (90, 0)
    // (to a frontend's port, as a flow of the node's to a service would be)
    ("egress: the node's own, no service", 200, 4), // 190, 4 (172, 4)
    ("egress: already translated", 10, 0),          // 6 < 8; 8, 0 (8, 0)
    // XDP (the external interface's program), the packet arriving on the
    // interface its next hop is out of, so sent back out (`XDP_TX`): the
    // same path as tc ingress's, its rewrite plain stores and the
    // checksums computed in the program (no helper calls: the figures
    // beside tc's count instructions a helper would have run). Budgets
    // since the interpreter ran XDP programs (first counts in comments).
    // Since XDP asks whether it may mark (`XDP_MARKS`, read here as
    // compiled: 1), its translated paths are 2-18 longer (the global's
    // load, the route's compare, the registers they take).
    ("XDP: no service", 155, 1),                      // 144 > 142; 170, 3
    ("XDP: established, next hop looked up", 700, 9), // 690 > 677; 682, 9
    ("XDP: established", 605, 7),                     // 596 > 579; 592, 7
    ("XDP: reply", 650, 9),                           // 640 > 622; 619, 8
    ("XDP: established, handed to tc", 610, 8),       // 598 > 575; 589, 8
    ("XDP: first packet", 1050, 21),                  // 1037, 21 (egress bit); 1016 > 1010; 988, 19
    // IPv6 (issue 20): the path is IPv4's instantiated for IPv6, the
    // packet and its tuple in per-CPU scratch space (an array read each
    // time, inlined by the verifier in the kernel, a helper call here);
    // addresses are four words; the rewrite is one store of Ethernet to
    // ports (redirected) or hop limit to ports (no IPv6 header checksum to
    // fold). Plain TCP/UDP (the transport header right after the fixed
    // one) is sorted by IPv4's entry: to no frontend's port (or to one at
    // an address no frontend has) and from no backend's, passed; else
    // looked up in conntrack there, and a packet of a tracked flow
    // translated there too (no tail call, no second parse: IPv6's
    // established packets 813 → 778 instructions, replies 858 → 813); one
    // of no flow goes on to its frontend in `kpx_tc_ingress6` (the tail
    // call, told so in the skb's control buffer; a first packet a second,
    // into `kpx_tc_new6`: +1 array read, the scratch space's). Anything
    // else (ICMPv6, extension headers, fragments) takes the whole path in
    // `kpx_tc_ingress6` (+8 for the control buffer). In parentheses:
    // before the entry looked up flows, then before the reply filter.
    // Since IPv6's direct server return, every comment's first figures:
    // the entry looks for Geneve (UDP to 6081) before its filters (+4 to
    // +5, as IPv4's path does), a tracked flow's entry is checked for DSR
    // (+6 to +10, as IPv4's is; before: 151, 400, 110, 169, 1379, 1084,
    // 819, 734, 872, 778, 907, 813, 654, 1489, 654, 238, 288).
    // Since the entry parses a packet it sorted as plain without the
    // checks `sort6` made (Ethernet type, version, extension headers:
    // `parse_plain6`), a tracked flow's or a first packet's path is 35 to
    // 50 instructions shorter: "now < before; " leads those comments.
    ("IPv6: no service", 170, 2), // 157 > 155; 156, 4: 151, 4 (151, 4)
    ("IPv6: no service, a frontend's port and address", 425, 9), // 414 > 376; 371 < 414; 414, 9: 395, 8 (440, 8)
    ("IPv6: no service, port no frontend uses", 170, 2), // 157 > 114; 115, 3: 110, 3 (110, 3)
    ("IPv6: no service, from a backend's port", 175, 2), // 157 < 172; 173, 4: 169, 4
    ("IPv6: first packet", 1485, 34), // 1470, 34 (egress bit); 1449 > 1378; 1416, 32: 1375, 31 (1329, 30)
    ("IPv6: first reply: connection established", 1120, 29), // 1109 > 1048; 1044 < 1093; 1093, 27: 1111, 30 (1028, 28)
    ("IPv6: established, FIB to the stack", 840, 14), // 826 > 790; 786 < 829; 829, 14: 849, 16 (879, 16)
    ("IPv6: established, to the stack (cached)", 755, 12), // 741 > 704; 703 < 744; 744, 12: 770, 14 (796, 14)
    ("IPv6: established, next hop looked up", 900, 15), // 888 > 853; 842 < 887; 887, 15: 903, 17 (935, 17)
    ("IPv6: established", 800, 13), // 788 > 752; 747 < 789; 789, 13: 813, 15 (842, 15)
    ("IPv6: reply, next hop looked up", 930, 17), // 918 > 886; 874 < 925; 925, 16: 948, 19 (927, 18)
    ("IPv6: reply", 830, 15), // 818 > 785; 779 < 827; 827, 14: 858, 17 (834, 16)
    ("IPv6: ICMP error about a flow", 690, 14), // 667 > 666; 667, 14: 647, 14 (653, 14)
    ("IPv6: first packet, masqueraded", 1605, 38), // 1587, 38 (egress bit); 1570 > 1498; 1536, 36: 1485, 35 (1441, 34)
    ("IPv6: no endpoints: REJECT", 680, 21),       // 668 > 635; 672, 21: 645, 20 (688, 20)
    ("IPv6: fragment to a service", 255, 5),       // 249 < 250; 250, 5: 230, 5 (224, 5)
    // Direct server return over IPv6: a first packet's three tail calls
    // (its frontend, its setup, DSR's program), DSR's steps subprograms of
    // their own (their arguments through the stack), the packet parsed
    // again into scratch space, the outer UDP checksum computed.
    ("IPv6: DSR: first packet, in Geneve", 2060, 42), // 2036, 42 (egress bit); 2016 > 1904; 1902 < 1945; 1945, 39
    ("IPv6: DSR: a datagram in Geneve again", 1395, 22), // 1382 > 1300; 1303 < 1342; 1342, 21
    ("IPv6: DSR: Geneve received, to a backend here", 1325, 25), // 1310 > 1281; 1282, 24
    // A forwarded IPv6 packet whose transport header follows the fixed one
    // is passed before the tail call (its next header byte read).
    ("IPv6: egress: a pod's packet", 35, 0), // 29 < 32; 32, 0 (32, 0)
    ("IPv6: egress: the node's own, no service", 350, 6), // 292, 6 (335, 6)
    // XDP's IPv6: sorted and looked up as at tc ingress's entry; a first
    // packet tail-called twice (its frontend, its setup), as tc's.
    ("IPv6: XDP: no service", 150, 1), // 144 > 142; 140, 3
    ("IPv6: XDP: established, next hop looked up", 990, 11), // 976 > 928; 936 < 973; 973, 11
    ("IPv6: XDP: established", 880, 9), // 868 > 818; 832 < 866; 866, 9
    ("IPv6: XDP: reply", 910, 11),     // 900 > 856; 873 < 909; 909, 10
    ("IPv6: XDP: first packet", 1560, 30), // 1540, 30 (egress bit); 1524 > 1506 (`XDP_MARKS`); 1428 < 1473; 1473, 28
];

#[test]
fn every_path_stays_within_its_budget() {
    let runs = paths::run_all().expect("running the paths");
    let mut over = Vec::new();
    println!("{:<34} {:>6} {:>8}   budget", "path", "insns", "helpers");
    for (name, r) in &runs {
        let Some(&(_, insns, helpers)) = BUDGETS.iter().find(|b| b.0 == *name) else {
            panic!("path {name:?} has no budget: add one");
        };
        println!(
            "{name:<34} {:>6} {:>8}   {insns} / {helpers}   {:?}",
            r.insns, r.helper_calls, r.by_helper
        );
        if r.insns > insns || r.helper_calls > helpers {
            over.push(format!(
                "{name}: {} instructions and {} helper calls, budget {insns} and {helpers}",
                r.insns, r.helper_calls
            ));
        }
    }
    assert_eq!(runs.len(), BUDGETS.len(), "a budget names no path");
    assert!(over.is_empty(), "paths over budget:\n{}", over.join("\n"));
}

/// The counts are of real translations: what the interpreter's runs leave
/// in the packet are valid, correctly translated frames, marked as
/// translated, and those redirected carry the next hop's MAC and a TTL one
/// lower, as forwarding by the stack would leave them.
#[test]
fn translated_paths_leave_valid_packets() {
    let mut checked = 0;
    for (name, r) in paths::run_all().expect("running the paths") {
        if !(name.starts_with("first packet")
            || name.starts_with("established")
            || name.starts_with("reply")
            || name.starts_with("lost flow"))
        {
            continue;
        }
        checked += 1;
        // Checksums are verified by `inspect`.
        let seen = inspect(&r.packet);
        if name.starts_with("reply") {
            assert_eq!(
                seen.src.to_string(),
                "198.19.0.10",
                "{name}: reply not from the VIP"
            );
        } else {
            assert!(
                seen.dst.octets()[..2] == [198, 18],
                "{name}: not sent to a backend: {seen:?}"
            );
        }
        if name.contains("masqueraded") || name.contains("NodePort") {
            assert_eq!(
                seen.src.to_string(),
                "198.18.0.1",
                "{name}: not masqueraded"
            );
        }
        assert_ne!(r.mark & MARK_TRANSLATED, 0, "{name}: not marked translated");
        let redirected = r.verdict == 7;
        assert_eq!(
            (r.packet[..6] == paths::NEXT_HOP_MAC, r.packet[14 + 8]),
            (redirected, if redirected { 63 } else { 64 }),
            "{name}: next hop MAC and TTL"
        );
    }
    assert_eq!(checked, 14, "the translated paths");
}

/// The same for IPv6's translated paths: valid frames (checksums
/// recomputed), to a backend or from the VIP, masqueraded where they
/// should be, and those redirected with the next hop's MAC and a hop limit
/// one lower (written in one block with the rest of the headers).
#[test]
fn translated_ipv6_paths_leave_valid_packets() {
    let mut checked = 0;
    for (name, r) in paths::run_all().expect("running the paths") {
        let Some(path) = name.strip_prefix("IPv6: ") else {
            continue;
        };
        if !(path.starts_with("first packet")
            || path.starts_with("established")
            || path.starts_with("reply"))
        {
            continue;
        }
        checked += 1;
        let seen = support::v6::inspect6(&r.packet);
        if path.starts_with("reply") {
            assert_eq!(
                seen.src.to_string(),
                "2001:2:0:ff::10",
                "{name}: reply not from the VIP"
            );
        } else {
            assert_eq!(
                seen.dst.segments()[..4],
                [0x2001, 2, 0, 20],
                "{name}: not sent to a backend: {seen:?}"
            );
        }
        if path.contains("masqueraded") {
            assert_eq!(seen.src.to_string(), "2001:2::1", "{name}: not masqueraded");
        }
        assert_ne!(r.mark & MARK_TRANSLATED, 0, "{name}: not marked translated");
        let redirected = r.verdict == 7;
        assert_eq!(
            (r.packet[..6] == paths::NEXT_HOP_MAC, seen.hop_limit),
            (redirected, if redirected { 63 } else { 64 }),
            "{name}: next hop MAC and hop limit"
        );
        assert_eq!(&r.packet[12..14], &[0x86, 0xdd], "{name}: ethertype");
    }
    assert_eq!(checked, 8, "IPv6's translated paths");
}

/// XDP's counts are of real translations too: each family's packets sent
/// back out (`XDP_TX`) are valid frames (checksums checked), to a backend
/// or from the VIP, with the next hop's MAC and a TTL (hop limit) one
/// lower.
#[test]
fn xdp_paths_leave_valid_packets() {
    let mut checked = 0;
    for (name, r) in paths::run_all().expect("running the paths") {
        if !name.contains("XDP: ") || r.verdict as u32 != paths::XDP_TX {
            continue;
        }
        checked += 1;
        let reply = name.ends_with("reply");
        let (src, dst, ttl) = if name.starts_with("IPv6: ") {
            let seen = support::v6::inspect6(&r.packet);
            (
                seen.src.to_string(),
                seen.dst.segments()[..4] == [0x2001, 2, 0, 20],
                seen.hop_limit,
            )
        } else {
            let seen = inspect(&r.packet);
            (
                seen.src.to_string(),
                seen.dst.octets()[..2] == [198, 18],
                r.packet[14 + 8],
            )
        };
        if reply {
            assert!(
                src == "198.19.0.10" || src == "2001:2:0:ff::10",
                "{name}: reply not from the VIP ({src})"
            );
        } else {
            assert!(dst, "{name}: not sent to a backend");
        }
        assert_eq!(r.packet[..6], paths::NEXT_HOP_MAC, "{name}: next hop MAC");
        assert_eq!(ttl, 63, "{name}: TTL");
    }
    assert_eq!(checked, 8, "XDP's translated paths");
}

/// The same packets, the same counts: what makes a budget meaningful.
#[test]
fn counts_are_repeatable() {
    let a = paths::run_all().expect("running the paths");
    let b = paths::run_all().expect("running the paths");
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!((x.insns, &x.by_helper), (y.insns, &y.by_helper), "{n}");
    }
}

/// `--fib-forwarding=false`: translated packets go to the stack, the FIB is
/// not asked and nothing is redirected, even where it would answer.
#[test]
fn stack_forwarding_hands_translated_packets_to_the_stack() {
    use proxy_common::{map_names, DatapathConfig, CFG_F_STACK_FORWARDING};
    let mut vm = paths::vm().expect("vm");
    let key = 0u32.to_ne_bytes();
    let cfg = vm
        .map_get(map_names::CONFIG, &key)
        .expect("config map")
        .expect("config written");
    assert_eq!(cfg.len(), size_of::<DatapathConfig>());
    // SAFETY: the value is a DatapathConfig's bytes (length checked), and
    // every bit pattern is a valid DatapathConfig.
    let mut c: DatapathConfig = unsafe { std::ptr::read_unaligned(cfg.as_ptr().cast()) };
    c.flags |= CFG_F_STACK_FORWARDING;
    // SAFETY: DatapathConfig is plain data with explicit padding.
    let bytes = unsafe {
        std::slice::from_raw_parts((&c as *const DatapathConfig).cast::<u8>(), cfg.len())
    };
    vm.map_insert(map_names::CONFIG, &key, bytes)
        .expect("config");
    for p in paths::paths(std::net::Ipv4Addr::UNSPECIFIED)
        .iter()
        .filter(|p| p.name == "first packet" || p.name == "first packet, masqueraded")
    {
        vm.fib = p.fib;
        let r = vm
            .run("kpx_tc_ingress", &p.frame, Default::default())
            .expect("run");
        assert_eq!(r.verdict, 0, "{}: not handed to the stack", p.name);
        assert!(
            !r.by_helper.contains_key("redirect"),
            "{}: redirected",
            p.name
        );
        inspect(&r.packet);
    }
}

/// Headers beyond the skb's linear part (direct packet access cannot see
/// them) are read with copies instead: the flow is translated all the same.
#[test]
fn headers_beyond_the_linear_part_are_parsed_and_translated() {
    use support::SYN_ACK;
    let mut vm = paths::vm().expect("vm");
    let all = paths::paths(std::net::Ipv4Addr::UNSPECIFIED);
    let path = |name: &str| all.iter().find(|p| p.name == name).expect("path");
    let mut run = |name: &str, frame: &[u8], fib, verdict: u32| {
        vm.fib = fib;
        let skb = pathlen::Skb {
            linear: Some(20),
            ..Default::default()
        };
        let r = vm.run("kpx_tc_ingress", frame, skb).expect("run");
        assert_eq!(r.verdict as u32, verdict, "{name}");
        assert!(
            r.by_helper.contains_key("skb_load_bytes"),
            "{name}: not copied"
        );
        let seen = inspect(&r.packet);
        assert_eq!(seen.dst.octets()[..2], [198, 18], "{name}: {seen:?}");
        seen
    };
    let first = path("first packet");
    let b = run(first.name, &first.frame, first.fib, first.verdict);
    // The backend's SYN-ACK, as the backend the first packet chose sends it.
    run("first reply", &reply(&b, SYN_ACK), pathlen::Fib::NoRoute, 0);
    let est = path("established, next hop looked up");
    run(est.name, &est.frame, est.fib, est.verdict);
}

/// The next hop cached in a flow entry serves packets no longer than the
/// one whose FIB lookup (and MTU check) cached it; a longer one asks the
/// FIB, and when that sends it to the stack (too big for the route), the
/// cache stays for the flow's other packets.
#[test]
fn the_next_hop_cache_covers_packets_no_longer_than_the_one_checked() {
    use support::{Pkt, ACK, SYN, SYN_ACK};
    let mut vm = paths::vm().expect("vm");
    let all = paths::paths(std::net::Ipv4Addr::UNSPECIFIED);
    let forward = all
        .iter()
        .find(|p| p.name == "first packet")
        .expect("path")
        .fib;
    let run = |vm: &mut pathlen::Vm, fib, frame: &[u8]| {
        vm.fib = fib;
        vm.run("kpx_tc_ingress", frame, Default::default())
            .expect("run")
    };
    let small = Pkt::new("198.18.0.2", 46000, "198.19.0.10", 80, ACK).build();
    let mut big = Pkt::new("198.18.0.2", 46000, "198.19.0.10", 80, ACK);
    big.payload = vec![7; 1200];
    let big = big.build();
    let syn = Pkt::new("198.18.0.2", 46000, "198.19.0.10", 80, SYN).build();
    let opened = run(&mut vm, forward, &syn);
    assert_eq!(opened.verdict, 7);
    // The backend's answer establishes the connection (to the stack: the
    // original direction's next hop is still to be looked up).
    let b = inspect(&opened.packet);
    let synack = reply(&b, SYN_ACK);
    assert_eq!(run(&mut vm, pathlen::Fib::NoRoute, &synack).verdict, 0);
    // Looked up and cached.
    let r = run(&mut vm, forward, &small);
    assert_eq!((r.verdict, r.by_helper.get("fib_lookup")), (7, Some(&1)));
    // Cached: no lookup, even where the FIB would now say otherwise.
    let r = run(&mut vm, pathlen::Fib::NoRoute, &small);
    assert_eq!((r.verdict, r.by_helper.get("fib_lookup")), (7, None));
    // Longer than the packet the cache was checked with: asked, to the stack.
    let r = run(&mut vm, pathlen::Fib::NoRoute, &big);
    assert_eq!((r.verdict, r.by_helper.get("fib_lookup")), (0, Some(&1)));
    // The cache stays for the flow's usual packets.
    let r = run(&mut vm, pathlen::Fib::NoRoute, &small);
    assert_eq!((r.verdict, r.by_helper.get("fib_lookup")), (7, None));
    inspect(&r.packet);
}
