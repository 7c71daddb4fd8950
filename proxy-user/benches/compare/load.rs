//! The traffic: backend servers and a compiled load generator, like
//! netperf's TCP_CRR, TCP_RR and TCP_STREAM.
//!
//! The generator runs on one thread that joins the client pod's namespace
//! and is pinned to CPU 0, and so are the servers: one connection at a time,
//! client and server take turns on one core (across two cores every packet
//! would also cost a cross-CPU wake-up, noise that is not the proxy's), and
//! each server handles its connections in turn.
//!
//! Protocol, by a connection's first byte: `C` is answered with one byte and
//! the server closes (so TIME_WAIT stays on the servers and the client's
//! ports are free again at once); `S` is a sink (the server reads to EOF,
//! then answers the byte count as 8 bytes); anything else is echoed back,
//! one read at a time, until the client closes.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use testbed::Netns;

/// Client and servers share a core (see above).
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 0;

/// Pins the calling thread to `cpu` (best effort on a 1-CPU machine).
fn pin(cpu: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
    // sched_setaffinity only touch this set and the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % cpus, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Whether `fd` becomes readable within `ms` milliseconds.
fn readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// Servers on `ports` in one pod, stopped (and joined) on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(pod: &Netns, ports: &[u16]) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &port in ports {
            let listener = pod
                .enter(move || TcpListener::bind(("0.0.0.0", port)))?
                .with_context(|| format!("binding port {port} in {}", pod.name))?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || serve(listener, &stop)));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, stop: &AtomicBool) {
    pin(SERVER_CPU);
    let fd = listener.as_raw_fd();
    // One buffer for every connection: zeroing 256 KiB per connection cost
    // the no-proxy limit itself 4 µs of its 33 µs and flushed the caches
    // the path under test uses (`perf`: glibc's memset, 13% of the core).
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if !readable(fd, 100) {
            continue;
        }
        if let Ok((conn, _)) = listener.accept() {
            let _ = handle(conn, &mut buf, stop);
        }
    }
}

fn handle(mut conn: TcpStream, buf: &mut [u8], stop: &AtomicBool) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    // A stuck client cannot hold a server forever.
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let n = conn.read(buf)?;
    if n == 0 {
        return Ok(());
    }
    if buf[0] == b'C' {
        return conn.write_all(b"c");
    }
    if buf[0] == b'S' {
        let mut total = (n - 1) as u64;
        while !stop.load(Ordering::Relaxed) {
            match conn.read(buf)? {
                0 => break,
                k => total += k as u64,
            }
        }
        return conn.write_all(&total.to_be_bytes());
    }
    conn.write_all(&buf[..n])?;
    while !stop.load(Ordering::Relaxed) {
        match conn.read(buf)? {
            0 => break,
            k => conn.write_all(&buf[..k])?,
        }
    }
    Ok(())
}

/// A measured rate, with latencies of the exchange where it has one.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Rate {
    /// Transactions per second (connections, round trips), or Gbit/s for bulk.
    pub rate: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// TCP_CRR: the `connect()` call alone (the handshake, and with socket
    /// load balancing its translation), p50 in µs.
    #[serde(default)]
    pub connect_us: Option<f64>,
    /// Failed attempts (refused, timed out, reset) during the runs.
    pub errors: u64,
}

/// One target of [`crr_in_turn`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct InTurn {
    /// Connections per second of the time spent on this target.
    pub rate: f64,
    /// The `connect()` call's p50, µs.
    pub connect_us: f64,
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// connect, 1-byte request and response, close (TCP_CRR)
    Crr,
    /// 1-byte request/response on one established connection (TCP_RR)
    Rr,
    /// one connection streaming 256 KiB writes (TCP_STREAM), in Gbit/s
    Bulk,
}

/// `runs` runs of `secs` seconds each from `client` to `to`; the run with
/// the median rate is reported (its own percentiles).
pub fn measure(client: &Netns, to: SocketAddrV4, kind: Kind, runs: u32, secs: f64) -> Result<Rate> {
    let mut results = Vec::new();
    for _ in 0..runs {
        let d = Duration::from_secs_f64(secs);
        let r = client.enter(move || {
            pin(CLIENT_CPU);
            match kind {
                Kind::Crr => crr(to, d),
                Kind::Rr => rr(to, d),
                Kind::Bulk => bulk(to, d),
            }
        })??;
        results.push(r);
    }
    results.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let errors = results.iter().map(|r| r.errors).sum();
    let mut median = results.get(results.len() / 2).cloned().context("no runs")?;
    median.errors = errors;
    Ok(median)
}

fn connect(to: SocketAddrV4) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

/// Linux's `IP_BIND_ADDRESS_NO_PORT`: a bound socket's port is chosen at
/// `connect()`, as an unbound one's is.
const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;

/// A blocking `connect()` (at most 2 s) from the client's address `from`
/// to `to`, set up as [`connect`]'s connection is.
fn connect_from(from: Ipv4Addr, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let err = std::io::Error::last_os_error;
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let (src, dst) = (sockaddr(SocketAddrV4::new(from, 0)), sockaddr(to));
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err());
    }
    // SAFETY: `fd` is a socket just created and owned by nothing else.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: socket options and addresses of the sizes given, valid for
    // each call, on the socket `s` owns.
    unsafe {
        let opt = |level, name, v: *const libc::c_void, len: usize| {
            libc::setsockopt(fd, level, name, v, len as libc::socklen_t)
        };
        if opt(libc::IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, (&raw const one).cast(), 4) < 0
            // A blocking connect() waits at most SO_SNDTIMEO.
            || opt(
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>(),
            ) < 0
            || libc::bind(fd, (&raw const src).cast(), len) < 0
            || libc::connect(fd, (&raw const dst).cast(), len) < 0
        {
            return Err(err());
        }
    }
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

fn percentile(sorted: &[Duration], p: f64) -> Option<f64> {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map(|d| d.as_secs_f64() * 1e6)
}

impl Rate {
    /// Transactions per second and latency percentiles of one run.
    fn of(mut lat: Vec<Duration>, took: Duration, errors: u64) -> Self {
        lat.sort_unstable();
        Self {
            rate: lat.len() as f64 / took.as_secs_f64(),
            p50_us: percentile(&lat, 0.5),
            p99_us: percentile(&lat, 0.99),
            connect_us: None,
            errors,
        }
    }
}

fn crr(to: SocketAddrV4, d: Duration) -> Result<Rate> {
    let mut lat = Vec::with_capacity(200_000);
    let mut connects = Vec::with_capacity(200_000);
    let mut errors = 0u64;
    let start = Instant::now();
    while start.elapsed() < d {
        let t0 = Instant::now();
        let mut one = || -> std::io::Result<()> {
            let mut s = connect(to)?;
            connects.push(t0.elapsed());
            s.write_all(b"C")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            // The server's FIN: the connection is over on both sides.
            match s.read(&mut b)? {
                0 => Ok(()),
                _ => Err(std::io::ErrorKind::InvalidData.into()),
            }
        };
        match one() {
            Ok(()) => lat.push(t0.elapsed()),
            Err(_) => errors += 1,
        }
        if errors > 100 && lat.is_empty() {
            bail!("no connection to {to} succeeds");
        }
    }
    connects.sort_unstable();
    Ok(Rate {
        connect_us: percentile(&connects, 0.5),
        ..Rate::of(lat, start.elapsed(), errors)
    })
}

/// Where [`crr_in_turn`] connects: from the pod whose namespace is
/// `netns`, its address `from`, to each of `to` in turn (a service's
/// endpoints dialled directly, as a client balancing by itself would).
#[derive(Clone, Debug)]
pub struct Target {
    pub netns: String,
    pub from: Ipv4Addr,
    pub to: Vec<SocketAddrV4>,
}

/// Runs `f` on a thread pinned to the client's core, which joins each
/// target's namespace before its turn ([`Turns::enter`]).
fn in_turn<T: Send>(netns: &[&str], f: impl FnOnce(Turns) -> Result<T> + Send) -> Result<T> {
    let files = netns
        .iter()
        .map(|n| {
            std::fs::File::open(format!("/run/netns/{n}"))
                .with_context(|| format!("opening netns {n}"))
        })
        .collect::<Result<Vec<_>>>()?;
    std::thread::scope(|s| {
        s.spawn(move || {
            pin(CLIENT_CPU);
            f(Turns(files))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))?
    })
}

/// The namespaces of [`in_turn`]'s targets.
struct Turns(Vec<std::fs::File>);

impl Turns {
    /// Joins target `i`'s namespace: before every turn, the same for each
    /// (the sockets it creates then are that namespace's).
    fn enter(&self, i: usize) -> Result<()> {
        let f = self.0.get(i).context("no such target")?;
        // SAFETY: setns on this thread only; `f` is an open netns file.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(())
    }
}

/// TCP_CRR to each of `targets` in turn, one connection each, for `secs`:
/// each one's rate (connections per second of the time spent on it) and
/// `connect()` p50. Taken side by side, the targets share every drift of
/// the machine (timer, the other core's work, the host under the VM), so
/// their ratios are what reaching one costs over another and nothing
/// else. Each turn's socket is created in its target's namespace; joining
/// it is not timed.
pub fn crr_in_turn(targets: &[Target], secs: f64) -> Result<Vec<InTurn>> {
    let d = Duration::from_secs_f64(secs);
    let names: Vec<&str> = targets.iter().map(|t| t.netns.as_str()).collect();
    in_turn(&names, |turns| {
        let mut took: Vec<Vec<Duration>> = targets
            .iter()
            .map(|_| Vec::with_capacity(100_000))
            .collect();
        let mut spent = vec![Duration::ZERO; targets.len()];
        let mut errors = 0u64;
        let start = Instant::now();
        let mut round = 0usize;
        while start.elapsed() < d {
            for (i, t) in targets.iter().enumerate() {
                let Some(&to) = t.to.get(round % t.to.len().max(1)) else {
                    bail!("a target without an address");
                };
                turns.enter(i)?;
                let t0 = Instant::now();
                let one = || -> std::io::Result<Duration> {
                    let mut s = connect_from(t.from, to)?;
                    let c = t0.elapsed();
                    s.write_all(b"C")?;
                    let mut x = [0u8; 1];
                    s.read_exact(&mut x)?;
                    match s.read(&mut x)? {
                        0 => Ok(c),
                        _ => Err(std::io::ErrorKind::InvalidData.into()),
                    }
                };
                match one() {
                    Ok(c) => took[i].push(c),
                    Err(_) => errors += 1,
                }
                spent[i] += t0.elapsed();
            }
            round += 1;
            if errors > 100 && took.iter().any(|t| t.is_empty()) {
                bail!("no connection to some of {targets:?} succeeds");
            }
        }
        took.into_iter()
            .zip(spent)
            .map(|(mut t, spent)| {
                t.sort_unstable();
                Ok(InTurn {
                    rate: t.len() as f64 / spent.as_secs_f64(),
                    connect_us: percentile(&t, 0.5).context("no connection measured")?,
                })
            })
            .collect()
    })
}

/// TCP_RR on one connection to each of `targets` (its first address) in
/// turn, one round trip each, for `secs`: each one's round trips per
/// second of the time spent on it.
pub fn rr_in_turn(targets: &[Target], secs: f64) -> Result<Vec<f64>> {
    let d = Duration::from_secs_f64(secs);
    let names: Vec<&str> = targets.iter().map(|t| t.netns.as_str()).collect();
    in_turn(&names, |turns| {
        let mut conns = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let to = *t.to.first().context("a target without an address")?;
            turns.enter(i)?;
            conns.push(connect_from(t.from, to).with_context(|| format!("connecting to {to}"))?);
        }
        let mut spent = vec![Duration::ZERO; conns.len()];
        let mut count = 0u64;
        let mut b = [0u8; 1];
        let start = Instant::now();
        while start.elapsed() < d {
            for (s, spent) in conns.iter_mut().zip(spent.iter_mut()) {
                let t0 = Instant::now();
                s.write_all(b"r")?;
                s.read_exact(&mut b).context("a round trip in turn")?;
                *spent += t0.elapsed();
            }
            count += 1;
        }
        Ok(spent
            .iter()
            .map(|s| count as f64 / s.as_secs_f64())
            .collect())
    })
}

/// Bulk transfer to each of `targets` (its first address) in turn, for
/// `secs`: a turn is one connection carrying [`BULK_TURN`] bytes, timed
/// until the server says it read them all (so no turn's data drains into
/// the next one's); each one's Gbit/s of the time spent on it.
pub fn bulk_in_turn(targets: &[Target], secs: f64) -> Result<Vec<f64>> {
    let d = Duration::from_secs_f64(secs);
    let names: Vec<&str> = targets.iter().map(|t| t.netns.as_str()).collect();
    in_turn(&names, |turns| {
        let mut spent = vec![Duration::ZERO; targets.len()];
        let mut sent = vec![0u64; targets.len()];
        let start = Instant::now();
        while start.elapsed() < d {
            for (i, t) in targets.iter().enumerate() {
                let to = *t.to.first().context("a target without an address")?;
                turns.enter(i)?;
                let t0 = Instant::now();
                let s = connect_from(t.from, to)?;
                sent[i] += bulk_send(s, to, |sent| sent < BULK_TURN)?;
                spent[i] += t0.elapsed();
            }
        }
        Ok(sent
            .iter()
            .zip(&spent)
            .map(|(&b, s)| b as f64 * 8.0 / s.as_secs_f64() / 1e9)
            .collect())
    })
}

/// Bytes one turn of [`bulk_in_turn`] sends: long enough that the
/// connection's setup is noise (tens of ms at this machine's rates).
const BULK_TURN: u64 = 64 << 20;

/// Sends on `s` while `more(bytes sent so far)` (the server's bulk
/// protocol: the first byte `S`), then waits for the server's count of
/// what it read; returns what was sent.
fn bulk_send(mut s: TcpStream, to: SocketAddrV4, mut more: impl FnMut(u64) -> bool) -> Result<u64> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut chunk = vec![b'b'; 256 * 1024];
    chunk[0] = b'S';
    let mut sent = 0u64;
    while more(sent) {
        s.write_all(&chunk)?;
        sent += chunk.len() as u64;
        chunk[0] = b'b';
    }
    s.shutdown(Shutdown::Write)?;
    let mut total = [0u8; 8];
    s.read_exact(&mut total)
        .with_context(|| format!("bulk transfer through {to}: no byte count"))?;
    let received = u64::from_be_bytes(total) + 1;
    if received != sent {
        bail!("bulk transfer through {to}: sent {sent} bytes, the server read {received}");
    }
    Ok(sent)
}

fn rr(to: SocketAddrV4, d: Duration) -> Result<Rate> {
    let mut s = connect(to).with_context(|| format!("connecting to {to}"))?;
    let mut lat = Vec::with_capacity(500_000);
    let mut b = [0u8; 1];
    let start = Instant::now();
    while start.elapsed() < d {
        let t0 = Instant::now();
        s.write_all(b"r")?;
        s.read_exact(&mut b)
            .with_context(|| format!("round trip through {to}"))?;
        lat.push(t0.elapsed());
    }
    Ok(Rate::of(lat, start.elapsed(), 0))
}

fn bulk(to: SocketAddrV4, d: Duration) -> Result<Rate> {
    let s = connect(to).with_context(|| format!("connecting to {to}"))?;
    let start = Instant::now();
    let sent = bulk_send(s, to, |_| start.elapsed() < d)?;
    let took = start.elapsed();
    Ok(Rate {
        rate: sent as f64 * 8.0 / took.as_secs_f64() / 1e9,
        p50_us: None,
        p99_us: None,
        connect_us: None,
        errors: 0,
    })
}
