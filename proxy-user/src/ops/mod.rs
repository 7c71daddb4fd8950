//! What operators touch: the health servers ([`health`]), Prometheus metrics
//! ([`metrics`]), `kpx dump` ([`dump`], and its `ipvsadm -Ln` view
//! [`ipvsadm`]) and the removal of kube-proxy's rules on takeover
//! ([`cleanup`]).

pub mod cleanup;
pub mod dump;
pub mod health;
pub mod ipvsadm;
pub mod metrics;
