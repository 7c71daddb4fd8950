//! What translates the bed's service traffic, and how each mode is
//! programmed: from nothing to N services, and one endpoint change.
//!
//! - kube-proxy's iptables mode: `kpx iptables-rules` (kube-proxy v1.29's
//!   proxier), loaded with `iptables-nft-restore` (and
//!   `iptables-legacy-restore` where the kernel has the legacy tables);
//! - kube-proxy's nftables mode: `kpx iptables-rules --mode nftables`,
//!   loaded with `nft -f`;
//! - kpx: the real `kpx agent` watching the API server stand-in.
//!
//! The references' rules are generated before the clock starts: their
//! programming time is the restore tool's alone, kube-proxy's own
//! computation excluded (it favours them).
//!
//! Long because each mode's setup (kube-proxy's iptables, nftables, kpx)
//! is its own small recipe, kept side by side for comparison.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use kpx::{
    control::model::FrontendKey,
    dataplane::maps::service_key,
    dataplane::maps::MapSet,
    reference::incremental::{self, ChangedPort},
};
use proxy_common::{wire, SlotKey, IPPROTO_TCP};
use serde::{Deserialize, Serialize};
use testbed::{Cluster, Proxy as Reference};

use crate::bed::{self, Bed};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The client addresses a backend pod directly; nothing is loaded.
    NoProxy,
    IptablesNft,
    IptablesLegacy,
    Nftables,
    Kpx,
    /// kpx with `--fib-forwarding=false`: translated packets go up the
    /// stack's routing instead of straight to the next hop.
    KpxStack,
    /// kpx with its socket-level load balancer on a cgroup the benchmark
    /// creates and runs its load generator in: a connection to a service
    /// is connected to a backend at `connect()`.
    KpxSocket,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::NoProxy => "no proxy",
            Mode::IptablesNft => "iptables (nft)",
            Mode::IptablesLegacy => "iptables (legacy)",
            Mode::Nftables => "nftables",
            Mode::Kpx => "kpx",
            Mode::KpxStack => "kpx, stack forwarding",
            Mode::KpxSocket => "kpx, socket LB",
        }
    }

    /// The modes that run kpx's agent.
    pub fn is_kpx(self) -> bool {
        matches!(self, Mode::Kpx | Mode::KpxStack | Mode::KpxSocket)
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "iptables-nft" | "iptables" => Mode::IptablesNft,
            "iptables-legacy" => Mode::IptablesLegacy,
            "nftables" => Mode::Nftables,
            "kpx" => Mode::Kpx,
            "kpx-stack" => Mode::KpxStack,
            "kpx-socket" => Mode::KpxSocket,
            _ => bail!(
                "unknown mode {s:?} (iptables-nft, iptables-legacy, nftables, kpx, kpx-stack, kpx-socket)"
            ),
        })
    }

    fn restore(self) -> &'static str {
        match self {
            Mode::IptablesLegacy => "iptables-legacy-restore",
            Mode::Nftables => "nft",
            _ => "iptables-nft-restore",
        }
    }
}

/// Programming from nothing to N services.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Install {
    /// iptables-restore --noflush (as kube-proxy runs it) / nft -f wall
    /// time; for kpx its first sync (recompute, plan and map writes), as the
    /// agent logs it.
    pub seconds: f64,
    /// False: stopped at the time limit (`seconds` is the limit).
    pub finished: bool,
    /// When kube-proxy's way did not finish: the time to load the same
    /// rules another way, so that traffic can still be measured. iptables:
    /// a flushing `iptables-restore` (equivalent in a fresh namespace);
    /// nftables: the same script in transactions of 40,000 commands.
    pub fallback_seconds: Option<f64>,
    /// kpx: of `seconds`, the map writes alone.
    pub writes_seconds: Option<f64>,
    /// kpx: from the agent's start (BPF load, attach, list) to the last
    /// service selectable in the maps.
    pub ready_seconds: Option<f64>,
    /// The references: lines of rules, and the restore tool's peak RSS.
    pub rule_lines: Option<usize>,
    pub tool_peak_rss_mib: Option<f64>,
    /// The references: time `kpx iptables-rules` took to render them (not
    /// part of `seconds`).
    pub render_seconds: Option<f64>,
}

impl Install {
    /// Whether the rules are in place, so that traffic can be measured.
    pub fn loaded(&self) -> bool {
        self.finished || self.fallback_seconds.is_some()
    }
}

/// One endpoint of one service replaced, at N services.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Change {
    /// What the mode does for it: kpx's sync, kube-proxy's partial
    /// iptables-restore (MinimizeIPTablesRestore, its default since 1.27),
    /// nftables' incremental transaction.
    pub seconds: f64,
    pub finished: bool,
    /// iptables: a full restore of every chain, as kube-proxy's periodic
    /// full resync does.
    pub full_restore: Option<Timed>,
    /// kpx: the map writes alone.
    pub writes_seconds: Option<f64>,
    /// kpx: from the API server's change to the new endpoint selectable.
    pub end_to_end_seconds: Option<f64>,
    pub end_to_end_p99_seconds: Option<f64>,
    /// kpx: how many changes the figures are medians of (the references: 1).
    pub samples: u32,
    /// kpx: map writes the change took.
    pub map_writes: Option<u64>,
    /// The references: lines in the incremental restore or transaction.
    pub rule_lines: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Memory {
    pub agent_rss_mib: f64,
    /// Kernel memory of all kpx maps (`memlock` of each map's fdinfo).
    pub map_bytes: u64,
}

/// A mode in charge of a bed, with what it needs to apply a change.
pub struct Proxy<'a> {
    pub mode: Mode,
    kpx: &'a Path,
    rules: String,
    /// How long one restore or transaction may take before it is stopped.
    limit: Duration,
    /// kpx: how many endpoint changes to time.
    changes: u32,
    /// kpx-socket: the cgroup its programs are on, this process in it.
    socket: Option<SocketScope>,
}

/// The benchmark's process in a cgroup of its own while a mode is
/// measured (fields drop in order: out of the cgroup, then it goes).
struct SocketScope {
    _joined: testbed::probe::Joined,
    _cgroup: testbed::probe::Cgroup,
}

/// The references' rules for what the API server holds now.
fn render(bed: &Bed, mode: Mode, kpx: &Path) -> Result<String> {
    let reference = if mode == Mode::Nftables {
        Reference::Nftables
    } else {
        Reference::Iptables
    };
    let kubeconfig = bed.kubeconfig()?;
    bed.cluster.reference_rules_from(
        reference,
        kpx,
        &["--kubeconfig", &kubeconfig.to_string_lossy()],
    )
}

/// A restore or transaction that was timed.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Timed {
    pub seconds: f64,
    /// False when it was stopped at the time limit (nothing committed:
    /// both tools apply a table in one transaction).
    pub finished: bool,
}

/// Runs `program args < input` in the node namespace, stopped after
/// `limit`; wall time and the program's peak RSS.
fn timed_pipe(
    bed: &Bed,
    program: &str,
    args: &[&str],
    input: &str,
    limit: Duration,
) -> Result<(Timed, f64)> {
    let t0 = Instant::now();
    let mut child = bed
        .cluster
        .node
        .command(Path::new(program))?
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let mut stderr = child.stderr.take().context("no stderr")?;
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let mut finished = true;
    loop {
        // SAFETY: reaps our own child by PID (std's Child is not waited on
        // afterwards); status and ru outlive the call.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            break;
        }
        if r < 0 {
            bail!("waiting for {program}: {}", std::io::Error::last_os_error());
        }
        if finished && t0.elapsed() > limit {
            finished = false;
            // SAFETY: signalling our own, not yet reaped, child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = t0.elapsed();
    let written = writer.join();
    let errors = errors.join().unwrap_or_default();
    let timed = Timed {
        seconds: took.as_secs_f64(),
        finished,
    };
    if !finished {
        return Ok((timed, ru.ru_maxrss as f64 / 1024.0));
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{program} {args:?} failed ({status}): {}", errors.trim());
    }
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("writing rules to {program}: {e}"),
        Err(_) => bail!("the writer thread for {program} panicked"),
    }
    Ok((timed, ru.ru_maxrss as f64 / 1024.0))
}

/// Whether `mode` can run here (the legacy tables need `ip_tables`).
pub fn available(mode: Mode) -> Result<(), String> {
    let program = match mode {
        Mode::IptablesLegacy => "iptables-legacy",
        Mode::IptablesNft => "iptables-nft",
        Mode::Nftables => "nft",
        _ => return Ok(()),
    };
    let probe = || -> Result<()> {
        let ns = testbed::Netns::create(&format!("kpxbench{}-probe", std::process::id()))?;
        let args: &[&str] = if mode == Mode::Nftables {
            &["list", "tables"]
        } else {
            &["-t", "nat", "-L", "-n"]
        };
        let out = ns.command(Path::new(program))?.args(args).output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    probe().map_err(|e| format!("{program}: {e:#}"))
}

impl<'a> Proxy<'a> {
    /// Programs the bed's N services; the clock runs for the restore (or
    /// the agent's first sync) only.
    pub fn install(
        bed: &mut Bed,
        mode: Mode,
        kpx: &'a Path,
        limit: Duration,
        changes: u32,
    ) -> Result<(Self, Install)> {
        let mut proxy = Self {
            mode,
            kpx,
            rules: String::new(),
            limit,
            changes,
            socket: None,
        };
        let install = match mode {
            Mode::NoProxy => Install::default(),
            Mode::Kpx | Mode::KpxStack | Mode::KpxSocket => proxy.start_agent(bed)?,
            _ => proxy.load_rules(bed)?,
        };
        Ok((proxy, install))
    }

    fn load_rules(&mut self, bed: &Bed) -> Result<Install> {
        let t0 = Instant::now();
        self.rules = render(bed, self.mode, self.kpx)?;
        let render_s = t0.elapsed().as_secs_f64();
        let args: &[&str] = if self.mode == Mode::Nftables {
            &["-f", "-"]
        } else {
            &["--noflush"]
        };
        let restore = self.mode.restore();
        let (timed, rss) = timed_pipe(bed, restore, args, &self.rules, self.limit)?;
        let mut install = Install {
            seconds: timed.seconds,
            finished: timed.finished,
            rule_lines: Some(self.rules.lines().count()),
            tool_peak_rss_mib: Some(rss),
            render_seconds: Some(render_s),
            ..Default::default()
        };
        if !timed.finished {
            // Nothing was committed. The same ruleset another way, so that
            // traffic can be measured.
            let fallback = if self.mode == Mode::Nftables {
                self.nft_in_chunks(bed)?
            } else {
                // Flushing: a fresh namespace has nothing to keep.
                timed_pipe(bed, restore, &[], &self.rules, self.limit * 4)?.0
            };
            if fallback.finished {
                install.fallback_seconds = Some(fallback.seconds);
            }
        }
        Ok(install)
    }

    /// The nft script in transactions of at most 40,000 commands, in
    /// order (each line is one command): one big transaction costs nft
    /// superlinear time.
    fn nft_in_chunks(&self, bed: &Bed) -> Result<Timed> {
        const CHUNK: usize = 40_000;
        let t0 = Instant::now();
        let lines: Vec<&str> = self.rules.lines().collect();
        for chunk in lines.chunks(CHUNK) {
            let left = (self.limit * 8).saturating_sub(t0.elapsed());
            let (t, _) = timed_pipe(bed, "nft", &["-f", "-"], &chunk.join("\n"), left)?;
            if !t.finished {
                return Ok(Timed {
                    seconds: t0.elapsed().as_secs_f64(),
                    finished: false,
                });
            }
        }
        Ok(Timed {
            seconds: t0.elapsed().as_secs_f64(),
            finished: true,
        })
    }

    fn start_agent(&mut self, bed: &mut Bed) -> Result<Install> {
        let started = Instant::now();
        // Resyncs and collections far more often than the defaults (60 s,
        // 10 s), so the timed endpoint changes meet them.
        let mut extra = vec![
            "--metrics-bind-address",
            "",
            "--healthz-bind-address",
            "",
            "--sync-period",
            "5s",
            "--conntrack-gc-interval",
            "1s",
        ];
        if self.mode == Mode::KpxStack {
            extra.extend(["--fib-forwarding", "false"]);
        }
        let cgroup = match self.mode {
            Mode::KpxSocket => Some(testbed::probe::Cgroup::create("bench")?),
            _ => None,
        };
        let cgroup_path = cgroup
            .as_ref()
            .map(|c| c.path.to_string_lossy().into_owned());
        if let Some(p) = &cgroup_path {
            extra.extend(["--socket-lb-cgroup", p]);
        }
        bed.cluster.start_agent_kube(self.kpx, &bed.api, &extra)?;
        let maps = pinned_maps(&bed.cluster, started)?;
        let n = bed.n;
        // Looked at every millisecond, not in a busy loop: on a machine of
        // two cores a spinning observer would take one from the agent it
        // times (a start of seconds, so 1 ms of resolution is plenty).
        // An agent that exits (the kernel refused a program, say) ends the
        // wait at once rather than after its ten minutes.
        let mut exited = false;
        spin(Duration::from_secs(600), || {
            let ready = selects(&maps, 0, None) && selects(&maps, n - 1, None);
            if !ready {
                exited = !bed.cluster.agent.as_mut().is_some_and(|a| a.running());
                std::thread::sleep(Duration::from_millis(1));
            }
            ready || exited
        })
        .filter(|_| !exited)
        .ok_or_else(|| {
            let how = if exited {
                "the agent exited"
            } else {
                "no initial sync"
            };
            anyhow!("{how} before its first sync:\n{}", bed.cluster.agent_log())
        })?;
        let ready = started.elapsed();
        let sync = wait_sync_line(&bed.cluster, 0)?;
        if let Some(cgroup) = cgroup {
            spin(Duration::from_secs(10), || {
                bed.cluster
                    .agent_log()
                    .contains("socket-level load balancing: all")
            })
            .ok_or_else(|| anyhow!("no socket LB:\n{}", bed.cluster.agent_log()))?;
            // From here on the load generator's connect() calls are the
            // cgroup's (the baseline was measured before, outside it).
            self.socket = Some(SocketScope {
                _joined: cgroup.join_self()?,
                _cgroup: cgroup,
            });
        }
        Ok(Install {
            seconds: sync.took.as_secs_f64(),
            finished: true,
            writes_seconds: Some(sync.writing.as_secs_f64()),
            ready_seconds: Some(ready.as_secs_f64()),
            ..Default::default()
        })
    }

    /// Replaces the last endpoint of service `bed.changed()` and programs it.
    pub fn change(&mut self, bed: &Bed) -> Result<Change> {
        let i = bed.changed();
        let fresh = bed::fresh_endpoint(0);
        let new_slice = bed::slice(i, Some((bed::ENDPOINTS - 1, fresh)));
        let name = bed::service_name(i);
        match self.mode {
            Mode::NoProxy => Ok(Change::default()),
            Mode::Kpx | Mode::KpxStack | Mode::KpxSocket => self.kpx_changes(bed),
            Mode::Nftables => {
                bed.api.apply(new_slice)?;
                let after = render(bed, self.mode, self.kpx)?;
                let tx = incremental::nftables_partial(&self.rules, &after, changed_port(&name));
                let (t, _) = timed_pipe(bed, "nft", &["-f", "-"], &tx, self.limit)?;
                self.rules = after;
                Ok(Change {
                    seconds: t.seconds,
                    finished: t.finished,
                    samples: 1,
                    rule_lines: Some(tx.lines().count()),
                    ..Default::default()
                })
            }
            Mode::IptablesNft | Mode::IptablesLegacy => {
                bed.api.apply(new_slice)?;
                let after = render(bed, self.mode, self.kpx)?;
                let partial =
                    incremental::iptables_partial(&self.rules, &after, changed_port(&name))
                        .map_err(|e| anyhow!(e))?;
                let restore = self.mode.restore();
                let (t, _) = timed_pipe(bed, restore, &["--noflush"], &partial, self.limit)?;
                // What kube-proxy's periodic full resync writes: every chain.
                let full = incremental::without_builtin_jumps(&after);
                let (full_t, _) = timed_pipe(bed, restore, &["--noflush"], &full, self.limit)?;
                self.rules = after;
                Ok(Change {
                    seconds: t.seconds,
                    finished: t.finished,
                    samples: 1,
                    full_restore: Some(full_t),
                    rule_lines: Some(partial.lines().count()),
                    ..Default::default()
                })
            }
        }
    }

    /// `self.changes` endpoint changes, each one endpoint of another
    /// service, spaced past the agent's --min-sync-period so each is synced
    /// alone: medians, and the end-to-end p99.
    fn kpx_changes(&self, bed: &Bed) -> Result<Change> {
        let maps = MapSet::open_pinned(&bed.cluster.bpffs())?;
        let mut samples = Vec::new();
        for r in 0..self.changes.max(1) {
            let i = if r == 0 {
                bed.changed()
            } else {
                (r * 7919) % bed.n
            };
            let fresh = bed::fresh_endpoint(r);
            std::thread::sleep(Duration::from_millis(150));
            let syncs = sync_lines(&bed.cluster.agent_log()).len();
            let t0 = Instant::now();
            bed.api
                .apply(bed::slice(i, Some((bed::ENDPOINTS - 1, fresh))))?;
            spin(Duration::from_secs(60), || selects(&maps, i, Some(fresh)))
                .ok_or_else(|| anyhow!("change {r} never reached the maps"))?;
            let e2e = t0.elapsed();
            samples.push((wait_sync_line(&bed.cluster, syncs)?, e2e));
        }
        let median = |f: &dyn Fn(&(SyncLine, Duration)) -> Duration| {
            let mut v: Vec<Duration> = samples.iter().map(f).collect();
            v.sort();
            v[v.len() / 2].as_secs_f64()
        };
        let mut e2e: Vec<Duration> = samples.iter().map(|s| s.1).collect();
        e2e.sort();
        Ok(Change {
            seconds: median(&|s| s.0.took),
            finished: true,
            writes_seconds: Some(median(&|s| s.0.writing)),
            end_to_end_seconds: Some(median(&|s| s.1)),
            end_to_end_p99_seconds: e2e
                .get(((e2e.len() - 1) as f64 * 0.99).round() as usize)
                .map(Duration::as_secs_f64),
            map_writes: samples.first().map(|s| s.0.writes),
            samples: samples.len() as u32,
            ..Default::default()
        })
    }

    pub fn memory(&self, bed: &Bed) -> Result<Option<Memory>> {
        if !self.mode.is_kpx() {
            return Ok(None);
        }
        let pid = bed
            .cluster
            .agent
            .as_ref()
            .map(|a| a.pid())
            .context("no agent")?;
        Ok(Some(Memory {
            agent_rss_mib: rss_kib(pid)? as f64 / 1024.0,
            map_bytes: map_bytes(&bed.cluster.bpffs())?,
        }))
    }
}

/// The bed's service port `name`/http.
fn changed_port(name: &str) -> ChangedPort<'_> {
    ChangedPort {
        namespace: bed::NAMESPACE,
        name,
        proto: "tcp",
        port: "http",
    }
}

fn pinned_maps(c: &Cluster, started: Instant) -> Result<MapSet> {
    loop {
        if let Ok(m) = MapSet::open_pinned(&c.bpffs()) {
            return Ok(m);
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the agent did not pin its maps:\n{}", c.agent_log());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether the datapath would pick `addr` (or any backend) for service `i`.
fn selects(maps: &MapSet, i: u32, addr: Option<Ipv4Addr>) -> bool {
    let key: proxy_common::ServiceKey = service_key(&FrontendKey {
        addr: bed::vip(i).into(),
        port: bed::SERVICE_PORT,
        proto: IPPROTO_TCP,
    });
    let Ok(v) = maps.services.get(&key, 0) else {
        return false;
    };
    if v.count != bed::ENDPOINTS {
        return false;
    }
    let Some(addr) = addr else { return true };
    (0..v.count).any(|slot| {
        maps.slots
            .get(
                &SlotKey {
                    svc_id: v.svc_id,
                    slot,
                },
                0,
            )
            .is_ok_and(|s| s.backend.addr == wire::addr(addr))
    })
}

fn spin(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::yield_now();
    }
    None
}

/// One "synced ..." line of the agent's log.
#[derive(Debug)]
struct SyncLine {
    writes: u64,
    took: Duration,
    writing: Duration,
}

/// Parses `...: W map writes in T (writing U)`.
fn sync_lines(log: &str) -> Vec<SyncLine> {
    log.lines()
        .filter(|l| l.contains(" synced "))
        .filter_map(|l| {
            let (_, rest) = l.split_once("): ")?;
            let (writes, rest) = rest.split_once(" map writes in ")?;
            let (took, rest) = rest.split_once(" (writing ")?;
            Some(SyncLine {
                writes: writes.trim().parse().ok()?,
                took: parse_debug_duration(took)?,
                writing: parse_debug_duration(rest.trim_end_matches(')'))?,
            })
        })
        .collect()
}

/// Waits for sync line number `index` (from 0) in the agent's log.
fn wait_sync_line(c: &Cluster, index: usize) -> Result<SyncLine> {
    let t0 = Instant::now();
    loop {
        if let Some(l) = sync_lines(&c.agent_log()).into_iter().nth(index) {
            return Ok(l);
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!(
                "no sync line {index} in the agent's log:\n{}",
                c.agent_log()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Rust's `{:?}` of a Duration: `12ns`, `3.4µs`, `5.6ms`, `7.8s`.
fn parse_debug_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic() || c == 'µ')?);
    let v: f64 = num.parse().ok()?;
    let scale = match unit {
        "ns" => 1e-9,
        "µs" | "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(v * scale))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// Sum of `memlock` over every map pinned under `dir`: what the kernel
/// charges for them (elements actually present, for the non-preallocated
/// hash maps).
fn map_bytes(dir: &Path) -> Result<u64> {
    use std::os::fd::{AsFd, AsRawFd};
    let mut total = 0;
    for name in proxy_common::map_names::ALL {
        let data = aya::maps::MapData::from_pin(dir.join(name))
            .with_context(|| format!("opening pinned map {name}"))?;
        let fd = data.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .with_context(|| format!("no memlock for {name}"))?;
    }
    Ok(total)
}
