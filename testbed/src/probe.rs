//! Client processes in a cgroup of the test's own: the socket-level load
//! balancer acts on processes by cgroup, so its tests attach it to a
//! cgroup v2 directory they create ([`Cgroup`]) and run their clients
//! there as `kpx-probe` processes ([`run`], [`Session`]), each also in a
//! pod's network namespace. The test process itself, and every other
//! process of the machine, stays where it was.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::Ordering,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{Netns, NEXT};

/// A cgroup v2 directory the test created under the hierarchy's root,
/// removed on drop (its processes, all started by the test, have ended).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(tag: &str) -> Result<Self> {
        let root = cgroup2_root()?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("kpxtb-{tag}-{}-{n}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Cgroup {
    /// Moves this whole process (every thread) into the cgroup until the
    /// guard drops: for the benchmark, whose load generator is a thread.
    /// Tests use [`run`] / [`Session`] instead: separate processes.
    pub fn join_self(&self) -> Result<Joined> {
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| anyhow!("this process is in no cgroup v2"))?;
        let back = cgroup2_root()?.join(rel.trim_start_matches('/'));
        fs::write(
            self.path.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .with_context(|| format!("joining {}", self.path.display()))?;
        Ok(Joined { back })
    }
}

/// This process is in a test cgroup until dropped; then back where it was.
pub struct Joined {
    back: PathBuf,
}

impl Drop for Joined {
    fn drop(&mut self) {
        let procs = self.back.join("cgroup.procs");
        if let Err(e) = fs::write(&procs, std::process::id().to_string()) {
            eprintln!("testbed: moving back to {}: {e}", procs.display());
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A probe reaped a moment ago may still be leaving the cgroup.
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("testbed: could not remove {}", self.path.display());
    }
}

/// Where cgroup2 is mounted (on this machine kind /sys/fs/cgroup/unified).
fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .ok_or_else(|| anyhow!("no cgroup v2 hierarchy is mounted"))
}

/// The `kpx-probe` binary: `$KPX_PROBE`, else beside the test binary's
/// directory (`target/<profile>/kpx-probe`, which `cargo xtask test`
/// builds first).
pub fn binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KPX_PROBE") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let candidates = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("kpx-probe"))
        .collect::<Vec<_>>();
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "kpx-probe not found at {candidates:?}: build it with `cargo build -p testbed --bin kpx-probe` (`cargo xtask test` does)"
            )
        })
}

/// `kpx-probe ARGS` in `netns`, inside `cgroup` if given.
pub fn command(netns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> Result<Command> {
    let mut cmd = netns.command(&binary()?)?;
    cmd.args(args);
    if let Some(cg) = cgroup {
        join_before_exec(&mut cmd, &cg.path)?;
    }
    Ok(cmd)
}

/// Moves the child into the cgroup at `path` between fork and exec, so its
/// first `connect()` is already the cgroup's.
pub fn join_before_exec(cmd: &mut Command, path: &Path) -> Result<()> {
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(path.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", path.display()))?;
    // SAFETY: between fork and exec only write(2), async-signal-safe, runs;
    // "0" moves the writing process. `procs` stays open in the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Runs `kpx-probe ARGS` to the end; its output lines.
pub fn run(netns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> Result<Vec<String>> {
    let out = command(netns, cgroup, args)?
        .output()
        .context("running kpx-probe")?;
    if !out.status.success() {
        bail!(
            "kpx-probe {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect())
}

/// A `kpx-probe session`: one socket held open, an exchange per [`ask`].
///
/// [`ask`]: Session::ask
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// The session's first line (`open ...`, or `err ...`).
    pub opened: String,
}

impl Session {
    pub fn start(netns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> Result<Self> {
        let mut full = vec!["session"];
        full.extend_from_slice(args);
        let mut child = command(netns, cgroup, &full)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting kpx-probe")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
        let mut s = Self {
            child,
            stdin,
            stdout,
            opened: String::new(),
        };
        s.opened = s.line()?;
        Ok(s)
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("kpx-probe session ended");
        }
        Ok(line.trim().to_string())
    }

    /// One exchange on the held socket: its `ok ...` / `err ...` line.
    pub fn ask(&mut self) -> Result<String> {
        self.say("ask")
    }

    /// One command line to the session (`ask`; `connect ADDR` for connected
    /// UDP; `to ADDR`, `pair ADDR` for unconnected UDP); its answer.
    pub fn say(&mut self, line: &str) -> Result<String> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("session closed"))?;
        stdin.write_all(format!("{line}\n").as_bytes())?;
        stdin.flush()?;
        self.line()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // EOF ends the session; the child is ours to reap.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// A probe answer line, parsed: `ok <identity> <client seen> peer=<p> ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub identity: String,
    pub client: String,
    pub peer: String,
}

impl Answer {
    /// The parsed answer, or the line itself as the error (`err ECONNREFUSED ...`).
    pub fn parse(line: &str) -> std::result::Result<Self, String> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let field = |k: &str| {
            f.iter()
                .find_map(|x| x.strip_prefix(k))
                .unwrap_or_default()
                .to_string()
        };
        if f.first() != Some(&"ok") || f.len() < 5 {
            return Err(line.to_string());
        }
        Ok(Self {
            identity: f[1].into(),
            client: f[2].into(),
            peer: field("peer="),
        })
    }
}
