//! What the agent runs with: its flags ([`AgentFlags`], with the node flags
//! `kpx iptables-rules` shares) over the KubeProxyConfiguration file over
//! the defaults, which live here and nowhere else.

use std::{net::Ipv4Addr, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Result;

use crate::{
    control::{
        cidr::Cidr,
        config::{self, Bind, NodeFlags, NodePortAddress, Overrides},
        scheduler::{Kind, Parsed, Scheduler},
    },
    dataplane::{
        attach::Patterns,
        conntrack::Timeouts,
        node::{NodePortMode, PortRange},
        socklb, xdp,
    },
};

/// Where kpx pins its maps and links unless told otherwise.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/kpx";
const DEFAULT_INTERFACES: &str = "*";
const DEFAULT_POLL: Duration = Duration::from_secs(1);
/// kube-proxy's syncPeriod and minSyncPeriod defaults (iptables mode: 30 s
/// and 1 s; kpx resyncs less often, its steady state being diffs, and
/// batches less because a sync costs microseconds).
const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(60);
const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_millis(100);
const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(10);
/// kube-proxy's: metrics on loopback, health on every address.
const DEFAULT_METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);
const DEFAULT_HEALTHZ: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 10256);

/// `kpx agent`'s flags. Those without a value here come from the file or
/// the defaults (shown in brackets).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AgentFlags {
    #[command(flatten)]
    pub node: NodeFlags,
    /// Source ports of masqueraded flows (first-last). Local sockets are
    /// kept out of them (ip_local_reserved_ports) if the ephemeral range
    /// overlaps [default: 1024-29999].
    #[arg(long)]
    pub masquerade_ports: Option<PortRange>,
    /// The default scheduler, by IPVS's names (kube-proxy's flag): random
    /// (iptables mode's choice), rr, wrr, sh, dh, mh, lc, wlc, sed, nq or
    /// twos. A Service can name its own (annotation `kpx.io/scheduler`)
    /// [default: random].
    #[arg(long, value_parser = parse_scheduler)]
    pub ipvs_scheduler: Option<Parsed>,
    /// Send translated packets straight to their next hop as the FIB names
    /// it; false hands them to the stack's routing (the node's own packets
    /// are still re-routed at egress) [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    pub fib_forwarding: Option<bool>,
    /// Socket-level load balancing: connect() and sendmsg() to a service
    /// go straight to a backend, with no per-packet translation after.
    /// all, host-only (the node's own sockets; pods' flows keep the service
    /// address on the wire, for a service mesh) or off. Also the config
    /// file's kpx extension `kpx.socketLB` [default: all].
    #[arg(long)]
    pub socket_lb: Option<socklb::Mode>,
    /// The cgroup v2 directory whose processes the socket-level load
    /// balancer serves (`kpx.socketLBCgroup`) [default: the root of the
    /// host's cgroup v2 hierarchy].
    #[arg(long)]
    pub socket_lb_cgroup: Option<PathBuf>,
    /// XDP on the node's external interfaces: packets from outside to
    /// NodePorts, LoadBalancer IPs and externalIPs balanced before the
    /// stack. auto (native where the driver runs XDP, else none), native,
    /// generic or off (`kpx.xdp`) [default: auto].
    #[arg(long)]
    pub xdp: Option<xdp::Mode>,
    /// Interfaces XDP runs on: names or glob patterns, comma-separated
    /// (`kpx.xdpInterfaces`) [default: those holding the node's addresses
    /// (InternalIP, ExternalIP, --node-ip) that serve NodePorts].
    #[arg(long)]
    pub xdp_interfaces: Option<String>,
    /// How flows from outside the cluster to a NodePort, LoadBalancer IP or
    /// externalIP (Cluster traffic policy) reach a backend on another
    /// node: snat (masqueraded, as kube-proxy), dsr (direct server return:
    /// the backend sees the client's address and its node answers the
    /// client directly) or hybrid (dsr for TCP, snat for UDP). Every node
    /// must run the same (`kpx.nodePortMode`) [default: snat].
    #[arg(long)]
    pub nodeport_mode: Option<NodePortMode>,
    /// Direct server return for IPv6 flows too (`--nodeport-mode=dsr|hybrid`;
    /// without it, IPv6's are masqueraded). Every node takes IPv6 Geneve
    /// out; turn this on once every node runs a kpx that does (earlier ones
    /// drop it) (`kpx.dsrIPv6`) [default: false].
    #[arg(long, action = clap::ArgAction::Set)]
    pub dsr_ipv6: Option<bool>,
    /// Interfaces to attach to: names or glob patterns, comma-separated.
    /// Interfaces that appear later are attached when they do. `lo` is never
    /// used [default: *].
    #[arg(long)]
    pub interfaces: Option<String>,
    /// bpffs directory for the pinned maps (bpffs is mounted if needed)
    /// [default: /sys/fs/bpf/kpx].
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// Established TCP conntrack capacity in entries (two per flow); the
    /// table of UDP flows and TCP handshakes gets half as many. Overrides
    /// --conntrack-max-per-core/--conntrack-min; default 524288 (262144
    /// connections). Applies when the maps are created.
    #[arg(long)]
    pub conntrack_max: Option<u32>,
    /// Flows to track per CPU (kube-proxy's; 0 keeps kpx's default size).
    #[arg(long)]
    pub conntrack_max_per_core: Option<u32>,
    /// The least number of flows to track, whatever the CPU count.
    #[arg(long)]
    pub conntrack_min: Option<u32>,
    /// Idle timeout of TCP flows whose SYN was not answered yet [default: 60s].
    #[arg(long, value_parser = positive_duration)]
    pub conntrack_tcp_timeout_syn: Option<Duration>,
    /// Idle timeout of established TCP flows [default: 24h].
    #[arg(long, value_parser = positive_duration)]
    pub conntrack_tcp_timeout_established: Option<Duration>,
    /// Idle timeout of half-closed TCP flows (FIN in one direction) [default: 1h].
    #[arg(long, value_parser = positive_duration)]
    pub conntrack_tcp_timeout_close_wait: Option<Duration>,
    /// Idle timeout of TCP flows closed in both directions [default: 120s].
    #[arg(long, value_parser = positive_duration)]
    pub conntrack_tcp_timeout_time_wait: Option<Duration>,
    /// Idle timeout of reset TCP flows [default: 10s].
    #[arg(long, value_parser = positive_duration)]
    pub conntrack_tcp_timeout_close: Option<Duration>,
    /// Idle timeout of UDP flows that saw no reply [default: 30s].
    #[arg(long, value_parser = positive_duration)]
    pub conntrack_udp_timeout: Option<Duration>,
    /// Idle timeout of UDP flows that saw replies [default: 120s].
    #[arg(long, value_parser = positive_duration)]
    pub conntrack_udp_timeout_stream: Option<Duration>,
    /// How often expired conntrack entries are removed [default: 10s].
    #[arg(long, value_parser = positive_duration)]
    pub conntrack_gc_interval: Option<Duration>,
    /// How often the manifests are checked for changes [default: 1s].
    #[arg(long, value_parser = positive_duration)]
    pub poll_interval: Option<Duration>,
    /// How often the maps are re-read and any drift repaired; /healthz
    /// fails when a change waits longer than twice this [default: 60s].
    #[arg(long, value_parser = positive_duration)]
    pub sync_period: Option<Duration>,
    /// The least time between two syncs: a change is applied at once when
    /// the last sync is older, and changes arriving meanwhile are batched
    /// [default: 100ms].
    #[arg(long, value_parser = config::parse_go_duration)]
    pub min_sync_period: Option<Duration>,
    /// Where Prometheus metrics are served (`/metrics`); empty to disable
    /// [default: 127.0.0.1:10249].
    #[arg(long)]
    pub metrics_bind_address: Option<Bind>,
    /// Where `/healthz` and `/livez` are served; empty to disable
    /// [default: 0.0.0.0:10256].
    #[arg(long)]
    pub healthz_bind_address: Option<Bind>,
    /// Once the first sync is in place, remove kube-proxy's iptables and
    /// nftables rules (as `kpx cleanup --kube-proxy`); the DaemonSet turns
    /// this on.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub cleanup_kube_proxy: bool,
    /// Exit when the health or metrics port cannot be bound (default: retry).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub bind_address_hard_fail: Option<bool>,
    /// The agent's OOM score adjustment (-1000..1000; kube-proxy uses -999).
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    pub oom_score_adj: Option<i32>,
    /// Log verbosity as kube-proxy's -v: 4 and up is debug, 6 and up trace.
    /// RUST_LOG, when set, wins.
    #[arg(short = 'v', long = "v")]
    pub verbosity: Option<u32>,
}

fn parse_scheduler(s: &str) -> Result<Parsed, String> {
    Kind::parse(s)
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match config::parse_go_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?} must be more than zero")),
        d => Ok(d),
    }
}

impl AgentFlags {
    /// The settings a flag was given for (the file has the same fields).
    pub fn overrides(&self) -> Overrides {
        Overrides {
            healthz_bind_address: self.healthz_bind_address,
            metrics_bind_address: self.metrics_bind_address,
            bind_address_hard_fail: self.bind_address_hard_fail,
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
            scheduler: self.ipvs_scheduler,
            socket_lb: self.socket_lb,
            socket_lb_cgroup: self.socket_lb_cgroup.clone(),
            xdp: self.xdp,
            xdp_interfaces: self.xdp_interfaces.clone(),
            nodeport_mode: self.nodeport_mode,
            dsr_ipv6: self.dsr_ipv6,
            ..self.node.overrides()
        }
    }
}

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A manifest file or directory (standalone mode), polled for changes.
    Manifests(PathBuf),
    /// The Kubernetes API: this kubeconfig, or the in-cluster config.
    Kube { kubeconfig: Option<PathBuf> },
}

/// Everything the agent runs with, resolved.
#[derive(Clone, Debug)]
pub struct Settings {
    pub source: Source,
    pub hostname: String,
    /// Configured node IPs, the primary first.
    pub node_ips: Vec<std::net::IpAddr>,
    pub cluster_cidrs: Vec<Cidr>,
    pub interfaces: Patterns,
    pub bpffs: PathBuf,
    /// Conntrack capacity in entries; None for the datapath's default.
    pub conntrack_entries: Option<u32>,
    /// How often the manifests are checked for changes.
    pub poll: Duration,
    /// How often the maps are re-read and repaired.
    pub resync: Duration,
    /// The least time between two syncs (kube-proxy's minSyncPeriod).
    pub min_sync: Duration,
    pub ct_timeouts: Timeouts,
    /// How often expired conntrack entries are collected.
    pub ct_gc_interval: Duration,
    /// Where `/metrics` is served; None for nowhere.
    pub metrics_addr: Option<SocketAddr>,
    /// Where `/healthz` and `/livez` are served; None for nowhere.
    pub healthz_addr: Option<SocketAddr>,
    /// A health or metrics port that cannot be bound stops the agent
    /// (kube-proxy's bindAddressHardFail) instead of being retried.
    pub bind_hard_fail: bool,
    /// Once the first sync is in the maps, remove kube-proxy's rules (the
    /// DaemonSet's migration step; tc runs before netfilter, so both may
    /// coexist until then without a gap).
    pub cleanup_kube_proxy: bool,
    /// Which node addresses serve NodePorts (empty: all but loopback).
    pub nodeport_addresses: Vec<NodePortAddress>,
    /// Masquerade all traffic to cluster IPs.
    pub masquerade_all: bool,
    /// Services that name no scheduler use this one.
    pub scheduler: Scheduler,
    /// Source ports of masqueraded flows.
    pub masquerade_ports: PortRange,
    /// Redirect translated packets to the FIB's next hop (else: the stack).
    pub fib_forwarding: bool,
    /// Socket-level load balancing, and on which cgroup (None: the host's
    /// cgroup v2 root, found at start).
    pub socket_lb: socklb::Mode,
    pub socket_lb_cgroup: Option<PathBuf>,
    /// XDP, and on which interfaces (None: those holding the node's
    /// addresses that serve NodePorts).
    pub xdp: xdp::Mode,
    pub xdp_interfaces: Option<Patterns>,
    pub nodeport_mode: NodePortMode,
    /// `nodeport_mode` serves IPv6 flows too.
    pub dsr_ipv6: bool,
    pub oom_score_adj: Option<i32>,
    pub verbosity: Option<u32>,
    /// Given, but meaningless to kpx: one log line each at start.
    pub ignored: Vec<String>,
}

impl Settings {
    /// `flags` over `file` over the defaults; `hostname` names the node
    /// when neither does.
    pub fn resolve(
        flags: &AgentFlags,
        file: Option<config::Loaded>,
        hostname: impl FnOnce() -> Result<String>,
    ) -> Result<Self> {
        let (file, mut ignored) = file.map_or_else(Default::default, |l| (l.overrides, l.ignored));
        let o = flags.overrides().or(file);
        if let Some(bit) = o.masquerade_bit {
            ignored.push(format!(
                "masqueradeBit {bit}: kpx masquerades in its datapath, without a fwmark"
            ));
        }
        let t = Timeouts::default();
        Ok(Self {
            source: match &flags.node.manifests {
                Some(path) => Source::Manifests(path.clone()),
                None => Source::Kube {
                    kubeconfig: o.kubeconfig.clone(),
                },
            },
            hostname: match &o.hostname_override {
                Some(h) => h.clone(),
                None => hostname()?,
            },
            node_ips: flags.node.node_ips(&o),
            // `lo` never carries pod traffic that needs translating.
            interfaces: Patterns::parse(flags.interfaces.as_deref().unwrap_or(DEFAULT_INTERFACES))?
                .excluding("lo"),
            bpffs: flags.bpffs.clone().unwrap_or_else(|| DEFAULT_BPFFS.into()),
            conntrack_entries: conntrack_entries(
                flags.conntrack_max,
                o.conntrack_max_per_core,
                o.conntrack_min,
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            ),
            poll: flags.poll_interval.unwrap_or(DEFAULT_POLL),
            resync: o.sync_period.unwrap_or(DEFAULT_SYNC_PERIOD),
            min_sync: o.min_sync_period.unwrap_or(DEFAULT_MIN_SYNC_PERIOD),
            ct_timeouts: Timeouts {
                tcp_syn: flags.conntrack_tcp_timeout_syn.unwrap_or(t.tcp_syn),
                tcp_established: o.tcp_established_timeout.unwrap_or(t.tcp_established),
                tcp_close_wait: o.tcp_close_wait_timeout.unwrap_or(t.tcp_close_wait),
                tcp_time_wait: flags
                    .conntrack_tcp_timeout_time_wait
                    .unwrap_or(t.tcp_time_wait),
                tcp_close: flags.conntrack_tcp_timeout_close.unwrap_or(t.tcp_close),
                udp: o.udp_timeout.unwrap_or(t.udp),
                udp_stream: o.udp_stream_timeout.unwrap_or(t.udp_stream),
            },
            ct_gc_interval: flags.conntrack_gc_interval.unwrap_or(DEFAULT_GC_INTERVAL),
            metrics_addr: o
                .metrics_bind_address
                .map_or(Some(DEFAULT_METRICS), |b| b.0),
            healthz_addr: o
                .healthz_bind_address
                .map_or(Some(DEFAULT_HEALTHZ), |b| b.0),
            bind_hard_fail: o.bind_address_hard_fail.unwrap_or(false),
            cleanup_kube_proxy: flags.cleanup_kube_proxy,
            cluster_cidrs: o.cluster_cidrs.unwrap_or_default(),
            nodeport_addresses: o.nodeport_addresses.unwrap_or_default(),
            masquerade_all: o.masquerade_all.unwrap_or(false),
            scheduler: match o.scheduler {
                Some(Parsed::Known(kind)) => Scheduler::new(kind),
                Some(Parsed::NotImplemented(n)) => {
                    ignored.push(format!(
                        "scheduler {n}: kpx does not implement it yet; random is used"
                    ));
                    Scheduler::default()
                }
                None => Scheduler::default(),
            },
            masquerade_ports: flags.masquerade_ports.clone().unwrap_or_default(),
            fib_forwarding: flags.fib_forwarding.unwrap_or(true),
            socket_lb: o.socket_lb.unwrap_or_default(),
            socket_lb_cgroup: o.socket_lb_cgroup.clone(),
            xdp: o.xdp.unwrap_or_default(),
            xdp_interfaces: o
                .xdp_interfaces
                .as_deref()
                .map(Patterns::parse)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--xdp-interfaces: {e:#}"))?,
            nodeport_mode: o.nodeport_mode.unwrap_or_default(),
            dsr_ipv6: o.dsr_ipv6.unwrap_or(false),
            oom_score_adj: o.oom_score_adj,
            verbosity: o.verbosity,
            ignored,
        })
    }
}

/// The conntrack map's size in entries: --conntrack-max, else kube-proxy's
/// max(maxPerCore × CPUs, min) flows at two entries each, else the default.
fn conntrack_entries(
    explicit: Option<u32>,
    per_core: Option<u32>,
    min: Option<u32>,
    cpus: usize,
) -> Option<u32> {
    if explicit.is_some() {
        return explicit;
    }
    let per_core = per_core.filter(|n| *n > 0)?;
    let flows = (u64::from(per_core) * cpus as u64).max(u64::from(min.unwrap_or(0)));
    Some(u32::try_from(flows.saturating_mul(2)).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: AgentFlags,
    }

    fn resolve(args: &[&str], file: Option<&str>) -> Settings {
        let cli = Cli::try_parse_from(std::iter::once("kpx").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let file = file.map(|y| config::parse(y).expect("test file"));
        Settings::resolve(&cli.flags, file, || Ok("from-kernel".into())).expect("resolves")
    }

    const FILE: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
hostnameOverride: from-file
bindAddress: 198.18.0.1
clusterCIDR: 198.18.0.0/16
metricsBindAddress: 0.0.0.0:9999
iptables: {syncPeriod: 30s, masqueradeAll: true, masqueradeBit: 14}
conntrack: {udpTimeout: 5s, maxPerCore: 1000, min: 4000}
";

    #[test]
    fn nothing_given_is_the_defaults() {
        let s = resolve(&[], None);
        assert_eq!(s.hostname, "from-kernel");
        assert_eq!(s.source, Source::Kube { kubeconfig: None });
        assert_eq!(s.bpffs, PathBuf::from(DEFAULT_BPFFS));
        assert_eq!(
            (s.resync, s.min_sync),
            (DEFAULT_SYNC_PERIOD, DEFAULT_MIN_SYNC_PERIOD)
        );
        assert_eq!(s.metrics_addr, Some(DEFAULT_METRICS));
        assert_eq!(s.healthz_addr, Some(DEFAULT_HEALTHZ));
        assert_eq!(s.ct_timeouts, Timeouts::default());
        assert_eq!(s.conntrack_entries, None);
        assert_eq!(s.masquerade_ports, PortRange::default());
        assert!(s.fib_forwarding && !s.masquerade_all && !s.bind_hard_fail);
        assert!(s.interfaces.matches("eth0") && !s.interfaces.matches("lo"));
        assert!(s.ignored.is_empty());
    }

    #[test]
    fn the_file_fills_what_no_flag_gives_and_flags_win() {
        let s = resolve(&[], Some(FILE));
        assert_eq!(s.hostname, "from-file");
        assert_eq!(s.node_ips, [Ipv4Addr::new(198, 18, 0, 1)]);
        assert_eq!(s.resync, Duration::from_secs(30));
        assert_eq!(s.metrics_addr, Some("0.0.0.0:9999".parse().unwrap()));
        assert_eq!(s.ct_timeouts.udp, Duration::from_secs(5));
        assert!(s.masquerade_all);
        assert!(s.ignored.iter().any(|i| i.starts_with("masqueradeBit 14")));

        let s = resolve(
            &[
                "--hostname-override=from-flag",
                "--sync-period=10s",
                "--masquerade-all=false",
                "--metrics-bind-address=",
                "--conntrack-udp-timeout=7s",
                "--bind-address=198.18.0.9",
                "--node-ip=198.18.0.1",
            ],
            Some(FILE),
        );
        assert_eq!(s.hostname, "from-flag");
        assert_eq!(s.resync, Duration::from_secs(10));
        assert!(!s.masquerade_all);
        assert_eq!(s.metrics_addr, None, "an empty address serves nothing");
        assert_eq!(s.ct_timeouts.udp, Duration::from_secs(7));
        // The primary first, never twice.
        assert_eq!(
            s.node_ips,
            [Ipv4Addr::new(198, 18, 0, 9), Ipv4Addr::new(198, 18, 0, 1)]
        );
        // Untouched by flags: still the file's.
        assert_eq!(s.cluster_cidrs, ["198.18.0.0/16".parse::<Cidr>().unwrap()]);
    }

    #[test]
    fn xdp_is_auto_on_the_nodeport_interfaces_unless_told() {
        let s = resolve(&[], None);
        assert_eq!(s.xdp, xdp::Mode::Auto);
        assert!(s.xdp_interfaces.is_none());
        let s = resolve(&["--xdp=generic", "--xdp-interfaces=eth*,bond0"], None);
        assert_eq!(s.xdp, xdp::Mode::Generic);
        let p = s.xdp_interfaces.expect("patterns");
        assert!(p.matches("eth1") && p.matches("bond0") && !p.matches("veth0"));
        let err = match Cli::try_parse_from(["kpx", "--xdp=fast"]) {
            Ok(_) => panic!("--xdp=fast accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("--xdp"), "{err}");
    }

    #[test]
    fn nodeport_mode_is_snat_unless_told() {
        use proxy_common::{CFG_F_DSR_TCP, CFG_F_DSR_UDP};
        let s = resolve(&[], None);
        assert_eq!(s.nodeport_mode, NodePortMode::Snat);
        assert_eq!(s.nodeport_mode.flags(), 0);
        let s = resolve(&["--nodeport-mode=hybrid"], None);
        assert_eq!(s.nodeport_mode.flags(), CFG_F_DSR_TCP);
        let s = resolve(&["--nodeport-mode=dsr"], None);
        assert_eq!(s.nodeport_mode.flags(), CFG_F_DSR_TCP | CFG_F_DSR_UDP);
        assert_eq!(s.nodeport_mode.to_string(), "dsr");
        assert!(!s.dsr_ipv6, "IPv6 is opt-in");
        let s = resolve(&["--nodeport-mode=dsr", "--dsr-ipv6=true"], None);
        assert!(s.dsr_ipv6);
        let err = match Cli::try_parse_from(["kpx", "--nodeport-mode=direct"]) {
            Ok(_) => panic!("--nodeport-mode=direct accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("want snat, dsr or hybrid"), "{err}");
    }

    #[test]
    fn manifests_replace_the_api_and_the_kubeconfig_conflicts() {
        let s = resolve(&["--manifests=/m"], None);
        assert_eq!(s.source, Source::Manifests("/m".into()));
        assert!(Cli::try_parse_from(["kpx", "--manifests=/m", "--kubeconfig=/k"]).is_err());
    }

    #[test]
    fn conntrack_size_is_explicit_else_per_core_else_default() {
        assert_eq!(conntrack_entries(Some(1024), Some(1), None, 4), Some(1024));
        assert_eq!(
            conntrack_entries(None, Some(1000), Some(100), 4),
            Some(8000)
        );
        assert_eq!(
            conntrack_entries(None, Some(1000), Some(10_000), 4),
            Some(20_000)
        );
        assert_eq!(conntrack_entries(None, Some(0), Some(10_000), 4), None);
        assert_eq!(conntrack_entries(None, None, None, 4), None);
        // From the file, under no flag.
        let s = resolve(&[], Some(FILE));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        assert_eq!(s.conntrack_entries, Some((1000 * cpus).max(4000) * 2));
    }

    #[test]
    fn zero_and_nonsense_durations_are_refused() {
        assert!(Cli::try_parse_from(["kpx", "--sync-period=0s"]).is_err());
        assert!(Cli::try_parse_from(["kpx", "--conntrack-gc-interval=soon"]).is_err());
        assert!(Cli::try_parse_from(["kpx", "--min-sync-period=0s"]).is_ok());
    }

    /// Every address, CIDR, port and bound is checked before the agent
    /// starts, and the error names the flag.
    #[test]
    fn addresses_cidrs_and_ports_out_of_range_are_refused_naming_the_flag() {
        for (arg, flag) in [
            ("--bind-address=198.18.0.300", "--bind-address"),
            ("--node-ip=node-1", "--node-ip"),
            (
                "--cluster-cidr=198.18.0.0/16,198.19.0.0/33",
                "--cluster-cidr",
            ),
            ("--nodeport-addresses=198.18.0.0/40", "--nodeport-addresses"),
            ("--masquerade-ports=1024-70000", "--masquerade-ports"),
            ("--masquerade-ports=3000-2000", "--masquerade-ports"),
            (
                "--healthz-bind-address=0.0.0.0:99999",
                "--healthz-bind-address",
            ),
            (
                "--metrics-bind-address=127.0.0.1:port",
                "--metrics-bind-address",
            ),
            ("--conntrack-max=-1", "--conntrack-max"),
            ("--iptables-masquerade-bit=32", "--iptables-masquerade-bit"),
            ("--oom-score-adj=1001", "--oom-score-adj"),
        ] {
            let err = match Cli::try_parse_from(["kpx", arg]) {
                Ok(_) => panic!("{arg} accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(flag), "{arg}: {err}");
        }
    }
}
