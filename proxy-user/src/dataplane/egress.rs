//! tc egress on demand: the datapath's bitmap of the interfaces that have
//! kpx's tc egress program (`KPX_EGRESS`), the requests new flows leave
//! for it (`KPX_EGRESS_WANTED`), and which interfaces need it before any
//! flow: those some route wider than one host's leads through.
//!
//! Why on demand: tc egress translates only what the node itself sends
//! (ICMP errors about a translated flow, a hostNetwork backend's replies,
//! the node's own flows). All of that goes to a flow's client through the
//! interface the flow came in on, except the node's own flows, which leave
//! where the node's routes send a service address: never through a pod's
//! veth, whose routes name single hosts. So a pod's veth needs egress
//! once tc sets up a flow that came in there, and not before; every
//! packet forwarded to the pod meanwhile skips a hook.

use std::collections::HashSet;

use anyhow::{Context as _, Result};
use proxy_common::egress_bit;

use crate::dataplane::MapSet;

/// Sets (`on`) or clears `ifindex`'s bit in the datapath's bitmap. An
/// interface beyond the bitmap has none: the datapath never asks for it.
pub fn mark(maps: &mut MapSet, ifindex: u32, on: bool) -> Result<()> {
    let Some(bit) = egress_bit(ifindex) else {
        return Ok(());
    };
    // The agent is the only writer: read, change, write back.
    let word = maps
        .egress
        .get(&bit.word, 0)
        .with_context(|| format!("reading word {} of KPX_EGRESS", bit.word))?;
    let new = if on {
        word | bit.mask
    } else {
        word & !bit.mask
    };
    if new != word {
        maps.egress
            .set(bit.word, new, 0)
            .with_context(|| format!("writing word {} of KPX_EGRESS", bit.word))?;
    }
    Ok(())
}

/// Makes the bitmap say exactly which of `with_egress` (ifindexes) have tc
/// egress: bits an earlier agent left for interfaces whose egress went with
/// it (netlink filters it owned) are cleared, so their flows ask again.
/// Each word is read and only a changed one written: never a moment with a
/// present interface's bit clear.
pub fn rewrite(maps: &mut MapSet, with_egress: &[u32]) -> Result<()> {
    let mut want = vec![0u64; proxy_common::capacity::EGRESS_WORDS as usize];
    for &ifindex in with_egress {
        if let Some(bit) = egress_bit(ifindex) {
            want[bit.word as usize] |= bit.mask;
        }
    }
    for (word, &bits) in (0u32..).zip(&want) {
        let have = maps
            .egress
            .get(&word, 0)
            .with_context(|| format!("reading word {word} of KPX_EGRESS"))?;
        if have != bits {
            maps.egress
                .set(word, bits, 0)
                .with_context(|| format!("writing word {word} of KPX_EGRESS"))?;
        }
    }
    Ok(())
}

/// The interfaces new flows asked tc egress for, their requests removed.
pub fn take_wanted(maps: &mut MapSet) -> Result<Vec<u32>> {
    let wanted = maps
        .egress_wanted
        .keys()
        .collect::<Result<Vec<u32>, _>>()
        .context("listing KPX_EGRESS_WANTED")?;
    for ifindex in &wanted {
        // Gone already: the datapath asks again if it must.
        let _ = maps.egress_wanted.remove(ifindex);
    }
    Ok(wanted)
}

/// The interfaces some route of the main table wider than a single host
/// leads through (IPv4's from `/proc/net/route`, IPv6's from
/// `/proc/net/ipv6_route`, link-local and multicast aside): the node's own
/// packets to a service address can leave there, so they get tc egress at
/// once. Unreadable tables give none: then every interface waits for a
/// flow, and the failure is logged.
pub fn wide_route_interfaces() -> HashSet<String> {
    let mut out = HashSet::new();
    match std::fs::read_to_string("/proc/net/route") {
        Ok(t) => out.extend(wide_v4(&t)),
        Err(e) => log::warn!("reading /proc/net/route: {e}"),
    }
    match std::fs::read_to_string("/proc/net/ipv6_route") {
        Ok(t) => out.extend(wide_v6(&t)),
        // No IPv6 in this kernel: no IPv6 routes.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("reading /proc/net/ipv6_route: {e}"),
    }
    out
}

/// `/proc/net/route`'s interfaces with a route whose mask is not /32.
fn wide_v4(table: &str) -> impl Iterator<Item = String> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (iface, mask) = (f.first()?, f.get(7)?);
        let mask = u32::from_str_radix(mask, 16).ok()?;
        (mask != u32::MAX).then(|| iface.to_string())
    })
}

/// `/proc/net/ipv6_route`'s interfaces with a route shorter than /128
/// that is neither link-local (fe80::/10) nor multicast (ff00::/8).
fn wide_v6(table: &str) -> impl Iterator<Item = String> + '_ {
    table.lines().filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dest, plen, iface) = (f.first()?, f.get(1)?, f.get(9)?);
        let plen = u8::from_str_radix(plen, 16).ok()?;
        let first = u16::from_str_radix(dest.get(..4)?, 16).ok()?;
        let special = first & 0xffc0 == 0xfe80 || first & 0xff00 == 0xff00;
        (plen < 128 && !special).then(|| iface.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_host_routes_are_not_wide_and_the_default_route_is() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t010012C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  cali1\t020012C6\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  flannel.1\t000112C6\t000112C6\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let mut got: Vec<String> = wide_v4(v4).collect();
        got.sort();
        assert_eq!(got, ["eth0", "flannel.1"]);
        let v6 = "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     cali1\n\
                  20010002000000000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     cali1\n\
                  ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     cali1\n\
                  20010002000000ff0000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     svc6\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010002000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n";
        let mut got: Vec<String> = wide_v6(v6).collect();
        got.sort();
        assert_eq!(got, ["eth0", "svc6"]);
    }
}
