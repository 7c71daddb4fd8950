//! Map writes in the kernel: a sync plan written in batches
//! (`BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH`) leaves the maps exactly
//! as the same plan written one element at a time, and as the planner's
//! mirror says; a batch that fails part-way says how far it got; a batched
//! read (`BPF_MAP_LOOKUP_BATCH`) sees every element once.

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData};
use kpx::{
    control::{index::Index, manifests, model::NodeInfo},
    dataplane::{
        batch,
        maps::{Datapath, LoadOptions},
        reconcile::{self, BackendAddr, Mirror, Op, Scope},
    },
};

fn datapath() -> Datapath {
    testbed::built("the datapath", Datapath::load(&LoadOptions::default()))
}

/// The plan of a first sync of `n` services of `endpoints` endpoints each,
/// every third dual-stack (its IPv6 endpoints in a slice of their own),
/// then of the same cluster with every other service gone.
fn plans(n: u32, endpoints: u8) -> (Vec<Op>, Vec<Op>, Mirror) {
    let yaml = |n: u32, skip_odd: bool| {
        let mut out = manifests::Loaded::default();
        for i in (0..n).filter(|i| !skip_odd || i % 2 == 0) {
            let (hi, lo) = ((i / 250) as u8, (i % 250) as u8 + 1);
            let vip = Ipv4Addr::new(198, 19, hi, lo);
            let eps: Vec<Ipv4Addr> = (0..endpoints)
                .map(|e| Ipv4Addr::new(198, 18, hi, e + 10 * (i % 20) as u8))
                .collect();
            let mut text =
                testbed::service_yaml(&format!("s{i}"), vip, (80, 8080), (53, 5353), &eps);
            if i % 3 == 0 {
                let vip6 = format!("2001:2:0:ff::{:x}", i + 1);
                text = text.replace(
                    &format!("  clusterIP: {vip}\n"),
                    &format!("  clusterIP: {vip}\n  clusterIPs: [{vip}, '{vip6}']\n"),
                );
                let eps6: String = (0..endpoints)
                    .map(|e| {
                        format!(
                            "- addresses: ['2001:2:0:{hi:x}::{:x}']\n",
                            u32::from(e) + 10 * (i % 20)
                        )
                    })
                    .collect();
                text.push_str(&format!(
                    "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-6, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv6\nports:\n- {{name: http, protocol: TCP, port: 8080}}\n- {{name: dns, protocol: UDP, port: 5353}}\nendpoints:\n{eps6}"
                ));
            }
            manifests::parse_file("plan", &text, &mut out);
            assert!(out.problems.is_empty(), "{:?}", out.problems);
        }
        out
    };
    let node = NodeInfo {
        addresses: vec![
            Ipv4Addr::new(198, 18, 255, 1).into(),
            "2001:2:0:fe::1".parse().unwrap(),
        ],
        ..NodeInfo::named("node-1")
    };
    let mut index = Index::new(node);
    let mut mirror = Mirror::default();
    let cap = proxy_common::capacity::SERVICE_STATS;
    let all = yaml(n, false);
    index.replace_all(all.services, all.slices);
    let first = reconcile::reconcile(&mirror, &index.outcome().desired, Scope::All, cap).unwrap();
    for op in &first {
        mirror.record(op);
    }
    let half = yaml(n, true);
    index.replace_all(half.services, half.slices);
    let second = reconcile::reconcile(&mirror, &index.outcome().desired, Scope::All, cap).unwrap();
    for op in &second {
        mirror.record(op);
    }
    (first, second, mirror)
}

#[test]
#[ignore = "needs root"]
fn a_plan_written_in_batches_leaves_the_maps_as_one_write_at_a_time() {
    let (first, second, mirror) = plans(400, 4);
    let deletes = second
        .iter()
        .filter(|op| matches!(op, Op::DelService(_) | Op::DelSlot(_) | Op::DelBackend(_)))
        .count();
    assert!(
        first.len() > 3_000 && deletes > 1_000,
        "{} / {deletes}",
        first.len()
    );
    // Both families' maps are written: IPv6 frontends and slots are there.
    let v6 = |op: &&Op| matches!(op, Op::PutService(k, _) if k.addr.is_ipv6());
    assert!(first.iter().filter(v6).count() > 200);
    let (mut batched, mut single) = (datapath(), datapath());
    batched.maps.write_all(&first).unwrap();
    batched.maps.write_all(&second).unwrap();
    for op in first.iter().chain(&second) {
        single.maps.write(op).unwrap();
    }
    let (b, s) = (
        batched.maps.read_state().unwrap(),
        single.maps.read_state().unwrap(),
    );
    assert_eq!(b.services, s.services);
    assert_eq!(b.slots, s.slots);
    assert_eq!(b.backends, s.backends);
    assert_eq!(b.addrs, s.addrs);
    assert_eq!(b.names, s.names);
    assert_eq!(b.services, mirror.state.services);
    assert_eq!(b.slots, mirror.state.slots);
    assert_eq!(b.backends, mirror.state.backends);
    assert_eq!(b.addrs, mirror.state.addrs);
    // IPv6's entries are in IPv6's maps, in the datapath's layout.
    let v6_services = mirror
        .state
        .services
        .keys()
        .filter(|k| k.addr.is_ipv6())
        .count();
    assert!(v6_services > 100);
    assert_eq!(batched.maps.v6.services.keys().count(), v6_services);
    let v6_slots = mirror
        .state
        .backends
        .values()
        .filter(|b| b.addr.is_ipv6())
        .count();
    assert!(v6_slots > 0 && batched.maps.v6.slots.keys().count() >= v6_slots);
    // Deleting what is already gone (an interrupted earlier sync) is fine.
    batched.maps.write_all(&second).unwrap();
}

#[test]
#[ignore = "needs root"]
fn a_plan_written_from_a_second_thread_is_handed_back_in_order_and_reads_as_the_mirror() {
    let (first, second, mut mirror) = plans(400, 4);
    let config = Op::SetConfig(Default::default());
    mirror.record(&config);
    let mut dp = datapath();
    for (plan, chunk) in [(&first, 1000), (&second, 777), (&vec![config], 5)] {
        let mut handed = Vec::new();
        let (done, failed) = dp
            .maps
            .write_all_pipelined(plan, chunk, &mut |w| handed.extend_from_slice(w));
        assert!(failed.is_none(), "{failed:?}");
        assert_eq!(done, plan.len());
        assert!(handed == *plan, "handed back out of order");
    }
    let read = dp.maps.read_state().unwrap();
    assert_eq!(read.services, mirror.state.services);
    assert_eq!(read.slots, mirror.state.slots);
    assert_eq!(read.backends, mirror.state.backends);
    // A resync's digest of these maps: the mirror's fingerprint, and the
    // whole read's; and no longer once an entry is changed behind it.
    let digest = dp.maps.read_digest().unwrap();
    assert!(digest.matches(mirror.fingerprint));
    assert!(digest.matches(read.fingerprint()));
    let gone = *mirror.state.services.keys().next().unwrap();
    dp.maps.write(&Op::DelService(gone)).unwrap();
    assert!(!dp.maps.read_digest().unwrap().matches(mirror.fingerprint));
}

#[test]
#[ignore = "needs root"]
fn a_slot_holding_another_backend_than_its_id_names_is_told_apart_by_both_reads() {
    let mut dp = datapath();
    let mut mirror = Mirror::default();
    let backend = |last: u8| BackendAddr {
        addr: Ipv4Addr::new(198, 18, 0, last).into(),
        port: 8080,
        proto: proxy_common::IPPROTO_TCP,
        local: false,
    };
    let key = |svc_id: u32| proxy_common::SlotKey { svc_id, slot: 0 };
    // Two frontends' slots sharing backend 7, as a ClusterIP and its
    // NodePort do.
    let plan = [
        Op::PutBackend(7, backend(10)),
        Op::PutSlot(key(1), 7, backend(10)),
        Op::PutSlot(key(2), 7, backend(10)),
        Op::SetConfig(Default::default()),
    ];
    dp.maps.write_all(&plan).unwrap();
    for op in &plan {
        mirror.record(op);
    }
    assert!(dp.maps.read_digest().unwrap().matches(mirror.fingerprint));
    assert_eq!(dp.maps.read_state().unwrap().differences(&mirror.state), 0);
    // Either slot holding another backend under id 7, whichever of the
    // two a read meets last.
    for svc_id in [1, 2] {
        dp.maps
            .write(&Op::PutSlot(key(svc_id), 7, backend(99)))
            .unwrap();
        assert!(!dp.maps.read_digest().unwrap().matches(mirror.fingerprint));
        let read = dp.maps.read_state().unwrap();
        assert!(read.differences(&mirror.state) > 0, "slot {svc_id}");
        dp.maps
            .write(&Op::PutSlot(key(svc_id), 7, backend(10)))
            .unwrap();
    }
}

#[test]
#[ignore = "needs root"]
fn a_batched_read_sees_every_element_once() {
    let map: HashMap<MapData, u32, u64> = HashMap::create(40_000, 0).expect("a map");
    let raw = aya::maps::IterableMap::map(&map);
    assert!(batch::lookup_all::<u32, u64>(raw).unwrap().is_empty());
    // More than one batch's worth.
    let keys: Vec<u32> = (0..25_000).map(|i| i * 7 + 1).collect();
    let values: Vec<u64> = keys.iter().map(|k| u64::from(*k) << 20).collect();
    batch::update(raw, &keys, &values).unwrap();
    let mut read = batch::lookup_all::<u32, u64>(raw).unwrap();
    read.sort();
    let want: Vec<(u32, u64)> = keys.iter().copied().zip(values.iter().copied()).collect();
    assert_eq!(read.len(), want.len(), "each element once");
    assert_eq!(read, want);
}

#[test]
#[ignore = "needs root"]
fn a_batch_that_fails_part_way_says_how_far_it_got() {
    let mut map: HashMap<MapData, u32, u32> = HashMap::create(4, 0).expect("a map");
    let keys: Vec<u32> = (1..=10).collect();
    let partial = batch::update(aya::maps::IterableMap::map(&map), &keys, &keys)
        .expect_err("4 entries cannot hold 10");
    assert_eq!(partial.done, 4, "{:?}", partial.error);
    assert_eq!(map.keys().count(), 4);
    // A missing key in the middle of a delete is skipped, not an error.
    batch::delete(aya::maps::IterableMap::map(&map), &[1, 99, 2, 3]).unwrap();
    let left: Vec<u32> = map.keys().map(|k| k.unwrap()).collect();
    assert_eq!(left, vec![4]);
    map.remove(&4).unwrap();
}

#[test]
#[ignore = "needs root"]
fn per_cpu_statistics_are_reset_in_one_batch_on_every_cpu() {
    let mut dp = datapath();
    let cpus = aya::util::nr_cpus().unwrap();
    let busy = proxy_common::ServiceStats {
        packets: 7,
        bytes: 700,
        new_flows: 1,
        reply_packets: 3,
        reply_bytes: 300,
        xdp_packets: 2,
        socket_flows: 1,
    };
    for id in 1..=3u32 {
        let values = aya::maps::PerCpuValues::try_from(vec![busy; cpus]).unwrap();
        dp.maps.service_stats.set(id, values, 0).unwrap();
    }
    assert_eq!(dp.maps.service_stats(2).unwrap().packets, 7 * cpus as u64);
    dp.maps
        .write_all(&[Op::ResetStats(1), Op::ResetStats(2), Op::ResetStats(3)])
        .unwrap();
    for id in 1..=3 {
        let s = dp.maps.service_stats(id).unwrap();
        assert_eq!((s.packets, s.bytes, s.new_flows), (0, 0, 0), "service {id}");
    }
}
