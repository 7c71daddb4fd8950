//! Egress: whether the interface a new flow arrived on has kpx's tc egress
//! program, which translates what the node itself sends its client about
//! the flow (ICMP errors, a hostNetwork backend's replies). Where the
//! socket-level load balancer takes pods' flows, the agent attaches it to
//! pod-facing interfaces only once a flow needs it, so
//! that pod-to-pod packets (socket-balanced flows' included) cross no
//! egress program at all; a new flow from an interface without it asks
//! for it here.

use proxy_common::egress_bit;

use crate::maps::{EGRESS, EGRESS_WANTED};

/// Whether tc egress is attached to `ifindex`; if not, asks the agent for
/// it. One array read (inlined), and a hash insert while it is asked for.
#[inline(always)]
pub fn ensure(ifindex: u32) -> bool {
    // Beyond the bitmap: attached with tc ingress, never asked for.
    let Some(bit) = egress_bit(ifindex) else {
        return true;
    };
    if EGRESS.get(bit.word).is_some_and(|w| w & bit.mask != 0) {
        return true;
    }
    // Full (256 interfaces asking at once): the next flow asks again.
    let _ = EGRESS_WANTED.insert(ifindex, 0u32, 0);
    false
}
