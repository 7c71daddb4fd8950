//! The Kubernetes API as an input: kube-rs watchers on Services,
//! EndpointSlices and this node's Node, forwarded to the agent as [`Change`]s.
//!
//! kube-runtime's watcher lists, then watches from the list's
//! resourceVersion; on `410 Gone` it relists, on a dropped connection it
//! resumes the watch, and on errors it retries with exponential backoff
//! (`default_backoff`: 800 ms doubling up to 30 s, reset after success).
//! The agent keeps serving its last state meanwhile: nothing here can
//! flush a map.

use std::path::Path;

use anyhow::{Context as _, Result};
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    api::Api,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt as _},
    Client, Config,
};
use tokio::sync::mpsc;

/// What the watchers report.
#[derive(Debug)]
pub enum Change {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
    /// A list or watch call failed; the watcher retries with backoff.
    Error {
        resource: &'static str,
        error: String,
    },
}

/// kube-proxy's selector: objects of other proxies and headless Services'
/// slices never reach us (`service.kubernetes.io/headless` is set by the
/// EndpointSlice controller).
pub const SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// A client from `kubeconfig`, or the in-cluster config (service account
/// token and `KUBERNETES_SERVICE_HOST`) when none is given.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::incluster()
            .context("no --kubeconfig and not running in a pod (in-cluster config unavailable)")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Starts the three watchers; they run until `tx` is dropped.
pub fn spawn(client: Client, node_name: &str, tx: mpsc::Sender<Change>) {
    let list = || watcher::Config::default().labels(SELECTOR);
    forward(
        "services",
        watcher(Api::<Service>::all(client.clone()), list()),
        Change::Service,
        tx.clone(),
    );
    forward(
        "endpointslices",
        watcher(Api::<EndpointSlice>::all(client.clone()), list()),
        Change::Slice,
        tx.clone(),
    );
    let own = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    forward(
        "nodes",
        watcher(Api::<Node>::all(client), own),
        Change::Node,
        tx,
    );
}

fn forward<K, S>(
    resource: &'static str,
    stream: S,
    wrap: fn(Box<watcher::Event<K>>) -> Change,
    tx: mpsc::Sender<Change>,
) where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream.default_backoff());
        while let Some(item) = stream.next().await {
            let change = match item {
                Ok(ev) => wrap(Box::new(ev)),
                Err(e) => Change::Error {
                    resource,
                    error: e.to_string(),
                },
            };
            if tx.send(change).await.is_err() {
                break; // the agent is stopping
            }
        }
    });
}

/// One list of everything the agent watches (for one-shot commands such
/// as `kpx iptables-rules`): Services, EndpointSlices and the Node, if any.
pub async fn list_once(
    client: Client,
    node_name: &str,
) -> Result<(Vec<Service>, Vec<EndpointSlice>, Option<Node>)> {
    let lp = kube::api::ListParams::default().labels(SELECTOR);
    let services = Api::<Service>::all(client.clone())
        .list(&lp)
        .await
        .context("listing Services")?
        .items;
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&lp)
        .await
        .context("listing EndpointSlices")?
        .items;
    let node = Api::<Node>::all(client)
        .get_opt(node_name)
        .await
        .with_context(|| format!("reading Node {node_name}"))?;
    Ok((services, slices, node))
}
