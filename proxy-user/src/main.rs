//! The `kpx` command: parses the command line and hands each command to the
//! library (agent, dump, cleanup, reference rules).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use kpx::{
    agent::{self, settings::DEFAULT_BPFFS, AgentFlags, Settings},
    control::config::{self, NodeFlags},
    dataplane::{attach, bpffs, takeover, Datapath, LoadOptions, MapSet},
    ops::{cleanup, dump, ipvsadm},
    reference::{self, Mode},
};

/// kube-client's own connection errors are off: the agent reports every
/// failed list or watch itself, once, with what it does about it.
const DEFAULT_LOG: &str = "info,kube_client=off";

/// kpx: a kube-proxy replacement with an eBPF datapath.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load and attach the datapath, keep its maps in sync.
    Agent(Box<AgentFlags>),
    /// Show what the datapath's maps hold (works while an agent runs).
    Dump {
        what: DumpWhat,
        /// Directory where the agent pinned its maps.
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// With `services`: ipvsadm's layout (`ipvsadm -Ln`), for IPVS
        /// mode's users.
        #[arg(long)]
        ipvsadm: bool,
        /// With --ipvsadm: the statistics (`ipvsadm -Ln --stats --exact`).
        #[arg(long, requires = "ipvsadm", conflicts_with = "rate")]
        stats: bool,
        /// With --ipvsadm: rates per second over one second (`ipvsadm -Ln
        /// --rate --exact`).
        #[arg(long, requires = "ipvsadm")]
        rate: bool,
    },
    /// Detach kpx's programs and remove its pinned maps (stop the agent
    /// first); with --kube-proxy, remove kube-proxy's rules instead.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Remove what kube-proxy installed (its KUBE-* iptables chains and
        /// jumps, in both the nft and legacy backends, and its nftables
        /// `kube-proxy` tables), like `kube-proxy --cleanup`. kpx's own
        /// datapath is left alone.
        #[arg(long)]
        kube_proxy: bool,
        /// First hand kpx's established service flows to netfilter's
        /// conntrack, with kpx's NAT, so they keep working once kpx's
        /// programs are gone (the way back to kube-proxy); false drops them.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        keep_flows: bool,
    },
    /// Load the datapath into this kernel (the verifier runs) and report success.
    Check,
    /// Print the rules kube-proxy would install on this node for the same
    /// inputs: its iptables mode's `iptables-restore` input (default) or
    /// its nftables mode's `nft -f` script. For comparisons and the
    /// benchmark; kpx itself never installs them.
    IptablesRules(Box<RulesArgs>),
}

#[derive(Clone, Copy, ValueEnum)]
enum RulesMode {
    Iptables,
    Nftables,
}

#[derive(clap::Args)]
struct RulesArgs {
    /// Which kube-proxy mode's rules to print.
    #[arg(long, value_enum, default_value = "iptables")]
    mode: RulesMode,
    /// Which family's proxier: ipv4 (iptables, `ip kube-proxy`) or ipv6
    /// (ip6tables, `ip6 kube-proxy`). A dual-stack node runs both.
    #[arg(long, value_enum, default_value = "ipv4")]
    ip_family: RulesFamily,
    #[command(flatten)]
    node: NodeFlags,
    /// Serve NodePorts on 127.0.0.1 too (kube-proxy's default in iptables
    /// mode, when loopback is a NodePort address).
    #[arg(long = "iptables-localhost-nodeports", default_value = "true", action = clap::ArgAction::Set)]
    localhost_nodeports: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum RulesFamily {
    Ipv4,
    Ipv6,
}

#[derive(Clone, Copy, ValueEnum)]
enum DumpWhat {
    Services,
    Backends,
    Conntrack,
    Stats,
    /// Sockets the socket-level load balancer connected to a backend.
    Sockets,
    /// Interfaces with kpx's tc (ingress, egress) and XDP programs.
    Interfaces,
}

fn init_logging(verbosity: Option<u32>) {
    let default = match verbosity.unwrap_or(0) {
        0..=3 => DEFAULT_LOG,
        4 | 5 => "debug,kube_client=info,hyper=info,tower=info",
        _ => "trace,hyper=info,tower=info",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default)).init();
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Agent(flags) => run_agent(&flags),
        Command::Dump {
            what,
            bpffs,
            json,
            ipvsadm,
            stats,
            rate,
        } => {
            init_logging(None);
            if ipvsadm {
                let view = match (stats, rate) {
                    (true, _) => IpvsView::Stats,
                    (_, true) => IpvsView::Rate,
                    _ => IpvsView::Conns,
                };
                return run_ipvsadm(what, &bpffs, json, view);
            }
            run_dump(what, &bpffs, json)
        }
        Command::Cleanup {
            bpffs,
            kube_proxy,
            keep_flows,
        } => {
            init_logging(None);
            if kube_proxy {
                let report = cleanup::kube_proxy()?;
                println!("{report}");
                return Ok(());
            }
            if keep_flows {
                // Before the programs go: until then kpx still serves them.
                match MapSet::open_pinned(&bpffs).and_then(|maps| takeover::hand_back(&maps)) {
                    Ok(report) => println!("kpx's flows handed to netfilter: {report}"),
                    Err(e) => eprintln!("kpx's flows not handed to netfilter: {e:#}"),
                }
            }
            let links = attach::unpin_links(&bpffs)?;
            let removed = bpffs::unpin_all(&bpffs)?;
            println!(
                "detached {links} programs (tc and socket-level) and removed {} pinned maps from {}",
                removed.len(),
                bpffs.display()
            );
            Ok(())
        }
        Command::IptablesRules(args) => {
            init_logging(None);
            let mode = match args.mode {
                RulesMode::Iptables => Mode::Iptables,
                RulesMode::Nftables => Mode::Nftables,
            };
            let family = match args.ip_family {
                RulesFamily::Ipv4 => kpx::control::cidr::Family::V4,
                RulesFamily::Ipv6 => kpx::control::cidr::Family::V6,
            };
            print!(
                "{}",
                reference::rules(&args.node, mode, family, args.localhost_nodeports)?
            );
            Ok(())
        }
        Command::Check => {
            init_logging(None);
            Datapath::load(&LoadOptions::default())?;
            println!("datapath loaded: the kernel's verifier accepted it");
            Ok(())
        }
    }
}

fn run_agent(flags: &AgentFlags) -> Result<()> {
    // The file is read before logging starts: its verbosity sets the level.
    let file = flags.node.file()?;
    let settings = Settings::resolve(flags, file, || config::hostname(None))?;
    init_logging(settings.verbosity);
    if let Some(path) = &flags.node.config {
        log::info!("configuration from {}", path.display());
    }
    for i in &settings.ignored {
        log::info!("configuration: ignoring {i}");
    }
    if settings
        .nodeport_addresses
        .iter()
        .any(|a| matches!(a, config::NodePortAddress::Localhost))
    {
        log::warn!(
            "nodePortAddresses: localhost NodePorts are not served (kpx sees no traffic on lo)"
        );
    }
    if let Some(adj) = settings.oom_score_adj {
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", adj.to_string()) {
            log::warn!("setting oom_score_adj to {adj}: {e}");
        }
    }
    agent::tune_malloc();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(agent::run(settings))
}

fn run_dump(what: DumpWhat, dir: &Path, json: bool) -> Result<()> {
    // Interfaces are read from the pinned links, the rest from the maps.
    let maps = || MapSet::open_pinned(dir);
    let out = match what {
        DumpWhat::Services => render(
            dump::services(&maps()?)?.as_slice(),
            json,
            dump::services_table,
        )?,
        DumpWhat::Backends => render(
            dump::backends(&maps()?, dir)?.as_slice(),
            json,
            dump::backends_table,
        )?,
        DumpWhat::Conntrack => render(
            dump::conntrack(&maps()?)?.as_slice(),
            json,
            dump::conntrack_table,
        )?,
        DumpWhat::Stats => render(&dump::stats(&maps()?)?, json, dump::stats_table)?,
        DumpWhat::Sockets => render(
            dump::sockets(&maps()?, dir)?.as_slice(),
            json,
            dump::sockets_table,
        )?,
        DumpWhat::Interfaces => render(
            dump::interfaces(dir)?.as_slice(),
            json,
            dump::interfaces_table,
        )?,
    };
    println!("{}", out.trim_end());
    Ok(())
}

#[derive(Clone, Copy)]
enum IpvsView {
    Conns,
    Stats,
    Rate,
}

fn run_ipvsadm(what: DumpWhat, dir: &Path, json: bool, view: IpvsView) -> Result<()> {
    if !matches!(what, DumpWhat::Services) {
        anyhow::bail!("--ipvsadm shows services: kpx dump services --ipvsadm");
    }
    let maps = MapSet::open_pinned(dir)?;
    let mut services = ipvsadm::read(&maps)?;
    if let IpvsView::Rate = view {
        let start = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_secs(1));
        let earlier = std::mem::replace(&mut services, ipvsadm::read(&maps)?);
        ipvsadm::rates(&earlier, &mut services, start.elapsed().as_secs_f64());
    }
    let table = match view {
        IpvsView::Conns => ipvsadm::table,
        IpvsView::Stats => ipvsadm::stats_table,
        IpvsView::Rate => ipvsadm::rate_table,
    };
    let out = render(services.as_slice(), json, table)?;
    println!("{}", out.trim_end());
    Ok(())
}

/// JSON, or the table, of any dump.
fn render<T: serde::Serialize + ?Sized>(
    v: &T,
    json: bool,
    table: fn(&T) -> String,
) -> Result<String> {
    Ok(if json {
        serde_json::to_string_pretty(v)?
    } else {
        table(v)
    })
}
