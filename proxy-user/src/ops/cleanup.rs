//! `kpx cleanup --kube-proxy`: remove what kube-proxy left in the kernel,
//! like `kube-proxy --cleanup`, so its rules cannot act on packets that kpx
//! now handles. Only kube-proxy's own chains go (and the rules jumping to
//! them); kubelet's chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY,
//! KUBE-IPTABLES-HINT) and everything else stay.
//!
//! iptables: both backends (nf_tables and legacy) and both families, each
//! read with `*-save` and edited with one `*-restore --noflush` transaction
//! per backend. nftables: kube-proxy's `ip kube-proxy` and `ip6 kube-proxy`
//! tables. IPVS mode's leftovers, after the rules that use them: the
//! `kube-ipvs0` interface (and with it the service addresses bound to it,
//! which would otherwise make the node answer for every VIP itself), the
//! `KUBE-*` ipsets, and the IPVS virtual services (all of them, as
//! `kube-proxy --cleanup` flushes IPVS).

use std::{
    collections::BTreeSet,
    fmt,
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// kube-proxy's fixed chain names (iptables and ipvs modes).
const CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    "KUBE-MARK-MASQ",
    "KUBE-MARK-DROP",
    // ipvs mode
    "KUBE-LOAD-BALANCER",
    "KUBE-NODE-PORT",
    "KUBE-LOOP-BACK",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
    "KUBE-SOURCE-RANGES-FIREWALL",
];

/// kube-proxy's per-service and per-endpoint chain prefixes.
const PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
    "KUBE-XLB-",
];

/// Whether kube-proxy owns a chain of this name.
pub fn is_kube_proxy_chain(name: &str) -> bool {
    CHAINS.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// What one cleanup removed.
#[derive(Debug, Default)]
pub struct Report {
    /// (tool, chains removed, jump rules removed).
    pub iptables: Vec<(String, usize, usize)>,
    /// Tools not present or whose backend is unavailable, with why.
    pub skipped: Vec<String>,
    /// nftables tables deleted (`ip kube-proxy`).
    pub nft_tables: Vec<String>,
    /// What was done about IPVS mode's leftovers, one line each.
    pub ipvs: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (tool, chains, jumps) in &self.iptables {
            writeln!(
                f,
                "{tool}: removed {chains} kube-proxy chains and {jumps} rules jumping to them"
            )?;
        }
        for t in &self.nft_tables {
            writeln!(f, "nftables: deleted table {t}")?;
        }
        if self.nft_tables.is_empty() {
            writeln!(f, "nftables: no kube-proxy table")?;
        }
        for line in &self.ipvs {
            writeln!(f, "{line}")?;
        }
        for s in &self.skipped {
            writeln!(f, "skipped {s}")?;
        }
        Ok(())
    }
}

/// Removes kube-proxy's iptables chains and nftables tables in this network
/// namespace.
pub fn kube_proxy() -> Result<Report> {
    let mut report = Report::default();
    for family in ["iptables", "ip6tables"] {
        for backend in ["nft", "legacy"] {
            let tool = format!("{family}-{backend}");
            match iptables(&tool) {
                Ok(Some((chains, jumps))) => report.iptables.push((tool, chains, jumps)),
                Ok(None) => {}
                Err(e) => report.skipped.push(format!("{tool}: {e:#}")),
            }
        }
    }
    report.nft_tables = nftables()?;
    // After the rules: an ipset a rule still uses cannot be destroyed.
    for step in [dummy_interface, ipsets, ipvs_services] {
        match step() {
            Ok(line) => report.ipvs.push(line),
            Err(e) => report.skipped.push(format!("{e:#}")),
        }
    }
    Ok(report)
}

/// IPVS mode's interface holding every service address.
const IPVS_INTERFACE: &str = "kube-ipvs0";

/// Runs `program args`; Ok(None) when the program is not installed.
fn run(program: &str, args: &[&str]) -> Result<Option<String>> {
    let out = match Command::new(program).args(args).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("running {program}")),
    };
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Deletes `kube-ipvs0`, and with it the service addresses bound to it.
fn dummy_interface() -> Result<String> {
    // Asked of iproute2, not of /sys/class/net: sysfs shows the network
    // namespace it was mounted in, not necessarily this process's.
    let Some(links) = run("ip", &["-o", "link", "show"]).context("ipvs: listing interfaces")?
    else {
        return Ok("ipvs: iproute2 (ip) is not installed, kube-ipvs0 not looked for".into());
    };
    let present = links
        .lines()
        .any(|l| l.split(": ").nth(1).and_then(|n| n.split('@').next()) == Some(IPVS_INTERFACE));
    if !present {
        return Ok(format!("ipvs: no {IPVS_INTERFACE} interface"));
    }
    let addrs = run("ip", &["-o", "-4", "addr", "show", "dev", IPVS_INTERFACE])
        .context("ipvs: listing the addresses of kube-ipvs0")?
        .map_or(0, |out| out.lines().count());
    run("ip", &["link", "delete", IPVS_INTERFACE]).context("ipvs: deleting kube-ipvs0")?;
    Ok(format!(
        "ipvs: deleted interface {IPVS_INTERFACE} and its {addrs} service addresses"
    ))
}

/// Destroys kube-proxy's ipsets (`KUBE-*`).
fn ipsets() -> Result<String> {
    let Some(list) = run("ipset", &["list", "-n"]).context("ipset: listing sets")? else {
        return Ok("ipset: not installed, so no set of kube-proxy's to remove".into());
    };
    let ours: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with("KUBE-"))
        .collect();
    for name in &ours {
        run("ipset", &["destroy", name]).with_context(|| format!("ipset: destroying {name}"))?;
    }
    Ok(if ours.is_empty() {
        "ipset: no kube-proxy set".into()
    } else {
        format!("ipset: destroyed {} kube-proxy sets", ours.len())
    })
}

/// Flushes IPVS's virtual services, as `kube-proxy --cleanup` does.
fn ipvs_services() -> Result<String> {
    let Ok(table) = std::fs::read_to_string("/proc/net/ip_vs") else {
        return Ok("ipvs: not in this kernel, no virtual service to remove".into());
    };
    // The header is three lines; each service and real server one more.
    let services = table
        .lines()
        .skip(3)
        .filter(|l| !l.trim_start().starts_with("->"))
        .count();
    if services == 0 {
        return Ok("ipvs: no virtual service".into());
    }
    run("ipvsadm", &["--clear"])
        .context("ipvs: flushing the virtual services")?
        .with_context(|| {
            format!("ipvs: {services} virtual services left, and ipvsadm is not installed to remove them")
        })?;
    Ok(format!("ipvs: removed {services} virtual services"))
}

/// One backend: Some((chains, jumps)) when it had kube-proxy chains.
fn iptables(tool: &str) -> Result<Option<(usize, usize)>> {
    let save = Command::new(format!("{tool}-save")).output();
    let out = match save {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("not installed"),
        Err(e) => return Err(e).with_context(|| format!("running {tool}-save")),
    };
    if !out.status.success() {
        bail!(
            "{tool}-save failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dump = String::from_utf8_lossy(&out.stdout);
    let plan = restore_input(&dump);
    if plan.chains == 0 {
        return Ok(None);
    }
    let mut child = Command::new(format!("{tool}-restore"))
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool}-restore"))?;
    child
        .stdin
        .take()
        .context("restore stdin")?
        .write_all(plan.text.as_bytes())?;
    let done = child.wait_with_output()?;
    if !done.status.success() {
        bail!(
            "{tool}-restore failed: {}\ninput was:\n{}",
            String::from_utf8_lossy(&done.stderr).trim(),
            plan.text
        );
    }
    Ok(Some((plan.chains, plan.jumps)))
}

/// An `iptables-restore --noflush` transaction, and what it removes.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub text: String,
    pub chains: usize,
    pub jumps: usize,
}

/// From an `iptables-save` dump: per table, flush kube-proxy's chains,
/// delete the rules elsewhere that jump to them, then delete the chains.
pub fn restore_input(dump: &str) -> Plan {
    let mut text = String::new();
    let (mut chains, mut jumps) = (0, 0);
    // (table, owned chains, jump rules to delete)
    let mut table: Option<(String, BTreeSet<String>, Vec<String>)> = None;
    let mut flush = |t: &mut Option<(String, BTreeSet<String>, Vec<String>)>, text: &mut String| {
        let Some((name, owned, dels)) = t.take() else {
            return;
        };
        if owned.is_empty() {
            return;
        }
        text.push_str(&format!("*{name}\n"));
        for c in &owned {
            // With --noflush, declaring a chain flushes it.
            text.push_str(&format!(":{c} - [0:0]\n"));
        }
        for d in &dels {
            text.push_str(d);
            text.push('\n');
        }
        for c in &owned {
            text.push_str(&format!("-X {c}\n"));
        }
        text.push_str("COMMIT\n");
        chains += owned.len();
        jumps += dels.len();
    };
    for line in dump.lines() {
        if let Some(name) = line.strip_prefix('*') {
            flush(&mut table, &mut text);
            table = Some((name.trim().to_string(), BTreeSet::new(), Vec::new()));
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if let Some((_, owned, _)) = &mut table {
                if is_kube_proxy_chain(chain) {
                    owned.insert(chain.to_string());
                }
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let Some((_, _, dels)) = &mut table else {
                continue;
            };
            let words = split_words(rule);
            let Some(chain) = words.first() else { continue };
            // Rules inside kube-proxy's chains go with the flush.
            if is_kube_proxy_chain(chain) {
                continue;
            }
            if jump_target(&words).is_some_and(is_kube_proxy_chain) {
                dels.push(format!("-D {rule}"));
            }
        }
    }
    flush(&mut table, &mut text);
    Plan {
        text,
        chains,
        jumps,
    }
}

/// The words of a rule, double-quoted strings (comments) kept whole.
fn split_words(rule: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = rule.trim_start();
    while !rest.is_empty() {
        let end = if rest.starts_with('"') {
            // iptables-save escapes quotes inside as \"
            let b = rest.as_bytes();
            let mut i = 1;
            while i < b.len() && !(b[i] == b'"' && b[i - 1] != b'\\') {
                i += 1;
            }
            (i + 1).min(rest.len())
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        out.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    out
}

fn jump_target<'a>(words: &[&'a str]) -> Option<&'a str> {
    words
        .windows(2)
        .find(|w| matches!(w[0], "-j" | "--jump" | "-g" | "--goto"))
        .map(|w| w[1])
}

/// Deletes kube-proxy's nftables tables; returns their names.
fn nftables() -> Result<Vec<String>> {
    let out = match Command::new("nft").args(["list", "tables"]).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("running nft"),
    };
    if !out.status.success() {
        bail!(
            "nft list tables: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut deleted = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["table", family @ ("ip" | "ip6"), "kube-proxy"] = words.as_slice() {
            let st = Command::new("nft")
                .args(["delete", "table", family, "kube-proxy"])
                .status()
                .context("running nft delete table")?;
            if !st.success() {
                bail!("nft delete table {family} kube-proxy failed");
            }
            deleted.push(format!("{family} kube-proxy"));
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kube_proxy_chains_and_the_jumps_to_them_are_removed() {
        let dump = r#"# Generated by iptables-nft-save v1.8.9
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
:MY-CHAIN - [0:0]
-A INPUT -m comment --comment "kubernetes service portals -j KUBE-SERVICES" -j MY-CHAIN
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A INPUT -j KUBE-FIREWALL
-A KUBE-SERVICES -d 198.19.0.10/32 -p tcp -m comment --comment "default/none has no endpoints" -j REJECT --reject-with icmp-port-unreachable
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-SEP-QRSTUVWXYZ012345 - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 198.19.0.10/32 -j KUBE-SVC-ABCDEFGHIJKLMNOP
-A KUBE-SVC-ABCDEFGHIJKLMNOP -j KUBE-SEP-QRSTUVWXYZ012345
COMMIT
"#;
        let plan = restore_input(dump);
        assert_eq!(plan.chains, 5, "{}", plan.text);
        assert_eq!(plan.jumps, 2, "{}", plan.text);
        assert_eq!(
            plan.text,
            "*mangle\n:KUBE-PROXY-CANARY - [0:0]\n-X KUBE-PROXY-CANARY\nCOMMIT\n\
             *filter\n:KUBE-SERVICES - [0:0]\n\
             -D INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -X KUBE-SERVICES\nCOMMIT\n\
             *nat\n:KUBE-SEP-QRSTUVWXYZ012345 - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -X KUBE-SEP-QRSTUVWXYZ012345\n-X KUBE-SERVICES\n-X KUBE-SVC-ABCDEFGHIJKLMNOP\nCOMMIT\n"
        );
        assert_eq!(
            restore_input("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n").chains,
            0
        );
    }
}
