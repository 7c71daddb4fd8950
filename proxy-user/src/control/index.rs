//! The cluster as the agent knows it: validated Services and EndpointSlices
//! and the node, with the desired frontends kept up to date incrementally.
//!
//! Objects arrive one at a time (watch events) or as a whole (a relist, the
//! manifests). Each is validated once, on arrival; a change marks only its
//! Service dirty, and [`Index::update`] recomputes only dirty Services. So a
//! one-endpoint change costs the same at 10 or 10,000 Services.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::SystemTime,
};

// SipHash's DoS resistance is kept (a random seed per table) at a fraction
// of its cost: hashing was a tenth of a first sync at 50,000 Services.
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::control::model::{
    self, Desired, Frontend, FrontendKey, NodeInfo, Outcome, Problem, ServicePort, ServiceRef,
    Skipped, Slice, Sourced, Svc, ANNOTATION_TRIGGER_TIME,
};
use crate::control::{cidr::Family, scheduler::Scheduler};

/// namespace/name of an object (a slice's, here).
type Key = ServiceRef;

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    ServiceRef::new(
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default(),
    )
}

/// A validated object as the index keeps it: boxed, so the tables' spare
/// buckets cost a pointer each, not a whole object.
type Parsed<T> = Result<Option<Box<T>>, Box<Problem>>;

fn boxed<T>(parsed: Result<Option<T>, Problem>) -> Parsed<T> {
    parsed.map(|o| o.map(Box::new)).map_err(Box::new)
}

#[derive(Debug)]
struct SvcEntry {
    parsed: Parsed<Svc>,
    /// What validation skipped.
    skipped: Skips,
}

/// What validation skipped in one object: one pointer, nearly always null
/// (every Service and slice has an index entry, where an empty vector cost
/// 24 bytes).
#[derive(Debug, Default, PartialEq, Eq)]
// Boxed on purpose: a thin pointer where a `Vec` is three words.
#[allow(clippy::box_collection)]
struct Skips(Option<Box<Vec<(String, Skipped)>>>);

impl Skips {
    fn new(v: Vec<(String, Skipped)>) -> Self {
        Self((!v.is_empty()).then(|| Box::new(v)))
    }

    fn as_slice(&self) -> &[(String, Skipped)] {
        self.0.as_deref().map_or(&[], |v| v.as_slice())
    }
}

#[derive(Debug)]
struct SliceEntry {
    owner: Option<ServiceRef>,
    parsed: Parsed<Slice>,
}

/// The Services claiming one frontend, each with its frontend, in
/// namespace/name order (the first keeps it). Nearly always one.
type Claims = Vec<(ServiceRef, Arc<Frontend>)>;

/// Running totals of what the index holds, so the per-sync gauges cost
/// nothing at 50,000 Services.
#[derive(Debug, Default)]
struct Tally {
    /// Malformed Services and EndpointSlices.
    invalid: usize,
    /// Claims beyond the first of each frontend.
    contested: usize,
    skipped: HashMap<Skipped, usize>,
}

impl Tally {
    /// Counts an entry in (`sign` +1) or out (-1).
    fn entry<T>(&mut self, parsed: &Parsed<T>, skipped: &[(String, Skipped)], sign: isize) {
        let add = |n: &mut usize| *n = n.saturating_add_signed(sign);
        if parsed.is_err() {
            add(&mut self.invalid);
        }
        for (_, why) in skipped {
            add(self.skipped.entry(*why).or_default());
        }
    }
}

/// What an [`Index::update`] did.
#[derive(Debug, Default)]
pub struct Update {
    /// Services whose frontends were recomputed.
    pub services: usize,
    /// Frontends that may have changed.
    pub touched: BTreeSet<FrontendKey>,
    /// Frontends claimed by more than one Service (the first by
    /// namespace/name wins), newly seen in this update.
    pub conflicts: Vec<Problem>,
}

/// What applying one object did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The object differs from what was known (so a sync is due).
    pub changed: bool,
    /// It is malformed: reported and skipped (the last good version is
    /// dropped too, as a deleted object would be).
    pub problem: Option<Problem>,
}

#[derive(Debug)]
pub struct Index {
    node: NodeInfo,
    /// The node's default scheduler, for Services that name none.
    scheduler: Scheduler,
    services: HashMap<ServiceRef, SvcEntry>,
    slices: HashMap<Key, SliceEntry>,
    /// Service → its slices' names, in name order.
    slices_of: HashMap<ServiceRef, Vec<Arc<str>>>,
    dirty: HashSet<ServiceRef>,
    /// Frontend → the Services claiming it.
    claims: HashMap<FrontendKey, Claims>,
    /// Service → the frontends it claims.
    owned: HashMap<ServiceRef, Vec<FrontendKey>>,
    desired: Desired,
    /// `last-change-trigger-time`s of slice changes not yet synced.
    triggers: Vec<SystemTime>,
    /// Services with a health check node port: (port, local ready endpoints).
    health_checks: BTreeMap<ServiceRef, (u16, usize)>,
    tally: Tally,
}

impl Index {
    pub fn new(node: NodeInfo) -> Self {
        Self {
            node,
            scheduler: Scheduler::default(),
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_of: HashMap::new(),
            dirty: HashSet::new(),
            claims: HashMap::new(),
            owned: HashMap::new(),
            desired: Desired::default(),
            triggers: Vec::new(),
            health_checks: BTreeMap::new(),
            tally: Tally::default(),
        }
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// A new view of the node: every Service may select differently.
    /// Schedules Services that name no scheduler with `s` (IPVS's
    /// `ipvs.scheduler`); random until set.
    pub fn scheduled_by(mut self, s: Scheduler) -> Self {
        self.scheduler = s;
        self
    }

    pub fn set_node(&mut self, node: NodeInfo) -> bool {
        if node == self.node {
            return false;
        }
        self.node = node;
        self.dirty.extend(self.services.keys().cloned());
        true
    }

    pub fn apply_service(&mut self, s: Sourced<Service>) -> Applied {
        let mut skipped = Vec::new();
        let parsed = boxed(model::service(&s, &mut skipped));
        // The parsed Service's own reference where there is one: the same
        // strings, not a second copy.
        let id = match &parsed {
            Ok(Some(svc)) => svc.id.clone(),
            _ => key_of(&s.object.metadata),
        };
        let problem = parsed.as_ref().err().map(|p| (**p).clone());
        let changed = self
            .services
            .get(&id)
            .is_none_or(|e| e.parsed != parsed || e.skipped.as_slice() != skipped.as_slice());
        if changed {
            self.tally.entry(&parsed, &skipped, 1);
            let entry = SvcEntry {
                parsed,
                skipped: Skips::new(skipped),
            };
            if let Some(old) = self.services.insert(id.clone(), entry) {
                self.tally.entry(&old.parsed, old.skipped.as_slice(), -1);
            }
            self.dirty.insert(id);
        }
        Applied { changed, problem }
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) -> bool {
        let id = ServiceRef::new(namespace, name);
        let Some(old) = self.services.remove(&id) else {
            return false;
        };
        self.tally.entry(&old.parsed, old.skipped.as_slice(), -1);
        self.dirty.insert(id);
        true
    }

    pub fn apply_slice(&mut self, s: Sourced<EndpointSlice>) -> Applied {
        let key = key_of(&s.object.metadata);
        let mut parsed = boxed(model::slice(&s));
        // The owner's name shared with its Service's key (one allocation
        // per Service, not one more per slice).
        if let Ok(Some(slice)) = &mut parsed {
            if let Some((k, _)) = self.services.get_key_value(&slice.service) {
                slice.service = k.clone();
            }
        }
        let problem = parsed.as_ref().err().map(|p| (**p).clone());
        let owner = match &parsed {
            Ok(Some(slice)) => Some(slice.service.clone()),
            _ => model::slice_owner(&s.object),
        };
        let changed = self
            .slices
            .get(&key)
            .is_none_or(|e| e.parsed != parsed || e.owner != owner);
        if changed {
            if let Some(t) = trigger_time(&s.object) {
                self.triggers.push(t);
            }
            self.remove_slice(&key);
            if let Some(o) = &owner {
                let names = self.slices_of.entry(o.clone()).or_default();
                if let Err(at) = names.binary_search(&key.name) {
                    // Most Services have one slice: no room for four.
                    names.reserve_exact(1);
                    names.insert(at, Arc::clone(&key.name));
                }
                self.dirty.insert(o.clone());
            }
            self.tally.entry(&parsed, &[], 1);
            self.slices.insert(key, SliceEntry { owner, parsed });
        }
        Applied { changed, problem }
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) -> bool {
        self.remove_slice(&ServiceRef::new(namespace, name))
    }

    fn remove_slice(&mut self, key: &Key) -> bool {
        let Some(old) = self.slices.remove(key) else {
            return false;
        };
        self.tally.entry(&old.parsed, &[], -1);
        if let Some(o) = old.owner {
            if let Some(set) = self.slices_of.get_mut(&o) {
                set.retain(|n| *n != key.name);
                if set.is_empty() {
                    self.slices_of.remove(&o);
                }
            }
            self.dirty.insert(o);
        }
        true
    }

    /// Deletes the Services `keep` rejects (the end of a relist); returns
    /// how many went.
    pub fn retain_services(&mut self, keep: impl Fn(&str, &str) -> bool) -> usize {
        let gone: Vec<ServiceRef> = self
            .services
            .keys()
            .filter(|id| !keep(&id.namespace, &id.name))
            .cloned()
            .collect();
        for id in &gone {
            self.delete_service(&id.namespace, &id.name);
        }
        gone.len()
    }

    /// Deletes the EndpointSlices `keep` rejects; returns how many went.
    pub fn retain_slices(&mut self, keep: impl Fn(&str, &str) -> bool) -> usize {
        let gone: Vec<Key> = self
            .slices
            .keys()
            .filter(|k| !keep(&k.namespace, &k.name))
            .cloned()
            .collect();
        for k in &gone {
            self.remove_slice(k);
        }
        gone.len()
    }

    /// A complete list of Services (a relist): whatever is not in it is gone.
    /// Returns the problems of malformed objects and whether anything changed.
    pub fn replace_services(&mut self, all: Vec<Sourced<Service>>) -> (bool, Vec<Problem>) {
        let keep: HashSet<Key> = all.iter().map(|s| key_of(&s.object.metadata)).collect();
        let (mut changed, mut problems) = (false, Vec::new());
        for s in all {
            let a = self.apply_service(s);
            changed |= a.changed;
            problems.extend(a.problem);
        }
        let gone = self.retain_services(|ns, name| keep.contains(&ServiceRef::new(ns, name)));
        (changed || gone > 0, problems)
    }

    /// A complete list of EndpointSlices (a relist).
    pub fn replace_slices(&mut self, all: Vec<Sourced<EndpointSlice>>) -> (bool, Vec<Problem>) {
        let keep: HashSet<Key> = all.iter().map(|s| key_of(&s.object.metadata)).collect();
        let (mut changed, mut problems) = (false, Vec::new());
        for s in all {
            let a = self.apply_slice(s);
            changed |= a.changed;
            problems.extend(a.problem);
        }
        let gone = self.retain_slices(|ns, name| keep.contains(&ServiceRef::new(ns, name)));
        (changed || gone > 0, problems)
    }

    /// Both lists at once (manifest mode).
    pub fn replace_all(
        &mut self,
        services: Vec<Sourced<Service>>,
        slices: Vec<Sourced<EndpointSlice>>,
    ) -> (bool, Vec<Problem>) {
        let (a, mut p) = self.replace_services(services);
        let (b, q) = self.replace_slices(slices);
        p.extend(q);
        (a || b, p)
    }

    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Recomputes the frontends of every dirty Service.
    pub fn update(&mut self) -> Update {
        let mut up = Update::default();
        let dirty: Vec<ServiceRef> = self.dirty.drain().collect();
        let mut touched = BTreeSet::new();
        for id in dirty {
            up.services += 1;
            self.health_checks.remove(&id);
            for key in self.owned.remove(&id).unwrap_or_default() {
                if let Some(c) = self.claims.get_mut(&key) {
                    if let Ok(at) = c.binary_search_by(|(s, _)| s.cmp(&id)) {
                        c.remove(at);
                        if !c.is_empty() {
                            self.tally.contested = self.tally.contested.saturating_sub(1);
                        }
                    }
                }
                touched.insert(key);
            }
            let Some(entry) = self.services.get(&id) else {
                continue;
            };
            let Ok(Some(svc)) = &entry.parsed else {
                continue;
            };
            // One pass per family, as kube-proxy runs one proxier per family.
            let slices = self.slices_of_service(&id);
            let mut fronts = Vec::new();
            let mut health = None;
            for (i, family) in svc.families().enumerate() {
                let ports = model::service_ports(svc, &slices, &self.node, family);
                // The health check counts the primary family's endpoints (a
                // dual-stack pod is one endpoint in each family's slices).
                if let (0, Some(port)) = (i, svc.health_check_node_port) {
                    health = Some((port, model::local_ready_endpoints(&ports)));
                }
                let node_ip = self.node.primary(family);
                fronts.extend(model::frontends(
                    svc,
                    &ports,
                    node_ip,
                    self.scheduler,
                    family,
                ));
            }
            if let Some(h) = health {
                self.health_checks.insert(id.clone(), h);
            }
            let mut keys = Vec::with_capacity(fronts.len());
            for (k, f) in fronts {
                let c = self.claims.entry(k).or_default();
                let claim = (id.clone(), Arc::new(f));
                match c.binary_search_by(|(s, _)| s.cmp(&id)) {
                    // A Service claims a frontend once (frontends() merges).
                    Ok(at) => c[at] = claim,
                    Err(at) => {
                        if !c.is_empty() {
                            self.tally.contested += 1;
                        }
                        c.insert(at, claim);
                    }
                }
                keys.push(k);
                touched.insert(k);
            }
            self.owned.insert(id.clone(), keys);
        }
        for &key in &touched {
            match self.claims.get_mut(&key) {
                Some(claims) if !claims.is_empty() => {
                    claims.shrink_to_fit();
                    if let Some((_, f)) = claims.first() {
                        self.desired.frontends.insert(key, Arc::clone(f));
                    }
                    if claims.len() > 1 {
                        up.conflicts.extend(conflicts(key, claims));
                    }
                }
                _ => {
                    self.claims.remove(&key);
                    self.desired.frontends.remove(&key);
                }
            }
        }
        up.touched = touched;
        up
    }

    /// Services that need a health check node port, as of the last
    /// `update`: (port, ready endpoints on this node).
    pub fn health_checks(&self) -> &BTreeMap<ServiceRef, (u16, usize)> {
        &self.health_checks
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// The last-change-trigger-times collected since the last call.
    pub fn take_triggers(&mut self) -> Vec<SystemTime> {
        std::mem::take(&mut self.triggers)
    }

    /// The valid slices of a Service, in name order.
    fn slices_of_service(&self, id: &ServiceRef) -> Vec<&Slice> {
        self.slices_of
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|n| {
                self.slices.get(&ServiceRef {
                    namespace: Arc::clone(&id.namespace),
                    name: Arc::clone(n),
                })
            })
            .filter_map(|e| e.parsed.as_ref().ok().and_then(Option::as_deref))
            .collect()
    }

    /// Every valid Service on `family` with the full model of its ports on
    /// it, in namespace/name order (what kube-proxy's rule writers iterate,
    /// one family's proxier at a time).
    pub fn services_with_ports(&self, family: Family) -> Vec<(Svc, Vec<ServicePort>)> {
        let mut ids: Vec<&ServiceRef> = self.services.keys().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| {
                let svc = self.services[id].parsed.as_ref().ok()?.as_deref()?;
                if !svc.has_family(family) {
                    return None;
                }
                let slices = self.slices_of_service(id);
                let ports = model::service_ports(svc, &slices, &self.node, family);
                Some((svc.on(family), ports))
            })
            .collect()
    }

    /// Every current problem: malformed objects, then conflicts.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out: Vec<Problem> = self
            .services
            .values()
            .filter_map(|e| e.parsed.as_ref().err().map(|p| (**p).clone()))
            .chain(
                self.slices
                    .values()
                    .filter_map(|e| e.parsed.as_ref().err().map(|p| (**p).clone())),
            )
            .collect();
        let mut keys: Vec<&FrontendKey> = self.claims.keys().collect();
        keys.sort();
        for k in keys {
            if self.claims[k].len() > 1 {
                out.extend(conflicts(*k, &self.claims[k]));
            }
        }
        out
    }

    /// How many objects are malformed, and frontends contested, right now
    /// (kept as they change: O(1)).
    pub fn problem_count(&self) -> usize {
        self.tally.invalid + self.tally.contested
    }

    /// Current skips by reason (kept as they change).
    pub fn skipped_counts(&self) -> &HashMap<Skipped, usize> {
        &self.tally.skipped
    }

    /// Every current skip with its reason.
    pub fn skipped(&self) -> Vec<(String, Skipped)> {
        let mut out: Vec<(String, Skipped)> = self
            .services
            .values()
            .flat_map(|e| e.skipped.as_slice().iter().cloned())
            .collect();
        out.sort();
        out
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.services.len(), self.slices.len())
    }

    /// Updates and returns everything at once (the pure-function view).
    pub fn outcome(&mut self) -> Outcome {
        self.update();
        Outcome {
            desired: self.desired.clone(),
            problems: self.problems(),
            skipped: self.skipped(),
        }
    }
}

fn conflicts(key: FrontendKey, claims: &Claims) -> Vec<Problem> {
    let mut it = claims.iter();
    let Some((winner, _)) = it.next() else {
        return Vec::new();
    };
    it.map(|(id, _)| Problem {
        origin: "cluster".into(),
        object: format!("Service {id}"),
        field: "spec".into(),
        message: format!(
            "{}:{} is also claimed by Service {winner}, which keeps it",
            key.addr, key.port
        ),
    })
    .collect()
}

/// The `endpoints.kubernetes.io/last-change-trigger-time` of a slice.
fn trigger_time(s: &EndpointSlice) -> Option<SystemTime> {
    let text = s
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_TRIGGER_TIME)?;
    let ts: k8s_openapi::jiff::Timestamp = text.parse().ok()?;
    Some(SystemTime::from(ts))
}

/// The desired frontends for `services` and `slices` on `node`, all at
/// once: the model as a pure function (tests, the reference generator).
pub fn desired(
    services: &[Sourced<Service>],
    slices: &[Sourced<EndpointSlice>],
    node: &NodeInfo,
) -> Outcome {
    let mut index = Index::new(node.clone());
    index.replace_all(services.to_vec(), slices.to_vec());
    index.outcome()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use testbed::service_yaml;

    fn objects(yaml: &str) -> (Sourced<Service>, Sourced<EndpointSlice>) {
        let mut loaded = crate::control::manifests::Loaded::default();
        crate::control::manifests::parse_file("t", yaml, &mut loaded);
        (loaded.services.remove(0), loaded.slices.remove(0))
    }

    fn svc_n(i: u8, eps: &[Ipv4Addr]) -> (Sourced<Service>, Sourced<EndpointSlice>) {
        objects(&service_yaml(
            &format!("s{i}"),
            Ipv4Addr::new(198, 19, 0, i),
            (80, 8080),
            (53, 5353),
            eps,
        ))
    }

    #[test]
    fn only_changed_services_are_recomputed_and_relists_find_deletions() {
        let b1 = Ipv4Addr::new(198, 18, 1, 1);
        let b2 = Ipv4Addr::new(198, 18, 1, 2);
        let mut ix = Index::new(NodeInfo::named("node-1"));
        let (svcs, slices): (Vec<_>, Vec<_>) = (1..=50).map(|i| svc_n(i, &[b1])).unzip();
        ix.replace_all(svcs, slices);
        assert_eq!(ix.update().services, 50);
        assert_eq!(ix.desired().frontends.len(), 100);
        // The same object again: nothing to do.
        let (s7, sl7) = svc_n(7, &[b1]);
        assert!(!ix.apply_service(s7).changed);
        assert!(!ix.apply_slice(sl7).changed);
        assert!(!ix.is_dirty());
        // One slice changes: one service recomputed.
        let (_, sl7) = svc_n(7, &[b1, b2]);
        assert!(ix.apply_slice(sl7).changed);
        assert_eq!(ix.update().services, 1);
        let k = FrontendKey {
            addr: Ipv4Addr::new(198, 19, 0, 7).into(),
            port: 80,
            proto: proxy_common::IPPROTO_TCP,
        };
        assert_eq!(ix.desired().frontends[&k].backends.len(), 2);
        // A relist without s9: s9 is deleted, its frontends go.
        let (svcs, slices): (Vec<_>, Vec<_>) = (1..=50)
            .filter(|i| *i != 9)
            .map(|i| svc_n(i, &[b1]))
            .unzip();
        let (changed, problems) = ix.replace_all(svcs, slices);
        assert!(changed && problems.is_empty());
        assert_eq!(
            ix.update().services,
            2,
            "s9 deleted, s7 back to one endpoint"
        );
        assert_eq!(ix.desired().frontends.len(), 98);
    }

    /// The running totals behind the gauges agree with a count of what the
    /// index holds, through adds, replacements, conflicts and deletes.
    #[test]
    fn running_totals_match_a_recount() {
        let b1 = Ipv4Addr::new(198, 18, 1, 1);
        let recount = |ix: &Index| {
            let mut skips: HashMap<Skipped, usize> = HashMap::new();
            for (_, why) in ix.skipped() {
                *skips.entry(why).or_default() += 1;
            }
            let tally: HashMap<Skipped, usize> = ix
                .skipped_counts()
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| (*k, *n))
                .collect();
            assert_eq!(tally, skips);
            assert_eq!(ix.problem_count(), ix.problems().len());
        };
        let mut ix = Index::new(NodeInfo::named("node-1"));
        let (a, sa) = svc_n(1, &[b1]);
        let mut twin = a.clone();
        twin.object.metadata.name = Some("twin".into());
        let mut bad = svc_n(2, &[b1]).0;
        bad.object.spec.as_mut().expect("spec").cluster_ip = Some("not-an-ip".into());
        let mut headless = svc_n(3, &[b1]).0;
        headless.object.spec.as_mut().expect("spec").cluster_ip = Some("None".into());
        for s in [a.clone(), twin, bad, headless.clone()] {
            ix.apply_service(s);
        }
        ix.apply_slice(sa);
        ix.update();
        recount(&ix);
        assert_eq!(
            ix.problem_count(),
            3,
            "one malformed, two contested frontends"
        );
        // The malformed one fixed, the twin gone, the headless one again.
        ix.apply_service(svc_n(2, &[b1]).0);
        ix.delete_service("default", "twin");
        ix.apply_service(headless);
        ix.update();
        recount(&ix);
        assert_eq!(ix.problem_count(), 0);
        ix.delete_service("default", "s3");
        ix.delete_slice("default", "s1-1");
        ix.update();
        recount(&ix);
    }

    #[test]
    fn a_frontend_claimed_twice_goes_to_the_first_service_by_name() {
        let b1 = Ipv4Addr::new(198, 18, 1, 1);
        let (a, _) = svc_n(1, &[b1]);
        let mut b = svc_n(1, &[b1]).0;
        b.object.metadata.name = Some("later".into());
        let mut ix = Index::new(NodeInfo::named("node-1"));
        ix.apply_service(b);
        ix.apply_service(a);
        let up = ix.update();
        // Both frontends (TCP and UDP) are contested; "later" < "s1" keeps them.
        assert_eq!(up.conflicts.len(), 2, "{:?}", up.conflicts);
        assert_eq!(up.conflicts[0].object, "Service default/s1");
        assert!(up.conflicts[0]
            .message
            .contains("claimed by Service default/later"));
        let names = |ix: &Index| -> Vec<String> {
            ix.desired()
                .frontends
                .values()
                .map(|f| f.name.to_string())
                .collect()
        };
        assert_eq!(names(&ix), ["default/later:dns", "default/later:http"]);
        // The winner leaves: the other takes over.
        ix.delete_service("default", "later");
        ix.update();
        assert_eq!(names(&ix), ["default/s1:dns", "default/s1:http"]);
        assert!(ix.problems().is_empty());
    }
}
