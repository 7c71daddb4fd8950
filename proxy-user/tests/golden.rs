//! Golden tests, no root: Kubernetes YAML → index → reconcile → `kpx dump
//! services`, compared with the expected text in `tests/golden/`. The text is
//! what an operator reads, so a change to the model, the planner or the dump
//! shows up here as a reviewable diff. `KPX_BLESS=1` rewrites the expected
//! files (review the diff before committing it).

use std::{net::Ipv4Addr, path::Path};

use kpx::{
    control::{index::Index, manifests, model::NodeInfo},
    dataplane::reconcile::{self, Mirror, Scope},
    ops::dump,
};

/// The node every case runs on: node-1 in zone-a, 198.18.128.1.
fn node() -> NodeInfo {
    NodeInfo {
        zone: Some("zone-a".into()),
        addresses: vec![Ipv4Addr::new(198, 18, 128, 1).into()],
        ..NodeInfo::named("node-1")
    }
}

/// What `kpx dump services` shows right after the first sync of `input`,
/// then the skipped input, one line each.
fn render(input: &Path) -> String {
    let loaded = manifests::load(input).expect("readable manifests");
    let mut index = Index::new(node());
    index.replace_all(loaded.services, loaded.slices);
    let outcome = index.outcome();
    let mut mirror = Mirror::default();
    let ops = reconcile::reconcile(
        &mirror,
        &outcome.desired,
        Scope::All,
        proxy_common::capacity::SERVICE_STATS,
    )
    .expect("a plan");
    for op in &ops {
        mirror.record(op);
    }
    let rows = dump::service_rows(&mirror.state, &Default::default(), |_| {
        Ok(Default::default())
    })
    .expect("rows");
    let mut out = dump::services_table(&rows);
    let mut skipped: Vec<String> = (outcome.problems.iter().chain(&loaded.problems))
        .map(|p| format!("invalid: {p}"))
        .collect();
    skipped.extend(
        outcome
            .skipped
            .iter()
            .map(|(what, why)| format!("skipped: {what}: {}", why.name())),
    );
    skipped.sort();
    for s in skipped {
        out.push_str(&s);
        out.push('\n');
    }
    out
}

fn check(input: &str, expected: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Problems name their file: relative to the crate, wherever it is.
    let got = render(&root.join(input)).replace(&format!("{}/", root.display()), "");
    let path = root.join(expected);
    if std::env::var_os("KPX_BLESS").is_some() {
        std::fs::write(&path, &got).expect("writing the expected file");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (KPX_BLESS=1 writes it)", path.display()));
    if got != want {
        let diff: Vec<String> = want
            .lines()
            .zip(got.lines())
            .enumerate()
            .filter(|(_, (w, g))| w != g)
            .take(5)
            .map(|(i, (w, g))| format!("line {}:\n  want {w}\n  got  {g}", i + 1))
            .collect();
        panic!(
            "{input}: `kpx dump services` differs from {expected}:\n{}\n--- got ---\n{got}",
            diff.join("\n")
        );
    }
}

#[test]
fn the_example_cluster_dumps_as_expected() {
    check(
        "../examples/cluster.yaml",
        "tests/golden/cluster.services.txt",
    );
}

#[test]
fn the_readme_web_service_dumps_as_expected() {
    check("../examples/web.yaml", "tests/golden/web.services.txt");
}

#[test]
fn policies_topology_and_terminating_endpoints_dump_as_expected() {
    check(
        "tests/golden/policies.yaml",
        "tests/golden/policies.services.txt",
    );
}

#[test]
fn invalid_and_foreign_input_is_listed_and_the_rest_is_served() {
    check(
        "tests/golden/invalid.yaml",
        "tests/golden/invalid.services.txt",
    );
}

#[test]
fn a_corpus_of_malformed_objects_is_reported_field_by_field_and_the_rest_served() {
    check(
        "tests/golden/malformed.yaml",
        "tests/golden/malformed.services.txt",
    );
}
