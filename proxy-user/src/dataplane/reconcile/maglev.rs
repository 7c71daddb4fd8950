//! Maglev tables (Eisenbud et al., NSDI 2016) for the hashing schedulers
//! (`sh`, `dh`, `mh`): `M` slots, M a prime, each backend owning M/N of
//! them (±1), filled from per-backend permutations so that a change of
//! backends moves few slots besides those of the backends that left.
//!
//! Every node must build the same table for the same backends (a client
//! reaching the service through any node meets the same backend), so the
//! table depends only on the set of backends, never on the order they were
//! listed in, on backend ids or on a per-process hash seed.

use super::BackendAddr;

/// Slots per backend at least. Each backend's share is then within
/// 1/SPREAD of 1/N, and a backend leaving or joining moves under 1% of the
/// slots besides its own (measured: 1.5–2% at 100 slots per backend, 1.0–
/// 1.2% at 300, under 0.95% at 400).
const SPREAD: u64 = 400;
/// The largest table: IPVS's and Cilium's bound (2^17 - 1, a prime).
/// Beyond 327 backends a table has fewer than 400 slots per backend (and
/// moves up to about 1.5% beyond what must move at 1,000).
const MAX_SIZE: u64 = 131_071;

/// The table size for `n` backends: the first size of the ladder
/// 401, 809, 1601, 3203, ... (the smallest prime ≥ 400·2^k) that gives each
/// backend 400 slots; 0 for no backend.
///
/// A ladder, not the smallest prime ≥ 100·n: Maglev keeps flows in place
/// only while the table keeps its size, so the size changes only when the
/// backend count crosses a power of two (1, 2, 4, 8, ...), and then every
/// slot is laid out anew. A function of the count alone, so every node
/// picks the same size.
pub fn size(n: usize) -> u32 {
    if n == 0 {
        return 0;
    }
    let want = (n as u64).saturating_mul(SPREAD);
    let mut step = SPREAD;
    while step < want && step < MAX_SIZE {
        step *= 2;
    }
    (step.min(MAX_SIZE)..=MAX_SIZE)
        .find(|&m| is_prime(m))
        .unwrap_or(MAX_SIZE) as u32
}

fn is_prime(m: u64) -> bool {
    m >= 2
        && (2..)
            .take_while(|d| d * d <= m)
            .all(|d| !m.is_multiple_of(d))
}

/// The Maglev table of `backends` (each with the value its slots hold):
/// `size(backends.len())` entries.
pub fn table<T: Copy>(backends: &[(BackendAddr, T)]) -> Vec<T> {
    build(backends, u64::from(size(backends.len())))
}

/// The Maglev table of `backends` with `m` slots (`m` prime, or 0).
fn build<T: Copy>(backends: &[(BackendAddr, T)], m: u64) -> Vec<T> {
    if m == 0 || backends.is_empty() {
        return Vec::new();
    }
    let mut order: Vec<&(BackendAddr, T)> = backends.iter().collect();
    order.sort_by_key(|(b, _)| *b);
    // (offset, skip, next) of each backend's permutation of the slots.
    let mut perm: Vec<(u64, u64, u64)> = order
        .iter()
        .map(|(b, _)| {
            let k = identity(b);
            let offset = splitmix64(k ^ 0x6b70_785f_6d61_676c) % m;
            let skip = splitmix64(k ^ 0x6c65_765f_736b_6970) % (m - 1) + 1;
            (offset, skip, 0)
        })
        .collect();
    let mut owner: Vec<Option<u32>> = vec![None; m as usize];
    let mut filled = 0u64;
    // Each backend in turn takes its next preferred free slot; every round
    // fills N slots, and a permutation visits every slot (M is prime), so
    // this ends after M placements.
    'fill: loop {
        for (i, (offset, skip, next)) in perm.iter_mut().enumerate() {
            let mut c = (*offset + *next * *skip) % m;
            while owner[c as usize].is_some() {
                *next += 1;
                c = (*offset + *next * *skip) % m;
            }
            owner[c as usize] = Some(i as u32);
            *next += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    owner
        .into_iter()
        .map(|o| order[o.unwrap_or(0) as usize].1)
        .collect()
}

/// A backend's identity for its permutation: address, port and protocol.
fn identity(b: &BackendAddr) -> u64 {
    // IPv4's address as it always was (tables stay the same across
    // upgrades); IPv6's folded to 40 bits first (it is hashed anyway).
    let addr = match b.addr {
        std::net::IpAddr::V4(a) => u64::from(u32::from(a)),
        std::net::IpAddr::V6(a) => {
            let x = u128::from(a);
            splitmix64((x as u64) ^ splitmix64((x >> 64) as u64)) & 0xff_ffff_ffff
        }
    };
    (addr << 24) | (u64::from(b.port) << 8) | u64::from(b.proto)
}

/// A fixed 64-bit mixer (splitmix64's finaliser): the same on every node
/// and every build.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv4Addr};

    use super::*;

    fn backends(range: std::ops::Range<u32>) -> Vec<(BackendAddr, u32)> {
        range
            .map(|i| {
                let b = BackendAddr {
                    addr: Ipv4Addr::from(0xc612_0000 + i).into(),
                    port: 8080,
                    proto: 6,
                    local: false,
                };
                (b, i)
            })
            .collect()
    }

    fn shares(t: &[u32]) -> HashMap<u32, usize> {
        let mut n = HashMap::new();
        for id in t {
            *n.entry(*id).or_default() += 1;
        }
        n
    }

    #[test]
    fn sizes_are_primes_of_four_hundred_slots_per_backend() {
        assert_eq!(size(0), 0);
        assert_eq!(size(1), 401);
        assert_eq!(size(2), 809);
        assert_eq!(size(10), 6_421);
        assert_eq!(size(16), 6_421);
        assert_eq!(size(17), 12_809);
        assert_eq!(size(1_000), 131_071);
        for n in 1..=327 {
            assert!(u64::from(size(n)) >= 400 * n as u64, "{n}");
        }
    }

    #[test]
    fn every_backend_gets_its_share_within_one_percent() {
        for n in [1, 2, 3, 10, 64, 257] {
            let t = table(&backends(0..n));
            assert_eq!(t.len(), size(n as usize) as usize);
            let shares = shares(&t);
            assert_eq!(shares.len(), n as usize);
            let ideal = t.len() as f64 / f64::from(n);
            for (id, got) in shares {
                let off = (got as f64 - ideal).abs() / ideal;
                assert!(
                    off <= 0.01,
                    "n={n}: backend {id} has {got} slots, ideal {ideal:.1}"
                );
            }
        }
    }

    #[test]
    fn the_table_depends_only_on_the_set_of_backends() {
        let mut bs = backends(0..20);
        let t = table(&bs);
        bs.reverse();
        assert_eq!(table(&bs), t);
    }

    /// Slots that change owner when a backend leaves or joins, beyond the
    /// ones that must (the leaver's, or the newcomer's share).
    fn extra_moves(before: &[u32], after: &[u32], changed: u32) -> f64 {
        let moved = before
            .iter()
            .zip(after)
            .filter(|(b, a)| b != a && **b != changed && **a != changed)
            .count();
        moved as f64 / before.len() as f64
    }

    #[test]
    fn a_change_of_backends_moves_at_most_one_percent_more() {
        // Counts whose table keeps its size with one backend fewer.
        for n in [4u32, 10, 50, 200] {
            let all = backends(0..n);
            let t = table(&all);
            for leaver in [0, n / 2, n - 1] {
                let rest: Vec<_> = all
                    .iter()
                    .copied()
                    .filter(|(_, id)| *id != leaver)
                    .collect();
                let after = table(&rest);
                assert_eq!(after.len(), t.len());
                let extra = extra_moves(&t, &after, leaver);
                assert!(
                    extra <= 0.01,
                    "n={n}, {leaver} left: {:.2}% moved",
                    extra * 100.0
                );
                // And back: the same set, the same table.
                assert_eq!(table(&all), t);
            }
            // A newcomer takes its share, and little else moves.
            let mut more = all.clone();
            more.extend(backends(n + 7..n + 8));
            if size(more.len()) == size(all.len()) {
                let extra = extra_moves(&t, &table(&more), n + 7);
                assert!(
                    extra <= 0.01,
                    "n={n}, one joined: {:.2}% moved",
                    extra * 100.0
                );
            }
        }
    }

    #[test]
    fn a_thousand_backends_build_at_once() {
        // The time is `cargo xtask bench`'s; this checks the size it builds.
        assert_eq!(table(&backends(0..1_000)).len(), 131_071);
    }
}
