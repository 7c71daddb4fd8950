//! The planner, one write at a time: consistent after each, minimal, and
//! equal whatever the scope.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
};

use proxy_common::{ServiceValue, SVC_F_SOURCE_RANGES};

use super::*;
use crate::control::model::{Desired, Endpoint, Frontend, FrontendKey};
use proxy_common::{IPPROTO_TCP, IPPROTO_UDP};

/// A full reconcile from what the maps hold (as after a re-read).
fn full(state: &MapState, d: &Desired, max: u32) -> Result<Vec<Op>, PlanError> {
    reconcile(&Mirror::new(state.clone()), d, Scope::All, max)
}

/// (VIP, port, protocol, endpoints) per frontend.
type Spec<'a> = (&'a str, u16, u8, &'a [(&'a str, u16)]);

fn desired(spec: &[Spec]) -> Desired {
    let mut d = Desired::default();
    for (vip, port, proto, eps) in spec {
        d.frontends.insert(
            FrontendKey {
                addr: vip.parse().unwrap(),
                port: *port,
                proto: *proto,
            },
            Arc::new(Frontend {
                name: format!("ns/{vip}:{port}").into(),
                backends: eps
                    .iter()
                    .map(|(a, p)| Endpoint {
                        addr: a.parse().unwrap(),
                        port: *p,
                        local: false,
                    })
                    .collect(),
                ..Frontend::default()
            }),
        );
    }
    d
}

/// The datapath view `desired` should produce.
fn expected_view(d: &Desired) -> BTreeMap<FrontendKey, Vec<BackendAddr>> {
    d.frontends
        .iter()
        .map(|(k, f)| {
            let mut bs: Vec<BackendAddr> = f.backends.iter().map(|e| backend(e, k.proto)).collect();
            bs.sort();
            (*k, bs)
        })
        .collect()
}

/// Applies `ops` one at a time: consistent after each, and a service
/// alive before and after only ever selects old or new backends.
fn apply(m: &mut Mirror, ops: &[Op], after: &BTreeMap<FrontendKey, Vec<BackendAddr>>) {
    let before = m.state.view().expect("consistent before");
    for (n, op) in ops.iter().enumerate() {
        m.record(op);
        let view = m
            .state
            .view()
            .unwrap_or_else(|e| panic!("inconsistent after write {n} {op:?}: {e}\n{ops:#?}"));
        for (k, backends) in &view {
            if let (Some(old), Some(new)) = (before.get(k), after.get(k)) {
                for b in backends {
                    assert!(old.contains(b) || new.contains(b), "{k:?} selects {b:?}");
                }
            }
        }
    }
    assert_eq!(&m.state.view().expect("consistent"), after);
    // Kept write by write, it is what a walk of the whole state gives.
    assert_eq!(m.fingerprint, m.state.fingerprint());
}

/// Converges `state` on `d` by a full reconcile, write by write (see
/// [`apply`]); then nothing is left to do and nothing unreferenced is left.
fn converge(state: &mut MapState, d: &Desired) -> Vec<Op> {
    let ops = full(state, d, 1024).unwrap();
    let mut m = Mirror::new(state.clone());
    apply(&mut m, &ops, &expected_view(d));
    *state = m.state;
    assert_eq!(full(state, d, 1024).unwrap(), vec![]);
    let used: HashSet<u32> = state.slots.values().collect();
    assert!(
        state.backends.keys().all(|id| used.contains(id)),
        "leaked backends"
    );
    ops
}

const VIP: &str = "198.19.0.10";

#[test]
fn from_nothing_then_no_change_writes_nothing() {
    let mut s = MapState::default();
    let d = desired(&[(
        VIP,
        80,
        IPPROTO_TCP,
        &[("198.18.1.1", 8080), ("198.18.1.2", 8080)],
    )]);
    let ops = converge(&mut s, &d);
    // 2 backends, stats reset, 2 slots, address, service, name.
    assert_eq!(ops.len(), 8, "{ops:#?}");
}

#[test]
fn one_endpoint_added_is_three_writes() {
    let mut s = MapState::default();
    converge(
        &mut s,
        &desired(&[(VIP, 80, IPPROTO_TCP, &[("198.18.1.1", 8080)])]),
    );
    let ops = converge(
        &mut s,
        &desired(&[(
            VIP,
            80,
            IPPROTO_TCP,
            &[("198.18.1.1", 8080), ("198.18.1.2", 8080)],
        )]),
    );
    assert!(matches!(ops[0], Op::PutBackend(..)));
    assert!(matches!(ops[1], Op::PutSlot(SlotKey { slot: 1, .. }, ..)));
    assert!(matches!(
        ops[2],
        Op::PutService(_, ServiceValue { count: 2, .. })
    ));
    assert_eq!(ops.len(), 3);
}

#[test]
fn one_endpoint_removed_keeps_the_others_in_their_slots() {
    let mut s = MapState::default();
    let three = [
        ("198.18.1.1", 8080),
        ("198.18.1.2", 8080),
        ("198.18.1.3", 8080),
    ];
    converge(&mut s, &desired(&[(VIP, 80, IPPROTO_TCP, &three)]));
    let ops = converge(
        &mut s,
        &desired(&[(VIP, 80, IPPROTO_TCP, &[three[0], three[2]])]),
    );
    // Slot 1 gets backend 3; count shrinks; slot 2 and backend 2 go.
    assert_eq!(ops.len(), 4, "{ops:#?}");
    assert!(matches!(ops[3], Op::DelBackend(_)));
}

#[test]
fn shared_backends_are_written_once_and_kept_while_used() {
    let mut s = MapState::default();
    let eps: &[(&str, u16)] = &[("198.18.1.1", 8080)];
    converge(
        &mut s,
        &desired(&[
            (VIP, 80, IPPROTO_TCP, eps),
            ("198.19.0.11", 80, IPPROTO_TCP, eps),
        ]),
    );
    assert_eq!(s.backends.len(), 1);
    converge(&mut s, &desired(&[("198.19.0.11", 80, IPPROTO_TCP, eps)]));
    assert_eq!(s.backends.len(), 1);
    assert_eq!(s.addrs.len(), 1);
    assert_eq!(s.names.len(), 1);
}

#[test]
fn ids_freed_by_a_plan_are_not_reused_by_it() {
    let mut s = MapState::default();
    converge(
        &mut s,
        &desired(&[(VIP, 80, IPPROTO_TCP, &[("198.18.1.1", 8080)])]),
    );
    let old_id = s.services.values().next().unwrap().svc_id;
    // Replace the service and its backend in one plan.
    converge(
        &mut s,
        &desired(&[("198.19.0.12", 80, IPPROTO_TCP, &[("198.18.1.9", 8080)])]),
    );
    assert_ne!(s.services.values().next().unwrap().svc_id, old_id);
}

#[test]
fn running_out_of_service_ids_is_an_error_not_a_panic() {
    let d = desired(&[(VIP, 80, IPPROTO_TCP, &[]), (VIP, 81, IPPROTO_TCP, &[])]);
    assert_eq!(
        full(&MapState::default(), &d, 1),
        Err(PlanError::OutOfServiceIds(1))
    );
}

mod random {
    //! Randomized (with shrinking): whatever the changes, every write
    //! leaves a consistent datapath, and a touched reconcile leaves
    //! nothing for a full one to do.

    use proptest::{collection, prelude::*};

    use super::*;
    use crate::control::cidr::Cidr;

    /// 30 frontends: TCP :80 and UDP :53 on 15 addresses.
    fn key(i: u8) -> FrontendKey {
        FrontendKey {
            addr: std::net::Ipv4Addr::new(198, 19, 0, i / 2 + 1).into(),
            port: if i.is_multiple_of(2) { 80 } else { 53 },
            proto: if i.is_multiple_of(2) {
                IPPROTO_TCP
            } else {
                IPPROTO_UDP
            },
        }
    }

    fn endpoints() -> impl Strategy<Value = Vec<Endpoint>> {
        collection::btree_set(1..=12u8, 0..5).prop_map(|s| {
            s.into_iter()
                .map(|h| Endpoint {
                    addr: std::net::Ipv4Addr::new(198, 18, 1, h).into(),
                    port: 8080,
                    local: false,
                })
                .collect()
        })
    }

    /// Half with a Local policy (a second slot table), a third with
    /// source ranges.
    fn frontend() -> impl Strategy<Value = Frontend> {
        let range = (0..4u8, 14..=24u8).prop_map(|(n, len)| {
            Cidr::new(std::net::Ipv4Addr::new(198, 18, n, 7).into(), len).expect("len <= 32")
        });
        (
            endpoints(),
            any::<bool>(),
            endpoints(),
            prop::bool::weighted(1.0 / 3.0),
            collection::vec(range, 1..=3),
            0..2u32,
        )
            .prop_map(|(backends, local, local_eps, ranged, source_ranges, aff)| {
                Frontend {
                    name: format!("f{}", backends.len()).into(),
                    backends,
                    local_backends: if local { local_eps } else { Vec::new() },
                    flags: if local { proxy_common::SVC_F_LOCAL } else { 0 }
                        | if ranged { SVC_F_SOURCE_RANGES } else { 0 },
                    source_ranges,
                    affinity_timeout: aff,
                }
            })
    }

    fn desired_of() -> impl Strategy<Value = Desired> {
        collection::btree_map(0..30u8, frontend(), 0..20).prop_map(|m| Desired {
            frontends: m.into_iter().map(|(i, f)| (key(i), Arc::new(f))).collect(),
        })
    }

    /// A batch of changes: a frontend replaced, or (one in four) removed.
    fn batch() -> impl Strategy<Value = Vec<(u8, Option<Frontend>)>> {
        collection::vec((0..30u8, prop::option::weighted(0.75, frontend())), 1..=4)
    }

    proptest! {
        #[test]
        fn full_reconciles_converge_from_any_previous_state(
            steps in collection::vec(desired_of(), 1..8),
        ) {
            let mut m = Mirror::default();
            for d in &steps {
                let ops = reconcile(&m, d, Scope::All, 1024).unwrap();
                apply(&mut m, &ops, &expected_view(d));
                m = Mirror::new(m.state.clone());
                prop_assert_eq!(reconcile(&m, d, Scope::All, 1024).unwrap(), vec![]);
                let used: HashSet<u32> = m.state.slots.values().collect();
                prop_assert!(m.state.backends.keys().all(|id| used.contains(id)), "leaked backends");
            }
        }

        #[test]
        fn touched_reconciles_leave_nothing_for_a_full_one(
            start in desired_of(),
            batches in collection::vec(batch(), 1..40),
        ) {
            let mut d = start;
            let mut m = Mirror::default();
            let ops = reconcile(&m, &d, Scope::All, 1024).unwrap();
            apply(&mut m, &ops, &expected_view(&d));
            for changes in batches {
                let mut touched = BTreeSet::new();
                for (i, f) in changes {
                    touched.insert(key(i));
                    match f {
                        Some(f) => d.frontends.insert(key(i), Arc::new(f)),
                        None => d.frontends.remove(&key(i)),
                    };
                }
                let ops = reconcile(&m, &d, Scope::Touched(&touched), 1024).unwrap();
                apply(&mut m, &ops, &expected_view(&d));
                prop_assert_eq!(reconcile(&m, &d, Scope::All, 1024).unwrap(), vec![], "{:#?}", ops);
                // The mirror's indexes, kept write by write, equal fresh ones.
                let fresh = Mirror::new(m.state.clone());
                let indexes = |m: &Mirror| -> BTreeSet<(u32, u32, Option<u32>)> {
                    let b = &m.state.backends;
                    b.iter().map(|(id, x)| (*id, b.refs(*id), b.id_of(x))).collect()
                };
                prop_assert_eq!(
                    (indexes(&fresh), &fresh.svc_ids),
                    (indexes(&m), &m.svc_ids)
                );
            }
        }

        #[test]
        fn a_full_reconcile_prunes_what_no_frontend_reaches(
            d in desired_of(),
            stray_ids in collection::btree_set(900..920u32, 1..4),
        ) {
            let mut m = Mirror::default();
            let ops = reconcile(&m, &d, Scope::All, 1024).unwrap();
            apply(&mut m, &ops, &expected_view(&d));
            // Leftovers of an interrupted sync or of hands on the maps.
            let mut state = m.state.clone();
            for id in &stray_ids {
                state.slots.insert(SlotKey { svc_id: *id, slot: 0 }, *id);
                state.backends.insert(*id, BackendAddr { addr: std::net::Ipv4Addr::from(*id).into(), port: 1, proto: IPPROTO_TCP, local: false });
                state.names.insert(*id, "gone".into());
                state.ranges.entry(*id).or_default().insert("198.18.0.0/15".parse().unwrap());
                state.addrs.insert(std::net::Ipv4Addr::from(*id).into(), 1);
            }
            let mut m = Mirror::new(state);
            let ops = reconcile(&m, &d, Scope::All, 1024).unwrap();
            apply(&mut m, &ops, &expected_view(&d));
            let clean = Mirror::new(MapState::default());
            let mut fresh = clean.clone();
            let ops = reconcile(&clean, &d, Scope::All, 1024).unwrap();
            for op in &ops {
                fresh.record(op);
            }
            prop_assert_eq!(m.state.slots.len(), fresh.state.slots.len());
            prop_assert_eq!(m.state.backends.len(), fresh.state.backends.len());
            prop_assert_eq!(m.state.names.len(), fresh.state.names.len());
            prop_assert_eq!(m.state.ranges.len(), fresh.state.ranges.len());
            prop_assert_eq!(&m.state.addrs, &fresh.state.addrs);
        }
    }
}

#[test]
fn a_read_brought_up_to_date_with_the_writes_made_since_equals_the_mirror() {
    let two = &[("198.18.1.1", 8080), ("198.18.1.2", 8080)];
    let mut before = MapState::default();
    converge(&mut before, &desired(&[(VIP, 80, IPPROTO_TCP, two)]));
    // Read before a sync that changes a backend and adds a service.
    let read = before.clone();
    let mut after = before.clone();
    let written = converge(
        &mut after,
        &desired(&[
            (
                VIP,
                80,
                IPPROTO_TCP,
                &[("198.18.1.1", 8080), ("198.18.1.3", 8080)],
            ),
            ("198.19.0.11", 53, IPPROTO_UDP, two),
        ]),
    );
    assert!(read.differences(&after) > 0);
    let mut replayed = read;
    let mut fingerprint = replayed.fingerprint();
    assert_ne!(fingerprint, after.fingerprint());
    for op in &written {
        replayed.record_fingerprinted(op, &mut fingerprint);
    }
    assert_eq!(replayed.differences(&after), 0);
    assert_eq!(replayed, after);
    assert_eq!(fingerprint, after.fingerprint());

    // Drift: an entry deleted and another changed behind the agent's back.
    let mut drifted = after.clone();
    let slot = drifted.slots.keys().next().unwrap();
    drifted.slots.remove(&slot);
    let (_, v) = drifted.services.iter_mut().next().unwrap();
    v.count += 1;
    assert_eq!(drifted.differences(&after), 2);
    assert_eq!(after.differences(&drifted), 2);
    assert_ne!(drifted.fingerprint(), after.fingerprint());
}
