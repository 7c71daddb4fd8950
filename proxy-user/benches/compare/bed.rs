//! The benchmark's cluster: one node namespace, a client pod and ten backend
//! pods on veth pairs (the test bed of the end-to-end tests), and the API
//! server stand-in holding N ClusterIP Services of 10 endpoints each.
//!
//! Every Service has its own 10 endpoint (address, port) pairs, as in a real
//! cluster: addresses cycle through 198.18.16.0-198.18.255.255 and the
//! target port moves up by one each time the pool wraps. Only the endpoints
//! of the services that traffic is sent to exist as addresses of the
//! backend pods; the rest are programmed but never reached.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};
use testbed::{apiserver::ApiServer, Cluster, Netns};

use crate::load::Servers;

pub const ENDPOINTS: u32 = 10;
pub const NAMESPACE: &str = "bench";
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The client's second address ([`Bed::new`]).
pub const CLIENT_DIRECT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const POOL_BASE: u32 = u32::from_be_bytes([198, 18, 16, 0]);
const POOL: u32 = (256 - 16) * 256;
pub const SERVICE_PORT: u16 = 80;
const TARGET_BASE: u16 = 8080;

pub fn service_name(i: u32) -> String {
    // Zero-padded: kube-proxy orders its rules by name, so service 0 is
    // the first rule of KUBE-SERVICES and service N-1 the last.
    format!("svc-{i:05}")
}

pub fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes([198, 19, 0, 1]) + i)
}

/// Endpoint `j` of service `i`.
pub fn endpoint(i: u32, j: u32) -> SocketAddrV4 {
    let k = i * ENDPOINTS + j;
    SocketAddrV4::new(
        Ipv4Addr::from(POOL_BASE + k % POOL),
        TARGET_BASE + (k / POOL) as u16,
    )
}

pub fn service(i: u32) -> Value {
    let vip = vip(i).to_string();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": service_name(i), "namespace": NAMESPACE },
        "spec": { "type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                  "ports": [{ "name": "http", "protocol": "TCP", "port": SERVICE_PORT,
                              "targetPort": endpoint(i, 0).port() }] },
    })
}

/// Service `i`'s EndpointSlice, endpoint `j` replaced by `replace` if given.
pub fn slice(i: u32, replace: Option<(u32, Ipv4Addr)>) -> Value {
    let eps: Vec<Value> = (0..ENDPOINTS)
        .map(|j| {
            let a = match replace {
                Some((r, a)) if r == j => a,
                _ => *endpoint(i, j).ip(),
            };
            json!({ "addresses": [a.to_string()],
                    "conditions": { "ready": true, "serving": true, "terminating": false },
                    "nodeName": "node-1" })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": format!("{}-1", service_name(i)), "namespace": NAMESPACE,
                      "labels": { "kubernetes.io/service-name": service_name(i) } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "protocol": "TCP", "port": endpoint(i, 0).port() }],
        "endpoints": eps,
    })
}

/// The `r`th address outside the endpoint pool, for the endpoint changes.
pub fn fresh_endpoint(r: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes([198, 18, 1, 1]) + r % 3000)
}

pub struct Bed {
    pub n: u32,
    /// Field order is drop order: servers, then the API server, then the
    /// namespaces (the cluster).
    _servers: Vec<Servers>,
    pub api: ApiServer,
    pub cluster: Cluster,
}

impl Bed {
    /// A fresh node with N services in the API server and nothing loaded.
    pub fn new(n: u32) -> Result<Self> {
        let mut pods = vec![("client".to_string(), CLIENT)];
        for j in 0..ENDPOINTS {
            pods.push((format!("b{j}"), Ipv4Addr::new(198, 18, 0, 10 + j as u8)));
        }
        let pods: Vec<(&str, Ipv4Addr)> = pods.iter().map(|(n, a)| (n.as_str(), *a)).collect();
        let cluster = Cluster::new(&pods)?;
        let client = &cluster.pod("client").netns;
        // Half a million short connections in one run: the client may reuse
        // its ports as soon as the server has closed.
        client.sysctl("net/ipv4/ip_local_port_range", "1024 65000")?;
        // A second address of the client's for its connections straight to
        // endpoints taken in turn with ones through their service: tc's
        // flows through the service leave conntrack entries whose reply
        // tuple a direct connection from the same address could meet.
        client.ip(&["addr", "add", &format!("{CLIENT_DIRECT}/32"), "dev", "eth0"])?;
        cluster.node.ip(&[
            "route",
            "add",
            &format!("{CLIENT_DIRECT}/32"),
            "dev",
            &cluster.pod("client").host_if,
        ])?;
        let mut servers = Vec::new();
        for j in 0..ENDPOINTS {
            let pod = cluster.pod(&format!("b{j}"));
            // The servers close first, so TIME_WAIT piles up on their side:
            // hundreds of thousands of sockets by the last phase (the hash
            // table of established sockets is the kernel's, shared by every
            // namespace), which made every later phase's socket lookups
            // slower than the no-proxy limit measured before them. A bound
            // per namespace keeps each phase's tables alike.
            pod.netns.sysctl("net/ipv4/tcp_max_tw_buckets", "4096")?;
            // The first and last services' endpoint j live in pod j.
            let mine = [endpoint(0, j), endpoint(n - 1, j)];
            let mut addrs: Vec<Ipv4Addr> = mine.iter().map(|e| *e.ip()).collect();
            let mut ports: Vec<u16> = mine.iter().map(|e| e.port()).collect();
            addrs.dedup();
            ports.dedup();
            for a in addrs {
                let a = format!("{a}/32");
                pod.netns.ip(&["addr", "add", &a, "dev", "eth0"])?;
                cluster
                    .node
                    .ip(&["route", "add", &a, "dev", &pod.host_if])?;
            }
            servers.push(Servers::start(&pod.netns, &ports)?);
        }
        let api = ApiServer::start_with(cluster.binder("127.0.0.1:6443".parse()?))?;
        for i in 0..n {
            api.apply(service(i))
                .with_context(|| format!("storing service {i}"))?;
            api.apply(slice(i, None))?;
        }
        Ok(Self {
            n,
            _servers: servers,
            api,
            cluster,
        })
    }

    pub fn client(&self) -> &Netns {
        &self.cluster.pod("client").netns
    }

    /// A backend pod's own address: traffic that is not for a service.
    pub fn pod_ip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.cluster.pod("b0").ip, TARGET_BASE)
    }

    /// The last service's endpoints, dialled directly.
    pub fn last_endpoints(&self) -> Vec<SocketAddrV4> {
        (0..ENDPOINTS).map(|j| endpoint(self.n - 1, j)).collect()
    }

    pub fn first_vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(vip(0), SERVICE_PORT)
    }

    pub fn last_vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(vip(self.n - 1), SERVICE_PORT)
    }

    /// The service whose endpoint the change step replaces.
    pub fn changed(&self) -> u32 {
        self.n / 2
    }

    /// Writes a kubeconfig for the API server; returns its path.
    pub fn kubeconfig(&self) -> Result<std::path::PathBuf> {
        let p = self.cluster.workdir.join("kubeconfig");
        std::fs::write(&p, self.api.kubeconfig())?;
        Ok(p)
    }
}
