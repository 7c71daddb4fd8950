//! `cargo xtask bench`: kpx against kube-proxy's iptables and nftables
//! modes, side by side, on one machine, in the same run.
//!
//! For each N (services of 10 endpoints each) and each mode, a fresh bed
//! (client pod, node, ten backend pods: namespaces of its own, addresses
//! from 198.18.0.0/15) is programmed from nothing and measured:
//! programming time, new-connection rate and latency to the first and last
//! service, the rate to a pod IP with the mode loaded (traffic that is not
//! for a service), round trips and bulk throughput on an established flow,
//! one endpoint change, and kpx's memory. "No proxy" (the client talking to
//! a backend pod directly) is measured at each N too: the physical limit
//! every other figure is also given as a ratio to. Since this machine's
//! speed drifts between phases by more than a proxy costs, each mode is
//! also measured in turn, at the same moment, against a twin bed without a
//! proxy built beside its own ([`load::crr_in_turn`]). Then kpx's per-packet
//! cost from BPF_PROG_TEST_RUN at the same N. Last, the north-south
//! forwarding rate of each forwarder (one NodePort, a backend on another
//! node: [`northsouth`]).
//!
//! Results go to `target/bench/` (bench.json, bench.md, bench.svg).
//! Figures, never assertions: a benchmark, not a test. Needs root.
//!
//! `--quick`: N = 1 and 1,000, one short run per figure (about 90 s).
//! `--north-south`: the north-south table alone.
//! `--hot PATH`: one path's packet through tc ingress for `--seconds`
//! (default 10), ns per packet second by second ([`packet::HOT_PATHS`]):
//! two builds compared, or `perf record -a` beside it.
//! `--in-turn`: for each of `--modes` at each of `--sizes`, only the
//! figures taken in turn with a twin bed ([`measure_in_turn`]) and, for
//! kpx, its programs timed in place: a change's effect on a connection's
//! cost in about a minute.
//! `--render target/bench/bench.json`: the tables and chart again from a
//! run's JSON.
//! `--sizes 1,1000,...`, `--modes kpx,nftables,...` (of iptables-nft,
//! iptables-legacy, nftables, kpx, kpx-stack: kpx with
//! `--fib-forwarding=false`), `--runs K`, `--seconds S` (per run)
//! and `--limit S` (the longest one restore of a reference may take before
//! it is stopped and reported as unfinished; default 120 s, 30 s with
//! `--quick`) override the defaults.

#[path = "../../tests/support/mod.rs"]
mod support;

mod bed;
mod load;
mod modes;
mod northsouth;
mod packet;
mod progtime;
mod report;

use std::{path::Path, time::Instant};

use anyhow::{bail, Context as _, Result};

use crate::{
    bed::Bed,
    load::Kind,
    modes::{Mode, Proxy},
    report::{Baseline, Report, Row, Traffic},
};

const KPX: &str = env!("CARGO_BIN_EXE_kpx");

struct Options {
    quick: bool,
    sizes: Vec<u32>,
    /// The modes to compare (no proxy is always measured).
    modes: Vec<Mode>,
    runs: u32,
    seconds: f64,
    /// How long one restore or nft transaction may run before it is stopped.
    limit: std::time::Duration,
    /// kpx: endpoint changes timed per size (the references: one each).
    changes: u32,
    /// `--hot PATH`: that path's packet alone, for `--seconds` (10 unless
    /// given).
    hot: Option<String>,
}

fn options() -> Result<Options> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Options {
        quick,
        sizes: if quick {
            vec![1, 1000]
        } else {
            vec![1, 1000, 10_000, 50_000]
        },
        modes: vec![
            Mode::IptablesNft,
            Mode::IptablesLegacy,
            Mode::Nftables,
            Mode::Kpx,
            Mode::KpxStack,
            Mode::KpxSocket,
        ],
        runs: if quick { 1 } else { 3 },
        seconds: if quick { 0.7 } else { 2.0 },
        limit: std::time::Duration::from_secs(if quick { 30 } else { 120 }),
        changes: if quick { 5 } else { 200 },
        hot: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--quick" | "--bench" | "--packet" | "--north-south" | "--in-turn" => {}
            "--sizes" => {
                o.sizes = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<u32>())
                    .collect::<Result<_, _>>()
                    .context("--sizes: a comma-separated list of service counts")?;
                if o.sizes.iter().any(|&n| n == 0 || n > 60_000) {
                    bail!("--sizes: each size must be 1 to 60,000 (the VIP range holds 65,536)");
                }
            }
            "--modes" => {
                o.modes = value()?
                    .split(',')
                    .map(|m| Mode::parse(m.trim()))
                    .collect::<Result<_>>()?;
            }
            "--hot" => o.hot = Some(value()?.clone()),
            "--runs" => o.runs = value()?.parse().context("--runs")?,
            "--seconds" => o.seconds = value()?.parse().context("--seconds")?,
            "--limit" => {
                o.limit = std::time::Duration::from_secs_f64(value()?.parse().context("--limit")?)
            }
            other => {
                bail!("unknown argument {other:?} (known: --quick, --packet, --in-turn, --hot, --sizes, --modes, --runs, --seconds, --limit)")
            }
        }
    }
    Ok(o)
}

struct Progress(Instant);

impl Progress {
    fn say(&self, what: impl std::fmt::Display) {
        println!("[{:>7.1}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(String::new(), |kib| {
            format!(", {:.0} GiB", kib / 1024.0 / 1024.0)
        });
    format!("{cpu}, {cores} cores{mem}, Linux {kernel}")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--render") {
        // Re-render a run's tables and chart from its JSON.
        let file = args.get(i + 1).context("--render needs a bench.json")?;
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
        let report: Report =
            serde_json::from_str(&text).with_context(|| format!("parsing {file}"))?;
        let dir = Path::new(file).parent().unwrap_or(Path::new("."));
        report.write(dir)?;
        println!("{}", report.markdown());
        return Ok(());
    }
    let o = options()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark creates network namespaces and loads eBPF: run it as root");
    }
    let p = Progress(Instant::now());
    if let Some(path) = &o.hot {
        let seconds = if args.iter().any(|a| a == "--seconds") {
            o.seconds
        } else {
            10.0
        };
        let ns = testbed::Netns::create(&format!("kpxbench{}-hot", std::process::id()))?;
        if path.starts_with("xdp-") {
            // XDP sends a translated packet back out only where the FIB
            // says its next hop is.
            packet::fib_routes(&ns)?;
        }
        let above = ns.enter(|| packet::hot(path, seconds, &|s| p.say(s)))??;
        println!("{path}: {above:.1} ns above the empty program (median of {seconds} s)");
        return Ok(());
    }
    if args.iter().any(|a| a == "--packet") {
        return packet_only(&o, &p);
    }
    if args.iter().any(|a| a == "--in-turn") {
        return in_turn_only(&o, Path::new(KPX), &p);
    }
    if args.iter().any(|a| a == "--north-south") {
        let rates = northsouth::measure(Path::new(KPX), o.seconds, &|s| p.say(s))?;
        println!("\n{}", report::north_south_markdown(&machine(), &rates));
        return Ok(());
    }
    let kpx = Path::new(KPX);
    let mut unavailable = Vec::new();
    let mut modes = Vec::new();
    for &m in &o.modes {
        match modes::available(m) {
            Ok(()) => modes.push(m),
            Err(why) => {
                p.say(format!("{} is not available here: {why}", m.label()));
                unavailable.push((m, why));
            }
        }
    }
    p.say(format!(
        "sizes {:?}, modes: no proxy, {}; {} run(s) of {} s per figure",
        o.sizes,
        modes
            .iter()
            .map(|m| m.label())
            .collect::<Vec<_>>()
            .join(", "),
        o.runs,
        o.seconds
    ));
    let mut rows = Vec::new();
    let mut packet = Vec::new();
    for &n in &o.sizes {
        rows.push(no_proxy(n, &o, &p)?);
        for &m in &modes {
            rows.push(one_mode(n, m, kpx, &o, &p)?);
        }
        packet.push(packet_cost(n, o.quick, &p)?);
    }
    let north_south = northsouth::measure(kpx, o.seconds, &|s| p.say(s))?;
    let report = Report {
        command: if o.quick {
            "cargo xtask bench --quick".into()
        } else {
            "cargo xtask bench".into()
        },
        machine: machine(),
        date: k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%d")
            .to_string(),
        runs: o.runs,
        seconds_per_run: o.seconds,
        rows,
        packet,
        paths: report::path_lengths()?,
        north_south,
        unavailable,
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    report.write(&dir)?;
    println!("\n{}", report.markdown());
    p.say(format!(
        "wrote {0}/bench.md, {0}/bench.json and {0}/bench.svg",
        dir.display()
    ));
    Ok(())
}

/// With the mode loaded in `bed`: new connections to its last service,
/// to that service's endpoints directly, to a pod IP, and to the endpoints
/// of a twin bed's service that no proxy serves (the no-proxy limit, on the
/// machine at the same moment), one each in turn; then round trips, and
/// bulk transfers, through the last service and to the twin's endpoint, in
/// turn. As many rounds of the three as runs of the figures above, each as
/// long as one run: the ratios are taken per round (the bed's threads land
/// on the cores anew each time) and their median reported.
fn measure_in_turn(bed: &Bed, o: &Options, say: &dyn Fn(String)) -> Result<report::InTurnRow> {
    say("the no-proxy limit again, in a twin bed beside this one, in turn with the service".into());
    let twin = Bed::new(1)?;
    let client = |b: &Bed, from, to| load::Target {
        netns: b.client().name.clone(),
        from,
        to,
    };
    // The twin is dialled as kpx's bed is, target for target (the same
    // servers, source addresses and number of connections each): every
    // connection leaves a TIME_WAIT socket at its server (which closes
    // first), and a bed that took more connections was measured slower
    // for that alone (service / no proxy went from 0.99 in the first round
    // to 0.95 in the fourth, when the twin took one connection for kpx's
    // bed's three).
    let crr_targets = [
        client(bed, bed::CLIENT, vec![bed.last_vip()]),
        client(bed, bed::CLIENT_DIRECT, bed.last_endpoints()),
        client(bed, bed::CLIENT, vec![bed.pod_ip()]),
        client(&twin, bed::CLIENT, twin.last_endpoints()),
        client(&twin, bed::CLIENT_DIRECT, twin.last_endpoints()),
        client(&twin, bed::CLIENT, vec![twin.pod_ip()]),
    ];
    let pair = [
        client(bed, bed::CLIENT, vec![bed.last_vip()]),
        client(&twin, bed::CLIENT, twin.last_endpoints()),
    ];
    let mut rounds = Vec::new();
    for _ in 0..o.runs.max(1) {
        let crr = load::crr_in_turn(&crr_targets, o.seconds)?;
        let [service, endpoints, pod, no_proxy, twin_direct, twin_pod] = crr[..] else {
            bail!("six targets measured, {} results", crr.len());
        };
        let (rr, bulk) = (
            load::rr_in_turn(&pair, o.seconds)?,
            load::bulk_in_turn(&pair, o.seconds)?,
        );
        let (&[rr_service, rr_no_proxy], &[bulk_service, bulk_no_proxy]) = (&rr[..], &bulk[..])
        else {
            bail!(
                "two targets measured, {} and {} results",
                rr.len(),
                bulk.len()
            );
        };
        let round = report::InTurnRound {
            crr: [service, endpoints, pod, no_proxy],
            twin: [twin_direct, twin_pod],
            rr: (rr_service, rr_no_proxy),
            bulk: (bulk_service, bulk_no_proxy),
        };
        say(format!("in turn: {round}"));
        rounds.push(round);
    }
    report::InTurnRow::of(rounds).context("no round measured")
}

/// kpx's per-packet cost at `n` services, in a namespace of its own.
fn packet_cost(n: u32, quick: bool, p: &Progress) -> Result<packet::PacketCost> {
    p.say(format!("N={n}: kpx datapath cost per packet (test_run)"));
    let ns = testbed::Netns::create(&format!("kpxbench{}-tr", std::process::id()))?;
    ns.enter(|| packet::measure(n, quick, || packet::fib_routes(&ns)))?
}

/// `--packet`: the per-packet cost alone (test_run and path lengths, no
/// beds, no references): seconds, for every datapath change and for CI.
fn packet_only(o: &Options, p: &Progress) -> Result<()> {
    let sizes_given = std::env::args().any(|a| a == "--sizes");
    let sizes = if sizes_given || o.quick {
        o.sizes.clone()
    } else {
        vec![1, 1000, 10_000, 50_000]
    };
    let mut costs = Vec::new();
    for &n in &sizes {
        costs.push(packet_cost(n, o.quick, p)?);
    }
    let paths = report::path_lengths()?;
    println!("\n{}", report::packet_markdown(&machine(), &costs, &paths));
    Ok(())
}

/// `--in-turn`: each mode loaded in a fresh bed, its in-turn figures and
/// (kpx) its programs in place, nothing else.
fn in_turn_only(o: &Options, kpx: &Path, p: &Progress) -> Result<()> {
    for &n in &o.sizes {
        for &mode in &o.modes {
            let say = |what: String| p.say(format!("N={n}: {}: {what}", mode.label()));
            let mut bed = Bed::new(n)?;
            let (_proxy, install) = Proxy::install(&mut bed, mode, kpx, o.limit, o.changes)
                .with_context(|| format!("programming {} at {n} services", mode.label()))?;
            if !install.loaded() {
                say("not loaded in time: nothing measured".into());
                continue;
            }
            let row = measure_in_turn(&bed, o, &say)?;
            let ratio = |f: &dyn Fn(&report::InTurnRound) -> f64| {
                let (m, lo, hi) = row.ratio(f);
                format!("{m:.3} [{lo:.3}–{hi:.3}]")
            };
            say(format!(
                "service / no proxy {}, service / its endpoints {}, a pod IP / the twin's {}, \
                 round trips {}, bulk {}; connect() +{:.2} µs",
                ratio(&|r| r.crr[0].rate / r.crr[3].rate),
                ratio(&|r| r.crr[0].rate / r.crr[1].rate),
                ratio(&|r| r.crr[2].rate / r.twin[1].rate),
                ratio(&|r| r.rr.0 / r.rr.1),
                ratio(&|r| r.bulk.0 / r.bulk.1),
                row.service.connect_us - row.no_proxy.connect_us,
            ));
            if mode.is_kpx() {
                let (c, last) = (bed.client(), bed.last_vip());
                let programs = progtime::during(|| {
                    Ok(load::measure(c, last, Kind::Crr, 1, o.seconds)?.rate * o.seconds)
                })?;
                say(format!("in place: {}", report::programs_cell(&programs)));
            }
        }
    }
    Ok(())
}

fn no_proxy(n: u32, o: &Options, p: &Progress) -> Result<Row> {
    p.say(format!("N={n}: no proxy: building the bed"));
    let bed = Bed::new(n)?;
    let (c, pod) = (bed.client(), bed.pod_ip());
    p.say(format!(
        "N={n}: no proxy: new connections, round trips and bulk to {pod}"
    ));
    let t = Traffic {
        crr_first: None,
        crr_last: None,
        crr_pod: load::measure(c, pod, Kind::Crr, o.runs, o.seconds)?,
        rr: load::measure(c, pod, Kind::Rr, o.runs, o.seconds)?,
        bulk: load::measure(c, pod, Kind::Bulk, o.runs, o.seconds)?,
        baseline: None,
        in_turn: None,
        programs: Vec::new(),
    };
    p.say(format!(
        "N={n}: no proxy: {:.0} conn/s, {:.0} round trips/s, {:.1} Gbit/s",
        t.crr_pod.rate, t.rr.rate, t.bulk.rate
    ));
    Ok(Row {
        services: n,
        mode: Mode::NoProxy,
        install: Default::default(),
        change: Default::default(),
        traffic: Some(t),
        memory: None,
    })
}

fn one_mode(n: u32, mode: Mode, kpx: &Path, o: &Options, p: &Progress) -> Result<Row> {
    let say = |what: String| p.say(format!("N={n}: {}: {what}", mode.label()));
    say("building the bed".into());
    let mut bed = Bed::new(n)?;
    say("the no-proxy limit in this bed, before loading".into());
    let (c, pod) = (bed.client(), bed.pod_ip());
    let baseline = Baseline {
        crr: load::measure(c, pod, Kind::Crr, o.runs, o.seconds)?,
        rr: load::measure(c, pod, Kind::Rr, o.runs, o.seconds)?,
        bulk: load::measure(c, pod, Kind::Bulk, o.runs, o.seconds)?,
    };
    say("programming from nothing".into());
    let (mut proxy, install) = Proxy::install(&mut bed, mode, kpx, o.limit, o.changes)
        .with_context(|| format!("programming {} at {n} services", mode.label()))?;
    if !install.loaded() {
        say(format!(
            "kube-proxy's way stopped at {:.0} s and no other way loaded the rules in time: \
             no traffic measured at this size",
            install.seconds
        ));
        return Ok(Row {
            services: n,
            mode,
            install,
            change: Default::default(),
            traffic: None,
            memory: None,
        });
    }
    say(match install.fallback_seconds {
        Some(f) => format!(
            "kube-proxy's way stopped at {:.0} s; the same rules loaded another way in {f:.1} s",
            install.seconds
        ),
        None => format!("programmed in {:.3} s", install.seconds),
    });
    if !mode.is_kpx() {
        // The run opens several hundred thousand short connections; with
        // TIME_WAIT's 120 s the references' conntrack table (capped at
        // nf_conntrack_max per namespace) would fill and drop new flows.
        if let Err(e) = bed
            .cluster
            .node
            .sysctl("net/netfilter/nf_conntrack_tcp_timeout_time_wait", "1")
        {
            say(format!("could not shorten conntrack's TIME_WAIT: {e:#}"));
        }
    }
    let c = bed.client();
    say("new connections to the first service, the last, a pod IP".into());
    let crr_first = load::measure(c, bed.first_vip(), Kind::Crr, o.runs, o.seconds)?;
    let crr_last = load::measure(c, bed.last_vip(), Kind::Crr, o.runs, o.seconds)?;
    let crr_pod = load::measure(c, bed.pod_ip(), Kind::Crr, o.runs, o.seconds)?;
    say("round trips and bulk through the last service".into());
    let rr = load::measure(c, bed.last_vip(), Kind::Rr, o.runs, o.seconds)?;
    let bulk = load::measure(c, bed.last_vip(), Kind::Bulk, o.runs, o.seconds)?;
    let in_turn = measure_in_turn(&bed, o, &say)?;
    let programs = if mode.is_kpx() {
        say("kpx's programs timed in place (the kernel's statistics): new connections to the last service".into());
        let last = bed.last_vip();
        progtime::during(|| Ok(load::measure(c, last, Kind::Crr, 1, o.seconds)?.rate * o.seconds))
            .unwrap_or_else(|e| {
                say(format!("kpx's programs not timed: {e:#}"));
                Vec::new()
            })
    } else {
        Vec::new()
    };
    say(format!(
        "{:.0} / {:.0} conn/s (first / last; no proxy {:.0}), {:.0} to a pod IP, {:.0} round trips/s, {:.1} Gbit/s",
        crr_first.rate, crr_last.rate, baseline.crr.rate, crr_pod.rate, rr.rate, bulk.rate
    ));
    let memory = proxy.memory(&bed)?;
    say("one endpoint change".into());
    let change = proxy
        .change(&bed)
        .with_context(|| format!("one endpoint change, {} at {n} services", mode.label()))?;
    say(format!(
        "endpoint change programmed in {:.6} s{}",
        change.seconds,
        if change.finished { "" } else { " (stopped)" }
    ));
    Ok(Row {
        services: n,
        mode,
        install,
        change,
        traffic: Some(Traffic {
            crr_first: Some(crr_first),
            crr_last: Some(crr_last),
            crr_pod,
            rr,
            bulk,
            baseline: Some(baseline),
            in_turn: Some(in_turn),
            programs,
        }),
        memory,
    })
}
