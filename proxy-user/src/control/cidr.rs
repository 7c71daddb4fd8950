//! IP prefixes of either family, as in `--cluster-cidr`,
//! `loadBalancerSourceRanges` and `nodePortAddresses`: ipnet's type, not a
//! hand-written one. `Display` keeps the address as written
//! (`198.18.0.1/16` stays so); the datapath keys use [`Cidr::trunc`].
//! [`Family`] is what kube-proxy runs one proxier per: every address a
//! Service, slice or node carries serves only its own family's frontends.

use std::net::IpAddr;

pub use ipnet::IpNet as Cidr;

/// Parses `s` (surrounding blanks allowed) with an error that says what
/// was expected.
pub fn parse(s: &str) -> Result<Cidr, String> {
    s.trim().parse().map_err(|_| {
        format!("{s:?} is not a CIDR (a.b.c.d/n with n at most 32, or an IPv6 prefix x:y::/n)")
    })
}

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn of_net(c: &Cidr) -> Self {
        Self::of(&c.addr())
    }

    /// The unspecified address: a NodePort's frontend (any NodePort address).
    pub fn any(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        }
    }

    /// The API's name (`ipFamilies`, EndpointSlice `addressType`).
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn parses_contains_and_prints_as_written() {
        let c: Cidr = "198.19.0.0/16".parse().unwrap();
        assert!(c.contains(&IpAddr::from(Ipv4Addr::new(198, 19, 255, 1))));
        assert!(!c.contains(&IpAddr::from(Ipv4Addr::new(198, 20, 0, 1))));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&IpAddr::from(Ipv4Addr::new(1, 2, 3, 4))));
        assert!(!all.contains(&IpAddr::from(Ipv6Addr::LOCALHOST)));
        let host: Cidr = "198.18.0.1/16".parse().unwrap();
        assert_eq!(host.to_string(), "198.18.0.1/16");
        assert_eq!(host.network(), IpAddr::from(Ipv4Addr::new(198, 18, 0, 0)));
        let v6 = parse(" 2001:2::1/48 ").unwrap();
        assert_eq!(v6.to_string(), "2001:2::1/48");
        assert_eq!(Family::of_net(&v6), Family::V6);
        assert!(v6.contains(&"2001:2:0:ff::10".parse::<IpAddr>().unwrap()));
        for bad in ["198.18.0.0", "198.18.0.0/33", "2001:2::/129", "x/8"] {
            assert!(parse(bad).unwrap_err().contains("is not a CIDR"), "{bad}");
        }
        assert_eq!(
            parse(" 198.18.0.0/15 "),
            Ok("198.18.0.0/15".parse().unwrap())
        );
    }
}
