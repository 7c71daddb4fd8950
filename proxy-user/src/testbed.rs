//! A test bed of network namespaces: one node running a real `kpx agent`,
//! pods wired to it by veth pairs, real TCP/UDP servers answering with their
//! identity, and clients. Used by the end-to-end tests and the demo.
//!
//! Everything lives in namespaces created here, with no link to the root
//! namespace and no route out; addresses come from 198.18.0.0/15. Dropping a
//! [`Cluster`] stops its agent and servers and removes its namespaces, mounts
//! and files, also when a test fails.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
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

pub mod apiserver;

/// The node's address on every pod link (each pod routes through it).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const WORK_ROOT: &str = "/run/kpx-testbed";
const PREFIX: &str = "kpxtb";

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Writes a sysctl of this namespace (e.g. `net/ipv4/ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{key}");
        let value = value.to_string();
        self.enter(move || fs::write(&path, value).with_context(|| format!("writing {path}")))?
    }

    fn file(&self) -> Result<fs::File> {
        fs::File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening netns {}", self.name))
    }

    /// Runs `f` on a thread that has joined this namespace. Sockets created
    /// there stay in the namespace whichever thread uses them later.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = self.file()?;
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on this thread only (network namespaces are
                // per thread); `file` is an open netns file.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("setns");
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow!("thread in netns panicked"))?
        })
    }

    /// A command that will run inside this namespace (same mount namespace
    /// as the caller, so bpffs mounts and files are shared).
    pub fn command(&self, program: &Path) -> Result<Command> {
        let file = self.file()?;
        let mut cmd = Command::new(program);
        // SAFETY: between fork and exec only setns, an async-signal-safe
        // syscall, runs; `file` stays open in the closure.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
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
    pub cluster_cidr: String,
    pub interfaces: String,
    pub agent: Option<Agent>,
    pub servers: Vec<Servers>,
    pub pods: Vec<Pod>,
    pub node: Netns,
    pub workdir: PathBuf,
}

impl Cluster {
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
            node_name: "node-1".into(),
            node_ip: GATEWAY,
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
            host_if,
            netns,
        });
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
    /// bed's node settings, then `extra`.
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
            .args([
                "--hostname-override",
                &self.node_name,
                "--node-ip",
                &self.node_ip.to_string(),
            ])
            .args(["--cluster-cidr", &self.cluster_cidr])
            .args(["--interfaces", &self.interfaces])
            .args(["--poll-interval", "200ms"])
            .args(extra)
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
        let (tcp, udp) = pod.netns.enter(move || -> Result<_> {
            let tcp = TcpListener::bind(("0.0.0.0", tcp_port))?;
            let udp = UdpSocket::bind(("0.0.0.0", udp_port))?;
            Ok((tcp, udp))
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        tcp.set_nonblocking(true)?;
        {
            let (stop, identity) = (stop.clone(), identity.clone());
            threads.push(std::thread::spawn(move || {
                tcp_server(tcp, &identity, &stop)
            }));
        }
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                udp_server(udp, &identity, &stop)
            }));
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
}

pub const MULTI_CLUSTER_CIDR: &str = "198.18.0.0/17";
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
        let mode = if proxy == Proxy::Nftables {
            "nftables"
        } else {
            "iptables"
        };
        let out = self
            .node
            .command(kpx)?
            .arg("iptables-rules")
            .args(["--mode", mode])
            .args(source)
            .args(["--hostname-override", &self.node_name])
            .args(["--bind-address", &self.node_ip.to_string()])
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

    /// Loads the reference rules into the node namespace.
    pub fn load_reference(&self, proxy: Proxy, kpx: &Path) -> Result<()> {
        let rules = self.reference_rules(proxy, kpx)?;
        let (program, args): (&str, &[&str]) = match proxy {
            Proxy::Nftables => ("nft", &["-f", "-"]),
            _ => ("iptables-nft-restore", &["--noflush"]),
        };
        self.pipe_into(program, args, &rules)
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

fn tcp_server(listener: TcpListener, identity: &str, stop: &AtomicBool) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let identity = identity.to_string();
                conns.push(std::thread::spawn(move || tcp_conn(stream, &identity)));
            }
            // WouldBlock, or a transient accept error.
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
        conns.retain(|c: &JoinHandle<()>| !c.is_finished());
    }
}

/// Answers each line with the identity (and to `addr?`, the identity and
/// the client address it sees); ends at EOF, error, or 30 s idle.
fn tcp_conn(stream: TcpStream, identity: &str) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |p| p.to_string());
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let answer = if line.trim_end().ends_with("addr?") {
                    format!("{identity} {peer}\n")
                } else {
                    format!("{identity}\n")
                };
                if writer.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }
}

fn udp_server(sock: UdpSocket, identity: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let answer = if buf[..n].ends_with(b"addr?") {
                format!("{identity} {from}")
            } else {
                identity.to_string()
            };
            let _ = sock.send_to(answer.as_bytes(), from);
        }
    }
}

/// A TCP connection made from inside a pod, asking for identities.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    pub fn open(from: &Netns, to: SocketAddrV4, timeout: Duration) -> Result<Self> {
        let stream =
            from.enter(move || TcpStream::connect_timeout(&SocketAddr::V4(to), timeout))??;
        Self::new(stream, timeout)
    }

    fn new(stream: TcpStream, timeout: Duration) -> Result<Self> {
        stream.set_read_timeout(Some(timeout))?;
        // A stalled bulk send (a black-holed path) fails instead of hanging.
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    pub fn peer(&self) -> Result<SocketAddr> {
        Ok(self.writer.peer_addr()?)
    }

    /// Sends a line, returns the server's identity.
    pub fn ask(&mut self) -> Result<String> {
        self.ask_bulk(0)
    }

    /// Sends a line of `bytes` filler bytes (a bulk transfer), returns the
    /// server's identity once it has read all of it.
    pub fn ask_bulk(&mut self, bytes: usize) -> Result<String> {
        let mut line = vec![b'x'; bytes];
        line.extend_from_slice(b"who?\n");
        self.writer.write_all(&line)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        Ok(line.trim().to_string())
    }
}

/// Who answered and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub identity: String,
    pub client: SocketAddr,
}

impl Seen {
    fn parse(answer: &str) -> Result<Self> {
        let (identity, client) = answer
            .trim()
            .split_once(' ')
            .ok_or_else(|| anyhow!("unexpected answer {answer:?}"))?;
        Ok(Self {
            identity: identity.into(),
            client: client.parse()?,
        })
    }
}

impl Conn {
    /// Asks who answers and which client address it sees.
    pub fn who(&mut self) -> Result<Seen> {
        self.writer.write_all(b"addr?\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        Seen::parse(&line)
    }
}

/// One TCP connection from `from` to `to`: who answered, from where it saw
/// the client, and the client's own (local) address.
pub fn tcp_who(from: &Netns, to: SocketAddrV4, timeout: Duration) -> Result<(Seen, SocketAddr)> {
    let mut c = Conn::open(from, to, timeout)?;
    let local = c.writer.local_addr()?;
    Ok((c.who()?, local))
}

/// One UDP request from a fresh socket in `from`: who answered, the
/// client address it saw, and where the answer came from.
pub fn udp_who(from: &Netns, to: SocketAddrV4, timeout: Duration) -> Result<(Seen, SocketAddr)> {
    from.enter(move || -> Result<(Seen, SocketAddr)> {
        let sock = UdpSocket::bind(("0.0.0.0", 0))?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send_to(b"addr?", to)?;
        let mut buf = [0u8; 512];
        let (len, src) = sock.recv_from(&mut buf)?;
        Ok((Seen::parse(&String::from_utf8_lossy(&buf[..len]))?, src))
    })?
}

/// One TCP connection: connect, ask once, close. Returns the identity.
pub fn tcp_ask(from: &Netns, to: SocketAddrV4, timeout: Duration) -> Result<String> {
    Conn::open(from, to, timeout)?.ask()
}

/// `n` TCP connections from one pod, each asked once; identities in order.
pub fn tcp_ask_many(
    from: &Netns,
    to: SocketAddrV4,
    n: usize,
    timeout: Duration,
) -> Result<Vec<String>> {
    from.enter(move || -> Result<Vec<String>> {
        (0..n)
            .map(|_| {
                let stream = TcpStream::connect_timeout(&SocketAddr::V4(to), timeout)?;
                Conn::new(stream, timeout)?.ask()
            })
            .collect()
    })?
}

/// An answer to a UDP request.
#[derive(Clone, Debug)]
pub struct UdpAnswer {
    pub identity: String,
    /// Where the answer came from (must be the address asked).
    pub from: SocketAddr,
    /// The client's source port (the kernel may reuse one: same flow).
    pub local_port: u16,
}

/// `n` UDP requests, each from a fresh socket.
pub fn udp_ask_many(
    from: &Netns,
    to: SocketAddrV4,
    n: usize,
    timeout: Duration,
) -> Result<Vec<UdpAnswer>> {
    from.enter(move || -> Result<Vec<UdpAnswer>> {
        (0..n)
            .map(|_| {
                let sock = UdpSocket::bind(("0.0.0.0", 0))?;
                sock.set_read_timeout(Some(timeout))?;
                sock.send_to(b"who?", to)?;
                let mut buf = [0u8; 512];
                let (len, src) = sock.recv_from(&mut buf)?;
                Ok(UdpAnswer {
                    identity: String::from_utf8_lossy(&buf[..len]).into_owned(),
                    from: src,
                    local_port: sock.local_addr()?.port(),
                })
            })
            .collect()
    })?
}

/// Polls `f` every 50 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Service and EndpointSlice YAML for a ClusterIP service with a TCP port
/// `http` and a UDP port `dns`, all endpoints ready.
pub fn service_yaml(
    name: &str,
    vip: Ipv4Addr,
    tcp: (u16, u16),
    udp: (u16, u16),
    endpoints: &[Ipv4Addr],
) -> String {
    let eps: Vec<(Ipv4Addr, &str)> = endpoints.iter().map(|e| (*e, READY)).collect();
    service_yaml_with(name, vip, tcp, udp, &eps, "")
}

/// EndpointSlice conditions of a ready endpoint.
pub const READY: &str = "{ready: true, serving: true, terminating: false}";
/// ... of an endpoint shutting down that still serves.
pub const TERMINATING: &str = "{ready: false, serving: true, terminating: true}";

/// As [`service_yaml`], with each endpoint's conditions and extra lines for
/// the Service's spec (e.g. `sessionAffinity: ClientIP`).
pub fn service_yaml_with(
    name: &str,
    vip: Ipv4Addr,
    tcp: (u16, u16),
    udp: (u16, u16),
    endpoints: &[(Ipv4Addr, &str)],
    spec_extra: &str,
) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(e, cond)| format!("- addresses: [\"{e}\"]\n  conditions: {cond}\n"))
        .collect();
    let extra: String = spec_extra.lines().map(|l| format!("  {l}\n")).collect();
    let eps = if eps.is_empty() {
        " []\n".to_string()
    } else {
        format!("\n{eps}")
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {vip}
{extra}  ports:
  - {{name: http, protocol: TCP, port: {}, targetPort: {}}}
  - {{name: dns, protocol: UDP, port: {}, targetPort: {}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: {}}}
- {{name: dns, protocol: UDP, port: {}}}
endpoints:{eps}",
        tcp.0, tcp.1, udp.0, udp.1, tcp.1, udp.1
    )
}

/// An endpoint of [`service_manifest`]: its address, node and conditions.
pub struct Ep {
    pub addr: Ipv4Addr,
    pub node: &'static str,
    pub conditions: &'static str,
}

impl Ep {
    /// A ready endpoint on `node`.
    pub fn ready(addr: Ipv4Addr, node: &'static str) -> Self {
        Self {
            addr,
            node,
            conditions: READY,
        }
    }
}

/// A Service in namespace `default` (its `spec` lines and `status` block
/// given) and one EndpointSlice for it, with the ports `http` TCP 8080 and
/// `dns` UDP 5353 unless `slice_ports` lists others.
pub fn service_manifest(
    name: &str,
    spec: &str,
    status: &str,
    slice_ports: &str,
    eps: &[Ep],
) -> String {
    let eps: String = eps
        .iter()
        .map(|e| {
            format!(
                "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {}\n",
                e.addr, e.node, e.conditions
            )
        })
        .collect();
    let eps = if eps.is_empty() {
        "endpoints: []\n".to_string()
    } else {
        format!("endpoints:\n{eps}")
    };
    let slice_ports = if slice_ports.is_empty() {
        "- {name: http, protocol: TCP, port: 8080}\n- {name: dns, protocol: UDP, port: 5353}"
    } else {
        slice_ports
    };
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
{spec}
{status}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
{slice_ports}
{eps}"
    )
}
