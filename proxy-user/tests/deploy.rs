//! `deploy/` is what operators apply: every manifest must be a valid
//! Kubernetes object (no field the API would drop), namespace-agnostic, and
//! consistent with kpx itself: RBAC grants what the agent uses, the probes
//! hit the health port the ConfigMap configures, the ConfigMap's
//! KubeProxyConfiguration loads with kpx's own loader, the command's flags
//! exist, and the image puts the binary where the DaemonSet runs it.

mod bed;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Kustomization {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    labels: Option<Vec<Value>>,
    resources: Vec<String>,
    images: Option<Vec<Value>>,
}

/// Every object of `deploy/`, as (file, JSON).
fn objects() -> (Kustomization, Vec<(String, Value)>) {
    let dir = repo().join("deploy");
    let k: Kustomization =
        serde_norway::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .expect("kustomization.yaml");
    let mut out = Vec::new();
    for file in &k.resources {
        let text =
            std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
            if !v.is_null() {
                out.push((file.clone(), v));
            }
        }
    }
    (k, out)
}

/// `typed` (the object after a trip through its k8s-openapi type) keeps
/// every field of `original`: nothing is unknown or misspelt.
fn covered(original: &Value, typed: &Value, path: &str) -> Result<(), String> {
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                if v.is_null() {
                    continue;
                }
                let Some(tv) = t.get(k) else {
                    return Err(format!("{path}.{k}: unknown field"));
                };
                covered(v, tv, &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(o), Value::Array(t)) if o.len() == t.len() => o
            .iter()
            .zip(t)
            .enumerate()
            .try_for_each(|(i, (a, b))| covered(a, b, &format!("{path}[{i}]"))),
        (a, b) if a == b => Ok(()),
        (a, b) => Err(format!("{path}: {a} became {b}")),
    }
}

fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(file: &str, v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let back = serde_json::to_value(&t).unwrap();
    if let Err(e) = covered(v, &back, "") {
        panic!("{file}: {e}");
    }
    t
}

struct Deploy {
    kustomization: Kustomization,
    sa: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    config: ConfigMap,
    ds: DaemonSet,
}

fn deploy() -> Deploy {
    let (kustomization, objs) = objects();
    let (mut sa, mut role, mut binding, mut config, mut ds) = (None, None, None, None, None);
    for (file, v) in &objs {
        let kind = v["kind"].as_str().unwrap_or_default();
        match kind {
            "ServiceAccount" => sa = Some(typed::<ServiceAccount>(file, v)),
            "ClusterRole" => role = Some(typed::<ClusterRole>(file, v)),
            "ClusterRoleBinding" => binding = Some(typed::<ClusterRoleBinding>(file, v)),
            "ConfigMap" => config = Some(typed::<ConfigMap>(file, v)),
            "DaemonSet" => ds = Some(typed::<DaemonSet>(file, v)),
            other => panic!("{file}: unexpected kind {other:?}"),
        }
        // Namespace-agnostic: the kustomization (or an overlay) decides.
        assert!(
            v["metadata"].get("namespace").is_none(),
            "{file}: names a namespace"
        );
    }
    Deploy {
        kustomization,
        sa: sa.expect("a ServiceAccount"),
        role: role.expect("a ClusterRole"),
        binding: binding.expect("a ClusterRoleBinding"),
        config: config.expect("a ConfigMap"),
        ds: ds.expect("a DaemonSet"),
    }
}

#[test]
fn every_manifest_is_a_kubernetes_object_without_unknown_fields() {
    let d = deploy();
    assert_eq!(d.kustomization.kind, "Kustomization");
    assert_eq!(d.kustomization.namespace.as_deref(), Some("kube-system"));
    // The check itself catches a misspelt field.
    let mut bad: Value = serde_json::to_value(&d.ds).unwrap();
    bad["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    let back =
        serde_json::to_value(serde_json::from_value::<DaemonSet>(bad.clone()).unwrap()).unwrap();
    assert!(covered(&bad, &back, "").is_err());
}

#[test]
fn rbac_grants_list_and_watch_on_what_kpx_watches_and_nothing_else() {
    let d = deploy();
    let grants = bed::rbac_grants(&d.role);
    let want: BTreeSet<String> = [
        "list services",
        "watch services",
        "list endpointslices",
        "watch endpointslices",
        "list nodes",
        "watch nodes",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(grants, want);
    let name = d.sa.metadata.name.as_deref().unwrap();
    assert_eq!(d.binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(d.binding.role_ref.name.as_str()),
        d.role.metadata.name.as_deref()
    );
    let subjects = d.binding.subjects.unwrap_or_default();
    assert!(subjects
        .iter()
        .any(|s| s.kind == "ServiceAccount" && s.name == name));
    let spec = d.ds.spec.template.spec.unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some(name));
}

#[test]
fn the_daemonset_runs_kpx_like_kube_proxy_with_only_the_capabilities_it_needs() {
    let d = deploy();
    let ds_spec = d.ds.spec.clone();
    // Never a node without a proxy: no surge (one agent per node's maps),
    // and the datapath outlives the pod while it is replaced.
    let ru = ds_spec.update_strategy.unwrap().rolling_update.unwrap();
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(ru.max_surge, Some(IntOrString::Int(0)));
    let pod = ds_spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "must tolerate every taint"
    );
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap_or_default(), ["ALL"]);
    let added: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
    let want: BTreeSet<String> = [
        "BPF",
        "NET_ADMIN",
        "NET_RAW",
        "PERFMON",
        "SYS_ADMIN",
        "SYS_RESOURCE",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(added, want);
    let req = c.resources.clone().unwrap().requests.unwrap();
    assert!(req.contains_key("cpu") && req.contains_key("memory"));

    // The health port the probes use is the one the ConfigMap serves.
    let conf = d.config.data.clone().unwrap();
    let file_key = conf.keys().next().unwrap().clone();
    let loaded =
        kpx::control::config::parse(&conf[&file_key]).expect("the ConfigMap's configuration");
    assert_eq!(loaded.ignored, Vec::<String>::new());
    let healthz = loaded.overrides.healthz_bind_address.unwrap().0.unwrap();
    for (probe, path) in [
        (&c.liveness_probe, "/livez"),
        (&c.readiness_probe, "/healthz"),
    ] {
        let get = probe.clone().unwrap().http_get.unwrap();
        assert_eq!(get.port, IntOrString::Int(i32::from(healthz.port())));
        assert_eq!(get.path.as_deref(), Some(path));
    }

    // The command reads that file where the ConfigMap is mounted.
    let mounts: BTreeMap<String, String> = c
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|m| (m.name, m.mount_path))
        .collect();
    let volumes = pod.volumes.unwrap_or_default();
    let config_volume = volumes
        .iter()
        .find(|v| {
            v.config_map.as_ref().map(|c| c.name.as_str()) == d.config.metadata.name.as_deref()
        })
        .expect("the ConfigMap is mounted");
    let cmd = c.command.clone().unwrap();
    let config_arg = format!("--config={}/{file_key}", mounts[&config_volume.name]);
    assert!(cmd.contains(&config_arg), "{cmd:?} lacks {config_arg}");
    let host = |path: &str| {
        volumes.iter().any(|v| {
            v.host_path.as_ref().is_some_and(|h| h.path == path)
                && mounts.get(&v.name).is_some_and(|m| m == path)
        })
    };
    assert!(host("/sys/fs/bpf"), "the host's bpffs must be mounted");
    assert!(host("/lib/modules"));

    // Every flag exists in this kpx (`kpx agent --help` lists them).
    let help = Command::new(bed::KPX)
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert_eq!(cmd[1], "agent");
    for arg in &cmd[2..] {
        let flag = arg.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}[")),
            "unknown flag {flag}"
        );
    }

    // The image puts kpx where the command runs it, with the tools
    // --cleanup-kube-proxy calls.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(&format!("COPY --from=build /out/kpx {}", cmd[0])),
        "{dockerfile}"
    );
    assert!(cmd.iter().any(|a| a == "--cleanup-kube-proxy=true"));
    assert!(dockerfile.contains("iptables nftables"));
    assert!(dockerfile.contains("cargo xtask build"));
}
