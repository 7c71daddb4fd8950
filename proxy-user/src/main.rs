use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kpx::{
    agent::{self, Cidr},
    control::config::{self, Bind, NodePortAddress, Overrides},
    dataplane::attach::{self, Patterns},
    dataplane::bpffs,
    dataplane::maps::{Datapath, LoadOptions, MapSet},
    ops::cleanup,
    ops::dump,
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
    /// A KubeProxyConfiguration file, as for `kpx agent`. Flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Read Services and EndpointSlices from this YAML file or directory.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// List them (and this Node) from the Kubernetes API through this
    /// kubeconfig (default: the in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name (default: the hostname).
    #[arg(long)]
    hostname_override: Option<String>,
    /// This node's primary IPv4 address.
    #[arg(long)]
    bind_address: Option<Ipv4Addr>,
    /// A further address of this node (repeatable).
    #[arg(long = "node-ip")]
    node_ips: Vec<Ipv4Addr>,
    /// The cluster's pod CIDR(s), comma-separated (the first IPv4 one
    /// detects pod traffic, as kube-proxy's local traffic detector).
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Option<Vec<Cidr>>,
    /// NodePort addresses: CIDRs or the keywords primary, all, localhost.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Option<Vec<NodePortAddress>>,
    /// Masquerade all traffic to cluster IPs.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    masquerade_all: Option<bool>,
    /// The fwmark bit of the masquerade mark (default 14: 0x4000).
    #[arg(long = "iptables-masquerade-bit", value_parser = clap::value_parser!(u8).range(0..=31))]
    masquerade_bit: Option<u8>,
    /// Serve NodePorts on 127.0.0.1 too (kube-proxy's default in iptables
    /// mode, when loopback is a NodePort address).
    #[arg(long = "iptables-localhost-nodeports", default_value = "true", action = clap::ArgAction::Set)]
    localhost_nodeports: bool,
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
    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1), as
    /// kube-proxy's ConfigMap holds it. Flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
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
    /// This node's primary IPv4 address (kube-proxy's --bind-address; no
    /// socket is bound to it).
    #[arg(long)]
    bind_address: Option<Ipv4Addr>,
    /// A further address of this node (repeatable).
    #[arg(long = "node-ip")]
    node_ips: Vec<Ipv4Addr>,
    /// The cluster's pod CIDR(s), comma-separated.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Option<Vec<Cidr>>,
    /// NodePorts are served only on node addresses in these CIDRs
    /// (or the keywords primary, all), comma-separated.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Option<Vec<NodePortAddress>>,
    /// Masquerade all traffic to cluster IPs.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    masquerade_all: Option<bool>,
    /// The fwmark bit kube-proxy's rules use for masquerading (0-31;
    /// `kpx iptables-rules` uses it, kpx's datapath marks nothing).
    #[arg(long = "iptables-masquerade-bit", value_parser = clap::value_parser!(u8).range(0..=31))]
    masquerade_bit: Option<u8>,
    /// Source ports of masqueraded flows (first-last). Local sockets are
    /// kept out of them (ip_local_reserved_ports) if the ephemeral range
    /// overlaps.
    #[arg(long, default_value = "1024-29999")]
    masquerade_ports: kpx::dataplane::node::PortRange,
    /// Send translated packets straight to their next hop as the FIB names
    /// it (default); false hands them to the stack's routing (the node's
    /// own packets are still re-routed at egress).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    fib_forwarding: bool,
    /// Interfaces to attach to: names or glob patterns, comma-separated.
    /// Interfaces that appear later are attached when they do. `lo` is never used.
    #[arg(long, default_value = "*")]
    interfaces: String,
    /// bpffs directory for the pinned maps (bpffs is mounted if needed).
    #[arg(long, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Conntrack capacity in entries (two per flow). Overrides
    /// --conntrack-max-per-core/--conntrack-min; default 524288 (262144
    /// flows). Applies when the maps are created.
    #[arg(long)]
    conntrack_max: Option<u32>,
    /// Flows to track per CPU (kube-proxy's; 0 keeps kpx's default size).
    #[arg(long)]
    conntrack_max_per_core: Option<u32>,
    /// The least number of flows to track, whatever the CPU count.
    #[arg(long)]
    conntrack_min: Option<u32>,
    /// Idle timeout of TCP flows whose SYN was not answered yet.
    #[arg(long, default_value = "60s", value_parser = positive_duration)]
    conntrack_tcp_timeout_syn: Duration,
    /// Idle timeout of established TCP flows [default: 24h].
    #[arg(long, value_parser = positive_duration)]
    conntrack_tcp_timeout_established: Option<Duration>,
    /// Idle timeout of half-closed TCP flows (FIN in one direction) [default: 1h].
    #[arg(long, value_parser = positive_duration)]
    conntrack_tcp_timeout_close_wait: Option<Duration>,
    /// Idle timeout of TCP flows closed in both directions.
    #[arg(long, default_value = "120s", value_parser = positive_duration)]
    conntrack_tcp_timeout_time_wait: Duration,
    /// Idle timeout of reset TCP flows.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    conntrack_tcp_timeout_close: Duration,
    /// Idle timeout of UDP flows that saw no reply [default: 30s].
    #[arg(long, value_parser = positive_duration)]
    conntrack_udp_timeout: Option<Duration>,
    /// Idle timeout of UDP flows that saw replies [default: 120s].
    #[arg(long, value_parser = positive_duration)]
    conntrack_udp_timeout_stream: Option<Duration>,
    /// How often expired conntrack entries are removed.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    conntrack_gc_interval: Duration,
    /// How often the manifests are checked for changes.
    #[arg(long, default_value = "1s", value_parser = positive_duration)]
    poll_interval: Duration,
    /// How often the maps are re-read and any drift repaired; /healthz
    /// fails when a change waits longer than twice this [default: 60s].
    #[arg(long, value_parser = positive_duration)]
    sync_period: Option<Duration>,
    /// The least time between two syncs: a change is applied at once when
    /// the last sync is older, and changes arriving meanwhile are batched
    /// [default: 100ms].
    #[arg(long, value_parser = config::parse_go_duration)]
    min_sync_period: Option<Duration>,
    /// Where Prometheus metrics are served (`/metrics`); empty to disable
    /// [default: 127.0.0.1:10249].
    #[arg(long)]
    metrics_bind_address: Option<Bind>,
    /// Where `/healthz` and `/livez` are served; empty to disable
    /// [default: 0.0.0.0:10256].
    #[arg(long)]
    healthz_bind_address: Option<Bind>,
    /// Once the first sync is in place, remove kube-proxy's iptables and
    /// nftables rules (as `kpx cleanup --kube-proxy`); the DaemonSet turns
    /// this on.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    cleanup_kube_proxy: bool,
    /// Exit when the health or metrics port cannot be bound (default: retry).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    bind_address_hard_fail: Option<bool>,
    /// The agent's OOM score adjustment (-1000..1000; kube-proxy uses -999).
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    oom_score_adj: Option<i32>,
    /// Log verbosity as kube-proxy's -v: 4 and up is debug, 6 and up trace.
    /// RUST_LOG, when set, wins.
    #[arg(short = 'v', long = "v")]
    verbosity: Option<u32>,
}

impl AgentArgs {
    /// The settings a flag was given for.
    fn overrides(&self) -> Overrides {
        Overrides {
            kubeconfig: self.kubeconfig.clone(),
            hostname_override: self.hostname_override.clone(),
            bind_address: self.bind_address,
            cluster_cidrs: self.cluster_cidr.clone(),
            healthz_bind_address: self.healthz_bind_address,
            metrics_bind_address: self.metrics_bind_address,
            bind_address_hard_fail: self.bind_address_hard_fail,
            nodeport_addresses: self.nodeport_addresses.clone(),
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.masquerade_bit,
            conntrack_max_per_core: self.conntrack_max_per_core,
            conntrack_min: self.conntrack_min,
            tcp_established_timeout: self.conntrack_tcp_timeout_established,
            tcp_close_wait_timeout: self.conntrack_tcp_timeout_close_wait,
            udp_timeout: self.conntrack_udp_timeout,
            udp_stream_timeout: self.conntrack_udp_timeout_stream,
            sync_period: self.sync_period,
            min_sync_period: self.min_sync_period,
            oom_score_adj: self.oom_score_adj,
            verbosity: self.verbosity,
        }
    }
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match config::parse_go_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?} must be more than zero")),
        d => Ok(d),
    }
}

/// The conntrack map's size in entries: --conntrack-max, else kube-proxy's
/// max(maxPerCore × CPUs, min) flows at two entries each, else the default.
fn conntrack_entries(
    explicit: Option<u32>,
    per_core: Option<u32>,
    min: Option<u32>,
) -> Option<u32> {
    if explicit.is_some() {
        return explicit;
    }
    let per_core = per_core.filter(|n| *n > 0)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let flows = (u64::from(per_core) * cpus).max(u64::from(min.unwrap_or(0)));
    Some(u32::try_from(flows.saturating_mul(2)).unwrap_or(u32::MAX))
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
        Command::Agent(args) => run_agent(*args),
        Command::Dump { what, bpffs, json } => {
            init_logging(None);
            run_dump(what, &bpffs, json)
        }
        Command::Cleanup { bpffs, kube_proxy } => {
            init_logging(None);
            if kube_proxy {
                let report = cleanup::kube_proxy()?;
                println!("{report}");
                return Ok(());
            }
            let links = attach::unpin_links(&bpffs)?;
            let removed = bpffs::unpin_all(&bpffs)?;
            println!(
                "detached {links} tc programs and removed {} pinned maps from {}",
                removed.len(),
                bpffs.display()
            );
            Ok(())
        }
        Command::IptablesRules(args) => {
            init_logging(None);
            print!("{}", rules(*args)?);
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

fn run_agent(args: AgentArgs) -> Result<()> {
    // The file is read before logging starts: its verbosity sets the level.
    let loaded = match &args.config {
        Some(path) => Some(config::load(path)?),
        None => None,
    };
    let (file, ignored) = loaded.map_or_else(Default::default, |l| (l.overrides, l.ignored));
    let o = args.overrides().or(file);
    init_logging(o.verbosity);
    if let Some(path) = &args.config {
        log::info!("configuration from {}", path.display());
    }
    for i in &ignored {
        log::info!("configuration: ignoring {i}");
    }
    if let Some(bit) = o.masquerade_bit {
        log::info!(
            "configuration: ignoring masqueradeBit {bit}: kpx masquerades in its datapath, without a fwmark"
        );
    }
    if o.nodeport_addresses
        .iter()
        .flatten()
        .any(|a| matches!(a, NodePortAddress::Localhost))
    {
        log::warn!(
            "nodePortAddresses: localhost NodePorts are not served (kpx sees no traffic on lo)"
        );
    }
    if let Some(adj) = o.oom_score_adj {
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", adj.to_string()) {
            log::warn!("setting oom_score_adj to {adj}: {e}");
        }
    }
    let hostname = hostname(o.hostname_override)?;
    // `lo` never carries pod traffic that needs translating.
    let interfaces = Patterns::parse(&args.interfaces)?.excluding("lo");
    let node_ips = node_ips(o.bind_address, &args.node_ips);
    let defaults = kpx::dataplane::conntrack::Timeouts::default();
    let cfg = agent::Config {
        source: match args.manifests {
            Some(path) => agent::Source::Manifests(path),
            None => agent::Source::Kube {
                kubeconfig: o.kubeconfig,
            },
        },
        hostname,
        node_ips,
        cluster_cidrs: o.cluster_cidrs.unwrap_or_default(),
        interfaces,
        bpffs: args.bpffs,
        conntrack_entries: conntrack_entries(
            args.conntrack_max,
            o.conntrack_max_per_core,
            o.conntrack_min,
        ),
        poll: args.poll_interval,
        resync: o.sync_period.unwrap_or(Duration::from_secs(60)),
        min_sync: o.min_sync_period.unwrap_or(Duration::from_millis(100)),
        metrics_addr: o
            .metrics_bind_address
            .unwrap_or(Bind(Some(([127, 0, 0, 1], 10249).into())))
            .0,
        healthz_addr: o
            .healthz_bind_address
            .unwrap_or(Bind(Some(([0, 0, 0, 0], 10256).into())))
            .0,
        bind_hard_fail: o.bind_address_hard_fail.unwrap_or(false),
        cleanup_kube_proxy: args.cleanup_kube_proxy,
        nodeport_addresses: o.nodeport_addresses.unwrap_or_default(),
        masquerade_all: o.masquerade_all.unwrap_or(false),
        masquerade_ports: args.masquerade_ports.clone(),
        fib_forwarding: args.fib_forwarding,
        ct_timeouts: kpx::dataplane::conntrack::Timeouts {
            tcp_syn: args.conntrack_tcp_timeout_syn,
            tcp_established: o
                .tcp_established_timeout
                .unwrap_or(defaults.tcp_established),
            tcp_close_wait: o.tcp_close_wait_timeout.unwrap_or(defaults.tcp_close_wait),
            tcp_time_wait: args.conntrack_tcp_timeout_time_wait,
            tcp_close: args.conntrack_tcp_timeout_close,
            udp: o.udp_timeout.unwrap_or(defaults.udp),
            udp_stream: o.udp_stream_timeout.unwrap_or(defaults.udp_stream),
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

/// `kpx iptables-rules`: the model built exactly as the agent builds it,
/// rendered as kube-proxy's rules.
fn rules(args: RulesArgs) -> Result<String> {
    use kpx::{
        control::index::Index,
        control::model::{NodeInfo, Sourced},
        reference::{self, Mode, Settings},
    };
    let file = match &args.config {
        Some(path) => config::load(path)?.overrides,
        None => Overrides::default(),
    };
    let flags = Overrides {
        kubeconfig: args.kubeconfig.clone(),
        hostname_override: args.hostname_override.clone(),
        bind_address: args.bind_address,
        cluster_cidrs: args.cluster_cidr.clone(),
        nodeport_addresses: args.nodeport_addresses.clone(),
        masquerade_all: args.masquerade_all,
        masquerade_bit: args.masquerade_bit,
        ..Overrides::default()
    };
    let o = flags.or(file);
    let hostname = hostname(o.hostname_override.clone())?;
    let node_ips = node_ips(o.bind_address, &args.node_ips);
    let mut index = Index::new(NodeInfo {
        addresses: node_ips.clone(),
        ..NodeInfo::named(&hostname)
    });
    let problems = if let Some(path) = &args.manifests {
        let loaded = kpx::control::manifests::load(path)?;
        let (_, mut problems) = index.replace_all(loaded.services, loaded.slices);
        problems.extend(loaded.problems);
        problems
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (services, slices, node) = rt.block_on(async {
            let client = kpx::control::watch::client(o.kubeconfig.as_deref()).await?;
            kpx::control::watch::list_once(client, &hostname).await
        })?;
        if let Some(n) = &node {
            let mut info = NodeInfo::from_node(&hostname, n);
            let mut addresses = node_ips.clone();
            addresses.extend(info.addresses.iter().filter(|a| !node_ips.contains(a)));
            info.addresses = addresses;
            index.set_node(info);
        }
        let (_, problems) = index.replace_all(
            services.into_iter().map(Sourced::api).collect(),
            slices.into_iter().map(Sourced::api).collect(),
        );
        problems
    };
    for p in &problems {
        log::warn!("skipped: {p}");
    }
    index.update();
    let local = kpx::dataplane::node::local_ipv4().unwrap_or_else(|e| {
        log::warn!("listing this node's addresses: {e}; NodePort addresses unknown");
        Vec::new()
    });
    let settings = Settings {
        node_ip: index.node().addresses.first().copied(),
        cluster_cidr: o.cluster_cidrs.as_ref().and_then(|c| c.first().copied()),
        masquerade_all: o.masquerade_all.unwrap_or(false),
        masquerade_bit: o.masquerade_bit.unwrap_or(14),
        ..Settings::new(&hostname)
    }
    .with_nodeports(
        &o.nodeport_addresses.unwrap_or_default(),
        &local,
        args.localhost_nodeports,
    );
    let mode = match args.mode {
        RulesMode::Iptables => Mode::Iptables,
        RulesMode::Nftables => Mode::Nftables,
    };
    Ok(reference::render(
        mode,
        &index.services_with_ports(),
        &settings,
    ))
}

/// The node's name: the override, else the kernel's hostname.
fn hostname(over: Option<String>) -> Result<String> {
    match over {
        Some(h) => Ok(h),
        None => Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the hostname (or pass --hostname-override)")?
            .trim()
            .to_string()),
    }
}

/// The configured node IPs, the primary (--bind-address) first.
fn node_ips(bind: Option<Ipv4Addr>, more: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    let mut ips: Vec<Ipv4Addr> = bind.into_iter().collect();
    ips.extend(more.iter().filter(|ip| Some(**ip) != bind));
    ips
}
