//! What kube-proxy writes when one Service port changed, derived from its
//! full rulesets before and after the change: iptables mode's partial
//! restore (MinimizeIPTablesRestore, on by default since v1.27) and
//! nftables mode's incremental transaction. The benchmark times them
//! against kpx's map writes for the same change.
//!
//! - iptables: the filter table in full and the nat table's top-level
//!   chains (KUBE-SERVICES, KUBE-NODEPORTS, ...) in full, the changed
//!   port's own chains rewritten, and its chains that are gone declared
//!   (flushed) and deleted; every other service's chains are left alone.
//! - nftables: the changed port's chains re-created, flushed and refilled,
//!   its map elements re-added, its endpoint chains and affinity sets that
//!   are gone deleted.
//!   A port that gains its first endpoint would also lose its
//!   `no-endpoint-*` elements; the benchmark's changes never do that.

use std::collections::{BTreeSet, HashMap};

/// The Service port that changed.
#[derive(Clone, Copy, Debug)]
pub struct ChangedPort<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// `tcp`, `udp` or `sctp`.
    pub proto: &'a str,
    /// The port's name (empty for an unnamed port).
    pub port: &'a str,
}

impl ChangedPort<'_> {
    /// kube-proxy's ServicePortName as its iptables comments carry it.
    fn comment(&self) -> String {
        if self.port.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port)
        }
    }

    /// `ns/name/proto/port`, part of every nftables chain name of the port.
    fn nft_base(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.namespace, self.name, self.proto, self.port
        )
    }
}

/// The rules without the `-I` jumps from the built-in chains, which
/// kube-proxy ensures once, outside its restores (restoring them again with
/// `--noflush` would duplicate them).
pub fn without_builtin_jumps(rules: &str) -> String {
    rules
        .lines()
        .filter(|l| !l.starts_with("-I "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Per-service nat chains, skipped by a partial sync when unchanged.
fn per_service(chain: &str) -> bool {
    [
        "KUBE-SVC-",
        "KUBE-SEP-",
        "KUBE-SVL-",
        "KUBE-EXT-",
        "KUBE-FW-",
    ]
    .iter()
    .any(|p| chain.starts_with(p))
}

/// The nat table of a restore input: each chain with its rules, in order.
fn nat_chains(rules: &str) -> Result<Vec<(String, Vec<String>)>, String> {
    let nat = rules
        .split("*nat\n")
        .nth(1)
        .and_then(|t| t.split("COMMIT").next())
        .ok_or("no nat table in the rules")?;
    let mut order: Vec<(String, Vec<String>)> = Vec::new();
    let mut index = HashMap::new();
    for l in nat.lines() {
        if let Some(decl) = l.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("").to_string();
            index.insert(name.clone(), order.len());
            order.push((name, Vec::new()));
        } else if let Some(rule) = l.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            if let Some(&k) = index.get(chain) {
                order[k].1.push(l.to_string());
            }
        }
    }
    Ok(order)
}

/// The per-service chains of one port: jumped to from the top-level
/// chains' rules carrying its comment, and everything they jump to.
fn port_chains(chains: &[(String, Vec<String>)], comment: &str) -> BTreeSet<String> {
    let rules: HashMap<&str, &Vec<String>> = chains.iter().map(|(n, r)| (n.as_str(), r)).collect();
    let jump = |r: &str| {
        r.split_once(" -j ")
            .map(|(_, t)| t.split_whitespace().next().unwrap_or("").to_string())
            .filter(|t| per_service(t))
    };
    // The comment as a whole word: "ns/svc:p" must not match "ns/svc:p2".
    let quoted = [
        format!("\"{comment} "),
        format!("\"{comment}\""),
        format!(" {comment} "),
    ];
    let mut todo: Vec<String> = chains
        .iter()
        .filter(|(n, _)| !per_service(n))
        .flat_map(|(_, r)| r.iter())
        .filter(|r| quoted.iter().any(|q| r.contains(q.as_str())))
        .filter_map(|r| jump(r))
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(c) = todo.pop() {
        if !seen.insert(c.clone()) {
            continue;
        }
        for r in rules.get(c.as_str()).into_iter().flat_map(|r| r.iter()) {
            todo.extend(jump(r));
        }
    }
    seen
}

/// kube-proxy's partial `iptables-restore --noflush` input after `port`
/// changed from the full ruleset `before` to `after`.
pub fn iptables_partial(before: &str, after: &str, port: ChangedPort) -> Result<String, String> {
    let comment = port.comment();
    let filter = after
        .split("*nat\n")
        .next()
        .ok_or("no filter table in the rules")?;
    let chains = nat_chains(after)?;
    let changed = port_chains(&chains, &comment);
    let old = port_chains(&nat_chains(before)?, &comment);
    if changed.is_empty() && old.is_empty() {
        return Err(format!("no chain of {comment} in the rules"));
    }
    // Chains that are gone are declared (so flushed) with the others, then deleted.
    let gone: Vec<&String> = old.difference(&changed).collect();
    let mut out = without_builtin_jumps(filter);
    out.push_str("*nat\n");
    let kept = || {
        chains
            .iter()
            .filter(|(n, _)| !per_service(n) || changed.contains(n))
    };
    for name in kept().map(|(n, _)| n).chain(gone.iter().copied()) {
        out.push_str(&format!(":{name} - [0:0]\n"));
    }
    for (_, rules) in kept() {
        for r in rules {
            out.push_str(r);
            out.push('\n');
        }
    }
    for g in &gone {
        out.push_str(&format!("-X {g}\n"));
    }
    out.push_str("COMMIT\n");
    Ok(out)
}

/// kube-proxy nftables mode's transaction after `port` changed from the
/// full script `before` to `after`.
pub fn nftables_partial(before: &str, after: &str, port: ChangedPort) -> String {
    let base = port.nft_base();
    // The port's chains end in its base, its endpoint chains go on with
    // "__ip/port"; the service-ips elements name the chain they go to.
    let mine = |word: &str| word.ends_with(&base) || word.contains(&format!("{base}__"));
    // Per-endpoint objects: endpoint chains and their affinity sets.
    let endpoint_objects = |script: &str, kind: &str, prefix: &str| -> BTreeSet<String> {
        let add = format!("add {kind} ip kube-proxy ");
        script
            .lines()
            .filter_map(|l| l.strip_prefix(add.as_str()))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| c.starts_with(prefix) && mine(c))
            .map(str::to_string)
            .collect()
    };
    let mut tx: String = after
        .lines()
        .filter(|l| l.split_whitespace().any(mine))
        .map(|l| format!("{l}\n"))
        .collect();
    // Chains first: a set is deleted once no rule refers to it.
    for (kind, prefix) in [("chain", "endpoint-"), ("set", "affinity-")] {
        let (old, new) = (
            endpoint_objects(before, kind, prefix),
            endpoint_objects(after, kind, prefix),
        );
        for gone in old.difference(&new) {
            tx.push_str(&format!("delete {kind} ip kube-proxy {gone}\n"));
        }
    }
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "*filter
:KUBE-SERVICES - [0:0]
-I FORWARD -j KUBE-SERVICES
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-A - [0:0]
:KUBE-SEP-A1 - [0:0]
:KUBE-SEP-A2 - [0:0]
:KUBE-SVC-B - [0:0]
:KUBE-SEP-B1 - [0:0]
-I PREROUTING -j KUBE-SERVICES
-A KUBE-SERVICES -m comment --comment \"ns/a:http cluster IP\" -d 198.19.0.1 -j KUBE-SVC-A
-A KUBE-SERVICES -m comment --comment \"ns/a:http2 cluster IP\" -d 198.19.0.3 -j KUBE-SVC-B
-A KUBE-SVC-A -m statistic --mode random --probability 0.5 -j KUBE-SEP-A1
-A KUBE-SVC-A -j KUBE-SEP-A2
-A KUBE-SEP-A1 -j DNAT --to-destination 198.18.1.1:80
-A KUBE-SEP-A2 -j DNAT --to-destination 198.18.1.2:80
-A KUBE-SVC-B -j KUBE-SEP-B1
-A KUBE-SEP-B1 -j DNAT --to-destination 198.18.1.9:80
COMMIT
";

    const PORT: ChangedPort = ChangedPort {
        namespace: "ns",
        name: "a",
        proto: "tcp",
        port: "http",
    };

    #[test]
    fn a_partial_restore_rewrites_only_the_changed_port() {
        let after = BEFORE
            .replace("KUBE-SEP-A2", "KUBE-SEP-A3")
            .replace("198.18.1.2:80", "198.18.1.3:80");
        let p = iptables_partial(BEFORE, &after, PORT).unwrap();
        assert!(!p.contains("-I "), "{p}");
        // The top-level chain in full, the changed port's chains, not B's.
        assert!(p.contains("-A KUBE-SERVICES -m comment --comment \"ns/a:http2 cluster IP\""));
        assert!(p.contains(":KUBE-SVC-A - [0:0]\n") && p.contains(":KUBE-SEP-A3 - [0:0]\n"));
        assert!(p.contains("-A KUBE-SEP-A3 -j DNAT --to-destination 198.18.1.3:80"));
        assert!(
            !p.contains("KUBE-SVC-B -") && !p.contains("KUBE-SEP-B1 -"),
            "{p}"
        );
        // The endpoint chain that is gone: flushed, then deleted, at the end.
        assert!(p.contains(":KUBE-SEP-A2 - [0:0]\n"));
        assert!(p.ends_with("-X KUBE-SEP-A2\nCOMMIT\n"), "{p}");
    }

    #[test]
    fn an_unknown_port_is_an_error() {
        let other = ChangedPort { name: "zz", ..PORT };
        assert!(iptables_partial(BEFORE, BEFORE, other).is_err());
    }

    #[test]
    fn an_nftables_transaction_touches_only_the_changed_port() {
        let before = "add chain ip kube-proxy service-X-ns/a/tcp/http
add chain ip kube-proxy endpoint-E1-ns/a/tcp/http__198.18.1.1/80
add chain ip kube-proxy endpoint-E2-ns/a/tcp/http__198.18.1.2/80
add chain ip kube-proxy service-Y-ns/a/tcp/http2
add set ip kube-proxy affinity-E2-ns/a/tcp/http__198.18.1.2/80 { type ipv4_addr ; }
add element ip kube-proxy service-ips { 198.19.0.1 . tcp . 80 : goto service-X-ns/a/tcp/http }
add rule ip kube-proxy service-Y-ns/a/tcp/http2 jump endpoint-E9-ns/a/tcp/http2__198.18.1.9/80
";
        let after = before.replace(
            "E2-ns/a/tcp/http__198.18.1.2",
            "E3-ns/a/tcp/http__198.18.1.3",
        );
        let tx = nftables_partial(before, &after, PORT);
        assert!(tx.contains("add chain ip kube-proxy endpoint-E3-ns/a/tcp/http__198.18.1.3/80\n"));
        assert!(tx.contains("add element ip kube-proxy service-ips"));
        assert!(!tx.contains("http2"), "{tx}");
        assert!(tx.ends_with(
            "delete chain ip kube-proxy endpoint-E2-ns/a/tcp/http__198.18.1.2/80\n\
             delete set ip kube-proxy affinity-E2-ns/a/tcp/http__198.18.1.2/80\n"
        ));
    }
}
