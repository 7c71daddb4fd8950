//! Interfaces: attach the tc programs (ingress: the datapath; egress: ICMP
//! errors the node sends) to every interface matching the `--interfaces`
//! patterns, now and whenever one appears (netlink link events).
//!
//! On kernels ≥ 6.6 aya attaches through TCX links owned by this process: they
//! go away when the agent exits, so no stale program is ever left behind.

use std::{collections::BTreeMap, ffi::CStr, time::Duration};

use anyhow::{bail, Context as _, Result};
use aya::programs::{
    tc::{self, SchedClassifierLinkId},
    SchedClassifier, TcAttachType,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tokio::sync::mpsc;

use crate::datapath::Datapath;

/// `--interfaces`: comma-separated names or glob patterns (`eth0,veth*`),
/// and names never to attach to.
#[derive(Clone, Debug)]
pub struct Patterns(Vec<glob::Pattern>, Vec<String>);

impl Patterns {
    pub fn parse(spec: &str) -> Result<Self> {
        let mut v = Vec::new();
        for p in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            v.push(glob::Pattern::new(p).with_context(|| format!("bad interface pattern {p:?}"))?);
        }
        if v.is_empty() {
            bail!("--interfaces names no interface");
        }
        Ok(Self(v, Vec::new()))
    }

    pub fn excluding(mut self, name: &str) -> Self {
        self.1.push(name.to_string());
        self
    }

    pub fn matches(&self, name: &str) -> bool {
        !self.1.iter().any(|n| n == name) && self.0.iter().any(|p| p.matches(name))
    }
}

/// The interfaces of this network namespace: (index, name).
pub fn interfaces() -> Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry,
    // released below with if_freenameindex; names are NUL-terminated.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(std::io::Error::last_os_error()).context("if_nameindex");
        }
        let mut out = Vec::new();
        let mut p = head;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
        Ok(out)
    }
}

pub struct Attacher {
    patterns: Patterns,
    attached: BTreeMap<String, Attached>,
}

struct Attached {
    ifindex: u32,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

impl Attacher {
    pub fn new(patterns: Patterns) -> Self {
        Self {
            patterns,
            attached: BTreeMap::new(),
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Attaches to matching interfaces not yet attached; forgets vanished ones.
    /// Errors on single interfaces are logged, never fatal: the next link
    /// event or periodic pass retries.
    pub fn reconcile(&mut self, dp: &mut Datapath) {
        let present = match interfaces() {
            Ok(v) => v,
            Err(e) => {
                log::warn!("listing interfaces: {e:#}");
                return;
            }
        };
        // An interface that vanished (or was re-created with a new index)
        // took its TCX link with it.
        let stale: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, a)| !present.iter().any(|(i, n)| n == *name && *i == a.ifindex))
            .map(|(n, _)| n.clone())
            .collect();
        for name in stale {
            if let Some(a) = self.attached.remove(&name) {
                // Usually fails: the links died with their interface.
                let _ = detach(dp, a);
                log::info!("interface {name} is gone");
            }
        }
        for (ifindex, name) in present {
            if !self.patterns.matches(&name) || self.attached.contains_key(&name) {
                continue;
            }
            match attach_both(dp, &name) {
                Ok((ingress, egress)) => {
                    log::info!("attached tc ingress and egress to {name} (ifindex {ifindex})");
                    self.attached.insert(
                        name,
                        Attached {
                            ifindex,
                            ingress,
                            egress,
                        },
                    );
                }
                Err(e) => log::warn!("attaching to {name}: {e:#}; will retry"),
            }
        }
    }

    pub fn detach_all(&mut self, dp: &mut Datapath) {
        for (name, a) in std::mem::take(&mut self.attached) {
            match detach(dp, a) {
                Ok(()) => log::info!("detached from {name}"),
                Err(e) => log::debug!("detaching from {name}: {e:#}"),
            }
        }
    }
}

fn detach(dp: &mut Datapath, a: Attached) -> Result<()> {
    let ingress = dp.ingress()?.detach(a.ingress);
    let egress = dp.egress()?.detach(a.egress);
    ingress?;
    egress?;
    Ok(())
}

/// Both programs or neither: an interface with only one would translate
/// flows without their ICMP errors, or the reverse.
fn attach_both(
    dp: &mut Datapath,
    name: &str,
) -> Result<(SchedClassifierLinkId, SchedClassifierLinkId)> {
    let ingress = attach(dp.ingress()?, name, TcAttachType::Ingress)?;
    match attach(dp.egress()?, name, TcAttachType::Egress) {
        Ok(egress) => Ok((ingress, egress)),
        Err(e) => {
            let _ = dp.ingress()?.detach(ingress);
            Err(e)
        }
    }
}

fn attach(
    prog: &mut SchedClassifier,
    name: &str,
    at: TcAttachType,
) -> Result<SchedClassifierLinkId> {
    match prog.attach(name, at) {
        Ok(link) => Ok(link),
        // Before TCX (kernel < 6.6) the clsact qdisc must exist first.
        Err(first) => {
            if let Err(e) = tc::qdisc_add_clsact(name) {
                log::debug!("adding clsact to {name}: {e}");
            }
            prog.attach(name, at)
                .with_context(|| format!("attach failed ({first}), also after adding clsact"))
        }
    }
}

/// Notifies `tx` of every netlink link event (interface added, removed,
/// changed) in this network namespace. Runs on its own thread; reconnects
/// with backoff if the socket fails.
pub fn watch_links(tx: mpsc::Sender<()>) {
    const RTMGRP_LINK: u32 = 1;
    std::thread::spawn(move || {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = (|| -> std::io::Result<()> {
                let mut sock = Socket::new(NETLINK_ROUTE)?;
                sock.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    sock.recv(&mut &mut buf[..], 0)?;
                    // Coalesce: one pending notification is enough.
                    if tx.try_send(()).is_err() && tx.is_closed() {
                        return Ok(());
                    }
                }
            })();
            match result {
                Ok(()) => return,
                Err(e) => {
                    log::warn!("netlink link watch: {e}; retrying in {backoff:?}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    });
}
