//! IPv4 prefixes, as in `--cluster-cidr` and `loadBalancerSourceRanges`:
//! ipnet's type (IPv6 will need its other half), not a hand-written one.
//! `Display` keeps the address as written (`198.18.0.1/16` stays so); the
//! datapath keys use [`Cidr::network`].

pub use ipnet::Ipv4Net as Cidr;

/// Parses `s` (surrounding blanks allowed) with an error that says what
/// was expected.
pub fn parse(s: &str) -> Result<Cidr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 CIDR (a.b.c.d/n, n at most 32)"))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn parses_contains_and_prints_as_written() {
        let c: Cidr = "198.19.0.0/16".parse().unwrap();
        assert!(c.contains(&Ipv4Addr::new(198, 19, 255, 1)));
        assert!(!c.contains(&Ipv4Addr::new(198, 20, 0, 1)));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(u32::from(all.netmask()), 0);
        let host: Cidr = "198.18.0.1/16".parse().unwrap();
        assert_eq!(host.to_string(), "198.18.0.1/16");
        assert_eq!(host.network(), Ipv4Addr::new(198, 18, 0, 0));
        for bad in ["198.18.0.0", "198.18.0.0/33", "2001:2::/48", "x/8"] {
            assert!(
                parse(bad).unwrap_err().contains("not an IPv4 CIDR"),
                "{bad}"
            );
        }
        assert_eq!(
            parse(" 198.18.0.0/15 "),
            Ok("198.18.0.0/15".parse().unwrap())
        );
    }
}
