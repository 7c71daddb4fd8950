//! The run's results: a JSON file, Markdown tables and an SVG chart under
//! `target/bench/`. Every figure that compares modes also comes as a ratio
//! to the no-proxy limit measured at the same N in the same run.

use std::{fmt::Write as _, path::Path};

use anyhow::Result;
use plotters::{coord::Shift, prelude::*};
use serde::{Deserialize, Serialize};

use crate::{
    load::{InTurn, Rate},
    modes::{Change, Install, Memory, Mode},
    northsouth::{Forwarder, NsRate},
    packet::{PacketCost, XdpCost},
};

/// One mode at one N.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub services: u32,
    pub mode: Mode,
    pub install: Install,
    pub change: Change,
    /// None when the mode's rules could not be loaded within the limit.
    pub traffic: Option<Traffic>,
    pub memory: Option<Memory>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Traffic {
    /// New connections to the first and the last service programmed.
    pub crr_first: Option<Rate>,
    pub crr_last: Option<Rate>,
    /// New connections to a pod IP (no service) with the mode loaded; for
    /// "no proxy", the limit itself.
    pub crr_pod: Rate,
    /// Round trips on one established connection, and bulk Gbit/s: through
    /// the last service's VIP, or to the pod IP for "no proxy".
    pub rr: Rate,
    pub bulk: Rate,
    /// No proxy, measured in the same bed just before the mode was loaded:
    /// what this mode's figures are rated against (machine drift over a
    /// long run stays out of the ratios). None for "no proxy" itself.
    pub baseline: Option<Baseline>,
    /// The last service, its endpoints dialled directly, a pod IP and a
    /// twin bed's endpoints without a proxy, one connection each in turn
    /// with the mode loaded ([`crate::load::crr_in_turn`]).
    #[serde(default)]
    pub in_turn: Option<InTurnRow>,
    /// kpx's programs timed in place during new connections to the last
    /// service (kpx's modes; [`crate::progtime`]).
    #[serde(default)]
    pub programs: Vec<crate::progtime::ProgramTime>,
}

/// [`Traffic::in_turn`]: its figures are the medians of its rounds'.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InTurnRow {
    pub service: InTurn,
    pub endpoints: InTurn,
    pub pod: InTurn,
    /// The same spread over ten endpoints in a bed of its own that no
    /// proxy serves: the no-proxy limit at the same moment.
    pub no_proxy: InTurn,
    /// Round trips per second through the last service and to the twin
    /// bed's endpoint, in turn.
    pub rr: (f64, f64),
    /// Bulk Gbit/s through the last service and to the twin bed's
    /// endpoint, in turn.
    #[serde(default)]
    pub bulk: (f64, f64),
    /// The twin dialled as `endpoints` and `pod` are: its endpoints from
    /// the second client address, its pod IP.
    #[serde(default)]
    pub twin: [InTurn; 2],
    /// Each round (before rounds: one, taken whole).
    #[serde(default)]
    pub rounds: Vec<InTurnRound>,
}

/// One round of [`InTurnRow`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InTurnRound {
    /// The last service, its endpoints directly, a pod IP, the twin's
    /// endpoints (as the service's).
    pub crr: [InTurn; 4],
    /// The twin's endpoints from the second client address (as kpx's
    /// bed's directly), the twin's pod IP.
    #[serde(default)]
    pub twin: [InTurn; 2],
    pub rr: (f64, f64),
    pub bulk: (f64, f64),
}

impl std::fmt::Display for InTurnRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [s, e, p, n] = &self.crr;
        let [td, tp] = &self.twin;
        write!(
            f,
            "{:.0} / {:.0} / {:.0} / {:.0} conn/s (the last service / its endpoints directly / \
             a pod IP / no proxy's endpoints; the twin's endpoints directly {:.0}, its pod IP \
             {:.0}), connect() {:.1} / {:.1} / {:.1} / {:.1} µs; \
             {:.0} / {:.0} round trips/s, {:.1} / {:.1} Gbit/s (the last service / no proxy)",
            s.rate,
            e.rate,
            p.rate,
            n.rate,
            td.rate,
            tp.rate,
            s.connect_us,
            e.connect_us,
            p.connect_us,
            n.connect_us,
            self.rr.0,
            self.rr.1,
            self.bulk.0,
            self.bulk.1
        )
    }
}

/// kpx's programs timed in place: each one's time per run and runs per
/// connection, and their product summed.
pub fn programs_cell(programs: &[crate::progtime::ProgramTime]) -> String {
    let total: f64 = programs
        .iter()
        .map(|p| p.ns_per_run * p.runs_per_transaction)
        .sum();
    let each: Vec<String> = programs
        .iter()
        .map(|p| {
            format!(
                "{} {:.0} ns × {:.1}",
                p.name, p.ns_per_run, p.runs_per_transaction
            )
        })
        .collect();
    format!("{}; {:.2} µs a connection", each.join(", "), total / 1e3)
}

/// The median of `v` (the upper one of an even count); None if empty.
fn median_of(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

impl InTurnRow {
    /// The row of `rounds`: each figure the median of its rounds'.
    pub fn of(rounds: Vec<InTurnRound>) -> Option<Self> {
        let med = |f: &dyn Fn(&InTurnRound) -> f64| median_of(rounds.iter().map(f).collect());
        let turn = |i: usize| -> Option<InTurn> {
            Some(InTurn {
                rate: med(&|r| r.crr[i].rate)?,
                connect_us: med(&|r| r.crr[i].connect_us)?,
            })
        };
        let twin = |i: usize| -> Option<InTurn> {
            Some(InTurn {
                rate: med(&|r| r.twin[i].rate)?,
                connect_us: med(&|r| r.twin[i].connect_us)?,
            })
        };
        Some(Self {
            service: turn(0)?,
            endpoints: turn(1)?,
            pod: turn(2)?,
            no_proxy: turn(3)?,
            twin: [twin(0)?, twin(1)?],
            rr: (med(&|r| r.rr.0)?, med(&|r| r.rr.1)?),
            bulk: (med(&|r| r.bulk.0)?, med(&|r| r.bulk.1)?),
            rounds,
        })
    }

    /// `ratio` of each round: its median, lowest and highest (of the row's
    /// figures alone when it has no rounds).
    pub fn ratio(&self, ratio: impl Fn(&InTurnRound) -> f64) -> (f64, f64, f64) {
        let whole = InTurnRound {
            crr: [self.service, self.endpoints, self.pod, self.no_proxy],
            twin: self.twin,
            rr: self.rr,
            bulk: self.bulk,
        };
        let v: Vec<f64> = if self.rounds.is_empty() {
            vec![ratio(&whole)]
        } else {
            self.rounds.iter().map(&ratio).collect()
        };
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (median_of(v).unwrap_or(f64::NAN), lo, hi)
    }
}

/// The no-proxy limit next to one mode's figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Baseline {
    pub crr: Rate,
    pub rr: Rate,
    pub bulk: Rate,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub command: String,
    pub machine: String,
    pub date: String,
    pub runs: u32,
    pub seconds_per_run: f64,
    pub rows: Vec<Row>,
    pub packet: Vec<PacketCost>,
    /// Path lengths of the datapath (instructions, helper calls).
    #[serde(default)]
    pub paths: Vec<PathLength>,
    /// North-south forwarding rates (one NodePort, a backend on another
    /// node).
    #[serde(default)]
    pub north_south: Vec<NsRate>,
    /// Modes that could not run here, and why.
    pub unavailable: Vec<(Mode, String)>,
}

fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}

/// A duration, or "> limit" for a restore stopped at the limit.
fn limited(s: f64, finished: bool) -> String {
    if finished {
        seconds(s)
    } else {
        format!("> {} (stopped)", seconds(s))
    }
}

fn table(out: &mut String, header: &[String], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(
        out,
        "|{}",
        header.iter().map(|_| "---:|").collect::<String>()
    );
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out.push('\n');
}

/// One path of the datapath, counted by `pathlen`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathLength {
    pub path: String,
    pub insns: u64,
    pub helper_calls: u64,
}

/// Every path of the datapath through the real object in the counting
/// interpreter (the same runs `tests/pathlen.rs` holds to budgets).
pub fn path_lengths() -> Result<Vec<PathLength>> {
    Ok(crate::support::paths::run_all()?
        .into_iter()
        .map(|(path, r)| PathLength {
            path: path.to_string(),
            insns: r.insns,
            helper_calls: r.helper_calls,
        })
        .collect())
}

fn path_table(out: &mut String, paths: &[PathLength]) {
    if paths.is_empty() {
        return;
    }
    out.push_str(
        "**kpx datapath path lengths**: BPF instructions executed and helper calls per packet \
         (the object's bytecode run in `pathlen`'s interpreter: exact, the same on any machine)\n\n",
    );
    let rows: Vec<Vec<String>> = paths
        .iter()
        .map(|p| {
            vec![
                p.path.clone(),
                p.insns.to_string(),
                p.helper_calls.to_string(),
            ]
        })
        .collect();
    table(
        out,
        &["path".into(), "instructions".into(), "helper calls".into()],
        &rows,
    );
}

/// The per-packet table's paths, IPv4's and IPv6's alike.
const PATH_COLUMNS: [&str; 10] = [
    "no service, other port",
    "no service, a frontend's port",
    "no service, a frontend's port and address",
    "no service, from a backend's port",
    "established, FIB → stack",
    "reply, FIB → stack",
    "established, redirected",
    "reply, redirected",
    "first packet, FIB → stack (1 run)",
    "first packet, redirected (1 run)",
];

/// The datapath's cost per packet: ns above the empty program, per path.
fn packet_table(out: &mut String, costs: &[PacketCost]) {
    out.push_str(
        "**kpx datapath cost per packet**: BPF_PROG_TEST_RUN of the tc ingress program, \
         ns above the empty program (whose own cost is the first column). \
         `repeat` (median of 25 batches) for the paths a repeated packet can take; medians of \
         single runs, each against the empty program's single-run median, for the others. \
         \"FIB → stack\": the FIB has no route (the measuring namespace is empty), the packet goes \
         up the stack; \"redirected\": with routes, the flow's cached next hop is used and the \
         packet redirected (as on a node)\n\n",
    );
    let rows: Vec<Vec<String>> = costs
        .iter()
        .map(|p| {
            let above = |v: f64, floor: f64| format!("{:.0}", v - floor);
            vec![
                thousands(p.services as f64),
                format!("{:.0} / {:.0}", p.floor_ns, p.floor_single_ns),
                if p.no_frontend_port_ns > 0.0 {
                    above(p.no_frontend_port_ns, p.floor_ns)
                } else {
                    "–".into()
                },
                above(p.no_service_ns, p.floor_ns),
                if p.frontend_addr_ns > 0.0 {
                    above(p.frontend_addr_ns, p.floor_ns)
                } else {
                    "–".into()
                },
                if p.from_backend_ns > 0.0 {
                    above(p.from_backend_ns, p.floor_ns)
                } else {
                    "–".into()
                },
                above(p.established_ns, p.floor_ns),
                above(p.reply_ns, p.floor_ns),
                if p.reply_fib_ns > 0.0 {
                    above(p.established_fib_ns, p.floor_ns)
                } else {
                    "–".into()
                },
                if p.reply_fib_ns > 0.0 {
                    above(p.reply_fib_ns, p.floor_ns)
                } else {
                    "–".into()
                },
                above(p.first_packet_ns, p.floor_single_ns),
                if p.first_packet_fib_ns > 0.0 {
                    above(p.first_packet_fib_ns, p.floor_single_ns)
                } else {
                    "–".into()
                },
            ]
        })
        .collect();
    table(
        out,
        &[
            &["services".into(), "empty program (repeat / 1 run)".into()][..],
            &PATH_COLUMNS.map(String::from)[..],
        ]
        .concat(),
        &rows,
    );
}

/// tc egress on a forwarded pod packet, both families: ns above the empty
/// program.
fn egress_table(out: &mut String, costs: &[PacketCost]) {
    if costs.iter().all(|p| p.egress_forwarded_ns.is_none()) {
        return;
    }
    out.push_str(
        "\n**tc egress**: a pod's packet the node forwards (`BPF_PROG_TEST_RUN` with the skb's \
         `ingress_ifindex` set), ns above the empty program: what every packet between two pods \
         pays on its way out\n\n",
    );
    let rows: Vec<Vec<String>> = costs
        .iter()
        .filter_map(|p| {
            let (v4, v6) = p.egress_forwarded_ns?;
            let above = |v: f64, floor: f64| format!("{:.0}", v - floor);
            Some(vec![
                thousands(p.services as f64),
                above(v4, p.floor_ns),
                above(v6, p.floor_ns),
            ])
        })
        .collect();
    table(
        out,
        &["services".into(), "IPv4".into(), "IPv6".into()],
        &rows,
    );
}

/// IPv6's figures beside IPv4's: ns above the empty program, and their
/// ratio to IPv4's (issue 20: at most 1.15).
fn ipv6_table(out: &mut String, costs: &[PacketCost]) {
    if costs.iter().all(|p| p.ipv6.is_none()) {
        return;
    }
    out.push_str(
        "\n**IPv6**: the same paths for IPv6 packets (as many IPv6 services beside the IPv4 ones), \
         ns above the empty program, and in parentheses their ratio to IPv4's figure\n\n",
    );
    let rows: Vec<Vec<String>> = costs
        .iter()
        .filter_map(|p| p.ipv6.as_ref().map(|v| (p, v)))
        .map(|(p, v)| {
            let cell = |v6: f64, v4: f64, floor: f64| {
                if v6 <= 0.0 {
                    return "–".to_string();
                }
                let (a6, a4) = (v6 - floor, v4 - floor);
                format!("{a6:.0} ({:.2})", a6 / a4.max(1.0))
            };
            vec![
                thousands(p.services as f64),
                cell(v.no_frontend_port_ns, p.no_frontend_port_ns, p.floor_ns),
                cell(v.no_service_ns, p.no_service_ns, p.floor_ns),
                cell(v.frontend_addr_ns, p.frontend_addr_ns, p.floor_ns),
                cell(v.from_backend_ns, p.from_backend_ns, p.floor_ns),
                cell(v.established_ns, p.established_ns, p.floor_ns),
                cell(v.reply_ns, p.reply_ns, p.floor_ns),
                cell(v.established_fib_ns, p.established_fib_ns, p.floor_ns),
                cell(v.reply_fib_ns, p.reply_fib_ns, p.floor_ns),
                cell(v.first_packet_ns, p.first_packet_ns, p.floor_single_ns),
                cell(
                    v.first_packet_fib_ns,
                    p.first_packet_fib_ns,
                    p.floor_single_ns,
                ),
            ]
        })
        .collect();
    table(
        out,
        &[
            &["services".to_string()][..],
            &PATH_COLUMNS.map(String::from)[..],
        ]
        .concat(),
        &rows,
    );
}

/// The established table's lookup alone on each family's established
/// packet, and the ratio it sets under IPv6's figures: IPv4's plus the
/// lookup's difference, over IPv4's.
fn kernel_share_table(out: &mut String, costs: &[PacketCost]) {
    let rows: Vec<Vec<String>> = costs
        .iter()
        .filter_map(|p| {
            let (v4, v6) = p.ct_lookup_ns?;
            let (a4, a6) = (v4 - p.floor_ns, v6 - p.floor_ns);
            let diff = a6 - a4;
            let under = |est: f64| {
                if est <= 0.0 {
                    return "–".to_string();
                }
                format!("{:.2}", (est + diff) / est)
            };
            let xdp = p
                .xdp
                .as_ref()
                .map_or(0.0, |x| x.established_ns - x.floor_ns);
            Some(vec![
                thousands(p.services as f64),
                format!("{a4:.0}"),
                format!("{a6:.0}"),
                format!("{diff:.0}"),
                under(p.established_ns - p.floor_ns),
                under(p.established_fib_ns - p.floor_ns),
                under(xdp),
            ])
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    out.push_str(
        "
**The kernel's share**: the established table's lookup of an established packet's \
         tuple and nothing else (`kpx_tc_floor_ct`, taken in turn with the figures above), ns \
         above the empty program. The kernel hashes a key whole (`jhash2`, three words a round): \
         IPv6's 36-byte tuple takes two rounds more than IPv4's 12 bytes. So a packet of an IPv6 \
         flow costs at least IPv4's figure plus the difference, whatever the program around the \
         lookup does; the last three columns are that sum over IPv4's figure, the ratio IPv6's \
         cannot go below\n\n",
    );
    table(
        out,
        &[
            "services".into(),
            "IPv4 lookup (12 bytes)".into(),
            "IPv6 lookup (36 bytes)".into(),
            "difference".into(),
            "IPv6's floor: established, FIB → stack".into(),
            "established, redirected".into(),
            "established, XDP_TX".into(),
        ],
        &rows,
    );
}

/// `--north-south` alone.
pub fn north_south_markdown(machine: &str, rates: &[NsRate]) -> String {
    let mut out = format!("`cargo xtask bench -- --north-south` on {machine}\n\n");
    north_south_table(&mut out, rates);
    out
}

fn north_south_table(out: &mut String, rates: &[NsRate]) {
    if rates.is_empty() {
        return;
    }
    out.push_str(
        "\n**North-south forwarding**: 64-byte UDP frames from outside to a NodePort whose backend \
         is on another node (in and out of the same interface, masqueraded), one flow. Generator: \
         a live-frames `BPF_PROG_TEST_RUN` of an `XDP_TX` program on the far end of the node's \
         veth; sink: an `XDP_DROP` program there. Generator, node and sink share one CPU, so the \
         chain's rate is shown with the node's own share per packet (the chain's time per packet \
         less the reflector's, which bounces frames untouched) and the rate that share alone \
         allows\n\n",
    );
    let tc = rates
        .iter()
        .find(|r| r.forwarder == Forwarder::KpxTc)
        .and_then(|r| r.node_ns);
    let rows: Vec<Vec<String>> = rates
        .iter()
        .map(|r| {
            vec![
                r.forwarder.label().to_string(),
                thousands(r.chain_pps),
                format!("{:.3}", r.forwarded as f64 / r.sent.max(1) as f64),
                r.node_ns.map_or("–".into(), |ns| format!("{ns:.0}")),
                r.node_ns
                    .map_or("–".into(), |ns| thousands(1e9 / ns.max(1.0))),
                match (r.node_ns, tc) {
                    (Some(ns), Some(tc)) => format!("{:.2} x", tc / ns.max(1.0)),
                    _ => "–".into(),
                },
            ]
        })
        .collect();
    table(
        out,
        &[
            "forwarder".into(),
            "chain packets/s".into(),
            "came back".into(),
            "node ns/packet".into(),
            "node alone, packets/s".into(),
            "vs kpx tc".into(),
        ],
        &rows,
    );
}

/// An XDP figure: ns in all, above XDP's empty program, and tc's.
fn xdp_cell(v: f64, floor: f64, tc: f64) -> String {
    format!("{v:.0} ({:.0}; tc {tc:.0})", v - floor)
}

/// XDP's established, reply and first-packet cells (`xdp`, ns in all)
/// beside tc's redirected figures for the same packets (`tc`, ns in all):
/// each family's row of [`xdp_table`].
fn xdp_flow_cells(p: &PacketCost, x: &XdpCost, xdp: [f64; 3], tc: [f64; 3]) -> [String; 3] {
    let first = xdp_cell(xdp[2], x.floor_single_ns, tc[2] - p.floor_single_ns);
    [
        xdp_cell(xdp[0], x.floor_ns, tc[0] - p.floor_ns),
        xdp_cell(xdp[1], x.floor_ns, tc[1] - p.floor_ns),
        if x.first_to_tc {
            format!("{first}: passed to tc (this kernel lets XDP write no metadata)")
        } else {
            first
        },
    ]
}

/// The XDP program's figures beside tc's for the same packets.
fn xdp_table(out: &mut String, costs: &[PacketCost]) {
    if costs.iter().all(|p| p.xdp.is_none()) {
        return;
    }
    out.push_str(
        "\n**XDP** (`--xdp`): BPF_PROG_TEST_RUN of the XDP program, the packet arriving on the \
         interface its next hop is out of (a NodePort's backend or client on another node), so a \
         translated one is sent back out (`XDP_TX`); ns in all, then above XDP's empty program, \
         with tc's redirected figure above its own empty program for the same packet\n\n",
    );
    let rows: Vec<Vec<String>> = costs
        .iter()
        .filter_map(|p| {
            let x = p.xdp.as_ref()?;
            let flows = xdp_flow_cells(
                p,
                x,
                [x.established_ns, x.reply_ns, x.first_packet_ns],
                [p.established_fib_ns, p.reply_fib_ns, p.first_packet_fib_ns],
            );
            let head = [
                thousands(p.services as f64),
                format!("{:.0} / {:.0}", x.floor_ns, x.floor_single_ns),
                xdp_cell(x.no_service_ns, x.floor_ns, p.no_service_ns - p.floor_ns),
            ];
            Some([&head[..], &flows[..]].concat())
        })
        .collect();
    table(
        out,
        &[
            "services".into(),
            "empty XDP program (repeat / 1 run)".into(),
            "no service, a frontend's port".into(),
            "established, XDP_TX".into(),
            "reply, XDP_TX".into(),
            "first packet, XDP_TX (1 run)".into(),
        ],
        &rows,
    );
    let rows: Vec<Vec<String>> = costs
        .iter()
        .filter_map(|p| {
            let (x, v6) = (p.xdp.as_ref()?, p.ipv6.as_ref()?);
            if x.established6_ns <= 0.0 {
                return None;
            }
            let flows = xdp_flow_cells(
                p,
                x,
                [x.established6_ns, x.reply6_ns, x.first_packet6_ns],
                [
                    v6.established_fib_ns,
                    v6.reply_fib_ns,
                    v6.first_packet_fib_ns,
                ],
            );
            Some([&[thousands(p.services as f64)][..], &flows[..]].concat())
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    out.push_str(
        "\nThe same for IPv6 packets (ns in all, above XDP's empty program; tc's IPv6 \
         redirected figure):\n\n",
    );
    table(
        out,
        &[
            "services".into(),
            "IPv6 established, XDP_TX".into(),
            "IPv6 reply, XDP_TX".into(),
            "IPv6 first packet, XDP_TX (1 run)".into(),
        ],
        &rows,
    );
}

/// First packets by scheduler, against random's (IPVS parity: each within
/// 1.2 x random's).
fn scheduler_table(out: &mut String, costs: &[PacketCost]) {
    let Some(first) = costs
        .iter()
        .find(|p| !p.first_packet_by_scheduler.is_empty())
    else {
        return;
    };
    out.push_str(
        "\n**first packet by scheduler**: ns above the empty program (single-run medians, \
         redirected; one service per scheduler, their first packets in turn), and the ratio to \
         random's (the default); sh and dh pick as mh does, wlc, sed, nq and twos as lc\n\n",
    );
    let mut header = vec!["services".to_string()];
    header.extend(
        first
            .first_packet_by_scheduler
            .iter()
            .map(|(n, _)| n.clone()),
    );
    let rows: Vec<Vec<String>> = costs
        .iter()
        .filter(|p| !p.first_packet_by_scheduler.is_empty())
        .map(|p| {
            let random = p
                .first_packet_by_scheduler
                .iter()
                .find(|(n, _)| n == "random")
                .map_or(p.first_packet_fib_ns, |(_, ns)| *ns)
                - p.floor_single_ns;
            let mut row = vec![thousands(p.services as f64)];
            row.extend(p.first_packet_by_scheduler.iter().map(|(_, ns)| {
                let above = ns - p.floor_single_ns;
                format!("{above:.0} ({:.2} x)", above / random.max(1.0))
            }));
            row
        })
        .collect();
    table(out, &header, &rows);
    if first.maglev_1000_ms > 0.0 {
        let _ = writeln!(
            out,
            "\nMaglev table of a service of 1,000 backends (131,071 slots), built by the agent: \
             {:.1} ms (median of 20)\n",
            first.maglev_1000_ms
        );
    }
}

/// `cargo xtask bench --packet`: the per-packet tables alone.
/// Every table of the per-packet figures (`--packet`'s, and the full
/// report's).
fn per_packet_tables(out: &mut String, costs: &[PacketCost]) {
    packet_table(out, costs);
    ipv6_table(out, costs);
    egress_table(out, costs);
    xdp_table(out, costs);
    kernel_share_table(out, costs);
    scheduler_table(out, costs);
}

pub fn packet_markdown(machine: &str, costs: &[PacketCost], paths: &[PathLength]) -> String {
    let mut out = format!("`cargo xtask bench --packet` on {machine}\n\n");
    per_packet_tables(&mut out, costs);
    path_table(&mut out, paths);
    out
}

impl Report {
    fn sizes(&self) -> Vec<u32> {
        let mut s: Vec<u32> = self.rows.iter().map(|r| r.services).collect();
        s.dedup();
        s
    }

    fn modes(&self) -> Vec<Mode> {
        let mut m = Vec::new();
        for r in &self.rows {
            if r.mode != Mode::NoProxy && !m.contains(&r.mode) {
                m.push(r.mode);
            }
        }
        m
    }

    fn row(&self, n: u32, mode: Mode) -> Option<&Row> {
        self.rows.iter().find(|r| r.services == n && r.mode == mode)
    }

    /// A row per size, a cell per mode (`–` where the mode has no row).
    fn per_mode(&self, cell: &dyn Fn(Mode, &Row) -> String) -> Vec<Vec<String>> {
        let modes = self.modes();
        self.sizes()
            .iter()
            .map(|&n| {
                std::iter::once(thousands(n as f64))
                    .chain(
                        modes
                            .iter()
                            .map(|&m| self.row(n, m).map_or("–".into(), |row| cell(m, row))),
                    )
                    .collect()
            })
            .collect()
    }

    fn traffic(&self, n: u32, mode: Mode) -> Option<&Traffic> {
        self.row(n, mode)?.traffic.as_ref()
    }

    /// `value (ratio to the no-proxy limit)` of mode `m` at `n`, with
    /// `digits` decimals: the limit measured in the mode's own bed, else
    /// the no-proxy row's.
    fn rated(
        &self,
        n: u32,
        m: Mode,
        value: fn(&Traffic) -> Option<f64>,
        limit: fn(&Baseline) -> f64,
        digits: usize,
    ) -> String {
        let Some(t) = self.traffic(n, m) else {
            return "–".into();
        };
        let Some(v) = value(t) else {
            return "–".into();
        };
        let shown = if digits == 0 {
            thousands(v)
        } else {
            format!("{v:.digits$}")
        };
        let base = t.baseline.as_ref().map(limit).or_else(|| {
            let np = self.traffic(n, Mode::NoProxy)?;
            Some(limit(&Baseline {
                crr: np.crr_pod.clone(),
                rr: np.rr.clone(),
                bulk: np.bulk.clone(),
            }))
        });
        match base {
            Some(b) if b > 0.0 => format!("{shown} ({:.2})", v / b),
            _ => shown,
        }
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let (sizes, modes) = (self.sizes(), self.modes());
        let _ = writeln!(
            out,
            "`{}` on {}, {}; {} run(s) of {:.1} s per figure, the median run shown. \
             10 endpoints per service. Ratios (in brackets) are to the no-proxy limit \
             (the client talking to a backend pod directly), measured in the same bed \
             just before the mode was loaded.\n",
            self.command, self.machine, self.date, self.runs, self.seconds_per_run
        );
        for (mode, why) in &self.unavailable {
            let _ = writeln!(out, "Not measured: {} ({why}).\n", mode.label());
        }
        let with_modes = |first: &str| {
            std::iter::once(first.to_string())
                .chain(modes.iter().map(|m| m.label().to_string()))
                .collect::<Vec<_>>()
        };
        let crr_limit: fn(&Baseline) -> f64 = |b| b.crr.rate;
        let mut header = vec!["services".to_string(), "no proxy (pod IP)".into()];
        header.extend(modes.iter().map(|m| m.label().to_string()));
        let per_size = |cell: &dyn Fn(u32, Mode) -> String, base: &dyn Fn(u32) -> String| {
            sizes
                .iter()
                .map(|&n| {
                    let mut r = vec![thousands(n as f64), base(n)];
                    r.extend(modes.iter().map(|&m| cell(n, m)));
                    r
                })
                .collect::<Vec<_>>()
        };
        let base_of = |f: fn(&Traffic) -> String| {
            move |n: u32| self.traffic(n, Mode::NoProxy).map_or("–".into(), f)
        };

        out.push_str("**New connections per second** (TCP_CRR: connect, 1-byte request and response, close) to the first / the last service programmed\n\n");
        let rows = per_size(
            &|n, m| {
                format!(
                    "{} / {}",
                    self.rated(n, m, |t| Some(t.crr_first.as_ref()?.rate), crr_limit, 0),
                    self.rated(n, m, |t| Some(t.crr_last.as_ref()?.rate), crr_limit, 0)
                )
            },
            &base_of(|t| thousands(t.crr_pod.rate)),
        );
        table(&mut out, &header, &rows);

        out.push_str("**Latency of one new connection** to the last service, p50 / p99 (µs)\n\n");
        let lat = |r: Option<&Rate>| {
            r.map_or("–".into(), |r| {
                format!(
                    "{:.0} / {:.0}",
                    r.p50_us.unwrap_or(f64::NAN),
                    r.p99_us.unwrap_or(f64::NAN)
                )
            })
        };
        let rows = per_size(
            &|n, m| lat(self.traffic(n, m).and_then(|t| t.crr_last.as_ref())),
            &|n| lat(self.traffic(n, Mode::NoProxy).map(|t| &t.crr_pod)),
        );
        table(&mut out, &header, &rows);

        out.push_str("**One `connect()` call** (the handshake; with socket load balancing also its translation), p50 in µs: to the last service, and to a pod IP in the same bed before the mode was loaded\n\n");
        let us = |r: Option<&Rate>| r.and_then(|r| r.connect_us);
        let rows = per_size(
            &|n, m| {
                let t = self.traffic(n, m);
                match (
                    us(t.and_then(|t| t.crr_last.as_ref())),
                    us(t.and_then(|t| t.baseline.as_ref()).map(|b| &b.crr)),
                ) {
                    (Some(a), Some(b)) => {
                        format!("{a:.1} / {b:.1} ({:+.1})", a - b)
                    }
                    _ => "–".into(),
                }
            },
            &|n| {
                us(self.traffic(n, Mode::NoProxy).map(|t| &t.crr_pod))
                    .map_or("–".into(), |v| format!("{v:.1}"))
            },
        );
        table(&mut out, &header, &rows);

        out.push_str("**In turn, at the same moment** (this machine's speed drifts between phases by more than the proxies cost): with the mode loaded, one new connection (TCP_CRR) to the last service, one to one of its endpoints dialled directly (each in turn, from a second client address), one to a pod IP, one to the endpoints of a twin bed beside it that no proxy serves (the no-proxy limit), and the twin's endpoints and pod IP as kpx's bed's were dialled (so that both beds take as many connections, each leaving a TIME_WAIT socket at its server), and again; then round trips on one connection through the service and one in the twin, in turn; then bulk transfers of 64 MiB through each, in turn. One round of the three per run, each as long as one run of the figures above; each figure the median of its rounds'. Connections per second of the time spent on each target; the service's ratio to the twin (to no proxy) and to its own endpoints (what the service alone costs), and a pod IP's to the twin's (what the mode's programs cost traffic that is not for a service), each the median of the rounds' ratios with their lowest and highest in brackets; `connect()`'s p50 in µs, the service's above the twin's; round trips and Gbit/s, the service's and the twin's, and their ratio\n\n");
        let rows = per_size(
            &|n, m| match self.traffic(n, m).and_then(|t| t.in_turn.as_ref()) {
                Some(t) => {
                    let r = |(m, lo, hi): (f64, f64, f64)| format!("{m:.2} [{lo:.2}–{hi:.2}]");
                    let crr = |i: usize| move |x: &InTurnRound| x.crr[0].rate / x.crr[i].rate;
                    format!(
                        "{} / {} / {} / {} ({}, {}; a pod IP / the twin's {}); {:.1} / {:.1} ({:+.1}); RR {} / {} ({}); {:.1} / {:.1} Gbit/s ({})",
                        thousands(t.service.rate),
                        thousands(t.endpoints.rate),
                        thousands(t.pod.rate),
                        thousands(t.no_proxy.rate),
                        r(t.ratio(crr(3))),
                        r(t.ratio(crr(1))),
                        r(t.ratio(|x| if x.twin[1].rate > 0.0 { x.crr[2].rate / x.twin[1].rate } else { f64::NAN })),
                        t.service.connect_us,
                        t.no_proxy.connect_us,
                        t.service.connect_us - t.no_proxy.connect_us,
                        thousands(t.rr.0),
                        thousands(t.rr.1),
                        r(t.ratio(|x| x.rr.0 / x.rr.1)),
                        t.bulk.0,
                        t.bulk.1,
                        r(t.ratio(|x| x.bulk.0 / x.bulk.1)),
                    )
                }
                None => "–".into(),
            },
            &|_| "–".into(),
        );
        table(&mut out, &header, &rows);

        if self
            .rows
            .iter()
            .any(|r| r.traffic.as_ref().is_some_and(|t| !t.programs.is_empty()))
        {
            out.push_str("**kpx's programs in place**: new connections to the last service (TCP_CRR, one run) with the kernel's BPF statistics on (`BPF_ENABLE_STATS`, for that run only): each program that ran, its mean time per run and its runs per connection, and their product summed: kpx's CPU time per connection. Where `BPF_PROG_TEST_RUN` cannot look (the socket programs) or only looks at one packet (the tc programs, here on every hop of a real connection, caches as they are). The kernel's two clock reads around each run are inside each figure (20-30 ns)\n\n");
            let rows = per_size(
                &|n, m| match self.traffic(n, m).filter(|t| !t.programs.is_empty()) {
                    Some(t) => programs_cell(&t.programs),
                    None => "–".into(),
                },
                &|_| "–".into(),
            );
            table(&mut out, &header, &rows);
        }

        out.push_str("**Traffic that is not for a service** with the mode loaded: new connections per second to a pod IP\n\n");
        let rows = per_size(
            &|n, m| self.rated(n, m, |t| Some(t.crr_pod.rate), crr_limit, 0),
            &base_of(|t| thousands(t.crr_pod.rate)),
        );
        table(&mut out, &header, &rows);

        out.push_str("**Established flow** through the last service: request/response round trips per second (TCP_RR)\n\n");
        let rows = per_size(
            &|n, m| self.rated(n, m, |t| Some(t.rr.rate), |b| b.rr.rate, 0),
            &base_of(|t| thousands(t.rr.rate)),
        );
        table(&mut out, &header, &rows);

        out.push_str("**Bulk throughput** through the last service (one TCP stream, Gbit/s)\n\n");
        let rows = per_size(
            &|n, m| self.rated(n, m, |t| Some(t.bulk.rate), |b| b.bulk.rate, 1),
            &base_of(|t| format!("{:.1}", t.bulk.rate)),
        );
        table(&mut out, &header, &rows);

        out.push_str("**Programming** from nothing to all services (`iptables-restore --noflush` as kube-proxy runs it, or `nft -f`, of the whole ruleset, stopped at the time limit; kpx: its first sync, of which map writes in brackets, and from the agent's start to the last service in the maps)\n\n");
        let rows = self.per_mode(&|m, row| {
            let i = &row.install;
            match (i.writes_seconds, i.ready_seconds) {
                (Some(w), Some(ready)) => format!(
                    "{} ({}); ready in {}",
                    seconds(i.seconds),
                    seconds(w),
                    seconds(ready)
                ),
                _ => {
                    let mut cell = format!(
                        "{} ({} lines, {:.0} MiB peak)",
                        limited(i.seconds, i.finished),
                        thousands(i.rule_lines.unwrap_or(0) as f64),
                        i.tool_peak_rss_mib.unwrap_or(0.0)
                    );
                    if !i.loaded() {
                        cell.push_str("; not loaded another way in time either");
                    }
                    if let Some(f) = i.fallback_seconds {
                        let how = if m == Mode::Nftables {
                            "in 40k-command transactions"
                        } else {
                            "by a flushing restore"
                        };
                        let _ = write!(cell, "; loaded {how} in {}", seconds(f));
                    }
                    cell
                }
            }
        });
        table(&mut out, &with_modes("services"), &rows);

        out.push_str("**One endpoint change** at that size (iptables: kube-proxy's partial restore, full restore in brackets; nftables: the incremental transaction; kpx: medians over many changes of its sync, map writes in brackets, and of the time from the API change to the maps, with its p99; the agent resyncs every 5 s and collects conntrack every second here, so the changes meet both)\n\n");
        let rows = self.per_mode(&|_, row| {
            let c = &row.change;
            if c.samples == 0 {
                "–".to_string()
            } else if let (Some(w), Some(e2e)) = (c.writes_seconds, c.end_to_end_seconds) {
                format!(
                    "{} ({}, {} writes); {} end to end, p99 {} ({} changes)",
                    seconds(c.seconds),
                    seconds(w),
                    c.map_writes.unwrap_or(0),
                    seconds(e2e),
                    seconds(c.end_to_end_p99_seconds.unwrap_or(e2e)),
                    c.samples
                )
            } else if let Some(full) = c.full_restore {
                format!(
                    "{} ({})",
                    limited(c.seconds, c.finished),
                    limited(full.seconds, full.finished)
                )
            } else {
                limited(c.seconds, c.finished)
            }
        });
        table(&mut out, &with_modes("services"), &rows);

        out.push_str("**kpx memory**: agent resident set and kernel memory of its maps\n\n");
        let rows: Vec<Vec<String>> = sizes
            .iter()
            .filter_map(|&n| {
                let m = self.row(n, Mode::Kpx)?.memory.as_ref()?;
                Some(vec![
                    thousands(n as f64),
                    format!("{:.1} MiB", m.agent_rss_mib),
                    format!("{:.1} MiB", m.map_bytes as f64 / 1048576.0),
                ])
            })
            .collect();
        table(
            &mut out,
            &["services".into(), "agent RSS".into(), "map memory".into()],
            &rows,
        );

        per_packet_tables(&mut out, &self.packet);
        north_south_table(&mut out, &self.north_south);
        path_table(&mut out, &self.paths);
        out
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("bench.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("bench.md"), self.markdown())?;
        self.chart(&dir.join("bench.svg"))?;
        Ok(())
    }

    /// New-connection rate to the last service, and programming time,
    /// against N (log scales), one line per mode.
    fn chart(&self, path: &Path) -> Result<()> {
        let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(600);
        let sizes = self.sizes();
        let xmax = sizes.last().copied().unwrap_or(1) as f64 * 2.0;
        let colour = |m: Mode| match m {
            Mode::NoProxy => BLACK,
            Mode::IptablesNft => RGBColor(214, 39, 40),
            Mode::IptablesLegacy => RGBColor(255, 127, 14),
            Mode::Nftables => RGBColor(31, 119, 180),
            Mode::Kpx => RGBColor(44, 160, 44),
            Mode::KpxStack => RGBColor(148, 103, 189),
            Mode::KpxSocket => RGBColor(23, 190, 207),
        };
        let series = |m: Mode, f: &dyn Fn(&Row) -> Option<f64>| -> Vec<(f64, f64)> {
            sizes
                .iter()
                .filter_map(|&n| Some((n as f64, f(self.row(n, m)?)?)))
                .collect()
        };

        let crr = |r: &Row| {
            let t = r.traffic.as_ref()?;
            if r.mode == Mode::NoProxy {
                Some(t.crr_pod.rate)
            } else {
                t.crr_last.as_ref().map(|x| x.rate)
            }
        };
        let install = |r: &Row| (r.mode != Mode::NoProxy).then_some(r.install.seconds);
        let modes = self.modes();
        let lines = |f: &dyn Fn(&Row) -> Option<f64>, with_limit: bool| {
            let limit = with_limit.then_some(Mode::NoProxy);
            limit
                .into_iter()
                .chain(modes.iter().copied())
                .map(|m| (m, colour(m), series(m, f)))
                .collect::<Vec<_>>()
        };
        panel(
            &left,
            "New connections/s to the last service",
            "connections/s",
            xmax,
            &lines(&crr, true),
            thousands,
            SeriesLabelPosition::LowerLeft,
        )?;
        panel(
            &right,
            "Programming all services (stopped at the limit)",
            "seconds",
            xmax,
            &lines(&install, false),
            seconds,
            SeriesLabelPosition::UpperLeft,
        )?;
        root.present()?;
        Ok(())
    }
}

type Line = (Mode, RGBColor, Vec<(f64, f64)>);

/// One log-log chart: a line per mode against the number of services.
fn panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    y_desc: &str,
    xmax: f64,
    lines: &[Line],
    y_label: fn(f64) -> String,
    legend: SeriesLabelPosition,
) -> Result<()> {
    let ys = || {
        lines
            .iter()
            .flat_map(|l| l.2.iter().map(|p| p.1))
            .filter(|v| *v > 0.0)
    };
    let low = ys().fold(f64::INFINITY, f64::min);
    let ymin = if low.is_finite() { low / 2.0 } else { 1.0 };
    let ymax = ys().fold(ymin * 2.0, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d((0.7f64..xmax).log_scale(), (ymin..ymax).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("services (10 endpoints each)")
        .y_desc(y_desc)
        .x_label_formatter(&|v| thousands(*v))
        .y_label_formatter(&|v| y_label(*v))
        .draw()?;
    for (mode, c, points) in lines {
        let c = *c;
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)).point_size(4))?
            .label(mode.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
