//! kpx-probe: a client process for tests and the benchmark of the
//! socket-level load balancer, which acts on processes by their cgroup: the
//! bed starts this program inside a network namespace and a cgroup of its
//! own (`testbed::probe`), never the test process itself.
//!
//! Talks the bed's servers' protocol (`addr?` → "identity client-address")
//! and prints one line per exchange:
//! `ok <identity> <client seen> peer=<getpeername or recvfrom source> us=<connect µs>`
//! or `err <errno> us=<µs>`.
//!
//! Commands:
//! - `tcp ADDR N`: N connections, one exchange each;
//! - `udp ADDR N [PORT]`: one unconnected socket (bound to PORT), N
//!   `sendto()` / `recvfrom()` exchanges;
//! - `udp-connected ADDR N`: one connected UDP socket, N exchanges;
//! - `session tcp|udp|udp-connected ADDR [PORT]`: one socket held open,
//!   one exchange per line read from stdin, until EOF (`udp-connected`:
//!   a line `connect ADDR` connects the socket elsewhere);

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("kpx-probe: {e}");
        std::process::exit(2);
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let arg = |i: usize| args.get(i).map(String::as_str).ok_or("missing argument");
    let addr = |i: usize| -> Result<SocketAddr, String> {
        arg(i)?.parse().map_err(|e| format!("{}: {e}", args[i]))
    };
    let num = |i: usize| -> Result<u64, String> {
        arg(i)?.parse().map_err(|e| format!("{}: {e}", args[i]))
    };
    match arg(0)? {
        "tcp" => {
            for _ in 0..num(2)? {
                println!("{}", tcp_once(addr(1)?));
            }
        }
        "udp" => {
            let port = args.get(3).map(|p| p.parse::<u16>()).transpose();
            let sock = udp_socket(addr(1)?, port.map_err(|e| e.to_string())?.unwrap_or(0))?;
            for _ in 0..num(2)? {
                println!("{}", udp_exchange(&sock, Some(addr(1)?)));
            }
        }
        "udp-connected" => {
            let to = addr(1)?;
            let sock = udp_socket(to, 0)?;
            let t = Instant::now();
            if let Err(e) = sock.connect(to) {
                println!("err {} us={}", errno(&e), t.elapsed().as_micros());
                return Ok(());
            }
            for _ in 0..num(2)? {
                println!("{}", udp_exchange(&sock, None));
            }
        }
        "session" => session(arg(1)?, addr(2)?, args.get(3))?,
        other => return Err(format!("unknown command {other:?}")),
    }
    Ok(())
}

fn errno(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc_errno) => match libc_errno {
            111 => "ECONNREFUSED".into(),
            110 => "ETIMEDOUT".into(),
            113 => "EHOSTUNREACH".into(),
            103 => "ECONNABORTED".into(),
            89 => "EDESTADDRREQ".into(),
            1 => "EPERM".into(),
            11 => "EAGAIN".into(),
            n => format!("errno{n}"),
        },
        None => format!("{:?}", e.kind()),
    }
}

fn tcp_once(to: SocketAddr) -> String {
    let t = Instant::now();
    match TcpStream::connect_timeout(&to, TIMEOUT) {
        Ok(s) => {
            let us = t.elapsed().as_micros();
            match tcp_exchange(&s) {
                Ok(answer) => format!("ok {answer} peer={} us={us}", peer(&s)),
                Err(e) => format!("err {} us={us}", errno(&e)),
            }
        }
        Err(e) => format!("err {} us={}", errno(&e), t.elapsed().as_micros()),
    }
}

fn peer(s: &TcpStream) -> String {
    s.peer_addr().map_or_else(|e| errno(&e), |a| a.to_string())
}

fn tcp_exchange(s: &TcpStream) -> std::io::Result<String> {
    s.set_read_timeout(Some(TIMEOUT))?;
    (&*s).write_all(b"addr?\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim().to_string())
}

/// A UDP socket of `to`'s family (`AF_INET6` for an IPv6 address, so
/// the `6` socket hooks run), bound to `port`.
fn udp_socket(to: SocketAddr, port: u16) -> Result<UdpSocket, String> {
    let any: std::net::IpAddr = match to {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = UdpSocket::bind((any, port)).map_err(|e| format!("bind: {e}"))?;
    sock.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(sock)
}

/// One datagram and its answer: to `to` (unconnected) or the connected peer.
fn udp_exchange(sock: &UdpSocket, to: Option<SocketAddr>) -> String {
    let sent = match to {
        Some(to) => sock.send_to(b"addr?", to),
        None => sock.send(b"addr?"),
    };
    if let Err(e) = sent {
        return format!("err {} us=0", errno(&e));
    }
    let mut buf = [0u8; 512];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => {
            let answer = String::from_utf8_lossy(&buf[..n]);
            let peer = match to {
                Some(_) => from.to_string(),
                None => sock
                    .peer_addr()
                    .map_or_else(|e| errno(&e), |a| a.to_string()),
            };
            format!("ok {} peer={peer} us=0", answer.trim())
        }
        Err(e) => format!("err {} us=0", errno(&e)),
    }
}

/// Datagrams to `a` and to `b` before either answer is read: two
/// exchanges in flight on one unconnected socket.
fn udp_pair(sock: &UdpSocket, a: SocketAddr, b: SocketAddr) -> String {
    for to in [a, b] {
        if let Err(e) = sock.send_to(b"addr?", to) {
            return format!("err {} us=0", errno(&e));
        }
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    for _ in 0..2 {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let answer = String::from_utf8_lossy(&buf[..n]);
                got.push(format!("ok {} peer={from} us=0", answer.trim()));
            }
            Err(e) => got.push(format!("err {} us=0", errno(&e))),
        }
    }
    got.join(" | ")
}

fn session(proto: &str, to: SocketAddr, port: Option<&String>) -> Result<(), String> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    match proto {
        "tcp" => {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&to, TIMEOUT);
            let us = t.elapsed().as_micros();
            let s = match s {
                Ok(s) => s,
                Err(e) => {
                    println!("err {} us={us}", errno(&e));
                    return Ok(());
                }
            };
            writeln!(out, "open peer={} us={us}", peer(&s)).map_err(|e| e.to_string())?;
            out.flush().map_err(|e| e.to_string())?;
            for _ in stdin.lock().lines() {
                let line = match tcp_exchange(&s) {
                    Ok(answer) => format!("ok {answer} peer={} us=0", peer(&s)),
                    Err(e) => format!("err {} us=0", errno(&e)),
                };
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
                out.flush().map_err(|e| e.to_string())?;
            }
        }
        "udp" => {
            let port = port.map(|p| p.parse::<u16>()).transpose();
            let sock = udp_socket(to, port.map_err(|e| e.to_string())?.unwrap_or(0))?;
            writeln!(out, "open").map_err(|e| e.to_string())?;
            out.flush().map_err(|e| e.to_string())?;
            for line in stdin.lock().lines() {
                let line = line.map_err(|e| e.to_string())?;
                // `to ADDR`: one exchange with ADDR instead; `pair ADDR`:
                // datagrams to the session's address and to ADDR, then
                // both answers (`first | second`, in arrival order).
                let answer = match line.split_once(' ') {
                    Some((cmd, a)) => match (cmd, a.trim().parse::<SocketAddr>()) {
                        ("to", Ok(a)) => udp_exchange(&sock, Some(a)),
                        ("pair", Ok(a)) => udp_pair(&sock, to, a),
                        (_, Err(e)) => format!("err {e} us=0"),
                        (other, _) => format!("err unknown command {other} us=0"),
                    },
                    None => udp_exchange(&sock, Some(to)),
                };
                writeln!(out, "{answer}").map_err(|e| e.to_string())?;
                out.flush().map_err(|e| e.to_string())?;
            }
        }
        "udp-connected" => {
            let sock = udp_socket(to, 0)?;
            let t = Instant::now();
            if let Err(e) = sock.connect(to) {
                println!("err {} us={}", errno(&e), t.elapsed().as_micros());
                return Ok(());
            }
            writeln!(out, "open").map_err(|e| e.to_string())?;
            out.flush().map_err(|e| e.to_string())?;
            for line in stdin.lock().lines() {
                let line = line.map_err(|e| e.to_string())?;
                // `connect ADDR`: the same socket, connected elsewhere.
                let answer = match line.strip_prefix("connect ") {
                    Some(to) => match to.trim().parse::<SocketAddr>() {
                        Ok(to) => match sock.connect(to) {
                            Ok(()) => "connected".to_string(),
                            Err(e) => format!("err {} us=0", errno(&e)),
                        },
                        Err(e) => format!("err {e} us=0"),
                    },
                    None => udp_exchange(&sock, None),
                };
                writeln!(out, "{answer}").map_err(|e| e.to_string())?;
                out.flush().map_err(|e| e.to_string())?;
            }
        }
        other => return Err(format!("session: unknown protocol {other:?}")),
    }
    Ok(())
}
