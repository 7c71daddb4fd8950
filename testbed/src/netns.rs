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

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            let _ = ip(&["netns", "del", &self.name]);
        }
    }
}
