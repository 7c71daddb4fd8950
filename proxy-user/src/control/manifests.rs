//! Manifest mode: Services and EndpointSlices read from YAML (or JSON) files,
//! in the real Kubernetes schema, instead of from the API server.
//!
//! A file may hold several documents (`---`) and `kind: List` objects. Every
//! document is parsed on its own: a YAML syntax error or a schema error is a
//! [`Problem`] naming the file, the document, the object and the field, and
//! only that document is skipped.

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;
use serde_norway::Value;

use crate::control::model::{Problem, Sourced};

#[derive(Debug, Default)]
pub struct Loaded {
    pub services: Vec<Sourced<Service>>,
    pub slices: Vec<Sourced<EndpointSlice>>,
    /// Node objects: the agent uses the one named after its node.
    pub nodes: Vec<Sourced<Node>>,
    pub problems: Vec<Problem>,
}

/// The files `path` names: itself, or the `.yaml`/`.yml`/`.json` files
/// directly in it, sorted by name.
pub fn files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let p = entry?.path();
        let manifest = p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if manifest && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// A cheap change detector: names and contents of every manifest file.
pub fn fingerprint(path: &Path) -> Result<u64> {
    let mut h = DefaultHasher::new();
    for f in files(path)? {
        f.hash(&mut h);
        fs::read(&f)
            .with_context(|| format!("reading {}", f.display()))?
            .hash(&mut h);
    }
    Ok(h.finish())
}

/// Reads every manifest under `path`. Fails only when `path` itself cannot
/// be read; everything inside is reported per document.
pub fn load(path: &Path) -> Result<Loaded> {
    let mut out = Loaded::default();
    for f in files(path)? {
        match fs::read_to_string(&f) {
            Ok(text) => parse_file(&f.display().to_string(), &text, &mut out),
            Err(e) => out.problems.push(Problem {
                origin: f.display().to_string(),
                object: "file".into(),
                field: "-".into(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    Ok(out)
}

/// Splits a multi-document YAML stream at `---` lines, keeping each
/// document's first line number for messages.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") || line.starts_with("---\t") {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
            let rest = line[3..].trim();
            if !rest.is_empty() {
                current.push_str(rest);
                current.push('\n');
            }
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((start, current));
    docs.retain(|(_, d)| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

pub fn parse_file(file: &str, text: &str, out: &mut Loaded) {
    for (n, (line, doc)) in documents(text).into_iter().enumerate() {
        let origin = format!("{file} (document {}, line {line})", n + 1);
        match serde_norway::from_str::<Value>(&doc) {
            Ok(value) => parse_value(&origin, value, out),
            Err(e) => out.problems.push(Problem {
                origin,
                object: "document".into(),
                field: "-".into(),
                message: format!("not valid YAML: {e}"),
            }),
        }
    }
}

fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn parse_value(origin: &str, value: Value, out: &mut Loaded) {
    let kind = text(&value, "kind").unwrap_or("");
    let api = text(&value, "apiVersion").unwrap_or("");
    let name = {
        let meta = value.get("metadata");
        let ns = meta.and_then(|m| text(m, "namespace")).unwrap_or("default");
        let n = meta.and_then(|m| text(m, "name")).unwrap_or("<unnamed>");
        // Nodes are cluster-scoped.
        if kind == "Node" {
            format!("Node {n}")
        } else {
            format!("{kind} {ns}/{n}")
        }
    };
    match (api, kind) {
        ("v1", "Service") => {
            if let Some(object) = typed::<Service>(origin, &name, value, out) {
                out.services.push(Sourced {
                    origin: origin.into(),
                    object,
                });
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            if let Some(object) = typed::<EndpointSlice>(origin, &name, value, out) {
                out.slices.push(Sourced {
                    origin: origin.into(),
                    object,
                });
            }
        }
        ("v1", "Node") => {
            if let Some(object) = typed::<Node>(origin, &name, value, out) {
                out.problems
                    .extend(crate::control::model::node_problems(origin, &object));
                out.nodes.push(Sourced {
                    origin: origin.into(),
                    object,
                });
            }
        }
        (_, k) if k == "List" || k.ends_with("List") => match value.get("items") {
            Some(Value::Sequence(items)) => {
                for (i, item) in items.iter().enumerate() {
                    parse_value(&format!("{origin} items[{i}]"), item.clone(), out);
                }
            }
            _ => out.problems.push(Problem {
                origin: origin.into(),
                object: name,
                field: "items".into(),
                message: "a List needs an items array".into(),
            }),
        },
        ("", _) | (_, "") => out.problems.push(Problem {
            origin: origin.into(),
            object: "document".into(),
            field: if api.is_empty() { "apiVersion" } else { "kind" }.into(),
            message: "missing: not a Kubernetes object".into(),
        }),
        // Deployments, Pods, ... may share the files; they are not ours.
        _ => log::debug!("{origin}: ignoring {api} {name}"),
    }
}

fn typed<T: DeserializeOwned>(
    origin: &str,
    name: &str,
    value: Value,
    out: &mut Loaded,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            out.problems.push(Problem {
                origin: origin.into(),
                object: name.into(),
                field: if path == "." { "-".into() } else { path },
                message: e.into_inner().to_string(),
            });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 198.19.0.10
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.1.1]}]
";

    fn parse(text: &str) -> Loaded {
        let mut out = Loaded::default();
        parse_file("f.yaml", text, &mut out);
        out
    }

    #[test]
    fn multi_document_files_yield_every_object() {
        let out = parse(GOOD);
        assert_eq!((out.services.len(), out.slices.len()), (1, 1));
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        assert_eq!(out.slices[0].origin, "f.yaml (document 2, line 8)");
    }

    #[test]
    fn a_yaml_syntax_error_costs_only_its_document() {
        let text = format!("{GOOD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: [broken\n");
        let out = parse(&text);
        assert_eq!((out.services.len(), out.slices.len()), (1, 1));
        assert_eq!(out.problems.len(), 1);
        assert!(out.problems[0]
            .origin
            .starts_with("f.yaml (document 3, line 15)"));
        assert!(out.problems[0].message.starts_with("not valid YAML"));
    }

    #[test]
    fn schema_errors_name_the_field() {
        let bad = GOOD.replace("port: 80}", "port: eighty}");
        let out = parse(&bad);
        assert_eq!(out.services.len(), 0);
        assert_eq!(out.slices.len(), 1);
        assert_eq!(out.problems[0].object, "Service shop/web");
        assert_eq!(out.problems[0].field, "spec.ports[0].port");
    }

    #[test]
    fn lists_are_unpacked_and_other_kinds_ignored() {
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n  spec: {clusterIP: 198.19.0.1}\n- apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: d}\n";
        let out = parse(list);
        assert_eq!(out.services.len(), 1);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
    }

    #[test]
    fn documents_without_kind_are_reported() {
        let out = parse("metadata: {name: x}\n");
        assert_eq!(out.problems[0].field, "apiVersion");
    }
}
