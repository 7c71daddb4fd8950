//! The beds: one node running a real `kpx agent` with pods wired to it by veth
//! pairs, and several nodes on a fabric with clients outside the cluster.
//!
//! Long because both beds share their process and namespace lifecycle code.

use std::{
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::*;

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address on a dual-stack bed ([`Cluster::add_ipv6`]).
    pub ip6: Option<Ipv6Addr>,
    /// The node-side end of the pod's veth pair.
    pub host_if: String,
    pub netns: Netns,
}

/// A running `kpx agent` (a child process), stopped on drop.
pub struct Agent {
    child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: the agent dies without any cleanup of its own (a crash, an
    /// OOM kill).
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// SIGTERM, then SIGKILL if it has not exited within 10 s.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Servers answering every TCP line and every UDP datagram with an identity.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The test bed: a node namespace and pods. Fields drop in order: agent,
/// servers, pods, node, then the work directory.
pub struct Cluster {
    pub id: String,
    /// The node's name and primary IP, its cluster CIDR and the interfaces
    /// its agent attaches to (`kpx agent` flags).
    pub node_name: String,
    pub node_ip: Ipv4Addr,
    /// The node's IPv6 address on a dual-stack bed.
    pub node_ip6: Option<Ipv6Addr>,
    /// The agent is told nothing of IPv4 (no `--node-ip`, an IPv6 cluster
    /// CIDR only): an IPv6-only node, whose addresses come from its Node
    /// object.
    pub ipv6_only: bool,
    pub cluster_cidr: String,
    pub interfaces: String,
    pub agent: Option<Agent>,
    pub servers: Vec<Servers>,
    pub pods: Vec<Pod>,
    pub node: Netns,
    pub workdir: PathBuf,
}

impl Cluster {
    /// The node's name in a one-node bed (EndpointSlices' `nodeName`).
    pub const NODE_NAME: &str = "node-1";

    /// A node and one pod per `(name, address)`.
    pub fn new(pods: &[(&str, Ipv4Addr)]) -> Result<Self> {
        reap_leftovers();
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let workdir = Path::new(WORK_ROOT).join(&id);
        fs::create_dir_all(workdir.join("manifests"))
            .with_context(|| format!("creating {}", workdir.display()))?;
        let node = Netns::create(&format!("{id}-node"))?;
        let mut cluster = Self {
            id: id.clone(),
            node_name: Self::NODE_NAME.into(),
            node_ip: GATEWAY,
            node_ip6: None,
            ipv6_only: false,
            cluster_cidr: "198.18.0.0/16".into(),
            interfaces: "kpxh*".into(),
            agent: None,
            servers: Vec::new(),
            pods: Vec::new(),
            node,
            workdir,
        };
        cluster.node.sysctl("net/ipv4/ip_forward", "1")?;
        for (name, addr) in pods {
            cluster.add_pod(name, *addr)?;
        }
        Ok(cluster)
    }

    /// Adds a pod (also while an agent runs: a new interface on the node).
    pub fn add_pod(&mut self, name: &str, addr: Ipv4Addr) -> Result<()> {
        let i = self.pods.len();
        let netns = Netns::create(&format!("{}-p{i}", self.id))?;
        let host_if = format!("kpxh{i}");
        self.wire_pod(&netns, &host_if, addr)?;
        self.pods.push(Pod {
            name: name.into(),
            ip: addr,
            ip6: None,
            host_if,
            netns,
        });
        Ok(())
    }

    /// Makes the bed dual-stack: the node gets [`GATEWAY6`] on every pod
    /// link and forwards IPv6, and each pod of `pods` its `(name, address)`
    /// with a default route through the node; the agent is told the
    /// node's IPv6 address and an IPv6 cluster CIDR ([`CLUSTER_CIDR6`]).
    /// Before [`Cluster::serve`], which then answers on both families.
    ///
    /// Service addresses (2001:2:0:ff::/64) and external ones
    /// (2001:2:0:9::/64) are routed to a veth pair that leads nowhere (both
    /// ends in the node), as a node's default route would take them, so
    /// that what no proxy translates is forwarded (and dropped) rather than
    /// answered "no route". The node's ICMPv6
    /// errors are not rate-limited: the reference's REJECTs then answer
    /// every probe, as kpx's do.
    pub fn add_ipv6(&mut self, pods: &[(&str, Ipv6Addr)]) -> Result<()> {
        self.node.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        self.node.sysctl("net/ipv6/icmp/ratelimit", "0")?;
        self.node.ip(&[
            "link", "add", "svc6", "type", "veth", "peer", "name", "svc6p",
        ])?;
        self.node.ip(&["link", "set", "svc6", "up"])?;
        self.node.ip(&["link", "set", "svc6p", "up"])?;
        for range in [SERVICE_RANGE6, EXTERNAL_RANGE6] {
            self.node
                .ip(&["-6", "route", "add", range, "dev", "svc6"])?;
        }
        for (name, addr) in pods {
            let i = self
                .pods
                .iter()
                .position(|p| p.name == *name)
                .ok_or_else(|| anyhow!("no pod {name}"))?;
            let (a, gw) = (format!("{addr}/128"), format!("{GATEWAY6}/128"));
            let pod = &self.pods[i];
            // nodad: usable at once, not after duplicate address detection.
            self.node
                .ip(&["-6", "addr", "add", &gw, "dev", &pod.host_if, "nodad"])?;
            self.node
                .ip(&["-6", "route", "add", &a, "dev", &pod.host_if])?;
            pod.netns
                .ip(&["-6", "addr", "add", &a, "dev", "eth0", "nodad"])?;
            pod.netns.ip(&["-6", "route", "add", &gw, "dev", "eth0"])?;
            pod.netns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &GATEWAY6.to_string(),
                "dev",
                "eth0",
            ])?;
            self.pods[i].ip6 = Some(*addr);
        }
        // Link-local addresses still in duplicate address detection delay
        // the first neighbour exchanges by a second or two: wait them out.
        let tentative = |ns: &Netns| {
            Command::new("ip")
                .args(["-n", &ns.name, "-6", "addr", "show", "tentative"])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false)
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && (tentative(&self.node) || self.pods.iter().any(|p| tentative(&p.netns)))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.node_ip6 = Some(GATEWAY6);
        if !self.cluster_cidr.contains(':') {
            self.cluster_cidr = format!("{},{CLUSTER_CIDR6}", self.cluster_cidr);
        }
        Ok(())
    }

    /// A veth pair between the node and `netns`, `addr` on the pod's end,
    /// the pod routing everything through the node.
    fn wire_pod(&self, netns: &Netns, host_if: &str, addr: Ipv4Addr) -> Result<()> {
        let (a, gw) = (format!("{addr}/32"), format!("{GATEWAY}/32"));
        // Created inside the node namespace, the peer moved straight into
        // the pod's: nothing ever appears in the root namespace.
        self.node.ip(&[
            "link",
            "add",
            host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns.name,
        ])?;
        self.node.ip(&["addr", "add", &gw, "dev", host_if])?;
        self.node.ip(&["link", "set", host_if, "up"])?;
        self.node.ip(&["route", "add", &a, "dev", host_if])?;
        netns.ip(&["addr", "add", &a, "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", &gw, "dev", "eth0"])?;
        netns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &GATEWAY.to_string(),
            "dev",
            "eth0",
        ])
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.workdir.join("manifests")
    }

    pub fn bpffs(&self) -> PathBuf {
        self.workdir.join("bpf")
    }

    /// Writes (or replaces) a manifest file atomically.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        let dir = self.manifests_dir();
        let tmp = dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, dir.join(file))?;
        Ok(())
    }

    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        Ok(fs::remove_file(self.manifests_dir().join(file))?)
    }

    /// Starts `kpx agent` in the node namespace on the manifests directory.
    pub fn start_agent(&mut self, kpx: &Path, extra: &[&str]) -> Result<()> {
        let dir = self.manifests_dir();
        let source = ["--manifests", dir.to_str().unwrap_or_default()];
        self.spawn_agent(kpx, &source, extra)
    }

    /// Starts `kpx agent` in the node namespace on the API server `api`
    /// (which must listen inside the node namespace, see [`Cluster::bind`]).
    pub fn start_agent_kube(
        &mut self,
        kpx: &Path,
        api: &apiserver::ApiServer,
        extra: &[&str],
    ) -> Result<()> {
        let kubeconfig = self.workdir.join("kubeconfig");
        fs::write(&kubeconfig, api.kubeconfig())?;
        let source = ["--kubeconfig", kubeconfig.to_str().unwrap_or_default()];
        self.spawn_agent(kpx, &source, extra)
    }

    /// A function binding `addr` inside the node namespace, for servers the
    /// agent must reach on the node's own loopback.
    pub fn binder(&self, addr: SocketAddr) -> impl Fn() -> Result<TcpListener> + Send + 'static {
        let path = format!("/run/netns/{}", self.node.name);
        move || {
            let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            std::thread::scope(|s| {
                s.spawn(|| {
                    // SAFETY: setns on this short-lived thread only; `file`
                    // is an open netns file. The socket stays in that netns.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error()).context("setns");
                    }
                    TcpListener::bind(addr).with_context(|| format!("binding {addr}"))
                })
                .join()
                .map_err(|_| anyhow!("bind thread panicked"))?
            })
        }
    }

    /// Starts `kpx agent` in the node namespace with `source` arguments
    /// (`--manifests DIR`, `--kubeconfig FILE`, `--config FILE`) and the
    /// bed's node settings, then `extra`; `--socket-lb=off` unless `extra`
    /// says otherwise.
    pub fn spawn_agent(&mut self, kpx: &Path, source: &[&str], extra: &[&str]) -> Result<()> {
        let log = self.workdir.join("agent.log");
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = self.node.command(kpx)?;
        cmd.arg("agent")
            .args(source)
            .arg("--bpffs")
            .arg(self.bpffs())
            .args(["--hostname-override", &self.node_name])
            .args(
                (!self.ipv6_only)
                    .then(|| self.node_ip.to_string())
                    .into_iter()
                    .chain(
                        self.node_ip6
                            .filter(|_| !self.ipv6_only)
                            .map(|ip| ip.to_string()),
                    )
                    .flat_map(|ip| ["--node-ip".to_string(), ip]),
            )
            .args([
                "--cluster-cidr",
                if self.ipv6_only {
                    CLUSTER_CIDR6
                } else {
                    &self.cluster_cidr
                },
            ])
            .args(["--interfaces", &self.interfaces])
            .args(["--poll-interval", "200ms"])
            .args(extra)
            // The socket-level load balancer acts on a cgroup: only on one
            // a test created and names (`--socket-lb-cgroup`), never on
            // the machine's root cgroup, the agent's default.
            .args(
                (!extra.iter().any(|a| a.starts_with("--socket-lb"))).then_some("--socket-lb=off"),
            )
            .env("RUST_LOG", "info,kube_client=off")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let child = cmd.spawn().context("starting kpx agent")?;
        self.agent = Some(Agent { child, log });
        Ok(())
    }

    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Agent::log_text).unwrap_or_default()
    }

    /// Starts TCP and UDP servers in pod `name` answering with its name.
    pub fn serve(&mut self, name: &str, tcp_port: u16, udp_port: u16) -> Result<()> {
        self.serve_as(name, name, tcp_port, udp_port)
    }

    /// Starts a TCP server in the node's own network namespace (a
    /// hostNetwork pod's) on `addr`, answering with `identity`.
    pub fn serve_on_node(&mut self, identity: &str, addr: SocketAddr) -> Result<()> {
        let tcp = (self.binder(addr))()?;
        tcp.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, identity) = (stop.clone(), identity.to_string());
        let thread = std::thread::spawn(move || tcp_server(tcp, &identity, &s));
        self.servers.push(Servers {
            stop,
            threads: vec![thread],
        });
        Ok(())
    }

    /// Starts TCP and UDP servers in pod `name` answering with `identity`.
    pub fn serve_as(
        &mut self,
        name: &str,
        identity: &str,
        tcp_port: u16,
        udp_port: u16,
    ) -> Result<()> {
        let pod = self.pod(name);
        let identity = identity.to_string();
        // IPv4's wildcard, and a dual-stack pod's own IPv6 address (a
        // wildcard `::` socket would take IPv4 too, as mapped addresses).
        let mut addrs = vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)];
        addrs.extend(pod.ip6.map(IpAddr::V6));
        let sockets = pod.netns.enter(move || -> Result<Vec<_>> {
            addrs
                .into_iter()
                .map(|a| {
                    let tcp = TcpListener::bind((a, tcp_port))?;
                    let udp = UdpSocket::bind((a, udp_port))?;
                    Ok((tcp, udp))
                })
                .collect()
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (tcp, udp) in sockets {
            tcp.set_nonblocking(true)?;
            {
                let (stop, identity) = (stop.clone(), identity.clone());
                threads.push(std::thread::spawn(move || {
                    tcp_server(tcp, &identity, &stop)
                }));
            }
            udp.set_read_timeout(Some(Duration::from_millis(100)))?;
            {
                let (stop, identity) = (stop.clone(), identity.clone());
                threads.push(std::thread::spawn(move || {
                    udp_server(udp, &identity, &stop)
                }));
            }
        }
        self.servers.push(Servers { stop, threads });
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.stop();
        }
        self.servers.clear();
        self.pods.clear();
        let bpf = self.bpffs();
        if let Ok(c) = std::ffi::CString::new(bpf.as_os_str().as_encoded_bytes()) {
            // SAFETY: valid path; detaching a mount this test bed made.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

/// The network between nodes: one L2 segment (a bridge in its own
/// namespace) that node and client namespaces join by veth pairs. The
/// bridge's own address answers ARP as the nodes' next hop for service
/// addresses, but the fabric forwards nothing (ip_forward stays off), so no
/// packet goes further than the bed's namespaces.
pub struct Fabric {
    pub netns: Netns,
    ports: AtomicU32,
}

/// The fabric's subnet: nodes are `.1`, `.2`, ..., outside clients `.100` up.
pub const FABRIC_PREFIX: u8 = 24;
/// The fabric bridge's own address (a next hop that routes nowhere).
pub const FABRIC_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 254);

impl Fabric {
    pub fn new(id: &str) -> Result<Self> {
        let netns = Netns::create(&format!("{id}-fab"))?;
        netns.ip(&["link", "add", "br0", "type", "bridge"])?;
        netns.ip(&[
            "addr",
            "add",
            &format!("{FABRIC_GW}/{FABRIC_PREFIX}"),
            "dev",
            "br0",
        ])?;
        netns.ip(&["link", "set", "br0", "up"])?;
        Ok(Self {
            netns,
            ports: AtomicU32::new(0),
        })
    }

    /// Plugs `ns` into the fabric as `eth0` with address `addr`.
    pub fn plug(&self, ns: &Netns, addr: Ipv4Addr) -> Result<()> {
        let port = format!("fp{}", self.ports.fetch_add(1, Ordering::Relaxed));
        self.netns.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.netns.ip(&["link", "set", &port, "master", "br0"])?;
        self.netns.ip(&["link", "set", &port, "up"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{addr}/{FABRIC_PREFIX}"),
            "dev",
            "eth0",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])
    }
}

/// Two (or more) nodes on a [`Fabric`], each with its pods, and clients
/// outside the cluster. Pods of node `i` (from 1) are in 198.18.i.0/24, the
/// cluster CIDR is 198.18.0.0/17, node `i` is 198.18.128.i and service
/// addresses (198.19.0.0/16) are routed to node 1 by the outside clients and
/// to the fabric by the nodes, as a default route would.
pub struct MultiNode {
    pub nodes: Vec<Cluster>,
    pub clients: Vec<Netns>,
    pub fabric: Fabric,
    /// Descriptors a test ties to the bed's life (XDP programs and links
    /// on its interfaces).
    pub held: Vec<std::os::fd::OwnedFd>,
}

pub const MULTI_CLUSTER_CIDR: &str = "198.18.0.0/17";
/// A dual-stack bed's IPv6 service addresses and external (LB, external
/// IP) addresses.
pub const SERVICE_RANGE6: &str = "2001:2:0:ff::/64";
pub const EXTERNAL_RANGE6: &str = "2001:2:0:9::/64";
pub const SERVICE_RANGE: &str = "198.19.0.0/16";

impl MultiNode {
    /// `pods[i]` are node `i + 1`'s pods (name, address).
    pub fn new(pods: &[&[(&str, Ipv4Addr)]]) -> Result<Self> {
        let mut nodes: Vec<Cluster> = Vec::new();
        for node_pods in pods {
            nodes.push(Cluster::new(node_pods)?);
        }
        let fabric = Fabric::new(&nodes.first().map_or_else(String::new, |n| n.id.clone()))?;
        let mut bed = Self {
            nodes,
            clients: Vec::new(),
            fabric,
            held: Vec::new(),
        };
        for i in 0..bed.nodes.len() {
            let ip = Self::node_ip(i + 1);
            let node = &mut bed.nodes[i];
            bed.fabric.plug(&node.node, ip)?;
            node.node_name = format!("node-{}", i + 1);
            node.node_ip = ip;
            node.cluster_cidr = MULTI_CLUSTER_CIDR.into();
            node.interfaces = "kpxh*,eth0".into();
            let via = FABRIC_GW.to_string();
            node.node
                .ip(&["route", "add", SERVICE_RANGE, "via", &via, "dev", "eth0"])?;
            for j in 0..pods.len() {
                if j != i {
                    let other = Self::node_ip(j + 1).to_string();
                    node.node.ip(&[
                        "route",
                        "add",
                        &format!("198.18.{}.0/24", j + 1),
                        "via",
                        &other,
                        "dev",
                        "eth0",
                    ])?;
                }
            }
        }
        Ok(bed)
    }

    /// Node `i`'s (from 1) address on the fabric.
    pub fn node_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 128, i as u8)
    }

    /// An outside client (not in the cluster CIDR) at `addr` on the fabric,
    /// reaching service addresses through node 1.
    pub fn add_client(&mut self, addr: Ipv4Addr) -> Result<&Netns> {
        let id = self
            .nodes
            .first()
            .map_or_else(String::new, |n| n.id.clone());
        let ns = Netns::create(&format!("{id}-c{}", self.clients.len()))?;
        self.fabric.plug(&ns, addr)?;
        let via = Self::node_ip(1).to_string();
        ns.ip(&["route", "add", SERVICE_RANGE, "via", &via, "dev", "eth0"])?;
        self.clients.push(ns);
        Ok(self.clients.last().expect("just pushed"))
    }

    /// Node `i`'s (from 1) IPv6 address on the fabric (2001:2:0:180::/64,
    /// outside the cluster CIDR), on a dual-stack bed.
    pub fn node_ip6(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, 0x180, 0, 0, 0, i as u16)
    }

    /// Outside client `n`'s (from 0, in [`MultiNode::add_client`]'s order)
    /// IPv6 address on a dual-stack bed's fabric.
    pub fn client_ip6(n: usize) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, 0x180, 0, 0, 0, 0x100 + n as u16)
    }

    /// Makes the bed dual-stack: `pods[i]` are node `i + 1`'s pods' IPv6
    /// addresses (in 2001:2:0:<i + 1>::/64, of the IPv6 cluster CIDR; see
    /// [`Cluster::add_ipv6`]); node `i` gets [`MultiNode::node_ip6`] on the
    /// fabric (its `--node-ip`, beside its IPv4 one) and routes to the
    /// other nodes' pods through them; the clients added so far get
    /// [`MultiNode::client_ip6`]. Start the pods' servers after it (they
    /// bind the pods' IPv6 addresses).
    pub fn add_ipv6(&mut self, pods: &[&[(&str, Ipv6Addr)]]) -> Result<()> {
        let count = self.nodes.len();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.add_ipv6(pods.get(i).copied().unwrap_or_default())?;
            let own = Self::node_ip6(i + 1);
            node.node.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{own}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            node.node_ip6 = Some(own);
            for j in (0..count).filter(|&j| j != i) {
                node.node.ip(&[
                    "-6",
                    "route",
                    "add",
                    &format!("2001:2:0:{:x}::/64", j + 1),
                    "via",
                    &Self::node_ip6(j + 1).to_string(),
                    "dev",
                    "eth0",
                ])?;
            }
        }
        for (n, client) in self.clients.iter().enumerate() {
            let addr = format!("{}/64", Self::client_ip6(n));
            client.ip(&["-6", "addr", "add", &addr, "dev", "eth0", "nodad"])?;
        }
        Ok(())
    }

    /// Writes the same manifest for every node's agent.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        for n in &self.nodes {
            n.write_manifest(file, yaml)?;
        }
        Ok(())
    }

    /// The pod `name`, on whichever node.
    pub fn pod(&self, name: &str) -> &Pod {
        self.nodes
            .iter()
            .flat_map(|n| &n.pods)
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }
}

/// What translates a [`MultiNode`]'s service traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    /// `kpx agent` on every node.
    Kpx,
    /// kube-proxy's iptables mode: `kpx iptables-rules` loaded with
    /// `iptables-nft-restore` (nf_tables backend) in every node.
    Iptables,
    /// kube-proxy's nftables mode: `kpx iptables-rules --mode nftables`
    /// loaded with `nft -f`.
    Nftables,
}

impl Proxy {
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Kpx => "kpx",
            Proxy::Iptables => "iptables",
            Proxy::Nftables => "nftables",
        }
    }
}

impl MultiNode {
    /// Puts `proxy` in charge of every node, from the manifests written
    /// so far: starts the agents, or generates and loads the reference
    /// rules (with the same node settings the agents get).
    pub fn start_proxy(&mut self, proxy: Proxy, kpx: &Path) -> Result<()> {
        for n in &mut self.nodes {
            match proxy {
                Proxy::Kpx => n.start_agent(kpx, &[])?,
                Proxy::Iptables | Proxy::Nftables => n.load_reference(proxy, kpx)?,
            }
        }
        Ok(())
    }
}

impl Cluster {
    /// The rules kube-proxy would install here for the bed's manifests
    /// (`kpx iptables-rules`, run inside the node namespace so that it
    /// sees the node's addresses), in `iptables-restore` or `nft` form.
    pub fn reference_rules(&self, proxy: Proxy, kpx: &Path) -> Result<String> {
        let dir = self.manifests_dir();
        self.reference_rules_from(proxy, kpx, &["--manifests", &dir.to_string_lossy()])
    }

    /// As [`Cluster::reference_rules`], from another `source`
    /// (`--kubeconfig FILE` for an API server).
    pub fn reference_rules_from(
        &self,
        proxy: Proxy,
        kpx: &Path,
        source: &[&str],
    ) -> Result<String> {
        self.family_rules(proxy, kpx, source, "ipv4")
    }

    /// The rules of `family` (`ipv4`, `ipv6`) for the bed's manifests.
    fn family_rules(
        &self,
        proxy: Proxy,
        kpx: &Path,
        source: &[&str],
        family: &str,
    ) -> Result<String> {
        let mode = if proxy == Proxy::Nftables {
            "nftables"
        } else {
            "iptables"
        };
        let out = self
            .node
            .command(kpx)?
            .arg("iptables-rules")
            .args(["--mode", mode, "--ip-family", family])
            .args(source)
            .args(["--hostname-override", &self.node_name])
            .args(["--bind-address", &self.node_ip.to_string()])
            .args(
                self.node_ip6
                    .iter()
                    .flat_map(|ip| ["--node-ip".to_string(), ip.to_string()]),
            )
            .args(["--cluster-cidr", &self.cluster_cidr])
            .env("RUST_LOG", "warn")
            .output()
            .context("running kpx iptables-rules")?;
        if !out.status.success() {
            bail!(
                "kpx iptables-rules failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Loads the reference rules into the node namespace: on a dual-stack
    /// bed both families' (iptables and ip6tables, or nftables' `ip` and
    /// `ip6` tables), as kube-proxy runs one proxier per family.
    pub fn load_reference(&self, proxy: Proxy, kpx: &Path) -> Result<()> {
        let dir = self.manifests_dir();
        let source = ["--manifests", &*dir.to_string_lossy()];
        let families: &[&str] = if self.node_ip6.is_some() {
            &["ipv4", "ipv6"]
        } else {
            &["ipv4"]
        };
        for family in families {
            let rules = self.family_rules(proxy, kpx, &source, family)?;
            let (program, args): (&str, &[&str]) = match (proxy, *family) {
                (Proxy::Nftables, _) => ("nft", &["-f", "-"]),
                (_, "ipv6") => ("ip6tables-nft-restore", &["--noflush"]),
                _ => ("iptables-nft-restore", &["--noflush"]),
            };
            self.pipe_into(program, args, &rules)?;
        }
        Ok(())
    }

    /// Runs `program args` in the node namespace with `input` on stdin.
    pub fn pipe_into(&self, program: &str, args: &[&str], input: &str) -> Result<()> {
        let mut child = self
            .node
            .command(Path::new(program))?
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Removes namespaces and work directories left by test beds of processes
/// that no longer exist (a test killed before it could clean up).
fn reap_leftovers() {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    let pid_of = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|r| r.split('x').next())
            .map(str::to_string)
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if let Some(pid) = pid_of(name) {
                if !alive(&pid) {
                    let _ = ip(&["netns", "del", name]);
                }
            }
        }
    }
    if let Ok(entries) = fs::read_dir(WORK_ROOT) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = pid_of(&name) {
                if !alive(&pid) {
                    if let Ok(c) =
                        std::ffi::CString::new(e.path().join("bpf").as_os_str().as_encoded_bytes())
                    {
                        // SAFETY: valid path of a dead test bed's mount.
                        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                    }
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
}
