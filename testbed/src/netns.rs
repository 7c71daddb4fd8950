//! Network namespaces: created with `ip netns add`, entered by threads, deleted on drop.

use std::{fs, os::fd::AsRawFd, os::unix::process::CommandExt, path::Path, process::Command};

use anyhow::{anyhow, Context as _, Result};

use crate::*;

/// A named network namespace (`ip netns add`), deleted on drop unless it
/// is another's ([`Netns::shared`]).
pub struct Netns {
    pub name: String,
    owned: bool,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.into(),
            owned: true,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Another handle on this namespace, for a thread of the test; its
    /// drop leaves the namespace to its owner.
    pub fn shared(&self) -> Self {
        Self {
            name: self.name.clone(),
            owned: false,
        }
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

impl Netns {
    /// `ethtool -K DEV gro on|off` in this namespace. On a veth, GRO on
    /// also puts its receive side in NAPI mode, which it needs to take the
    /// frames its peer's XDP sends (`XDP_TX`, live test runs).
    pub fn set_gro(&self, dev: &str, on: bool) -> Result<()> {
        const ETHTOOL_SGRO: u32 = 0x2c;
        let dev = dev.to_string();
        self.enter(move || ethtool_set(&dev, ETHTOOL_SGRO, on))?
    }

    /// `ethtool -K DEV tx on|off` in this namespace. Off, the stack
    /// finishes every TCP/UDP checksum before the packet leaves, as a
    /// packet off a wire has it: a veth otherwise hands its peer packets
    /// whose checksum is partial (the skb says so, an XDP frame cannot).
    pub fn set_tx_checksum(&self, dev: &str, on: bool) -> Result<()> {
        const ETHTOOL_STXCSUM: u32 = 0x17;
        let dev = dev.to_string();
        self.enter(move || ethtool_set(&dev, ETHTOOL_STXCSUM, on))?
    }
}

/// An ethtool `set` command taking an `ethtool_value` (`cmd`: which) on
/// DEV, in the calling thread's namespace.
fn ethtool_set(dev: &str, cmd: u32, on: bool) -> Result<()> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if dev.len() >= libc::IFNAMSIZ {
        anyhow::bail!("{dev:?}: not an interface name");
    }
    // struct ethtool_value: cmd, data.
    let mut value: [u32; 2] = [cmd, on as u32];
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.as_bytes()) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = value.as_mut_ptr().cast();
    // SAFETY: a datagram socket for the ioctl.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: the descriptor just opened, closed when this drops.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: SIOCETHTOOL with an ifreq naming `value` (an ethtool_value),
    // both alive for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut ifr) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("ethtool command {cmd:#x} on {dev}"));
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            let _ = ip(&["netns", "del", &self.name]);
        }
    }
}
