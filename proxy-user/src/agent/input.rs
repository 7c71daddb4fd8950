//! One input handler for every kind the index keeps (Services,
//! EndpointSlices): a watch event becomes index changes, a relist deletes
//! what the new list lacks, and every change is counted.
//!
//! Listed objects are applied as they arrive (each is current), so no copy of
//! the whole list is ever held; only the (namespace, name)s seen so far.

use std::{collections::HashSet, marker::PhantomData};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{runtime::watcher::Event, ResourceExt as _};
use prometheus_client::metrics::counter::Counter;

use crate::control::{
    index::{Applied, Index},
    model::{Problem, Sourced},
};
use crate::ops::metrics::Metrics;

/// What the index does with one kind of object.
pub trait Kind: kube::Resource + Sized {
    /// The resource's plural, as the API and the metrics name it.
    const RESOURCE: &'static str;
    fn apply(index: &mut Index, object: Sourced<Self>) -> Applied;
    fn delete(index: &mut Index, namespace: &str, name: &str) -> bool;
    /// Keeps the objects `keep` accepts; how many were deleted.
    fn retain(index: &mut Index, keep: &dyn Fn(&str, &str) -> bool) -> usize;
    /// The metric counting this kind's changes (kube-proxy's names).
    fn changes(metrics: &Metrics) -> &Counter;
}

impl Kind for Service {
    const RESOURCE: &'static str = "services";
    fn apply(index: &mut Index, object: Sourced<Self>) -> Applied {
        index.apply_service(object)
    }
    fn delete(index: &mut Index, namespace: &str, name: &str) -> bool {
        index.delete_service(namespace, name)
    }
    fn retain(index: &mut Index, keep: &dyn Fn(&str, &str) -> bool) -> usize {
        index.retain_services(keep)
    }
    fn changes(metrics: &Metrics) -> &Counter {
        &metrics.service_changes
    }
}

impl Kind for EndpointSlice {
    const RESOURCE: &'static str = "endpointslices";
    fn apply(index: &mut Index, object: Sourced<Self>) -> Applied {
        index.apply_slice(object)
    }
    fn delete(index: &mut Index, namespace: &str, name: &str) -> bool {
        index.delete_slice(namespace, name)
    }
    fn retain(index: &mut Index, keep: &dyn Fn(&str, &str) -> bool) -> usize {
        index.retain_slices(keep)
    }
    fn changes(metrics: &Metrics) -> &Counter {
        &metrics.endpoint_changes
    }
}

/// What one event did.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// Objects added, changed or deleted.
    pub changes: u64,
    /// A malformed object, skipped.
    pub problem: Option<Problem>,
    /// A relist ended with this many objects.
    pub relisted: Option<usize>,
}

/// The watch state of one kind.
#[derive(Debug)]
pub struct Input<K> {
    /// A relist in progress: the (namespace, name)s listed so far.
    relist: Option<HashSet<(String, String)>>,
    /// A list has completed once: the index holds every object of the kind.
    listed: bool,
    kind: PhantomData<fn() -> K>,
}

impl<K> Default for Input<K> {
    fn default() -> Self {
        Self {
            relist: None,
            listed: false,
            kind: PhantomData,
        }
    }
}

fn key_of<K: kube::Resource>(o: &K) -> (String, String) {
    (
        o.namespace().unwrap_or_else(|| "default".into()),
        o.name_any(),
    )
}

impl<K: Kind> Input<K> {
    pub fn listed(&self) -> bool {
        self.listed
    }

    pub fn handle(&mut self, index: &mut Index, event: Event<K>) -> Outcome {
        let applied = match event {
            Event::Init => {
                self.relist = Some(HashSet::new());
                return Outcome::default();
            }
            Event::InitApply(o) => {
                self.relist
                    .get_or_insert_with(HashSet::new)
                    .insert(key_of(&o));
                K::apply(index, Sourced::api(o))
            }
            Event::InitDone => {
                let seen = self.relist.take().unwrap_or_default();
                let gone = K::retain(index, &|ns, name| {
                    seen.contains(&(ns.to_string(), name.to_string()))
                });
                self.listed = true;
                return Outcome {
                    changes: gone as u64,
                    relisted: Some(seen.len()),
                    ..Outcome::default()
                };
            }
            Event::Apply(o) => K::apply(index, Sourced::api(o)),
            Event::Delete(o) => {
                let (ns, name) = key_of(&o);
                return Outcome {
                    changes: u64::from(K::delete(index, &ns, &name)),
                    ..Outcome::default()
                };
            }
        };
        if applied.changed {
            Outcome {
                changes: 1,
                problem: applied.problem,
                relisted: None,
            }
        } else {
            Outcome::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::model::NodeInfo;

    fn service(name: &str, ip: &str) -> Service {
        serde_norway::from_str(&format!(
            "metadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, protocol: TCP}}]}}"
        ))
        .expect("test Service")
    }

    fn names(index: &Index) -> usize {
        index.counts().0
    }

    #[test]
    fn applies_and_deletes_count_only_real_changes() {
        let mut index = Index::new(NodeInfo::named("node-1"));
        let mut input = Input::<Service>::default();
        let a = service("a", "198.19.0.1");
        assert_eq!(input.handle(&mut index, Event::Apply(a.clone())).changes, 1);
        // The same object again changes nothing.
        assert_eq!(input.handle(&mut index, Event::Apply(a.clone())).changes, 0);
        assert_eq!(
            input.handle(&mut index, Event::Delete(a.clone())).changes,
            1
        );
        assert_eq!(input.handle(&mut index, Event::Delete(a)).changes, 0);
        assert_eq!(names(&index), 0);
    }

    #[test]
    fn a_relist_deletes_what_the_new_list_lacks_and_marks_the_kind_listed() {
        let mut index = Index::new(NodeInfo::named("node-1"));
        let mut input = Input::<Service>::default();
        for s in ["a", "b", "c"] {
            input.handle(&mut index, Event::Apply(service(s, "198.19.0.1")));
        }
        assert!(!input.listed());
        input.handle(&mut index, Event::Init);
        input.handle(&mut index, Event::InitApply(service("b", "198.19.0.1")));
        let done = input.handle(&mut index, Event::InitDone);
        assert_eq!(done.relisted, Some(1));
        assert_eq!(done.changes, 2, "a and c are gone");
        assert_eq!(names(&index), 1);
        assert!(input.listed());
    }

    #[test]
    fn a_malformed_object_is_a_change_with_its_problem() {
        let mut index = Index::new(NodeInfo::named("node-1"));
        let mut input = Input::<Service>::default();
        let out = input.handle(&mut index, Event::Apply(service("bad", "not-an-ip")));
        assert_eq!(out.changes, 1);
        let problem = out.problem.expect("reported").to_string();
        assert!(
            problem.contains("bad") && problem.contains("clusterIP"),
            "{problem}"
        );
    }
}
