//! A stand-in for kube-apiserver, for tests and benchmarks: the real HTTP
//! protocol kube-rs speaks, over real Service, EndpointSlice and Node JSON.
//!
//! - list: `limit`/`continue` pagination over a consistent snapshot, the
//!   list's `resourceVersion`, `labelSelector` (`k`, `!k`, `k=v`, `k!=v`)
//!   and `fieldSelector` (`metadata.name=`, `metadata.namespace=`);
//! - watch: a chunked stream of JSON events (`ADDED`, `MODIFIED`,
//!   `DELETED`, `BOOKMARK` when asked for) from a `resourceVersion`,
//!   ending after `timeoutSeconds`; a version older than the compacted
//!   history gets an `ERROR` event with a `410 Gone` Status, as from etcd;
//! - streaming lists (`sendInitialEvents=true`, Kubernetes' WatchList): the
//!   current objects as `ADDED` events, then a `BOOKMARK` annotated
//!   `k8s.io/initial-events-end`, then changes; or, as a server without the
//!   feature answers, a `422 Invalid` ([`ApiServer::refuse_streaming_lists`]),
//!   or a stream that ends unmarked ([`ApiServer::end_streamed_lists_unmarked`]);
//! - faults on demand: [`ApiServer::expire_watches`] (history compacted,
//!   410 to every open watch), [`ApiServer::drop_connections`] (every
//!   connection cut mid-stream) and [`ApiServer::stop`]/[`ApiServer::start`]
//!   (a restart: nothing listens in between).
//!
//! One global resourceVersion counter orders every change, like etcd's.
//!
//! Long because it is one small HTTP server with the API's list, watch and
//! fault semantics in one place; splitting it would scatter one protocol.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use axum::{
    body::Body,
    extract::{Query, State},
    http::{StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use bytes::Bytes;
use serde::Deserialize as _;
use serde_json::{json, Value};
use tokio::{sync::mpsc, task::JoinSet, time::Instant};

/// The resources the stand-in serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    pub fn of(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == kind)
    }
}

/// (namespace, name); namespace empty for Nodes.
type Key = (String, String);

#[derive(Clone)]
struct LogEntry {
    rv: u64,
    kind: Kind,
    type_: &'static str,
    object: Arc<Value>,
}

struct Snapshot {
    rv: u64,
    items: Arc<Vec<Arc<Value>>>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: HashMap<Kind, BTreeMap<Key, Arc<Value>>>,
    /// Every change after `compacted`, in order.
    log: VecDeque<LogEntry>,
    compacted: u64,
    snapshots: HashMap<u64, Snapshot>,
    next_snapshot: u64,
}

/// Call counts, for tests that check what the client did.
#[derive(Default)]
pub struct Calls {
    pub lists: AtomicU64,
    pub watches: AtomicU64,
    /// Watches that streamed the initial list (`sendInitialEvents`).
    pub streamed: AtomicU64,
    pub gone: AtomicU64,
    /// Every request as RBAC sees it: "list services", "watch nodes", or
    /// "METHOD /path" for anything this stand-in does not serve.
    pub audit: Mutex<BTreeSet<String>>,
}

impl Calls {
    /// Lists of a whole resource: paged list calls and streamed lists.
    pub fn initial_lists(&self) -> u64 {
        self.lists.load(Ordering::Relaxed) + self.streamed.load(Ordering::Relaxed)
    }
}

struct Shared {
    store: Mutex<Store>,
    /// Bumped on every change: wakes the watch streams.
    changed: tokio::sync::watch::Sender<u64>,
    /// Bumped by `expire_watches` (value 1) or `drop_connections` (value 2).
    fault: tokio::sync::watch::Sender<(u64, u8)>,
    bookmark_every: Duration,
    calls: Calls,
    /// A watch from a compacted version is refused with an HTTP 410 status
    /// (as some API servers and proxies answer) instead of an `ERROR` event.
    gone_as_status: std::sync::atomic::AtomicBool,
    /// Streaming lists are refused, as by a server without WatchList.
    refuse_streaming: std::sync::atomic::AtomicBool,
    /// Streamed lists end after the objects, without the end marker.
    unmarked_streaming: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panicking handler must not take the whole stand-in down.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Command {
    /// Answered once the listener is closed, so the address can be bound
    /// again at once.
    Stop(std::sync::mpsc::Sender<()>),
    Start(std::net::TcpListener),
}

type Binder = Box<dyn Fn() -> Result<std::net::TcpListener> + Send>;

/// The running stand-in. Dropping it stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
    bind: Binder,
    pub addr: SocketAddr,
}

impl ApiServer {
    /// Starts serving on the listener `bind` returns (called again by
    /// [`ApiServer::start`] after a stop, so it must return the same address).
    pub fn start_with(
        bind: impl Fn() -> Result<std::net::TcpListener> + Send + 'static,
    ) -> Result<Self> {
        let listener = bind()?;
        let addr = listener.local_addr()?;
        let (changed, _) = tokio::sync::watch::channel(0);
        let (fault, _) = tokio::sync::watch::channel((0, 0));
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed,
            fault,
            bookmark_every: Duration::from_millis(500),
            calls: Calls::default(),
            gone_as_status: std::sync::atomic::AtomicBool::new(false),
            refuse_streaming: std::sync::atomic::AtomicBool::new(false),
            unmarked_streaming: std::sync::atomic::AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("apiserver".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("apiserver stand-in: no runtime: {e}");
                        return;
                    }
                };
                rt.block_on(serve(s, listener, rx));
            })?;
        Ok(Self {
            shared,
            commands: tx,
            thread: Some(thread),
            bind: Box::new(bind),
            addr,
        })
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster: {{server: \"http://{}\"}}\n\
             users:\n- name: kpx\n  user: {{}}\ncontexts:\n- name: standin\n  context: {{cluster: standin, user: kpx}}\n\
             current-context: standin\n",
            self.addr
        )
    }

    pub fn calls(&self) -> &Calls {
        &self.shared.calls
    }

    /// Creates or replaces an object (JSON or YAML with `kind`).
    pub fn apply_yaml(&self, yaml: &str) -> Result<u64> {
        let v: Value = serde_norway::from_str(yaml).context("object YAML")?;
        self.apply(v)
    }

    /// Creates or replaces every object of a multi-document YAML stream.
    pub fn apply_all(&self, yaml: &str) -> Result<()> {
        for doc in serde_norway::Deserializer::from_str(yaml) {
            let v = Value::deserialize(doc).context("object YAML")?;
            if !v.is_null() {
                self.apply(v)?;
            }
        }
        Ok(())
    }

    /// Creates or replaces an object; returns its new resourceVersion.
    pub fn apply(&self, mut v: Value) -> Result<u64> {
        let kind = v
            .get("kind")
            .and_then(Value::as_str)
            .and_then(Kind::of)
            .ok_or_else(|| anyhow!("object without a served kind"))?;
        let key = key_of(kind, &v)?;
        let mut st = self.shared.store();
        st.rv += 1;
        let rv = st.rv;
        let meta = v
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| anyhow!("object without metadata"))?;
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        if kind != Kind::Node && !meta.contains_key("namespace") {
            meta.insert("namespace".into(), Value::String("default".into()));
        }
        let object = Arc::new(v);
        let prev = st
            .objects
            .entry(kind)
            .or_default()
            .insert(key, object.clone());
        let type_ = if prev.is_some() { "MODIFIED" } else { "ADDED" };
        st.log.push_back(LogEntry {
            rv,
            kind,
            type_,
            object,
        });
        drop(st);
        self.shared.changed.send_replace(rv);
        Ok(rv)
    }

    /// Deletes an object; false if there was none.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.store();
        let key = (
            if kind == Kind::Node { "" } else { namespace }.to_string(),
            name.to_string(),
        );
        let Some(prev) = st.objects.entry(kind).or_default().remove(&key) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        let mut last = (*prev).clone();
        if let Some(m) = last.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        st.log.push_back(LogEntry {
            rv,
            kind,
            type_: "DELETED",
            object: Arc::new(last),
        });
        drop(st);
        self.shared.changed.send_replace(rv);
        true
    }

    /// Forgets the change history (as etcd compaction does) and sends
    /// `410 Gone` to every open watch: clients must relist.
    pub fn expire_watches(&self) {
        self.compact();
        self.shared
            .fault
            .send_modify(|(n, what)| (*n, *what) = (*n + 1, 1));
    }

    /// Forgets the change history, as etcd compaction does, without telling
    /// open watches: a client finds out when it next starts a watch.
    pub fn compact(&self) {
        let mut st = self.shared.store();
        st.compacted = st.rv;
        st.log.clear();
        st.snapshots.clear();
    }

    /// From now on, a watch from a compacted version gets an HTTP `410
    /// Gone` status rather than a 200 stream with an `ERROR` event.
    pub fn answer_gone_with_status(&self, on: bool) {
        self.shared.gone_as_status.store(on, Ordering::Relaxed);
    }

    /// Refuses streaming lists with `422 Invalid`, as an API server without
    /// the WatchList feature (an older one, or one with the gate off) does:
    /// clients must list in pages.
    pub fn refuse_streaming_lists(&self, on: bool) {
        self.shared.refuse_streaming.store(on, Ordering::Relaxed);
    }

    /// Ends every streamed list after its objects, without the bookmark
    /// that marks its end (as a proxy that drops annotations might).
    pub fn end_streamed_lists_unmarked(&self, on: bool) {
        self.shared.unmarked_streaming.store(on, Ordering::Relaxed);
    }

    /// Cuts every open watch mid-stream, without a proper end.
    pub fn drop_connections(&self) {
        self.shared
            .fault
            .send_modify(|(n, what)| (*n, *what) = (*n + 1, 2));
    }

    /// Stops listening and closes every connection; returns once the
    /// listening socket is closed.
    pub fn stop(&self) -> Result<()> {
        let (done, closed) = std::sync::mpsc::channel();
        self.commands
            .send(Command::Stop(done))
            .map_err(|_| anyhow!("stand-in is gone"))?;
        closed
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the stand-in did not stop"))
    }

    /// Listens again, on the same address.
    pub fn start(&self) -> Result<()> {
        let l = (self.bind)()?;
        if l.local_addr()? != self.addr {
            bail!("restarted on {} instead of {}", l.local_addr()?, self.addr);
        }
        self.commands
            .send(Command::Start(l))
            .map_err(|_| anyhow!("stand-in is gone"))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Closing the command channel ends the server loop.
        let (tx, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.commands, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn key_of(kind: Kind, v: &Value) -> Result<Key> {
    let meta = v.get("metadata").ok_or_else(|| anyhow!("no metadata"))?;
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("no metadata.name"))?;
    let ns = match kind {
        Kind::Node => "",
        _ => meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default"),
    };
    Ok((ns.into(), name.into()))
}

/// The accept loop, stopped and restarted on command.
async fn serve(
    shared: Arc<Shared>,
    first: std::net::TcpListener,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let app = Router::new().fallback(handle).with_state(shared);
    let mut next = Some(first);
    loop {
        let mut conns = JoinSet::new();
        if let Some(std_listener) = next.take() {
            let listener = std_listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(std_listener));
            let listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("apiserver stand-in: listener: {e}");
                    return;
                }
            };
            let mut stopped = None;
            loop {
                tokio::select! {
                    c = commands.recv() => match c {
                        Some(Command::Stop(done)) => { stopped = Some(done); break; }
                        Some(Command::Start(l)) => { next = Some(l); break; }
                        None => return,
                    },
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                        conns.spawn(async move {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, svc)
                                .await;
                        });
                    }
                }
            }
            // Dropping the listener and aborting the connection tasks closes
            // every socket: clients see a restart.
            conns.abort_all();
            drop(listener);
            if let Some(done) = stopped {
                let _ = done.send(());
            }
            if next.is_some() {
                continue;
            }
        }
        match commands.recv().await {
            Some(Command::Start(l)) => next = Some(l),
            Some(Command::Stop(done)) => {
                let _ = done.send(());
            }
            None => return,
        }
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (
        code,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A label or field selector, as the API server evaluates it.
#[derive(Clone, Default)]
struct Selector {
    labels: Vec<(String, Option<String>, bool)>,
    fields: Vec<(String, String)>,
}

impl Selector {
    fn parse(q: &HashMap<String, String>) -> Result<Self, String> {
        let mut s = Self::default();
        for req in q
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
            .filter(|r| !r.is_empty())
        {
            // (key, value, must match): `!k`, `k`, `k=v`, `k==v`, `k!=v`.
            let r = if let Some(k) = req.strip_prefix('!') {
                (k.to_string(), None, false)
            } else if let Some((k, v)) = req.split_once("!=") {
                (k.to_string(), Some(v.to_string()), false)
            } else if let Some((k, v)) = req.split_once('=') {
                (
                    k.to_string(),
                    Some(v.trim_start_matches('=').to_string()),
                    true,
                )
            } else {
                (req.to_string(), None, true)
            };
            s.labels.push(r);
        }
        for req in q
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
            .filter(|r| !r.is_empty())
        {
            let (k, v) = req
                .split_once('=')
                .ok_or_else(|| format!("unsupported field selector {req:?}"))?;
            if k != "metadata.name" && k != "metadata.namespace" {
                return Err(format!("field label not supported: {k}"));
            }
            s.fields
                .push((k.to_string(), v.trim_start_matches('=').to_string()));
        }
        Ok(s)
    }

    fn matches(&self, v: &Value) -> bool {
        let meta = &v["metadata"];
        let labels = meta.get("labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.labels.iter().all(|(k, val, eq)| match (val, eq) {
            (None, true) => label(k).is_some(),
            (None, false) => label(k).is_none(),
            (Some(val), true) => label(k) == Some(val.as_str()),
            (Some(val), false) => label(k) != Some(val.as_str()),
        }) && self.fields.iter().all(|(k, val)| {
            let field = k.trim_start_matches("metadata.");
            meta.get(field).and_then(Value::as_str).unwrap_or("") == val
        })
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: axum::http::Method,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let kind = Kind::ALL.into_iter().find(|k| k.path() == uri.path());
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let entry = match kind {
        Some(k) if method == axum::http::Method::GET => format!(
            "{} {}",
            if watching { "watch" } else { "list" },
            k.path().rsplit('/').next().unwrap_or_default()
        ),
        _ => format!("{method} {}", uri.path()),
    };
    shared
        .calls
        .audit
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(entry);
    let Some(kind) = kind else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let sel = match Selector::parse(&q) {
        Ok(s) => s,
        Err(m) => return status(StatusCode::BAD_REQUEST, "BadRequest", &m),
    };
    if watching {
        shared.calls.watches.fetch_add(1, Ordering::Relaxed);
        watch(shared, kind, sel, &q)
    } else {
        shared.calls.lists.fetch_add(1, Ordering::Relaxed);
        list(&shared, kind, &sel, &q)
    }
}

fn list(shared: &Shared, kind: Kind, sel: &Selector, q: &HashMap<String, String>) -> Response {
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut st = shared.store();
    let (id, offset) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let parsed = token
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<usize>().ok()?)));
            match parsed {
                Some((id, off)) if st.snapshots.contains_key(&id) => (id, off),
                _ => {
                    shared.calls.gone.fetch_add(1, Ordering::Relaxed);
                    return status(
                        StatusCode::GONE,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result.",
                    );
                }
            }
        }
        None => {
            let items: Vec<Arc<Value>> = st
                .objects
                .get(&kind)
                .into_iter()
                .flat_map(|m| m.values())
                .filter(|v| sel.matches(v))
                .cloned()
                .collect();
            let id = st.next_snapshot;
            st.next_snapshot += 1;
            let rv = st.rv;
            st.snapshots.insert(
                id,
                Snapshot {
                    rv,
                    items: Arc::new(items),
                },
            );
            (id, 0)
        }
    };
    let (rv, items) = match st.snapshots.get(&id) {
        Some(s) => (s.rv, s.items.clone()),
        None => return status(StatusCode::GONE, "Expired", "snapshot gone"),
    };
    let end = if limit == 0 {
        items.len()
    } else {
        (offset + limit).min(items.len())
    };
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if end < items.len() {
        metadata["continue"] = Value::String(format!("{id}:{end}"));
    } else {
        st.snapshots.remove(&id);
    }
    drop(st);
    let page: Vec<&Value> = items
        .get(offset..end)
        .unwrap_or(&[])
        .iter()
        .map(|v| v.as_ref())
        .collect();
    let body = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.name()),
        "metadata": metadata,
        "items": page,
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn line(type_: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({ "type": type_, "object": object })).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn gone_status(kind: Kind, rv: u64) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("too old resource version: {rv}"), "reason": "Expired", "code": 410,
        "details": { "kind": kind.name() },
    })
}

fn gone_line(kind: Kind, rv: u64) -> Bytes {
    line("ERROR", &gone_status(kind, rv))
}

struct WatchState {
    shared: Arc<Shared>,
    kind: Kind,
    sel: Selector,
    sent: u64,
    /// Lines to send: events are serialized as they go out, not all when
    /// the watch starts (as the API server streams from its watch cache).
    pending: VecDeque<Line>,
    deadline: Instant,
    bookmarks: bool,
    next_bookmark: Instant,
    changed: tokio::sync::watch::Receiver<u64>,
    fault: tokio::sync::watch::Receiver<(u64, u8)>,
    done: bool,
}

fn watch(shared: Arc<Shared>, kind: Kind, sel: Selector, q: &HashMap<String, String>) -> Response {
    let from = q.get("resourceVersion").and_then(|v| v.parse::<u64>().ok());
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let initial_events = q.get("sendInitialEvents").map(String::as_str) == Some("true");
    if initial_events {
        if shared.refuse_streaming.load(Ordering::Relaxed) {
            return status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
            );
        }
        shared.calls.streamed.fetch_add(1, Ordering::Relaxed);
    }
    let mut pending = VecDeque::new();
    let mut done = false;
    let sent = {
        let st = shared.store();
        match from {
            // No version: the current state as ADDED events, then changes;
            // a streaming list marks the end of the state with a bookmark.
            None | Some(0) => {
                for v in st.objects.get(&kind).into_iter().flat_map(|m| m.values()) {
                    if sel.matches(v) {
                        pending.push_back(Line::Event("ADDED", v.clone()));
                    }
                }
                if initial_events && shared.unmarked_streaming.load(Ordering::Relaxed) {
                    done = true;
                } else if initial_events {
                    pending.push_back(Line::Ready(line(
                        "BOOKMARK",
                        &json!({
                            "kind": kind.name(), "apiVersion": kind.api_version(),
                            "metadata": {
                                "resourceVersion": st.rv.to_string(),
                                "annotations": { "k8s.io/initial-events-end": "true" },
                            },
                        }),
                    )));
                }
                st.rv
            }
            Some(rv) if rv < st.compacted => {
                shared.calls.gone.fetch_add(1, Ordering::Relaxed);
                if shared.gone_as_status.load(Ordering::Relaxed) {
                    return (
                        StatusCode::GONE,
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        gone_status(kind, rv).to_string(),
                    )
                        .into_response();
                }
                pending.push_back(Line::Ready(gone_line(kind, rv)));
                done = true;
                rv
            }
            Some(rv) => rv,
        }
    };
    let now = Instant::now();
    let state = WatchState {
        changed: shared.changed.subscribe(),
        fault: shared.fault.subscribe(),
        shared,
        kind,
        sel,
        sent,
        pending,
        deadline: now + Duration::from_secs(timeout),
        bookmarks: q.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
        next_bookmark: now,
        done,
    };
    let stream = futures::stream::unfold(state, |mut w| async move {
        loop {
            if !w.pending.is_empty() {
                return Some((Ok::<Bytes, std::io::Error>(w.next_chunk()), w));
            }
            if w.done {
                return None;
            }
            w.catch_up();
            if !w.pending.is_empty() {
                continue;
            }
            tokio::select! {
                _ = w.changed.changed() => {}
                r = w.fault.changed() => {
                    if r.is_err() { return None; }
                    let (_, what) = *w.fault.borrow_and_update();
                    if what == 2 {
                        let e = std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "dropped");
                        w.done = true;
                        return Some((Err(e), w));
                    }
                    w.shared.calls.gone.fetch_add(1, Ordering::Relaxed);
                    w.pending.push_back(Line::Ready(gone_line(w.kind, w.sent)));
                    w.done = true;
                }
                _ = tokio::time::sleep_until(w.next_bookmark), if w.bookmarks => {
                    w.next_bookmark = Instant::now() + w.shared.bookmark_every;
                    w.catch_up();
                    if w.pending.is_empty() {
                        // Every change up to `sent` went out (or was not selected).
                        w.pending.push_back(Line::Ready(line("BOOKMARK", &json!({
                            "kind": w.kind.name(), "apiVersion": w.kind.api_version(),
                            "metadata": { "resourceVersion": w.sent.to_string() },
                        }))));
                    }
                }
                _ = tokio::time::sleep_until(w.deadline) => return None,
            }
        }
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// One line of a watch's response.
enum Line {
    Ready(Bytes),
    /// An event, serialized when it is sent.
    Event(&'static str, Arc<Value>),
}

impl WatchState {
    /// The next lines, up to about 64 KiB of them in one chunk.
    fn next_chunk(&mut self) -> Bytes {
        let mut buf = Vec::new();
        while buf.len() < 64 << 10 {
            match self.pending.pop_front() {
                Some(Line::Ready(b)) => buf.extend_from_slice(&b),
                Some(Line::Event(type_, object)) => {
                    buf.extend_from_slice(b"{\"type\":\"");
                    buf.extend_from_slice(type_.as_bytes());
                    buf.extend_from_slice(b"\",\"object\":");
                    // Writing into a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut buf, &*object);
                    buf.extend_from_slice(b"}\n");
                }
                None => break,
            }
        }
        Bytes::from(buf)
    }

    /// Queues every change after `sent` that this watch selects.
    fn catch_up(&mut self) {
        let st = self.shared.store();
        let start = st.log.partition_point(|e| e.rv <= self.sent);
        for e in st.log.range(start..) {
            self.sent = e.rv;
            if e.kind == self.kind && self.sel.matches(&e.object) {
                self.pending
                    .push_back(Line::Event(e.type_, e.object.clone()));
            }
        }
    }
}
