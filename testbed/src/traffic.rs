//! Traffic: servers answering with their identity, and clients asking who answered.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};

use crate::*;

pub(crate) fn tcp_server(listener: TcpListener, identity: &str, stop: &AtomicBool) {
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

pub(crate) fn udp_server(sock: UdpSocket, identity: &str, stop: &AtomicBool) {
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
    pub fn open(from: &Netns, to: impl Into<SocketAddr>, timeout: Duration) -> Result<Self> {
        let to = to.into();
        let stream = from.enter(move || TcpStream::connect_timeout(&to, timeout))??;
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
pub fn tcp_who(
    from: &Netns,
    to: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<(Seen, SocketAddr)> {
    let mut c = Conn::open(from, to, timeout)?;
    let local = c.writer.local_addr()?;
    Ok((c.who()?, local))
}

/// One UDP request from a fresh socket in `from`: who answered, the
/// client address it saw, and where the answer came from.
pub fn udp_who(
    from: &Netns,
    to: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<(Seen, SocketAddr)> {
    udp_ask(from, to.into(), timeout, false)
}

/// As [`udp_who`], from a connected socket: unlike an unconnected one, it
/// learns of an ICMP error (a REJECT fails it with `ConnectionRefused`).
pub fn udp_connected_who(
    from: &Netns,
    to: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<(Seen, SocketAddr)> {
    udp_ask(from, to.into(), timeout, true)
}

fn udp_ask(
    from: &Netns,
    to: SocketAddr,
    timeout: Duration,
    connected: bool,
) -> Result<(Seen, SocketAddr)> {
    from.enter(move || -> Result<(Seen, SocketAddr)> {
        let sock = UdpSocket::bind(any_port(&to))?;
        sock.set_read_timeout(Some(timeout))?;
        if connected {
            sock.connect(to)?;
            sock.send(b"addr?")?;
        } else {
            sock.send_to(b"addr?", to)?;
        }
        let mut buf = [0u8; 512];
        let (len, src) = sock.recv_from(&mut buf)?;
        Ok((Seen::parse(&String::from_utf8_lossy(&buf[..len]))?, src))
    })?
}

/// One TCP connection: connect, ask once, close. Returns the identity.
pub fn tcp_ask(from: &Netns, to: impl Into<SocketAddr>, timeout: Duration) -> Result<String> {
    Conn::open(from, to, timeout)?.ask()
}

/// `n` TCP connections from one pod, each asked once; identities in order.
pub fn tcp_ask_many(
    from: &Netns,
    to: impl Into<SocketAddr>,
    n: usize,
    timeout: Duration,
) -> Result<Vec<String>> {
    let to = to.into();
    from.enter(move || -> Result<Vec<String>> {
        (0..n)
            .map(|_| {
                let stream = TcpStream::connect_timeout(&to, timeout)?;
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
    to: impl Into<SocketAddr>,
    n: usize,
    timeout: Duration,
) -> Result<Vec<UdpAnswer>> {
    let to = to.into();
    from.enter(move || -> Result<Vec<UdpAnswer>> {
        (0..n)
            .map(|_| {
                let sock = UdpSocket::bind(any_port(&to))?;
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

/// Any local port of `to`'s family, for a client socket.
fn any_port(to: &SocketAddr) -> SocketAddr {
    match to {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
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

/// New TCP connections, one after another (each asked once), from a thread
/// of its own until [`Load::stop`]: the load of the drills.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Load {
    /// Starts asking `to` from `from`, pausing `pause` between connections.
    pub fn start(from: &Netns, to: impl Into<SocketAddr>, pause: Duration) -> Self {
        let to = to.into();
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let ns = from.shared();
        let thread = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp_ask(&ns, to, Duration::from_secs(3)) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    std::thread::sleep(pause);
                }
            })
        };
        Self {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    /// Stops the load; (connections answered, connections failed).
    pub fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Long-lived connections, each with the backend that first answered it:
/// the drills' "did anything break or move" check, written once.
#[derive(Default)]
pub struct Held(pub Vec<(Conn, String)>);

impl Held {
    /// Opens `n` connections from `from` to `to`, asking each once.
    pub fn open(
        from: &Netns,
        to: impl Into<SocketAddr>,
        n: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let to = to.into();
        let mut held = Self::default();
        for _ in 0..n {
            held.add(from, to, timeout)?;
        }
        Ok(held)
    }

    /// Opens one more connection and asks it once.
    pub fn add(
        &mut self,
        from: &Netns,
        to: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<()> {
        let mut conn = Conn::open(from, to, timeout)?;
        let who = conn.ask()?;
        self.0.push((conn, who));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The backends that answered, distinct.
    pub fn backends(&self) -> std::collections::BTreeSet<&str> {
        self.0.iter().map(|(_, who)| who.as_str()).collect()
    }

    /// Asks every connection again: those that failed or answered from
    /// another backend, described (empty: none broke, none moved).
    pub fn broken(&mut self) -> Vec<String> {
        self.0
            .iter_mut()
            .enumerate()
            .filter_map(|(i, (conn, who))| match conn.ask() {
                Ok(now) if now == *who => None,
                Ok(now) => Some(format!("#{i}: {who} became {now}")),
                Err(e) => Some(format!("#{i} ({who}): {e:#}")),
            })
            .collect()
    }
}
