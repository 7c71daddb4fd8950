//! Upgrades over pinned maps: a new kpx meeting the maps an older (or
//! unknown) layout left in bpffs migrates them with their flows, or says it
//! cannot, replaces them and counts what was lost; it never hands the new
//! programs a map of another layout. The older layouts are synthetic: maps
//! created and pinned here exactly as that layout had them.

mod support;

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapInfo};
use kpx::dataplane::{
    bpffs,
    conntrack::flow_ports,
    maps::{CtTable, Datapath, LoadOptions},
    ports::PortFilter,
};
use proxy_common::{
    map_names, Backend, CtKey, CtTuple, CtValue, Event, Slot, SlotKey, IPPROTO_TCP, IPPROTO_UDP,
    LAYOUT_VERSION,
};
use support::{v6::*, *};

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// A fresh bpffs directory of this test's own, removed (with every pin in
/// it) when dropped.
struct PinDir(PathBuf);

impl PinDir {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/kpx-test-{name}-{}",
            std::process::id()
        ));
        testbed::built("bpffs", bpffs::ensure(&dir));
        Self(dir)
    }

    fn pin(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The datapath loaded over the pins, and its port filter written as
    /// the agent writes it before attaching the programs: from the
    /// frontends and backends the maps hold and the flows the tables hold
    /// (an older layout's address filter, in its `KPX_PORTS`, is not
    /// carried: its words now live in `KPX_DESTS`).
    fn load(&self) -> Datapath {
        let mut dp = testbed::built(
            "the datapath over pinned maps",
            Datapath::load(&LoadOptions {
                pin_dir: Some(self.0.clone()),
                conntrack_entries: None,
                ..Default::default()
            }),
        );
        let state = dp.maps.read_state().expect("reading the pinned maps");
        let mut ports = PortFilter::rebuild(&state, &dp.maps).expect("the port filter");
        let (live, addrs) = flow_ports(&dp.maps).expect("the flows' ports");
        ports.hold_live(&live, &addrs);
        ports.flush(&mut dp.maps).expect("writing the port filter");
        dp
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Creates a map of `map_type` with `K`/`V` sizes and pins it at `path`.
fn create_pinned<K, V>(path: &Path, map_type: u32, max_entries: u32) -> MapData {
    let obj = aya_obj::Map::new_from_params(
        map_type,
        size_of::<K>() as u32,
        size_of::<V>() as u32,
        max_entries,
        0,
    );
    let data = MapData::create(obj, "kpx_test_old", None).expect("creating a map");
    data.pin(path).expect("pinning it");
    data
}

fn layout_of(dir: &PinDir) -> u32 {
    let data = MapData::from_pin(dir.pin(map_names::LAYOUT)).expect("the layout pin");
    let map: Array<MapData, u32> = Map::from_map_data(data).unwrap().try_into().unwrap();
    map.get(&0, 0).unwrap()
}

/// Pins `old`'s service maps (and its conntrack tables, as layouts 2 and
/// 3 had them, when `conntrack`) under their names, and its slots as
/// layouts 1 and 2 had them.
fn pin_old_maps(dir: &PinDir, old: &Datapath, conntrack: bool) {
    use aya::maps::IterableMap as _;
    let mut maps = vec![
        (map_names::SERVICES, old.maps.services.map()),
        (map_names::SERVICE_ADDRS, old.maps.service_addrs.map()),
        (map_names::PORTS, old.maps.ports.map()),
    ];
    if conntrack {
        maps.push((map_names::CT_ANY, old.maps.ct.any.map()));
        pin_v3_established(dir, map_names::CT_TCP, old.maps.ct.entries());
    }
    for (name, map) in maps {
        map.pin(dir.pin(name)).expect("pinning an old layout's map");
    }
    pin_v2_slots(dir, old);
}

/// An established table as layouts 2 and 3 kept it: keyed by the whole
/// `CtKey`.
type OldEstablished<A> = HashMap<MapData, CtKey<A>, CtValue<A>>;

/// Pins the established entries among `entries` as layouts 2 and 3 kept
/// them, in a table `name`. Returns how many, and the table (open, as an
/// old program would hold it).
fn pin_v3_established<A: Copy>(
    dir: &PinDir,
    name: &str,
    entries: Vec<(CtTable, CtKey<A>, CtValue<A>)>,
) -> (usize, OldEstablished<A>)
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    let data = create_pinned::<CtKey<A>, CtValue<A>>(&dir.pin(name), BPF_MAP_TYPE_HASH, 1024);
    let mut old: OldEstablished<A> = Map::HashMap(data).try_into().unwrap();
    let established: Vec<_> = entries
        .into_iter()
        .filter(|(t, _, _)| *t == CtTable::Tcp)
        .collect();
    for (_, k, v) in &established {
        old.insert(k, v, 0).expect("old entry");
    }
    (established.len(), old)
}

/// Pins `dp`'s slots as layouts 1 and 2 had them: a backend id in each
/// slot, the backends in `KPX_BACKENDS`.
fn pin_v2_slots(dir: &PinDir, dp: &Datapath) {
    let slots: Vec<(SlotKey, Slot)> = dp.maps.slots.iter().map(|kv| kv.unwrap()).collect();
    assert!(!slots.is_empty());
    let data = create_pinned::<SlotKey, u32>(&dir.pin(map_names::SLOTS), BPF_MAP_TYPE_HASH, 64);
    let mut old_slots: HashMap<MapData, SlotKey, u32> = Map::HashMap(data).try_into().unwrap();
    let data = create_pinned::<u32, Backend>(
        &dir.pin(proxy_common::legacy_map_names::BACKENDS),
        BPF_MAP_TYPE_HASH,
        64,
    );
    let mut old_backends: HashMap<MapData, u32, Backend> = Map::HashMap(data).try_into().unwrap();
    for (k, s) in &slots {
        old_slots.insert(k, s.backend_id, 0).unwrap();
        old_backends.insert(s.backend_id, s.backend, 0).unwrap();
    }
}

/// After an upgrade: the slots carried with their backends in them, the
/// old backend map gone.
fn assert_slots_carried(dir: &PinDir, dp: &Datapath) {
    assert!(!dir.pin(proxy_common::legacy_map_names::BACKENDS).exists());
    let info = MapInfo::from_pin(dir.pin(map_names::SLOTS)).unwrap();
    assert_eq!(info.value_size() as usize, size_of::<Slot>());
    assert!(dp
        .maps
        .slots
        .iter()
        .all(|kv| kv.is_ok_and(|(_, s)| s.backend.addr != 0)));
    assert!(dp.maps.slots.keys().count() > 0);
}

/// Layout 1 (before versioning): one LRU conntrack table, `KPX_CT`, beside
/// the control-plane maps this layout still has. Its flows are carried
/// into the two tables, each where the datapath would have put it, and keep
/// their backends; the control-plane maps are shared as they are.
#[test]
#[ignore = "needs root"]
fn layout_1_maps_are_migrated_with_their_flows() {
    let dir = PinDir::new("upgrade-v1");
    // What a layout-1 agent left: its flows (made by today's datapath,
    // whose entries layout 1 shared) in one LRU map...
    let (established, embryonic, udp) = {
        let mut old = datapath();
        cluster(&mut old);
        let est = handshake(&mut old, &Pkt::new(CLIENT, 43000, VIP, 80, SYN));
        let emb = inspect(&run(&mut old, &Pkt::new(CLIENT, 43001, VIP, 80, SYN).build()).bytes);
        let udp = inspect(&run(&mut old, &Pkt::new(CLIENT, 43002, VIP, 53, UDP).build()).bytes);
        let entries = old.maps.ct_entries();
        assert_eq!(entries.len(), 6);
        let data = create_pinned::<CtKey, CtValue>(
            &dir.pin(proxy_common::legacy_map_names::CONNTRACK),
            BPF_MAP_TYPE_LRU_HASH,
            1024,
        );
        let mut v1: HashMap<MapData, CtKey, CtValue> =
            Map::LruHashMap(data).try_into().expect("typed");
        for (_, k, v) in &entries {
            v1.insert(k, v, 0).expect("old entry");
        }
        // ...and its service maps, pinned under their names, the slots
        // and backends as layouts 1 and 2 had them.
        pin_old_maps(&dir, &old, false);
        (est, emb, udp)
    };
    assert!(!dir.pin(map_names::LAYOUT).exists());

    let mut dp = dir.load();
    let up = dp.upgrade.clone().expect("loaded over pins");
    assert_eq!((up.from, up.carried, up.lost), (Some(1), 6, 0));
    assert!(!dir.pin(proxy_common::legacy_map_names::CONNTRACK).exists());
    assert_slots_carried(&dir, &dp);
    assert_eq!(layout_of(&dir), LAYOUT_VERSION);
    let count = |dp: &Datapath, t| {
        let entries = dp.maps.ct_entries().into_iter();
        entries.filter(|(table, _, _)| *table == t).count()
    };
    assert_eq!((count(&dp, CtTable::Tcp), count(&dp, CtTable::Any)), (2, 4));

    // The established connection goes on to the same backend, both ways.
    let out = run(&mut dp, &Pkt::new(CLIENT, 43000, VIP, 80, ACK).build());
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(inspect(&out.bytes), established);
    let back = run(&mut dp, &reply(&established, ACK));
    assert_eq!(inspect(&back.bytes).src, ip(VIP));
    // The handshake in progress completes on its backend.
    let synack = run(&mut dp, &reply(&embryonic, SYN_ACK));
    assert_eq!(synack.verdict, TC_ACT_OK);
    assert_eq!(event(&mut dp, Event::CtEstablished), 1);
    let ack = run(&mut dp, &Pkt::new(CLIENT, 43001, VIP, 80, ACK).build());
    assert_eq!(inspect(&ack.bytes), embryonic);
    // The UDP flow's answer still comes from the service.
    let answer = run(&mut dp, &reply(&udp, UDP));
    assert_eq!(inspect(&answer.bytes).src, ip(VIP));
    // The shared service maps serve new connections at once.
    let fresh = run(&mut dp, &Pkt::new(CLIENT, 43003, VIP, 80, SYN).build());
    assert_eq!(fresh.verdict, TC_ACT_OK);
    drop(dp);

    // The next start finds its own layout: shared, nothing to carry.
    let dp = dir.load();
    let up = dp.upgrade.clone().expect("loaded over pins");
    assert_eq!((up.from, up.carried, up.lost), (Some(LAYOUT_VERSION), 0, 0));
    assert_eq!(count(&dp, CtTable::Tcp), 4);
    assert!(dp
        .maps
        .ct_get(&ct_key(CLIENT, 43002, VIP, 53, IPPROTO_UDP))
        .is_some());
}

/// Layout 2 (slots holding a backend id, backends in `KPX_BACKENDS`): the
/// other conntrack table is shared as it is, the established one carried
/// into this layout's (keyed by `CtTuple`), and every slot is carried with
/// its backend in it, so new flows are served from the first packet, before
/// any sync.
#[test]
#[ignore = "needs root"]
fn layout_2_slots_are_carried_with_their_backends() {
    let dir = PinDir::new("upgrade-v2");
    let established = {
        let mut old = datapath();
        cluster(&mut old);
        let est = handshake(&mut old, &Pkt::new(CLIENT, 43100, VIP, 80, SYN));
        pin_old_maps(&dir, &old, true);
        let data = create_pinned::<u32, u32>(&dir.pin(map_names::LAYOUT), BPF_MAP_TYPE_ARRAY, 1);
        let mut layout: Array<MapData, u32> = Map::Array(data).try_into().unwrap();
        layout.set(0, 2, 0).unwrap();
        est
    };

    let mut dp = dir.load();
    let up = dp.upgrade.clone().expect("loaded over pins");
    assert_eq!((up.from, up.carried, up.lost), (Some(2), 2, 0));
    assert_eq!(layout_of(&dir), LAYOUT_VERSION);
    assert_slots_carried(&dir, &dp);
    // The established connection goes on.
    let out = run(&mut dp, &Pkt::new(CLIENT, 43100, VIP, 80, ACK).build());
    assert_eq!(inspect(&out.bytes), established);
    // New connections reach a backend of the service at once.
    let fresh = inspect(&run(&mut dp, &Pkt::new(CLIENT, 43101, VIP, 80, SYN).build()).bytes);
    assert_ne!(fresh.dst, ip(VIP));
    assert_eq!(drops(&mut dp, proxy_common::DropReason::BackendMissing), 0);
}

/// Layout 3 (both families' established tables keyed by the whole
/// `CtKey`): their connections are carried into this layout's tables,
/// keyed by `CtTuple`, and go on both ways on their backends; the other
/// tables are shared as they are. A connection the old programs
/// established while the new ones loaded is carried once they are
/// attached (`Datapath::carry_late`).
#[test]
#[ignore = "needs root"]
fn layout_3_established_flows_of_both_families_are_carried() {
    let dir = PinDir::new("upgrade-v3");
    let (established, established6, carried, late, late_entries, mut old_tcp) = {
        let mut old = datapath();
        cluster(&mut old);
        cluster6(&mut old);
        let est = handshake(&mut old, &Pkt::new(CLIENT, 43200, VIP, 80, SYN));
        let syn6 = Pkt6::new(CLIENT6, 43200, VIP6, 80, SYN).build();
        let est6 = inspect6(&run(&mut old, &syn6).bytes);
        assert_eq!(run(&mut old, &reply6(&est6, SYN_ACK)).verdict, TC_ACT_OK);
        // A handshake in progress stays where it is (`CT_ANY` is shared).
        run(&mut old, &Pkt::new(CLIENT, 43201, VIP, 80, SYN).build());
        // A connection the old programs establish after the new kpx read
        // their tables: its entries are written below, after the load.
        let late = handshake(&mut old, &Pkt::new(CLIENT, 43202, VIP, 80, SYN));
        let (early, late_entries): (Vec<_>, Vec<_>) =
            old.maps.ct.entries().into_iter().partition(|(_, k, _)| {
                k.src_port != 43202u16.to_be() && k.dst_port != 43202u16.to_be()
            });
        let (n4, old_tcp) = pin_v3_established(&dir, map_names::CT_TCP, early);
        let (n6, _) = pin_v3_established(&dir, map_names::CT6_TCP, old.maps.v6.ct.entries());
        assert_eq!(n4 + n6, 4, "both directions of one connection per family");
        use aya::maps::IterableMap as _;
        for (name, map) in [
            (map_names::SERVICES, old.maps.services.map()),
            (map_names::SLOTS, old.maps.slots.map()),
            (map_names::PORTS, old.maps.ports.map()),
            (map_names::CT_ANY, old.maps.ct.any.map()),
            (map_names::SERVICES6, old.maps.v6.services.map()),
            (map_names::SLOTS6, old.maps.v6.slots.map()),
        ] {
            map.pin(dir.pin(name)).expect("pinning an old layout's map");
        }
        let data = create_pinned::<u32, u32>(&dir.pin(map_names::LAYOUT), BPF_MAP_TYPE_ARRAY, 1);
        let mut layout: Array<MapData, u32> = Map::Array(data).try_into().unwrap();
        layout.set(0, 3, 0).unwrap();
        (est, est6, (n4 + n6) as u64, late, late_entries, old_tcp)
    };

    let mut dp = dir.load();
    let up = dp.upgrade.clone().expect("loaded over pins");
    assert_eq!((up.from, up.carried, up.lost), (Some(3), carried, 0));
    assert_eq!(layout_of(&dir), LAYOUT_VERSION);
    for (name, key) in [
        (map_names::CT_TCP, size_of::<CtTuple>()),
        (map_names::CT6_TCP, size_of::<CtTuple<proxy_common::In6>>()),
    ] {
        let info = MapInfo::from_pin(dir.pin(name)).unwrap();
        assert_eq!(info.key_size() as usize, key, "{name}");
    }
    // Both connections go on, both ways, on their backends.
    let out = run(&mut dp, &Pkt::new(CLIENT, 43200, VIP, 80, ACK).build());
    assert_eq!(inspect(&out.bytes), established);
    assert_eq!(
        inspect(&run(&mut dp, &reply(&established, ACK)).bytes).src,
        ip(VIP)
    );
    let out6 = run(&mut dp, &Pkt6::new(CLIENT6, 43200, VIP6, 80, ACK).build());
    assert_eq!(inspect6(&out6.bytes), established6);
    let back6 = inspect6(&run(&mut dp, &reply6(&established6, ACK)).bytes);
    assert_eq!(back6.src, ip6(VIP6));
    // The handshake in progress completes: `CT_ANY` was shared.
    let pending = dp.maps.ct_get(&ct_key(CLIENT, 43201, VIP, 80, IPPROTO_TCP));
    assert_eq!(pending.map(|(t, _)| t), Some(CtTable::Any));

    // The old programs, still attached while the new ones load, establish
    // one more connection in their table...
    for (_, k, v) in &late_entries {
        old_tcp.insert(k, v, 0).expect("an old program's entry");
    }
    assert!(dp
        .maps
        .ct_get(&ct_key(CLIENT, 43202, VIP, 80, IPPROTO_TCP))
        .is_none());
    // ...carried once the new ones are attached, and nothing twice.
    assert_eq!(dp.carry_late(), 2);
    assert_eq!(dp.upgrade.as_ref().map(|u| u.carried), Some(carried + 2));
    assert_eq!(dp.carry_late(), 0);
    let out = run(&mut dp, &Pkt::new(CLIENT, 43202, VIP, 80, ACK).build());
    assert_eq!(inspect(&out.bytes), late);
    assert_eq!(
        inspect(&run(&mut dp, &reply(&late, ACK)).bytes).src,
        ip(VIP)
    );
    assert_eq!(event(&mut dp, Event::CtEstablished), 0);
}

/// A layout this kpx does not know (a newer one, met on a downgrade) is
/// never shared: every pin is replaced, and its flows are counted as lost.
#[test]
#[ignore = "needs root"]
fn an_unknown_layout_is_replaced_and_its_flows_counted() {
    let dir = PinDir::new("upgrade-unknown");
    let data = create_pinned::<u32, u32>(&dir.pin(map_names::LAYOUT), BPF_MAP_TYPE_ARRAY, 1);
    let mut layout: Array<MapData, u32> = Map::Array(data).try_into().unwrap();
    layout.set(0, 99, 0).unwrap();
    // Its established table has a value kpx cannot read.
    let data = create_pinned::<CtKey, [u8; 96]>(&dir.pin(map_names::CT_TCP), BPF_MAP_TYPE_HASH, 64);
    let mut ct: HashMap<MapData, CtKey, [u8; 96]> = Map::HashMap(data).try_into().unwrap();
    for port in 0..3 {
        let k = ct_key(CLIENT, 50000 + port, VIP, 80, proxy_common::IPPROTO_TCP);
        ct.insert(k, [7u8; 96], 0).unwrap();
    }
    // A map of its own, which this kpx has never heard of.
    create_pinned::<u32, u64>(&dir.pin("KPX_FROM_THE_FUTURE"), BPF_MAP_TYPE_HASH, 8);

    let dp = dir.load();
    let up = dp.upgrade.clone().expect("loaded over pins");
    assert_eq!((up.from, up.carried, up.lost), (Some(99), 0, 3));
    assert_eq!(layout_of(&dir), LAYOUT_VERSION);
    let info = MapInfo::from_pin(dir.pin(map_names::CT_TCP)).unwrap();
    assert_eq!(info.value_size() as usize, size_of::<CtValue>());
    assert!(!dir.pin("KPX_FROM_THE_FUTURE").exists());
    assert_eq!(dp.maps.ct_entries().len(), 0);
}

/// Within one layout version, a pin whose sizes or type are not this
/// build's (a build that changed a map without a new version) is replaced,
/// not handed to the programs.
#[test]
#[ignore = "needs root"]
fn a_pinned_map_of_another_shape_is_replaced_not_shared() {
    let dir = PinDir::new("upgrade-shape");
    let data = create_pinned::<u32, u32>(&dir.pin(map_names::LAYOUT), BPF_MAP_TYPE_ARRAY, 1);
    let mut layout: Array<MapData, u32> = Map::Array(data).try_into().unwrap();
    layout.set(0, LAYOUT_VERSION, 0).unwrap();
    // The right sizes, the wrong type: an LRU where established flows must
    // never be evicted.
    create_pinned::<CtTuple, CtValue>(&dir.pin(map_names::CT_TCP), BPF_MAP_TYPE_LRU_HASH, 64);
    create_pinned::<CtKey, [u8; 40]>(&dir.pin(map_names::CT_ANY), BPF_MAP_TYPE_LRU_HASH, 64);
    let dp = dir.load();
    drop(dp);
    let tcp = MapInfo::from_pin(dir.pin(map_names::CT_TCP)).unwrap();
    assert_eq!(tcp.map_type().unwrap(), aya::maps::MapType::Hash);
    let any = MapInfo::from_pin(dir.pin(map_names::CT_ANY)).unwrap();
    assert_eq!(any.value_size() as usize, size_of::<CtValue>());
}

/// A node that served no IPv6 has IPv6's tables small; configured for
/// IPv6 later, its next start creates them at full size (IPv4's tables,
/// and their flows, untouched).
#[test]
#[ignore = "needs root"]
fn ipv6_tables_created_small_grow_once_ipv6_is_configured() {
    use kpx::dataplane::maps::IPV6_OFF_ENTRIES;
    let dir = PinDir::new("ipv6-grow");
    let load = |ipv6: bool| {
        testbed::built(
            "the datapath over pinned maps",
            Datapath::load(&LoadOptions {
                pin_dir: Some(dir.0.clone()),
                conntrack_entries: Some(4096),
                ipv6,
            }),
        )
    };
    let entries = |name: &str| MapInfo::from_pin(dir.pin(name)).unwrap().max_entries();
    let mut dp = load(false);
    for name in [map_names::CT6_TCP, map_names::CT6_ANY, map_names::AFFINITY6] {
        assert_eq!(entries(name), IPV6_OFF_ENTRIES, "{name}");
    }
    let key = CtKey::new(1, 2, 3, 4, IPPROTO_UDP);
    dp.maps
        .ct
        .insert(CtTable::Any, &key, &CtValue::default())
        .unwrap();
    drop(dp);
    // Unchanged while IPv6 stays off.
    drop(load(false));
    assert_eq!(entries(map_names::CT6_TCP), IPV6_OFF_ENTRIES);
    let dp = load(true);
    assert_eq!(entries(map_names::CT6_TCP), 4096);
    assert_eq!(entries(map_names::CT6_ANY), 2048);
    assert!(entries(map_names::AFFINITY6) > IPV6_OFF_ENTRIES);
    assert!(
        dp.maps.ct.get(CtTable::Any, &key).is_some(),
        "IPv4's flow kept"
    );
}
