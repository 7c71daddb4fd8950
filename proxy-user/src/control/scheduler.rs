//! Schedulers: how a frontend picks a backend for a new flow, by IPVS's
//! names, so the `ipvs.scheduler` of a KubeProxyConfiguration (or
//! `--ipvs-scheduler`) and per-Service annotations keep their meaning.
//!
//! Random is the default (iptables mode's `statistic --mode random`).
//! ClientIP session affinity overrides every scheduler, as IPVS persistence
//! does. Kubernetes endpoints have no weights, so IPVS's weighted variants
//! equal their plain ones (`wrr` is `rr`), and `lc`, `wlc`, `sed`, `nq`
//! and `twos` all prefer the backend with fewer active connections: kpx
//! keeps their names and serves them all by the power of two choices (of
//! two random backends, the less busy), O(1) where IPVS scans every
//! backend. Active means established TCP; UDP flows count as IPVS's
//! inactive ones, which weigh 1/256 of an active one there and nothing
//! here, so least-connection UDP services pick at random.

use std::fmt;

use proxy_common::{
    SCHED_DH, SCHED_LC, SCHED_MH, SCHED_NQ, SCHED_RANDOM, SCHED_RR, SCHED_SED, SCHED_SH,
    SCHED_TWOS, SCHED_WLC, SVC_F_HASH_PORT, SVC_SCHED_MASK, SVC_SCHED_SHIFT,
};

/// A Service's scheduler, by name (`kpx.io/scheduler: mh`).
pub const ANNOTATION_SCHEDULER: &str = "kpx.io/scheduler";
/// Its flags, comma-separated: ipvsadm's names (`mh-port`, `sh-fallback`)
/// or kube-router's (`flag-1,flag-2`).
pub const ANNOTATION_SCHEDULER_FLAGS: &str = "kpx.io/scheduler-flags";
/// kube-router's annotations, accepted as they are.
pub const KUBE_ROUTER_SCHEDULER: &str = "kube-router.io/service.scheduler";
pub const KUBE_ROUTER_SCHEDULER_FLAGS: &str = "kube-router.io/service.schedflags";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    #[default]
    Random,
    Rr,
    Sh,
    Dh,
    Mh,
    Lc,
    Wlc,
    Sed,
    Nq,
    Twos,
}

/// A scheduler and its flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scheduler {
    pub kind: Kind,
    /// `sh-port` / `mh-port` (flag 2): the hash covers the port as well, so
    /// one client's connections spread over the backends.
    pub hash_port: bool,
}

/// What a scheduler name means to kpx.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    Known(Kind),
    /// An IPVS scheduler kpx does not implement yet: it says so and
    /// schedules at random, as it always did.
    NotImplemented(&'static str),
}

/// IPVS schedulers kpx does not implement (yet), by name: the
/// locality-based ones (for cache clusters keyed by destination) and the
/// weight-based failover and overflow ones (weights Kubernetes does not
/// have).
const NOT_IMPLEMENTED: [&str; 4] = ["lblc", "lblcr", "fo", "ovf"];

impl Kind {
    /// `""` is the default (random); otherwise IPVS's scheduler names, and
    /// `random` for kpx's default by name.
    pub fn parse(name: &str) -> Result<Parsed, String> {
        let kind = match name {
            "" | "random" => Kind::Random,
            "rr" | "wrr" => Kind::Rr,
            "sh" => Kind::Sh,
            "dh" => Kind::Dh,
            "mh" => Kind::Mh,
            "lc" => Kind::Lc,
            "wlc" => Kind::Wlc,
            "sed" => Kind::Sed,
            "nq" => Kind::Nq,
            "twos" => Kind::Twos,
            other => {
                return NOT_IMPLEMENTED
                    .iter()
                    .find(|n| **n == other)
                    .map(|n| Parsed::NotImplemented(n))
                    .ok_or_else(|| {
                        format!(
                            "unknown scheduler {other:?} (random, rr, wrr, sh, dh, mh, lc, wlc, sed, nq or twos; IPVS's {} are not implemented yet)",
                            NOT_IMPLEMENTED.join(", ")
                        )
                    })
            }
        };
        Ok(Parsed::Known(kind))
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Random => "random",
            Kind::Rr => "rr",
            Kind::Sh => "sh",
            Kind::Dh => "dh",
            Kind::Mh => "mh",
            Kind::Lc => "lc",
            Kind::Wlc => "wlc",
            Kind::Sed => "sed",
            Kind::Nq => "nq",
            Kind::Twos => "twos",
        }
    }

    const fn code(self) -> u32 {
        match self {
            Kind::Random => SCHED_RANDOM,
            Kind::Rr => SCHED_RR,
            Kind::Sh => SCHED_SH,
            Kind::Dh => SCHED_DH,
            Kind::Mh => SCHED_MH,
            Kind::Lc => SCHED_LC,
            Kind::Wlc => SCHED_WLC,
            Kind::Sed => SCHED_SED,
            Kind::Nq => SCHED_NQ,
            Kind::Twos => SCHED_TWOS,
        }
    }
}

impl Scheduler {
    pub const fn new(kind: Kind) -> Self {
        Self {
            kind,
            hash_port: false,
        }
    }

    /// Applies comma-separated flags: ipvsadm's `sh-port` / `mh-port` (or
    /// kube-router's `flag-2`) hash the port too; `*-fallback` (`flag-1`)
    /// is what kpx always does (its tables hold only eligible backends, so
    /// the hash never lands on an unavailable one) and `flag-3` means
    /// nothing to sh, dh or mh.
    pub fn with_flags(mut self, flags: &str) -> Result<Self, String> {
        for f in flags.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            match f {
                "sh-port" | "mh-port" | "flag-2" => self.hash_port = true,
                "sh-fallback" | "mh-fallback" | "flag-1" | "flag-3" => {}
                other => {
                    return Err(format!(
                        "unknown scheduler flag {other:?} (sh-port, mh-port, sh-fallback, mh-fallback, flag-1, flag-2, flag-3)"
                    ))
                }
            }
        }
        Ok(self)
    }

    /// The `ServiceValue::flags` bits of this scheduler.
    pub const fn flags(self) -> u32 {
        (self.kind.code() << SVC_SCHED_SHIFT) | if self.hash_port { SVC_F_HASH_PORT } else { 0 }
    }

    /// The scheduler a service entry's flags name.
    pub fn of_flags(flags: u32) -> Self {
        let kind = match (flags & SVC_SCHED_MASK) >> SVC_SCHED_SHIFT {
            SCHED_RR => Kind::Rr,
            SCHED_SH => Kind::Sh,
            SCHED_DH => Kind::Dh,
            SCHED_MH => Kind::Mh,
            SCHED_LC => Kind::Lc,
            SCHED_WLC => Kind::Wlc,
            SCHED_SED => Kind::Sed,
            SCHED_NQ => Kind::Nq,
            SCHED_TWOS => Kind::Twos,
            _ => Kind::Random,
        };
        Self {
            kind,
            hash_port: flags & SVC_F_HASH_PORT != 0,
        }
    }

    /// Whether its tables are Maglev tables (sh, dh, mh).
    pub fn hashing(self) -> bool {
        proxy_common::hashing(self.kind.code())
    }
}

impl fmt::Display for Scheduler {
    /// As ipvsadm lists it: the name, then the flags kpx acts on.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.name())?;
        if self.hash_port {
            write!(f, " ({}-port)", self.kind.name())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_the_service_flags() {
        for name in [
            "random", "rr", "sh", "dh", "mh", "lc", "wlc", "sed", "nq", "twos",
        ] {
            let Ok(Parsed::Known(kind)) = Kind::parse(name) else {
                panic!("{name} not known");
            };
            assert_eq!(kind.name(), name);
            for hash_port in [false, true] {
                let s = Scheduler { kind, hash_port };
                assert_eq!(Scheduler::of_flags(s.flags() | 0x7), s);
            }
        }
        assert_eq!(Kind::parse(""), Ok(Parsed::Known(Kind::Random)));
        assert_eq!(Kind::parse("wrr"), Ok(Parsed::Known(Kind::Rr)));
        assert_eq!(Kind::parse("lblc"), Ok(Parsed::NotImplemented("lblc")));
        let e = Kind::parse("maglev").unwrap_err();
        assert!(e.contains("\"maglev\""), "{e}");
    }

    #[test]
    fn flags_by_ipvsadm_or_kube_router_names() {
        let mh = Scheduler::new(Kind::Mh);
        assert!(mh.with_flags("mh-port").unwrap().hash_port);
        assert!(mh.with_flags("flag-1, flag-2").unwrap().hash_port);
        assert!(!mh.with_flags("mh-fallback").unwrap().hash_port);
        assert!(mh.with_flags("port").is_err());
    }
}
