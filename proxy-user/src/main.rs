use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kpx::{
    agent::{self, Cidr},
    attach::Patterns,
    bpffs,
    datapath::{Datapath, LoadOptions, MapSet},
    dump,
};

const DEFAULT_BPFFS: &str = "/sys/fs/bpf/kpx";
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
    Agent(Box<AgentArgs>),
    /// Show what the datapath's maps hold (works while an agent runs).
    Dump {
        what: DumpWhat,
        /// Directory where the agent pinned its maps.
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove kpx's pinned maps (stop the agent first; its programs detach when it exits).
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Load the datapath into this kernel (the verifier runs) and report success.
    Check,
}

#[derive(Clone, Copy, ValueEnum)]
enum DumpWhat {
    Services,
    Backends,
    Conntrack,
    Stats,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Serve the Services and EndpointSlices in this YAML file or directory
    /// (standalone mode; edits take effect without restart) instead of the
    /// Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Watch the Kubernetes API through this kubeconfig (default: the
    /// in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name, as in the EndpointSlices' nodeName (default: the hostname).
    #[arg(long)]
    hostname_override: Option<String>,
    /// An address of this node (repeatable).
    #[arg(long = "node-ip")]
    node_ips: Vec<Ipv4Addr>,
    /// The cluster's pod CIDR(s), comma-separated.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<Cidr>,
    /// Interfaces to attach to: names or glob patterns, comma-separated.
    /// Interfaces that appear later are attached when they do. `lo` is never used.
    #[arg(long, default_value = "*")]
    interfaces: String,
    /// bpffs directory for the pinned maps (bpffs is mounted if needed).
    #[arg(long, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Conntrack capacity in entries (two per flow; default 524288, i.e.
    /// 262144 concurrent flows). Applies when the maps are created.
    #[arg(long)]
    conntrack_max: Option<u32>,
    /// Idle timeout of TCP flows whose SYN was not answered yet.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    conntrack_tcp_timeout_syn: Duration,
    /// Idle timeout of established TCP flows (kube-proxy's default).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    conntrack_tcp_timeout_established: Duration,
    /// Idle timeout of half-closed TCP flows (FIN in one direction; kube-proxy's default).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    conntrack_tcp_timeout_close_wait: Duration,
    /// Idle timeout of TCP flows closed in both directions.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    conntrack_tcp_timeout_time_wait: Duration,
    /// Idle timeout of reset TCP flows.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    conntrack_tcp_timeout_close: Duration,
    /// Idle timeout of UDP flows that saw no reply.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    conntrack_udp_timeout: Duration,
    /// Idle timeout of UDP flows that saw replies.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    conntrack_udp_timeout_stream: Duration,
    /// How often expired conntrack entries are removed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    conntrack_gc_interval: Duration,
    /// How often the manifests are checked for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    poll_interval: Duration,
    /// How often the maps are re-read and any drift repaired.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    sync_period: Duration,
    /// The least time between two syncs: a change is applied at once when
    /// the last sync is older, and changes arriving meanwhile are batched.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    min_sync_period: Duration,
    /// Where Prometheus metrics are served (`/metrics`); empty to disable.
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_bind)]
    metrics_bind_address: Bind,
}

/// An optional listen address (empty: none).
#[derive(Clone, Copy, Debug)]
struct Bind(Option<std::net::SocketAddr>);

fn parse_bind(s: &str) -> Result<Bind, String> {
    if s.is_empty() {
        return Ok(Bind(None));
    }
    s.parse()
        .map(|a| Bind(Some(a)))
        .map_err(|_| format!("{s:?} is not an address:port"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    if n == 0 {
        return Err(format!("duration {s:?} must be more than zero"));
    }
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("bad duration unit in {s:?} (ms, s, m, h)")),
    }
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(DEFAULT_LOG)).init();
    match Cli::parse().command {
        Command::Agent(args) => run_agent(*args),
        Command::Dump { what, bpffs, json } => run_dump(what, &bpffs, json),
        Command::Cleanup { bpffs } => {
            let removed = bpffs::unpin_all(&bpffs)?;
            println!(
                "removed {} pinned maps from {}",
                removed.len(),
                bpffs.display()
            );
            Ok(())
        }
        Command::Check => {
            Datapath::load(&LoadOptions::default())?;
            println!("datapath loaded: the kernel's verifier accepted it");
            Ok(())
        }
    }
}

fn run_agent(args: AgentArgs) -> Result<()> {
    let hostname = match args.hostname_override {
        Some(h) => h,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the hostname (or pass --hostname-override)")?
            .trim()
            .to_string(),
    };
    // `lo` never carries pod traffic that needs translating.
    let interfaces = Patterns::parse(&args.interfaces)?.excluding("lo");
    let cfg = agent::Config {
        source: match args.manifests {
            Some(path) => agent::Source::Manifests(path),
            None => agent::Source::Kube {
                kubeconfig: args.kubeconfig,
            },
        },
        hostname,
        node_ips: args.node_ips,
        cluster_cidrs: args.cluster_cidr,
        interfaces,
        bpffs: args.bpffs,
        conntrack_entries: args.conntrack_max,
        poll: args.poll_interval,
        resync: args.sync_period,
        min_sync: args.min_sync_period,
        metrics_addr: args.metrics_bind_address.0,
        ct_timeouts: kpx::conntrack::Timeouts {
            tcp_syn: args.conntrack_tcp_timeout_syn,
            tcp_established: args.conntrack_tcp_timeout_established,
            tcp_close_wait: args.conntrack_tcp_timeout_close_wait,
            tcp_time_wait: args.conntrack_tcp_timeout_time_wait,
            tcp_close: args.conntrack_tcp_timeout_close,
            udp: args.conntrack_udp_timeout,
            udp_stream: args.conntrack_udp_timeout_stream,
        },
        ct_gc_interval: args.conntrack_gc_interval,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(agent::run(cfg))
}

fn run_dump(what: DumpWhat, dir: &std::path::Path, json: bool) -> Result<()> {
    let maps = MapSet::open_pinned(dir)?;
    let out = match what {
        DumpWhat::Services => render(
            dump::services(&maps)?.as_slice(),
            json,
            dump::services_table,
        )?,
        DumpWhat::Backends => render(
            dump::backends(&maps)?.as_slice(),
            json,
            dump::backends_table,
        )?,
        DumpWhat::Conntrack => render(
            dump::conntrack(&maps)?.as_slice(),
            json,
            dump::conntrack_table,
        )?,
        DumpWhat::Stats => render(&dump::stats(&maps)?, json, dump::stats_table)?,
    };
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
