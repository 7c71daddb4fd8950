//! The Kubernetes API as an input: kube-rs watchers on Services,
//! EndpointSlices and this node's Node, forwarded to the agent as [`Change`]s.
//!
//! kube-runtime's watcher lists, then watches from the list's
//! resourceVersion; on a `410 Gone` event it relists and on a dropped
//! connection it resumes the watch. Two things are kpx's own:
//! - a watch that cannot even start because its resourceVersion is gone
//!   (an HTTP 410 *status*, not an event) makes kube-runtime retry the same
//!   version forever; kpx drops that watcher and starts a fresh one, which
//!   relists (client-go's reflector does the same);
//! - retries back off with [`ApiBackoff`]: jittered, capped at 1 s, so the
//!   agent converges within about a second of the API's return after any
//!   outage, where kube-runtime's default (800 ms doubling to 30 s) took
//!   5.3 s after a 4 s outage.
//!
//! Initial lists are streamed where the API server offers it (Kubernetes'
//! WatchList, `sendInitialEvents`: the objects come as watch events from
//! the API server's cache, never a whole page in memory on either side),
//! and listed in pages of 500 where it does not: a server without the
//! feature refuses the request (`422`/`400`), and kpx then lists that
//! resource in pages for the rest of its life.
//!
//! The agent keeps serving its last state meanwhile: nothing here can
//! flush a map.

use std::{
    hash::{BuildHasher as _, RandomState},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    api::Api,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{utils::Backoff, watcher, WatchStreamExt as _},
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
    let list = |streaming| lists(watcher::Config::default().labels(SELECTOR), streaming);
    let c = client.clone();
    forward(
        "services",
        move |streaming| watcher(Api::<Service>::all(c.clone()), list(streaming)),
        Change::Service,
        tx.clone(),
    );
    let c = client.clone();
    forward(
        "endpointslices",
        move |streaming| watcher(Api::<EndpointSlice>::all(c.clone()), list(streaming)),
        Change::Slice,
        tx.clone(),
    );
    let own = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    forward(
        "nodes",
        move |streaming| {
            watcher(
                Api::<Node>::all(client.clone()),
                lists(own.clone(), streaming),
            )
        },
        Change::Node,
        tx,
    );
}

/// `config` with streaming initial lists, or paged ones.
fn lists(config: watcher::Config, streaming: bool) -> watcher::Config {
    if streaming {
        config.streaming_lists()
    } else {
        config
    }
}

/// Whether `e` is the API server refusing a streaming list: one without
/// the WatchList feature answers `sendInitialEvents` (and the
/// `resourceVersionMatch` that goes with it) with 422 Invalid, or 400.
pub fn streaming_refused(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 422 || s.code == 400)
}

/// Whether `e` leaves the watcher retrying a resourceVersion the API
/// server no longer has (an HTTP 410 when the watch starts): only a fresh
/// watcher, which relists, gets out of it.
pub fn needs_relist(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 410)
}

fn forward<K, S>(
    resource: &'static str,
    make: impl Fn(bool) -> S + Send + 'static,
    wrap: fn(Box<watcher::Event<K>>) -> Change,
    tx: mpsc::Sender<Change>,
) where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut streaming = true;
        loop {
            let mut stream = std::pin::pin!(make(streaming).backoff(ApiBackoff::default()));
            let mut relist = false;
            // Streamed lists that started and never saw their end marker.
            let mut unfinished = 0;
            while let Some(item) = stream.next().await {
                let change = match item {
                    Ok(ev) => {
                        match &ev {
                            watcher::Event::Init if streaming => unfinished += 1,
                            watcher::Event::InitDone => unfinished = 0,
                            _ => {}
                        }
                        // A server that takes the request but never marks
                        // the end of the list (a proxy that drops the
                        // bookmark's annotation) would leave the agent
                        // waiting forever: a second unfinished one and the
                        // resource is listed in pages.
                        if unfinished >= 2 {
                            log::warn!(
                                "Kubernetes API, {resource}: a streamed list ended twice without its end marker; listing in pages from now on"
                            );
                            streaming = false;
                            relist = true;
                            break;
                        }
                        wrap(Box::new(ev))
                    }
                    Err(e) if streaming && streaming_refused(&e) => {
                        log::info!(
                            "Kubernetes API, {resource}: no streaming lists ({e}); listing in pages"
                        );
                        streaming = false;
                        relist = true;
                        break;
                    }
                    Err(e) => {
                        relist = needs_relist(&e);
                        Change::Error {
                            resource,
                            error: if relist {
                                format!("{e}: the version is gone, relisting")
                            } else {
                                e.to_string()
                            },
                        }
                    }
                };
                if tx.send(change).await.is_err() {
                    return; // the agent is stopping
                }
                if relist {
                    break;
                }
            }
            if !relist {
                return;
            }
            // The dropped watcher's backoff does not carry over: wait one
            // step, so a server answering 410 to everything is not hammered.
            tokio::time::sleep(ApiBackoff::default().first()).await;
        }
    });
}

/// Retry delays for the API: 100 ms doubling to a cap of 1 s, each drawn
/// at random from its upper half (so agents that lost the API together do
/// not return in step), reset by any success.
///
/// Why 1 s: convergence within about a second of the API's return matters
/// more than the cost of a refused connection; and a returning API server
/// is protected by its own API Priority and Fairness, which queues or
/// rejects (429) what it cannot take, rather than by clients waiting
/// 30 s. At 5,000 nodes × 3 watches the retries are at most 15,000
/// connection attempts a second while it is down, each a refused TCP
/// connect or a 429.
#[derive(Debug)]
pub struct ApiBackoff {
    next: Duration,
    random: RandomState,
    draws: u64,
}

impl ApiBackoff {
    const FIRST: Duration = Duration::from_millis(100);
    pub const CAP: Duration = Duration::from_secs(1);

    fn first(&mut self) -> Duration {
        self.next().unwrap_or(Self::CAP)
    }
}

impl Default for ApiBackoff {
    fn default() -> Self {
        Self {
            next: Self::FIRST,
            random: RandomState::new(),
            draws: 0,
        }
    }
}

impl Iterator for ApiBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let step = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        self.draws += 1;
        // A uniform draw in [0.5, 1.0) of the step, from a per-instance
        // random key (std's SipHash keys): no random-number crate needed.
        let r = self.random.hash_one(self.draws) as f64 / u64::MAX as f64;
        Some(step.mul_f64(0.5 + r / 2.0))
    }
}

impl Backoff for ApiBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_to_a_1s_cap_with_jitter_and_resets() {
        let mut b = ApiBackoff::default();
        let steps: Vec<Duration> = (0..8).map(|_| b.next().expect("endless")).collect();
        for (s, upper) in steps
            .iter()
            .zip([100, 200, 400, 800, 1000, 1000, 1000, 1000])
        {
            let upper = Duration::from_millis(upper);
            assert!(
                *s >= upper / 2 && *s <= upper,
                "{s:?} not in [{:?}, {upper:?}]",
                upper / 2
            );
        }
        // Jittered: not every capped step is the same.
        let capped: Vec<Duration> = (0..16).map(|_| b.next().expect("endless")).collect();
        assert!(capped.iter().any(|d| *d != capped[0]), "{capped:?}");
        b.reset();
        assert!(b.next().expect("endless") <= Duration::from_millis(100));
        // Two agents do not draw the same delays.
        let (mut x, mut y) = (ApiBackoff::default(), ApiBackoff::default());
        let (xs, ys): (Vec<_>, Vec<_>) = (0..8).map(|_| (x.next(), y.next())).unzip();
        assert_ne!(xs, ys);
    }

    #[test]
    fn only_a_gone_version_at_watch_start_forces_a_relist() {
        let status = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert!(needs_relist(&watcher::Error::WatchStartFailed(status(410))));
        assert!(!needs_relist(&watcher::Error::WatchStartFailed(status(
            500
        ))));
        assert!(!needs_relist(&watcher::Error::WatchFailed(status(410))));
    }

    #[test]
    fn only_an_invalid_watch_start_means_no_streaming_lists() {
        let start = |code| {
            watcher::Error::WatchStartFailed(kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            })))
        };
        assert!(streaming_refused(&start(422)));
        assert!(streaming_refused(&start(400)));
        // Outages, throttling and gone versions are retried as they are.
        for code in [401, 403, 410, 429, 500, 503] {
            assert!(!streaming_refused(&start(code)), "{code}");
        }
    }
}
