//! Interfaces: attach the tc programs (ingress: the datapath; egress: ICMP
//! errors the node sends) to every interface matching the `--interfaces`
//! patterns, now and whenever one appears (netlink link events).
//!
//! Egress only translates what the node itself sends; a packet it
//! forwards (a pod's to a pod) crosses it for nothing, and the hook alone
//! costs a round trip more than kpx's programs do (`cargo xtask bench`).
//! So where the socket-level load balancer takes pods' and the node's
//! flows (`--socket-lb=all`), egress goes on at once only on interfaces
//! some wider route than one host's leads through (the node's own flows
//! to a service address leave there), and on the rest (pods' veths) when
//! a flow tc translates first arrives there ([`egress`](super::egress)).
//!
//! On kernels with TCX (≥ 6.6) the links are pinned in `<bpffs>/links`, so
//! the datapath outlives the agent as kube-proxy's rules outlive kube-proxy:
//! a restarted or upgraded agent takes each link over and swaps its program
//! in atomically (BPF_LINK_UPDATE), and no packet meets a node without a
//! proxy. `kpx cleanup` removes the pins, which detaches the programs.
//! Without TCX, netlink tc filters are used, owned by the process and
//! removed when it exits.
//!
//! kpx attaches last in the TCX chain (`LinkOrder::default()`): another
//! tool's programs attached before it see packets as they arrived, and a
//! translated packet's verdict (which ends the chain) bypasses nobody. Only
//! kpx's own links are ever detached.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{self, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
    LinkOrder, SchedClassifier, TcAttachType,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tokio::sync::mpsc;

use crate::dataplane::{egress, maps::Datapath};

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
    let list = nix::net::if_::if_nameindex().context("if_nameindex")?;
    Ok(list
        .iter()
        .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
        .collect())
}

/// Where the links of a bpffs directory are pinned.
pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

/// A link's pin: interface index (a re-created interface is a different
/// one), direction and name.
fn pin_name(ifname: &str, ifindex: u32, at: TcAttachType) -> String {
    let dir = match at {
        TcAttachType::Ingress => "ingress",
        _ => "egress",
    };
    link_pin_name(ifindex, dir, ifname)
}

/// The file name of a link pinned for interface `ifname` (`ifindex`),
/// `how` it is attached (tc's direction, XDP's mode): tc's and XDP's pins
/// alike, read back by [`parse_link_pin_name`].
pub(crate) fn link_pin_name(ifindex: u32, how: &str, ifname: &str) -> String {
    // bpffs refuses names with a dot (reserved), which interface names
    // may have (VLANs: eth0.100); ':' is one they cannot have.
    format!("{ifindex}_{how}_{}", ifname.replace('.', ":"))
}

/// [`link_pin_name`]'s parts: (ifindex, how, interface name). None for a
/// file that is no link's pin.
pub(crate) fn parse_link_pin_name(file: &str) -> Option<(u32, &str, String)> {
    let (ifindex, rest) = file.split_once('_')?;
    let (how, name) = rest.split_once('_')?;
    Some((ifindex.parse().ok()?, how, name.replace(':', ".")))
}

/// Removes every pinned link under `bpffs`, tc's, XDP's and the socket-level
/// load balancer's (detaching those programs). Returns how many there were.
pub fn unpin_links(bpffs: &Path) -> Result<usize> {
    Ok(unpin_dir(&links_dir(bpffs))?
        + unpin_dir(&crate::dataplane::socklb::links_dir(bpffs))?
        + crate::dataplane::xdp::unpin(bpffs)?)
}

/// Removes every pinned link in `dir`, and the directory.
pub fn unpin_dir(dir: &Path) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut n = 0;
    for entry in entries {
        let path = entry?.path();
        if let Err(e) = detach_pinned(&path) {
            log::warn!(
                "detaching {}: {e}; it goes once the kernel drops it",
                path.display()
            );
        }
        fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        n += 1;
    }
    let _ = fs::remove_dir(dir);
    Ok(n)
}

/// Detaches the link pinned at `path` now (`BPF_LINK_DETACH`), so its
/// program is off the interface when this returns: removing the pin alone
/// leaves it attached until the kernel drops its last reference, and a
/// packet meanwhile would still be translated.
pub(crate) fn detach_pinned(path: &Path) -> std::io::Result<()> {
    use std::os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // union bpf_attr for OBJ_GET: pathname, bpf_fd, file_flags.
    let mut get: [u64; 2] = [name.as_ptr() as u64, 0];
    // SAFETY: `get` is OBJ_GET's bpf_attr, naming a NUL-terminated path
    // alive for the call.
    let fd = unsafe { crate::dataplane::sys::bpf(BPF_OBJ_GET, &mut get)? };
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // union bpf_attr for LINK_DETACH: link_fd.
    let mut detach: [u32; 4] = [link.as_raw_fd() as u32, 0, 0, 0];
    // SAFETY: `detach` is LINK_DETACH's bpf_attr; no pointer in it.
    unsafe { crate::dataplane::sys::bpf(BPF_LINK_DETACH, &mut detach)? };
    Ok(())
}

pub struct Attacher {
    patterns: Patterns,
    /// Where links are pinned (TCX); None: never pin.
    pin_dir: Option<PathBuf>,
    attached: BTreeMap<String, Attached>,
    /// tc egress where a flow asks for it, rather than everywhere.
    on_demand: bool,
    /// Interfaces whose tc egress failed to attach (warned once).
    egress_failed: std::collections::BTreeSet<String>,
    /// The datapath's egress bitmap made to match what is attached (once,
    /// at the first reconcile: an earlier agent's bits may be stale).
    bitmap_checked: bool,
}

/// How one program is attached to one interface.
enum Handle {
    /// A pinned TCX link: lives in bpffs, not in this process.
    Pinned(PathBuf),
    /// A netlink tc filter this process owns (detached at exit).
    Owned(SchedClassifierLinkId),
}

struct Attached {
    ifindex: u32,
    ingress: Handle,
    /// None until a flow asks for it (on demand).
    egress: Option<Handle>,
}

impl Attacher {
    /// `bpffs`: pin links there (and take over the ones found); None to
    /// keep them owned by the process.
    pub fn new(patterns: Patterns, bpffs: Option<&Path>) -> Self {
        Self {
            patterns,
            pin_dir: bpffs.map(links_dir),
            attached: BTreeMap::new(),
            on_demand: false,
            egress_failed: Default::default(),
            bitmap_checked: false,
        }
    }

    /// tc egress on demand (`true`) or on every interface at once; turned
    /// off, it is attached wherever it is missing at the next reconcile.
    pub fn egress_on_demand(&mut self, on: bool) {
        self.on_demand = on;
    }

    /// How many attached interfaces have tc egress.
    pub fn with_egress(&self) -> usize {
        self.attached
            .values()
            .filter(|a| a.egress.is_some())
            .count()
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
            self.egress_failed.remove(&name);
            if let Some(a) = self.attached.remove(&name) {
                // Usually fails: the links died with their interface.
                let _ = detach(dp, a);
                log::info!("interface {name} is gone");
            }
        }
        self.remove_stale_pins(&present);
        let wide = if self.on_demand {
            egress::wide_route_interfaces()
        } else {
            Default::default()
        };
        for (ifindex, name) in present {
            if !self.patterns.matches(&name) {
                continue;
            }
            let eager = !self.on_demand
                || wide.contains(&name)
                || proxy_common::egress_bit(ifindex).is_none()
                || self.pinned_egress(&name, ifindex);
            if let Some(a) = self.attached.get(&name) {
                if eager && a.egress.is_none() {
                    self.attach_egress(dp, &name, "");
                }
                continue;
            }
            let ingress = match dp
                .ingress()
                .and_then(|prog| self.attach_one(prog, &name, ifindex, TcAttachType::Ingress))
            {
                Ok(h) => h,
                Err(e) => {
                    log::warn!("attaching to {name}: {e:#}; will retry");
                    continue;
                }
            };
            let how = match &ingress {
                Handle::Pinned(p) => format!("pinned in {}", p.display()),
                Handle::Owned(_) => "netlink tc, detached at exit".into(),
            };
            log::info!(
                "attached tc ingress to {name} (ifindex {ifindex}; {how}){}",
                if eager {
                    ""
                } else {
                    "; tc egress when a flow tc translates arrives there"
                }
            );
            self.attached.insert(
                name.clone(),
                Attached {
                    ifindex,
                    ingress,
                    egress: None,
                },
            );
            if eager {
                self.attach_egress(dp, &name, "");
            }
        }
        if !self.bitmap_checked {
            let with: Vec<u32> = self
                .attached
                .values()
                .filter(|a| a.egress.is_some())
                .map(|a| a.ifindex)
                .collect();
            match egress::rewrite(&mut dp.maps, &with) {
                Ok(()) => self.bitmap_checked = true,
                Err(e) => log::warn!("checking the tc egress bitmap: {e:#}; will retry"),
            }
        }
    }

    /// Attaches tc egress to `name` (attached at ingress), and marks it in
    /// the datapath's bitmap. A failure is logged: the next reconcile, or
    /// the next flow's request, retries.
    fn attach_egress(&mut self, dp: &mut Datapath, name: &str, why: &str) {
        let Some(ifindex) = self.attached.get(name).map(|a| a.ifindex) else {
            return;
        };
        let handle = match dp
            .egress()
            .and_then(|prog| self.attach_one(prog, name, ifindex, TcAttachType::Egress))
        {
            Ok(h) => h,
            Err(e) => {
                // Once per interface: its flows ask again every few ms.
                if self.egress_failed.insert(name.to_string()) {
                    log::warn!("attaching tc egress to {name}: {e:#}; will retry");
                }
                return;
            }
        };
        self.egress_failed.remove(name);
        if let Some(a) = self.attached.get_mut(name) {
            a.egress = Some(handle);
        }
        if let Err(e) = egress::mark(&mut dp.maps, ifindex, true) {
            log::warn!(
                "noting tc egress on {name} in the datapath: {e:#}; its new flows ask again"
            );
        }
        log::info!("attached tc egress to {name} (ifindex {ifindex}){why}");
    }

    /// Whether an earlier agent left tc egress pinned on `name`: taken over
    /// as it is, never detached.
    fn pinned_egress(&self, name: &str, ifindex: u32) -> bool {
        self.pin_dir.as_ref().is_some_and(|d| {
            d.join(pin_name(name, ifindex, TcAttachType::Egress))
                .exists()
        })
    }

    /// Attaches tc egress where new flows asked for it (`KPX_EGRESS_WANTED`),
    /// and clears their requests.
    pub fn serve_requests(&mut self, dp: &mut Datapath) {
        let wanted = match egress::take_wanted(&mut dp.maps) {
            Ok(w) => w,
            Err(e) => {
                log::warn!("reading the interfaces asking for tc egress: {e:#}");
                return;
            }
        };
        for ifindex in wanted {
            let Some((name, a)) = self.attached.iter().find(|(_, a)| a.ifindex == ifindex) else {
                continue;
            };
            if a.egress.is_some() {
                // Attached, its bit lost (a new map): noted again.
                let _ = egress::mark(&mut dp.maps, ifindex, true);
                continue;
            }
            let name = name.clone();
            self.attach_egress(dp, &name, ": a flow tc translates arrived there");
        }
    }

    /// At exit: owned (netlink) filters are removed; pinned links stay, so
    /// the datapath keeps serving until the next agent takes it over.
    /// Returns how many interfaces stay attached.
    pub fn release(&mut self, dp: &mut Datapath) -> usize {
        let mut pinned = 0;
        for (name, a) in std::mem::take(&mut self.attached) {
            if matches!(a.ingress, Handle::Pinned(_)) {
                pinned += 1;
                continue;
            }
            match detach(dp, a) {
                Ok(()) => log::info!("detached from {name}"),
                Err(e) => log::debug!("detaching from {name}: {e:#}"),
            }
        }
        pinned
    }

    /// Pins of interfaces that are gone, or no longer match the patterns:
    /// removing the pin detaches whatever is still attached.
    fn remove_stale_pins(&self, present: &[(u32, String)]) {
        let Some(dir) = &self.pin_dir else { return };
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let current = present.iter().any(|(i, n)| {
                self.patterns.matches(n)
                    && [TcAttachType::Ingress, TcAttachType::Egress]
                        .iter()
                        .any(|at| pin_name(n, *i, *at) == file)
            });
            if !current {
                match fs::remove_file(entry.path()) {
                    Ok(()) => log::info!("removed the stale pinned link {file}"),
                    Err(e) => log::warn!("removing the stale pinned link {file}: {e}"),
                }
            }
        }
    }

    fn attach_one(
        &self,
        prog: &mut SchedClassifier,
        name: &str,
        ifindex: u32,
        at: TcAttachType,
    ) -> Result<Handle> {
        let Some(dir) = &self.pin_dir else {
            return attach(prog, name, at).map(Handle::Owned);
        };
        let path = dir.join(pin_name(name, ifindex, at));
        if path.exists() {
            // An earlier agent's link: swap our program in, atomically.
            match take_over(prog, &path) {
                Ok(()) => {
                    log::info!("took over the pinned link {}", path.display());
                    return Ok(Handle::Pinned(path));
                }
                Err(e) => {
                    log::info!(
                        "pinned link {} is unusable ({e:#}); replacing it",
                        path.display()
                    );
                    let _ = fs::remove_file(&path);
                }
            }
        }
        match prog.attach_with_options(name, at, TcAttachOptions::TcxOrder(LinkOrder::default())) {
            Ok(id) => {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                let link: FdLink = prog.take_link(id)?.try_into()?;
                // Dropping the handle keeps the link: the pin holds it.
                link.pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?;
                Ok(Handle::Pinned(path))
            }
            // No TCX in this kernel: netlink tc, owned by this process.
            Err(e) => {
                log::debug!("TCX attach to {name} failed ({e}); using netlink tc");
                attach(prog, name, at).map(Handle::Owned)
            }
        }
    }
}

/// Replaces the program of the pinned link at `path` with `prog`.
fn take_over(prog: &mut SchedClassifier, path: &Path) -> Result<()> {
    let pinned = PinnedLink::from_pin(path)?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned))?;
    let id = prog.attach_to_link(link)?;
    // Our handle closes; the pin keeps the link (and now our program).
    let _: FdLink = prog.take_link(id)?.try_into()?;
    Ok(())
}

fn release_handle(prog: &mut SchedClassifier, h: Handle) -> Result<()> {
    match h {
        Handle::Pinned(path) => Ok(fs::remove_file(path)?),
        Handle::Owned(id) => Ok(prog.detach(id)?),
    }
}

fn detach(dp: &mut Datapath, a: Attached) -> Result<()> {
    let ingress = release_handle(dp.ingress()?, a.ingress);
    let egress = match a.egress {
        Some(h) => {
            let _ = egress::mark(&mut dp.maps, a.ifindex, false);
            release_handle(dp.egress()?, h)
        }
        None => Ok(()),
    };
    ingress?;
    egress?;
    Ok(())
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

/// Notifies `tx` of every netlink link, IPv4 address and route event
/// (interface added, removed, changed; address added or removed; a route
/// that may make an interface need tc egress at once) in this network
/// namespace. Runs on its own thread; reconnects
/// with backoff if the socket fails.
pub fn watch_links(tx: mpsc::Sender<()>) {
    const RTMGRP_LINK: u32 = 1;
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    const RTMGRP_IPV4_ROUTE: u32 = 0x40;
    const RTMGRP_IPV6_ROUTE: u32 = 0x400;
    std::thread::spawn(move || {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = (|| -> std::io::Result<()> {
                let mut sock = Socket::new(NETLINK_ROUTE)?;
                let groups =
                    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
                sock.bind(&SocketAddr::new(0, groups))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_links_pin_name_reads_back_even_for_an_interface_with_dots() {
        let file = link_pin_name(7, "egress", "eth0.100");
        assert_eq!(file, "7_egress_eth0:100");
        assert_eq!(
            parse_link_pin_name(&file),
            Some((7, "egress", "eth0.100".to_string()))
        );
        assert_eq!(parse_link_pin_name("KPX_CT_TCP"), None);
    }
}
