//! XDP on the node's external interfaces (`--xdp`, `--xdp-interfaces`):
//! the tc ingress path for packets from outside, run before the kernel
//! builds an skb. The program shares tc's maps and functions; what it does
//! not translate it passes, untouched, to tc ingress, which stays attached.
//!
//! Links are pinned in `<bpffs>/links-xdp`, one per interface and mode
//! (`<ifindex>_<mode>_<name>`), so the datapath outlives the agent as tc's
//! does, and a restarted agent swaps its program in (`BPF_LINK_UPDATE`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::programs::{
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
    XdpMode,
};

use crate::dataplane::{
    attach::{interfaces, unpin_dir, Patterns},
    maps::Datapath,
};

/// `--xdp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Native where the interface's driver runs XDP; elsewhere none (tc
    /// serves those interfaces alone).
    #[default]
    Auto,
    /// Native (in the driver) or not at all: an interface whose driver
    /// refuses is reported.
    Native,
    /// Generic (after the skb is built; any interface): for testing, and
    /// for drivers without XDP where the early drop still pays.
    Generic,
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            "off" => Ok(Self::Off),
            other => Err(format!("{other:?}: want auto, native, generic or off")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Off => "off",
        })
    }
}

/// How the program runs on one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attachment {
    Native,
    Generic,
}

impl Attachment {
    fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }

    fn aya(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Generic => XdpMode::Skb,
        }
    }
}

/// Interfaces as (index, name).
type Interfaces = Vec<(u32, String)>;

/// Where XDP links are pinned.
pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links-xdp")
}

/// Removes every pinned XDP link under `bpffs` (detaching the program).
pub fn unpin(bpffs: &Path) -> Result<usize> {
    unpin_dir(&links_dir(bpffs))
}

fn pin_name(ifname: &str, ifindex: u32, how: Attachment) -> String {
    crate::dataplane::attach::link_pin_name(ifindex, how.name(), ifname)
}

/// The driver of interface `name` as ethtool names it (`veth`,
/// `mlx5_core`), in this network namespace; None if it does not say.
pub fn driver(name: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    /// `struct ethtool_drvinfo`.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 4 * 5],
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 32 * 4 + 12 + 4 * 5],
    };
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL reads `ifr` (a NUL-terminated name and a pointer
    // to `info`, a drvinfo of the size the kernel writes), both alive for
    // the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut ifr) };
    // SAFETY: the descriptor opened above, closed once.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Drivers `auto` leaves alone: a veth sends the frames XDP bounces
/// (`XDP_TX`) only if its peer runs XDP or GRO, which nothing on this side
/// can see, and drops them otherwise.
const AUTO_SKIPS: &[&str] = &["veth"];

/// The interfaces holding any of `addrs` (IPv4), by name.
pub fn interfaces_holding(addrs: &[Ipv4Addr]) -> std::io::Result<BTreeSet<String>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter(|i| {
            i.address
                .and_then(|a| a.as_sockaddr_in().map(|s| s.ip()))
                .is_some_and(|ip| addrs.contains(&ip))
        })
        .map(|i| i.interface_name)
        .collect())
}

/// Attaches the XDP program to the selected interfaces, now and whenever
/// they change.
pub struct XdpAttacher {
    mode: Mode,
    /// `--xdp-interfaces`; None: the interfaces holding the addresses the
    /// agent passes to `reconcile`.
    patterns: Option<Patterns>,
    /// `--interfaces`: XDP runs only where tc does, which forwards what XDP
    /// translated and hands up, and serves what XDP leaves alone.
    tc: Patterns,
    dir: PathBuf,
    /// Interface name → (ifindex, how).
    attached: BTreeMap<String, (u32, Attachment)>,
    /// Selected interfaces XDP is not put on, by ifindex: a driver that
    /// refused it (auto mode), a veth (auto mode), or one outside
    /// `--interfaces`. Said once, not retried until the interface is
    /// re-created.
    skipped: BTreeMap<String, u32>,
}

impl XdpAttacher {
    pub fn new(mode: Mode, patterns: Option<Patterns>, tc: Patterns, bpffs: &Path) -> Self {
        Self {
            mode,
            patterns,
            tc,
            dir: links_dir(bpffs),
            attached: BTreeMap::new(),
            skipped: BTreeMap::new(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The interfaces XDP runs on, with how.
    pub fn attached(&self) -> impl Iterator<Item = (&str, &'static str)> {
        self.attached
            .iter()
            .map(|(n, (_, how))| (n.as_str(), how.name()))
    }

    /// Attaches to the selected interfaces not yet attached, detaches from
    /// the rest; `nodeport` names the node's addresses that serve
    /// NodePorts (the default selection: the node's external interfaces). Errors on single interfaces are logged, never
    /// fatal: tc serves the interface meanwhile, and the next pass retries.
    pub fn reconcile(&mut self, dp: &mut Datapath, nodeport: &[Ipv4Addr]) {
        let present = match interfaces() {
            Ok(v) => v,
            Err(e) => {
                log::warn!("XDP: listing interfaces: {e:#}");
                return;
            }
        };
        let selected: BTreeSet<String> = if self.mode == Mode::Off {
            BTreeSet::new()
        } else {
            match &self.patterns {
                Some(p) => present
                    .iter()
                    .filter(|(_, n)| p.matches(n))
                    .map(|(_, n)| n.clone())
                    .collect(),
                None => match interfaces_holding(nodeport) {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("XDP: listing addresses: {e}; will retry");
                        return;
                    }
                },
            }
        };
        let (want, untouched): (Interfaces, Interfaces) = present
            .into_iter()
            .filter(|(_, n)| selected.contains(n) && n != "lo")
            .partition(|(_, n)| self.tc.matches(n));
        for (ifindex, name) in untouched {
            // Said once per interface, as a driver's refusal is.
            if self.skipped.insert(name.clone(), ifindex).is_none() {
                log::warn!(
                    "XDP: {name} is selected but not in --interfaces: XDP runs only where tc does (tc forwards what XDP hands up)"
                );
            }
        }
        self.skipped
            .retain(|n, i| want.iter().any(|(wi, wn)| wn == n && wi == i) || !self.tc.matches(n));
        self.remove_unwanted(&want);
        for (ifindex, name) in want {
            if self.attached.get(&name).is_some_and(|(i, _)| *i == ifindex)
                || self.skipped.contains_key(&name)
            {
                continue;
            }
            if self.mode == Mode::Auto {
                if let Some(d) = driver(&name).filter(|d| AUTO_SKIPS.contains(&d.as_str())) {
                    log::info!(
                        "XDP: {name} is a {d}, whose XDP_TX needs its peer to run XDP or GRO: tc serves it alone (--xdp=native or generic puts XDP there anyway)"
                    );
                    self.skipped.insert(name, ifindex);
                    continue;
                }
            }
            match self.attach(dp, &name, ifindex) {
                Ok((how, took_over)) => {
                    log::info!(
                        "XDP ({}) on {name} (ifindex {ifindex}{}): packets from outside are balanced before the stack",
                        how.name(),
                        if took_over { "; took over the pinned link" } else { "" }
                    );
                    self.attached.insert(name, (ifindex, how));
                }
                Err(e) if self.mode == Mode::Auto => {
                    log::info!(
                        "XDP: {name}'s driver does not run it natively ({e:#}); tc serves {name} alone (--xdp=generic runs it there anyway)"
                    );
                    self.skipped.insert(name, ifindex);
                }
                Err(e) => log::warn!("XDP: attaching to {name}: {e:#}; will retry"),
            }
        }
    }

    /// Pinned links of interfaces that are gone, no longer selected, or in
    /// another mode than asked: detached and unpinned.
    fn remove_unwanted(&mut self, want: &[(u32, String)]) {
        let keep: BTreeSet<String> = want
            .iter()
            .flat_map(|(i, n)| {
                [Attachment::Native, Attachment::Generic]
                    .into_iter()
                    .filter(|how| self.allows(*how))
                    .map(move |how| pin_name(n, *i, how))
            })
            .collect();
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                if keep.contains(&file) {
                    continue;
                }
                match unpin_dir_entry(&entry.path()) {
                    Ok(()) => {
                        log::info!("XDP: detached {file} (interface gone or no longer selected)")
                    }
                    Err(e) => log::warn!("XDP: removing the pinned link {file}: {e:#}"),
                }
            }
        }
        self.attached
            .retain(|n, (i, how)| keep.contains(&pin_name(n, *i, *how)));
    }

    /// Whether the mode asked for runs the program `how`.
    fn allows(&self, how: Attachment) -> bool {
        match self.mode {
            Mode::Auto | Mode::Native => how == Attachment::Native,
            Mode::Generic => how == Attachment::Generic,
            Mode::Off => false,
        }
    }

    /// Attaches (or takes over the pinned link) on one interface: how, and
    /// whether an earlier agent's link was taken over.
    fn attach(&self, dp: &mut Datapath, name: &str, ifindex: u32) -> Result<(Attachment, bool)> {
        let how = if self.mode == Mode::Generic {
            Attachment::Generic
        } else {
            Attachment::Native
        };
        let prog = dp.xdp()?;
        let path = self.dir.join(pin_name(name, ifindex, how));
        if path.exists() {
            let taken = PinnedLink::from_pin(&path)
                .map_err(anyhow::Error::from)
                .and_then(|p| Ok(XdpLink::try_from(FdLink::from(p))?))
                .and_then(|link| Ok(prog.attach_to_link(link)?));
            match taken {
                Ok(id) => {
                    // Our handle closes; the pin keeps the link.
                    let _: FdLink = prog.take_link(id)?.try_into()?;
                    return Ok((how, true));
                }
                Err(e) => {
                    log::info!(
                        "XDP: pinned link {} is unusable ({e:#}); replacing it",
                        path.display()
                    );
                    let _ = unpin_dir_entry(&path);
                }
            }
        }
        let id = prog
            .attach_to_if_index(ifindex, how.aya())
            .with_context(|| format!("{} XDP", how.name()))?;
        let link: FdLink = prog
            .take_link(id)?
            .try_into()
            .context("the kernel gave no XDP link (netlink attach): not pinned")?;
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        Ok((how, false))
    }
}

/// Detaches and removes one pinned link (whose interface may be gone,
/// and the link with it).
fn unpin_dir_entry(path: &Path) -> Result<()> {
    if let Err(e) = crate::dataplane::attach::detach_pinned(path) {
        log::debug!("XDP: detaching {}: {e}", path.display());
    }
    fs::remove_file(path).with_context(|| format!("unpinning {}", path.display()))
}
