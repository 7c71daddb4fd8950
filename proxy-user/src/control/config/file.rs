//! `kpx agent --config FILE`: kube-proxy's own configuration file
//! (`KubeProxyConfiguration`, kubeproxy.config.k8s.io/v1alpha1), so an
//! operator's existing ConfigMap keeps working.
//!
//! Every field of the schema is known: the ones that mean something to kpx
//! are honoured, the others are accepted and, when set to anything but their
//! zero value, logged once as ignored. Unknown fields and invalid values are
//! start-up errors naming the field. Zero values mean "default", as in
//! kube-proxy's defaulting (kubeadm writes every field, mostly zero).
//!
//! Long because it mirrors kube-proxy's whole schema, field by field, with
//! the kubeadm default file as a test fixture.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

use super::{Bind, Overrides};
use crate::control::scheduler::Kind;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// What a configuration file says, and what kpx does not use of it.
#[derive(Debug)]
pub struct Loaded {
    pub overrides: Overrides,
    /// "field: why", one per ignored non-zero field, for one log line each.
    pub ignored: Vec<String>,
}

/// Reads and validates a KubeProxyConfiguration file (YAML or JSON).
pub fn load(path: &Path) -> Result<Loaded> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("configuration file {}", path.display()))
}

/// Parses and validates a KubeProxyConfiguration document.
pub fn parse(text: &str) -> Result<Loaded> {
    let de = serde_norway::Deserializer::from_str(text);
    let file: File = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!("field {path}: {}", e.into_inner())
    })?;
    file.interpret()
}

// ---- the schema (kube-proxy's types.go, component-base's embedded types) ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct File {
    api_version: String,
    kind: String,
    feature_gates: BTreeMap<String, bool>,
    client_connection: ClientConnection,
    logging: Logging,
    hostname_override: String,
    bind_address: String,
    healthz_bind_address: String,
    metrics_bind_address: String,
    bind_address_hard_fail: bool,
    enable_profiling: bool,
    show_hidden_metrics_for_version: String,
    mode: String,
    iptables: IpTables,
    ipvs: Ipvs,
    nftables: NfTables,
    winkernel: Winkernel,
    detect_local_mode: String,
    detect_local: DetectLocal,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: String,
    node_port_addresses: Option<Vec<String>>,
    oom_score_adj: Option<i32>,
    conntrack: Conntrack,
    config_sync_period: GoDuration,
    port_range: String,
    windows_run_as_service: bool,
    /// kpx's own settings, under one key no kube-proxy field uses.
    kpx: Kpx,
}

/// `kpx:` — settings kube-proxy does not have.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct Kpx {
    /// `--socket-lb`: all, host-only or off.
    #[serde(rename = "socketLB")]
    socket_lb: String,
    /// `--socket-lb-cgroup`.
    #[serde(rename = "socketLBCgroup")]
    socket_lb_cgroup: String,
    /// `--xdp`: auto, native, generic or off.
    xdp: String,
    /// `--xdp-interfaces`.
    xdp_interfaces: String,
    /// `--nodeport-mode`: snat, dsr or hybrid.
    node_port_mode: String,
    /// `--dsr-ipv6`.
    #[serde(rename = "dsrIPv6")]
    dsr_ipv6: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct ClientConnection {
    kubeconfig: String,
    accept_content_types: String,
    content_type: String,
    qps: f64,
    burst: i64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct Logging {
    format: String,
    /// A Go duration string or nanoseconds.
    flush_frequency: Option<serde_norway::Value>,
    verbosity: u32,
    vmodule: Vec<VModule>,
    options: LogOptions,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct VModule {
    file_pattern: String,
    verbosity: u32,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct LogOptions {
    text: LogFormatOptions,
    json: LogFormatOptions,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct LogFormatOptions {
    split_stream: bool,
    /// A resource quantity ("0", "5Mi").
    info_buffer_size: Option<serde_norway::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct IpTables {
    masquerade_bit: Option<i32>,
    masquerade_all: bool,
    localhost_node_ports: Option<bool>,
    #[serde(rename = "snatNodeInternalIP")]
    snat_node_internal_ip: Option<bool>,
    sync_period: GoDuration,
    min_sync_period: GoDuration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct Ipvs {
    sync_period: GoDuration,
    min_sync_period: GoDuration,
    scheduler: String,
    #[serde(rename = "excludeCIDRs")]
    exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    strict_arp: bool,
    tcp_timeout: GoDuration,
    tcp_fin_timeout: GoDuration,
    udp_timeout: GoDuration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct NfTables {
    masquerade_bit: Option<i32>,
    masquerade_all: bool,
    sync_period: GoDuration,
    min_sync_period: GoDuration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct Winkernel {
    network_name: String,
    source_vip: String,
    #[serde(rename = "enableDSR")]
    enable_dsr: bool,
    root_hns_endpoint_name: String,
    forward_health_check_vip: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct DetectLocal {
    bridge_interface: String,
    interface_name_prefix: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct Conntrack {
    max_per_core: Option<i32>,
    min: Option<i32>,
    tcp_established_timeout: Option<GoDuration>,
    tcp_close_wait_timeout: Option<GoDuration>,
    tcp_be_liberal: bool,
    udp_timeout: GoDuration,
    udp_stream_timeout: GoDuration,
}

/// A `metav1.Duration`: a Go duration string; null and "0s" are zero.
#[derive(Default, Clone, Copy)]
struct GoDuration(Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        match s {
            None => Ok(GoDuration(Duration::ZERO)),
            Some(s) => parse_go_duration(&s)
                .map(GoDuration)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl GoDuration {
    /// Zero is kube-proxy's "unset".
    fn given(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

/// Parses a Go duration (`300ms`, `1.5h`, `2h45m`, `0`): what kube-proxy's
/// flags and file take. Negative durations are refused.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (such as 300ms, 1.5s, 2h45m)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err(format!("{s:?}: a duration cannot be negative"));
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_end);
        if num.is_empty() || num == "." {
            return Err(bad());
        }
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * scale;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

impl File {
    /// Validates every field and separates what kpx honours from what it ignores.
    fn interpret(self) -> Result<Loaded> {
        if self.api_version != API_VERSION {
            bail!(
                "field apiVersion: {:?}, expected {API_VERSION:?}",
                self.api_version
            );
        }
        if self.kind != KIND {
            bail!("field kind: {:?}, expected {KIND:?}", self.kind);
        }
        let mut ignored = Vec::new();
        let mut ignore = |field: &str, set: bool, why: &str| {
            if set {
                ignored.push(format!("{field}: {why}"));
            }
        };
        let mut o = Overrides::default();

        let cc = &self.client_connection;
        o.kubeconfig = (!cc.kubeconfig.is_empty()).then(|| PathBuf::from(&cc.kubeconfig));
        let client = "kpx uses the client's defaults (JSON, no client-side rate limit)";
        ignore(
            "clientConnection.acceptContentTypes",
            !cc.accept_content_types.is_empty(),
            client,
        );
        ignore(
            "clientConnection.contentType",
            !cc.content_type.is_empty(),
            client,
        );
        ignore("clientConnection.qps", cc.qps != 0.0, client);
        ignore("clientConnection.burst", cc.burst != 0, client);

        let lg = &self.logging;
        o.verbosity = (lg.verbosity != 0).then_some(lg.verbosity);
        let logs = "kpx logs text lines to stderr (RUST_LOG filters them)";
        ignore(
            "logging.format",
            !(lg.format.is_empty() || lg.format == "text"),
            logs,
        );
        ignore(
            "logging.flushFrequency",
            lg.flush_frequency.as_ref().is_some_and(|v| !is_zero(v)),
            logs,
        );
        ignore("logging.vmodule", !lg.vmodule.is_empty(), logs);
        for (name, f) in [("text", &lg.options.text), ("json", &lg.options.json)] {
            let set = f.split_stream || f.info_buffer_size.as_ref().is_some_and(|v| !is_zero(v));
            ignore(&format!("logging.options.{name}"), set, logs);
        }
        for v in &lg.vmodule {
            if v.file_pattern.is_empty() {
                bail!("field logging.vmodule: filePattern is empty");
            }
        }

        o.hostname_override =
            (!self.hostname_override.is_empty()).then(|| self.hostname_override.clone());
        if !self.bind_address.is_empty() {
            match self.bind_address.parse::<IpAddr>() {
                Ok(ip) if !ip.is_unspecified() => o.bind_address = Some(ip),
                Ok(_) => {}
                Err(_) => bail!(
                    "field bindAddress: {:?} is not an IP address",
                    self.bind_address
                ),
            }
        }
        o.healthz_bind_address = bind_field("healthzBindAddress", &self.healthz_bind_address)?;
        o.metrics_bind_address = bind_field("metricsBindAddress", &self.metrics_bind_address)?;
        o.bind_address_hard_fail = self.bind_address_hard_fail.then_some(true);
        ignore(
            "enableProfiling",
            self.enable_profiling,
            "kpx has no pprof handlers",
        );
        ignore(
            "showHiddenMetricsForVersion",
            !self.show_hidden_metrics_for_version.is_empty(),
            "kpx hides no metrics",
        );

        // The mode names which section's sync periods and masquerade
        // settings kube-proxy would use; kpx takes the same ones.
        let (sync, min_sync, masq_all, masq_bit, section) = match self.mode.as_str() {
            "" | "iptables" => (
                self.iptables.sync_period,
                self.iptables.min_sync_period,
                self.iptables.masquerade_all,
                self.iptables.masquerade_bit,
                "iptables",
            ),
            "ipvs" => (
                self.ipvs.sync_period,
                self.ipvs.min_sync_period,
                self.iptables.masquerade_all,
                self.iptables.masquerade_bit,
                "ipvs",
            ),
            "nftables" => (
                self.nftables.sync_period,
                self.nftables.min_sync_period,
                self.nftables.masquerade_all,
                self.nftables.masquerade_bit,
                "nftables",
            ),
            other => {
                bail!("field mode: {other:?} is not a Linux proxy mode (iptables, ipvs, nftables)")
            }
        };
        o.sync_period = sync.given();
        o.min_sync_period = min_sync.given();
        o.masquerade_all = masq_all.then_some(true);
        if let Some(bit) = masq_bit {
            let field = if section == "nftables" {
                "nftables.masqueradeBit"
            } else {
                "iptables.masqueradeBit"
            };
            o.masquerade_bit = Some(
                u8::try_from(bit)
                    .ok()
                    .filter(|b| *b <= 31)
                    .with_context(|| format!("field {field}: {bit} is out of range 0-31"))?,
            );
        }
        if !self.mode.is_empty() {
            ignore(
                "mode",
                true,
                &format!(
                    "kpx replaces the {} proxier; its {section} section's periods and masquerade settings are used",
                    self.mode
                ),
            );
        }
        let ipt = &self.iptables;
        ignore(
            "iptables.localhostNodePorts",
            ipt.localhost_node_ports == Some(true),
            "kpx never serves NodePorts on 127.0.0.1 (as kube-proxy's nftables and ipvs modes)",
        );
        ignore(
            "iptables.snatNodeInternalIP",
            ipt.snat_node_internal_ip == Some(true),
            "not supported yet",
        );
        let ipvs = &self.ipvs;
        if !ipvs.scheduler.is_empty() {
            // One not implemented yet is said at start, with the flag's.
            let parsed = Kind::parse(&ipvs.scheduler)
                .map_err(|e| anyhow::anyhow!("field ipvs.scheduler: {e}"))?;
            o.scheduler = Some(parsed);
        }
        let kpx = &self.kpx;
        if !kpx.socket_lb.is_empty() {
            o.socket_lb = Some(
                kpx.socket_lb
                    .parse()
                    .map_err(|e| anyhow::anyhow!("field kpx.socketLB: {e}"))?,
            );
        }
        o.socket_lb_cgroup =
            (!kpx.socket_lb_cgroup.is_empty()).then(|| PathBuf::from(&kpx.socket_lb_cgroup));
        if !kpx.xdp.is_empty() {
            o.xdp = Some(
                kpx.xdp
                    .parse()
                    .map_err(|e| anyhow::anyhow!("field kpx.xdp: {e}"))?,
            );
        }
        o.xdp_interfaces = (!kpx.xdp_interfaces.is_empty()).then(|| kpx.xdp_interfaces.clone());
        o.dsr_ipv6 = kpx.dsr_ipv6;
        if !kpx.node_port_mode.is_empty() {
            o.nodeport_mode = Some(
                kpx.node_port_mode
                    .parse()
                    .map_err(|e| anyhow::anyhow!("field kpx.nodePortMode: {e}"))?,
            );
        }
        let ipvs_set = ipvs.exclude_cidrs.as_ref().is_some_and(|v| !v.is_empty())
            || ipvs.strict_arp
            || !ipvs.tcp_timeout.0.is_zero()
            || !ipvs.tcp_fin_timeout.0.is_zero()
            || !ipvs.udp_timeout.0.is_zero();
        ignore(
            "ipvs",
            ipvs_set,
            "no IPVS is involved (ARP and IPVS timeouts do not apply; ipvs.scheduler does)",
        );
        let wk = &self.winkernel;
        let wk_set = !wk.network_name.is_empty()
            || !wk.source_vip.is_empty()
            || wk.enable_dsr
            || !wk.root_hns_endpoint_name.is_empty()
            || wk.forward_health_check_vip;
        ignore("winkernel", wk_set, "Windows only");
        ignore(
            "windowsRunAsService",
            self.windows_run_as_service,
            "Windows only",
        );

        match self.detect_local_mode.as_str() {
            "" | "ClusterCIDR" => {}
            other @ ("NodeCIDR" | "BridgeInterface" | "InterfaceNamePrefix") => bail!(
                "field detectLocalMode: {other} is not supported by kpx yet; use ClusterCIDR (with clusterCIDR)"
            ),
            other => bail!(
                "field detectLocalMode: unknown mode {other:?} (ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix)"
            ),
        }
        ignore(
            "detectLocal",
            !self.detect_local.bridge_interface.is_empty()
                || !self.detect_local.interface_name_prefix.is_empty(),
            "only used by the BridgeInterface and InterfaceNamePrefix modes",
        );

        if !self.cluster_cidr.is_empty() {
            let mut cidrs = Vec::new();
            for part in self.cluster_cidr.split(',').map(str::trim) {
                cidrs.push(
                    crate::control::cidr::parse(part)
                        .map_err(|e| anyhow::anyhow!("field clusterCIDR: {e}"))?,
                );
            }
            o.cluster_cidrs = Some(cidrs);
        }
        if let Some(list) = &self.node_port_addresses {
            let mut out = Vec::new();
            for (i, a) in list.iter().enumerate() {
                if a.contains(':') {
                    ignore(
                        &format!("nodePortAddresses[{i}]"),
                        true,
                        "IPv6; kpx serves IPv4 only",
                    );
                    continue;
                }
                out.push(
                    a.parse()
                        .map_err(|e| anyhow::anyhow!("field nodePortAddresses[{i}]: {e}"))?,
                );
            }
            if !list.is_empty() {
                o.nodeport_addresses = Some(out);
            }
        }
        if let Some(adj) = self.oom_score_adj {
            if !(-1000..=1000).contains(&adj) {
                bail!("field oomScoreAdj: {adj} is out of range -1000-1000");
            }
            o.oom_score_adj = Some(adj);
        }

        let ct = &self.conntrack;
        let count = |field: &str, v: Option<i32>| -> Result<Option<u32>> {
            match v {
                None => Ok(None),
                Some(n) => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| anyhow::anyhow!("field {field}: {n} must not be negative")),
            }
        };
        o.conntrack_max_per_core = count("conntrack.maxPerCore", ct.max_per_core)?;
        o.conntrack_min = count("conntrack.min", ct.min)?;
        o.tcp_established_timeout = ct.tcp_established_timeout.and_then(GoDuration::given);
        o.tcp_close_wait_timeout = ct.tcp_close_wait_timeout.and_then(GoDuration::given);
        o.udp_timeout = ct.udp_timeout.given();
        o.udp_stream_timeout = ct.udp_stream_timeout.given();
        ignore(
            "conntrack.tcpBeLiberal",
            ct.tcp_be_liberal,
            "kpx's own conntrack does not track TCP windows",
        );
        ignore(
            "configSyncPeriod",
            !self.config_sync_period.0.is_zero(),
            "kpx's watches need no informer resync (--sync-period repairs the maps)",
        );
        ignore(
            "portRange",
            !self.port_range.is_empty(),
            "unused since the userspace proxy was removed",
        );
        for (gate, on) in &self.feature_gates {
            ignore(
                &format!("featureGates.{gate}"),
                true,
                &format!("set to {on}; no kpx behaviour depends on a feature gate"),
            );
        }
        Ok(Loaded {
            overrides: o,
            ignored,
        })
    }
}

fn bind_field(field: &str, s: &str) -> Result<Option<Bind>> {
    if s.is_empty() {
        return Ok(None); // zero: the default
    }
    // kube-proxy also takes a bare IP and adds the default port; kpx takes
    // the explicit form only, so the file says which port is served.
    s.parse::<Bind>()
        .map(Some)
        .map_err(|e| anyhow::anyhow!("field {field}: {e}"))
}

/// A YAML scalar that is zero ("0", 0, "0s", null).
fn is_zero(v: &serde_norway::Value) -> bool {
    match v {
        serde_norway::Value::Null => true,
        serde_norway::Value::Number(n) => n.as_f64() == Some(0.0),
        serde_norway::Value::String(s) => {
            s.is_empty() || parse_go_duration(s).is_ok_and(|d| d.is_zero()) || s == "0"
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::super::NodePortAddress;
    use super::*;
    use crate::control::scheduler::Parsed;

    /// What `kubeadm init` writes into the kube-proxy ConfigMap (1.33):
    /// every field present, nearly all zero.
    pub const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 198.18.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    #[test]
    fn kubeadm_default_loads_with_nothing_ignored() {
        let l = parse(KUBEADM).expect("kubeadm config");
        assert_eq!(l.ignored, Vec::<String>::new());
        let o = l.overrides;
        assert_eq!(
            o.kubeconfig.as_deref(),
            Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        assert_eq!(
            o.cluster_cidrs,
            Some(vec!["198.18.0.0/16".parse().unwrap()])
        );
        // Zero values are kube-proxy's "use the default".
        assert_eq!(o.bind_address, None);
        assert_eq!(o.sync_period, None);
        assert_eq!(o.healthz_bind_address, None);
        assert_eq!(o.conntrack_max_per_core, None);
    }

    #[test]
    fn honoured_fields_are_read() {
        let l = parse(
            r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
hostnameOverride: node-a
bindAddress: 198.18.0.1
healthzBindAddress: 0.0.0.0:20256
metricsBindAddress: ""
bindAddressHardFail: true
clusterCIDR: 198.18.128.0/17,2001:2::/56
nodePortAddresses: ["198.18.0.0/24", primary]
oomScoreAdj: -999
mode: nftables
nftables: {masqueradeAll: true, masqueradeBit: 10, syncPeriod: 1m30s, minSyncPeriod: 250ms}
iptables: {syncPeriod: 5s}
conntrack:
  maxPerCore: 0
  min: 1000
  tcpEstablishedTimeout: 2h
  tcpCloseWaitTimeout: 30m0s
  udpTimeout: 15s
  udpStreamTimeout: 1.5m
logging: {verbosity: 4}
"#,
        )
        .expect("valid");
        let o = l.overrides;
        assert_eq!(o.hostname_override.as_deref(), Some("node-a"));
        assert_eq!(o.bind_address, Some(Ipv4Addr::new(198, 18, 0, 1).into()));
        assert_eq!(
            o.healthz_bind_address,
            Some(Bind(Some("0.0.0.0:20256".parse().unwrap())))
        );
        assert_eq!(o.metrics_bind_address, None);
        assert_eq!(o.bind_address_hard_fail, Some(true));
        // Dual-stack: one CIDR per family, both kept.
        assert_eq!(
            o.cluster_cidrs,
            Some(vec![
                "198.18.128.0/17".parse().unwrap(),
                "2001:2::/56".parse().unwrap()
            ])
        );
        assert_eq!(
            o.nodeport_addresses,
            Some(vec![
                NodePortAddress::Cidr("198.18.0.0/24".parse().unwrap()),
                NodePortAddress::Primary
            ])
        );
        assert_eq!(o.oom_score_adj, Some(-999));
        // mode: nftables reads the nftables section, not iptables'.
        assert_eq!(o.masquerade_all, Some(true));
        assert_eq!(o.masquerade_bit, Some(10));
        assert_eq!(o.sync_period, Some(Duration::from_secs(90)));
        assert_eq!(o.min_sync_period, Some(Duration::from_millis(250)));
        assert_eq!(o.conntrack_max_per_core, Some(0));
        assert_eq!(o.conntrack_min, Some(1000));
        assert_eq!(o.tcp_established_timeout, Some(Duration::from_secs(7200)));
        assert_eq!(o.tcp_close_wait_timeout, Some(Duration::from_secs(1800)));
        assert_eq!(o.udp_timeout, Some(Duration::from_secs(15)));
        assert_eq!(o.udp_stream_timeout, Some(Duration::from_secs(90)));
        assert_eq!(o.verbosity, Some(4));
        // The mode is reported as ignored; the IPv6 CIDR is not.
        assert!(
            !l.ignored.iter().any(|i| i.starts_with("clusterCIDR:")),
            "{:?}",
            l.ignored
        );
        assert!(l.ignored.iter().any(|i| i.starts_with("mode:")));
    }

    #[test]
    fn ignored_fields_are_listed_once_each() {
        let l = parse(
            r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
featureGates: {SomeGate: true}
enableProfiling: true
ipvs: {scheduler: rr, strictARP: true}
kpx: {socketLB: host-only, socketLBCgroup: /run/kpx/pods, xdp: generic, xdpInterfaces: "eth*", nodePortMode: hybrid, dsrIPv6: true}
conntrack: {tcpBeLiberal: true}
configSyncPeriod: 15m
clientConnection: {qps: 5, burst: 10}
logging: {format: json}
"#,
        )
        .expect("valid");
        let fields: Vec<&str> = l
            .ignored
            .iter()
            .map(|i| i.split(':').next().unwrap_or_default())
            .collect();
        assert_eq!(
            fields,
            [
                "clientConnection.qps",
                "clientConnection.burst",
                "logging.format",
                "enableProfiling",
                "ipvs",
                "conntrack.tcpBeLiberal",
                "configSyncPeriod",
                "featureGates.SomeGate"
            ]
        );
        assert_eq!(
            l.overrides,
            Overrides {
                scheduler: Some(Parsed::Known(Kind::Rr)),
                socket_lb: Some(crate::dataplane::socklb::Mode::HostOnly),
                socket_lb_cgroup: Some("/run/kpx/pods".into()),
                xdp: Some(crate::dataplane::xdp::Mode::Generic),
                xdp_interfaces: Some("eth*".into()),
                nodeport_mode: Some(crate::dataplane::node::NodePortMode::Hybrid),
                dsr_ipv6: Some(true),
                ..Overrides::default()
            }
        );
    }

    fn error(yaml: &str) -> String {
        format!(
            "{:#}",
            parse(&format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{yaml}"
            ))
            .expect_err("must be refused")
        )
    }

    #[test]
    fn invalid_and_unknown_fields_name_the_field() {
        for (yaml, want) in [
            ("clusterCidr: 198.18.0.0/16", "clusterCidr"),
            ("kpx: {socketLB: on}", "kpx.socketLB"),
            ("kpx: {xdp: fast}", "kpx.xdp"),
            ("kpx: {nodePortMode: direct}", "kpx.nodePortMode"),
            ("iptables: {masqueradeBits: 14}", "iptables"),
            ("conntrack: {maxPerCore: -1}", "conntrack.maxPerCore"),
            ("iptables: {masqueradeBit: 32}", "iptables.masqueradeBit"),
            ("iptables: {syncPeriod: 30}", "iptables.syncPeriod"),
            ("iptables: {syncPeriod: -5s}", "iptables.syncPeriod"),
            ("clusterCIDR: 198.18.0.0/33", "clusterCIDR"),
            ("bindAddress: nowhere", "bindAddress"),
            ("healthzBindAddress: 0.0.0.0", "healthzBindAddress"),
            ("nodePortAddresses: [everything]", "nodePortAddresses[0]"),
            ("oomScoreAdj: 2000", "oomScoreAdj"),
            ("mode: userspace", "mode"),
            ("detectLocalMode: NodeCIDR", "detectLocalMode"),
            ("logging: {verbosity: high}", "logging.verbosity"),
        ] {
            let e = error(yaml);
            assert!(e.contains(want), "{yaml}: {e}");
        }
        assert!(
            format!("{:#}", parse("kind: KubeProxyConfiguration").unwrap_err())
                .contains("apiVersion")
        );
        assert!(format!(
            "{:#}",
            parse("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration")
                .unwrap_err()
        )
        .contains("kind"));
    }

    #[test]
    fn go_durations() {
        for (s, want) in [
            ("0", 0.0),
            ("0s", 0.0),
            ("300ms", 0.3),
            ("1.5s", 1.5),
            ("2h45m", 9900.0),
            ("1h0m0s", 3600.0),
            ("100us", 0.0001),
            ("1µs", 0.000001),
            ("+5s", 5.0),
        ] {
            let d = parse_go_duration(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert!((d.as_secs_f64() - want).abs() < 1e-9, "{s}: {d:?}");
        }
        for s in ["", "5", "s", "1x", "-1s", ".s", "1h-5m"] {
            assert!(parse_go_duration(s).is_err(), "{s:?} accepted");
        }
    }
}
