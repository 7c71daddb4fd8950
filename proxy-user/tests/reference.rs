//! `kpx iptables-rules` on the shipped examples: the output loads with the
//! real tools (`iptables-restore --test` on both backends, `nft -c`), and
//! once loaded in a fresh namespace it holds kube-proxy's structure.

mod bed;

use std::{path::Path, process::Command};

use bed::KPX;
use testbed::Netns;

fn examples() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    out.sort();
    assert!(!out.is_empty());
    out
}

fn rules(example: &Path, mode: &str) -> String {
    let out = Command::new(KPX)
        .args(["iptables-rules", "--mode", mode, "--manifests"])
        .arg(example)
        .args([
            "--hostname-override",
            "node-1",
            "--bind-address",
            "198.18.128.1",
            "--cluster-cidr",
            "198.18.0.0/17",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `program args` in `ns` with `input` on stdin; its stdout.
fn run_in(ns: &Netns, program: &str, args: &[&str], input: &str) -> String {
    use std::io::Write as _;
    let mut child = ns
        .command(Path::new(program))
        .unwrap()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\ninput:\n{input}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs root"]
fn the_examples_rules_load_with_iptables_restore_and_nft() {
    // A fresh node namespace (root needed; under CI its absence fails).
    let c = bed::cluster(&[]);
    for ex in examples() {
        let ipt = rules(&ex, "iptables");
        for restore in ["iptables-nft-restore", "iptables-legacy-restore"] {
            if restore.contains("legacy") && which(restore).is_none() {
                continue;
            }
            run_in(&c.node, restore, &["--test", "--noflush"], &ipt);
        }
        run_in(&c.node, "nft", &["-c", "-f", "-"], &rules(&ex, "nftables"));
    }
}

#[test]
#[ignore = "needs root"]
fn loaded_rules_keep_kube_proxys_structure() {
    let c = bed::cluster(&[]);
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster.yaml");
    run_in(
        &c.node,
        "iptables-nft-restore",
        &["--noflush"],
        &rules(&ex, "iptables"),
    );
    let nat = run_in(&c.node, "iptables-nft-save", &["-t", "nat"], "");
    let filter = run_in(&c.node, "iptables-nft-save", &["-t", "filter"], "");
    let has = |text: &str, needle: &str| {
        assert!(
            text.lines().any(|l| l.contains(needle)),
            "no line with {needle:?} in\n{text}"
        )
    };
    // Entry points, in the order kube-proxy writes them.
    has(
        &nat,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    );
    has(
        &nat,
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
    );
    has(&nat, "-j MASQUERADE --random-fully");
    // shop/web: LB IP through the firewall chain, affinity, NodePorts.
    has(
        &nat,
        "--comment \"shop/web:http loadbalancer IP\" -m tcp --dport 80 -j KUBE-FW-",
    );
    has(
        &nat,
        "-s 198.18.128.0/24 -m comment --comment \"shop/web:http loadbalancer IP\" -j KUBE-EXT-",
    );
    has(&nat, "--rcheck --seconds 600 --reap --name KUBE-SEP-");
    has(&nat, "-A KUBE-NODEPORTS -p tcp -m comment --comment \"shop/web:http\" -m tcp --dport 30080 -j KUBE-EXT-");
    // shop/api (ETP Local, no endpoint here): short-circuits, then DROP.
    has(
        &nat,
        "--comment \"pod traffic for shop/api:https external destinations\"",
    );
    has(
        &filter,
        "--comment \"shop/api:https has no local endpoints\" -m tcp --dport 443 -j DROP",
    );
    has(
        &filter,
        "--comment \"shop/api:https health check node port\" -m tcp --dport 30999 -j ACCEPT",
    );
    // shop/cache (ITP Local): the cluster IP goes to the local chain.
    has(
        &nat,
        "--comment \"shop/cache cluster IP\" -m tcp --dport 6379 -j KUBE-SVL-",
    );
    // shop/empty: REJECT on its cluster IP and NodePort.
    has(&filter, "-d 198.19.0.40/32 -p tcp -m comment --comment \"shop/empty:http has no endpoints\" -m tcp --dport 80 -j REJECT");
    has(&filter, "--dst-type LOCAL -m tcp --dport 30040 -j REJECT");
    has(
        &filter,
        "-m comment --comment \"shop/web:http traffic not accepted by KUBE-FW-",
    );
    // The nodeports jump is last in KUBE-SERVICES.
    let last = nat
        .lines()
        .rfind(|l| l.starts_with("-A KUBE-SERVICES "))
        .unwrap();
    assert!(last.ends_with("-j KUBE-NODEPORTS"), "{last}");

    // nftables mode: the kube-proxy table with its verdict maps filled.
    run_in(&c.node, "nft", &["-f", "-"], &rules(&ex, "nftables"));
    let table = run_in(&c.node, "nft", &["list", "table", "ip", "kube-proxy"], "");
    for needle in [
        "198.19.0.10 . tcp . 80 : goto service-",
        "198.19.0.40 . tcp . 80 comment \"shop/empty:http\" : goto reject-chain",
        "tcp . 30443 comment \"shop/api:https\" : drop",
        "ip saddr != { 198.18.128.0/24, 198.19.2.10 } drop",
        "numgen random mod 2 vmap",
        "update @affinity-",
        "masquerade fully-random",
    ] {
        has(&table, needle);
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.exists())
}

/// Sorted lines of a saved ruleset, without comments (dates) and trailing commas.
fn normalized(saved: &str) -> Vec<String> {
    let mut lines: Vec<String> = saved
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.trim().trim_end_matches(',').to_string())
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    lines
}

/// What the benchmark times for the references' endpoint change: kube-proxy's
/// partial `iptables-restore` and its nftables transaction, applied to the
/// old rules, leave exactly the rules a full load of the new ones gives.
#[test]
#[ignore = "needs root"]
fn incremental_updates_leave_what_a_full_load_gives() {
    use kpx::reference::incremental::{self, ChangedPort};
    let old = bed::cluster(&[]);
    let new = bed::cluster(&[]);
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster.yaml");
    let text = std::fs::read_to_string(&ex).unwrap();
    // One endpoint of shop/web (both its ports) replaced.
    assert_eq!(text.matches("\"198.18.1.10\"").count(), 1);
    let changed = old.workdir.join("changed.yaml");
    std::fs::write(&changed, text.replace("\"198.18.1.10\"", "\"198.18.1.99\"")).unwrap();
    let ports = ["http", "dns"].map(|port| ChangedPort {
        namespace: "shop",
        name: "web",
        proto: if port == "dns" { "udp" } else { "tcp" },
        port,
    });

    let (before, after) = (rules(&ex, "iptables"), rules(&changed, "iptables"));
    run_in(&old.node, "iptables-nft-restore", &["--noflush"], &before);
    for p in ports {
        let partial = incremental::iptables_partial(&before, &after, p).unwrap();
        assert!(partial.contains("198.18.1.99") && partial.contains("-X KUBE-SEP-"));
        run_in(&old.node, "iptables-nft-restore", &["--noflush"], &partial);
    }
    run_in(&new.node, "iptables-nft-restore", &["--noflush"], &after);
    let save = |c: &testbed::Cluster| normalized(&run_in(&c.node, "iptables-nft-save", &[], ""));
    let (patched, fresh) = (save(&old), save(&new));
    assert!(fresh.iter().any(|l| l.contains("198.18.1.99")));
    assert_eq!(patched, fresh, "partial restores differ from a full load");

    let (before, after) = (rules(&ex, "nftables"), rules(&changed, "nftables"));
    run_in(&old.node, "nft", &["-f", "-"], &before);
    for p in ports {
        let tx = incremental::nftables_partial(&before, &after, p);
        assert!(
            tx.contains("198.18.1.99") && tx.contains("delete chain"),
            "{tx}"
        );
        run_in(&old.node, "nft", &["-f", "-"], &tx);
    }
    run_in(&new.node, "nft", &["-f", "-"], &after);
    let list = |c: &testbed::Cluster| {
        normalized(&run_in(
            &c.node,
            "nft",
            &["list", "table", "ip", "kube-proxy"],
            "",
        ))
    };
    assert_eq!(
        list(&old),
        list(&new),
        "the nftables transactions differ from a full load"
    );
}
