//! The verdict: how a packet's path ends, counted once, as a tc (or XDP)
//! action.

use aya_ebpf::bindings::{xdp_action, TC_ACT_SHOT, TC_ACT_UNSPEC};
use proxy_common::{Counter, DropReason};

use crate::stats;

/// Verdict for packets kpx does not act on: let the next tc program (or the
/// stack, if there is none) see them unchanged.
pub const PASS: i32 = TC_ACT_UNSPEC;
pub const DROP: i32 = TC_ACT_SHOT;

#[inline(always)]
pub fn action(v: Verdict) -> i32 {
    match v {
        Verdict::Pass(counter) => {
            stats::count(counter);
            PASS
        }
        // Never here: tc ingress's entry hands them over (`dsr::tail_call`,
        // `family::tail_call`).
        Verdict::Dsr(_) | Verdict::Ipv6 | Verdict::NewFlow => PASS,
        Verdict::Translated(action) | Verdict::Redirect(action) => action,
        Verdict::Drop(reason) => {
            stats::drop(reason);
            DROP
        }
    }
}

/// The same verdict at XDP. A packet passed is not counted here: it goes
/// on to tc ingress, which counts what it does with it.
#[inline(always)]
pub fn xdp_action(v: Verdict) -> u32 {
    match v {
        Verdict::Pass(_) | Verdict::Dsr(_) | Verdict::Ipv6 | Verdict::NewFlow => {
            xdp_action::XDP_PASS
        }
        Verdict::Translated(action) | Verdict::Redirect(action) => action as u32,
        Verdict::Drop(reason) => {
            stats::drop(reason);
            xdp_action::XDP_DROP
        }
    }
}

pub enum Verdict {
    /// Untouched; the counter says why.
    Pass(Counter),
    /// Untouched yet: direct server return's work, for the program's
    /// entry to run (tc ingress only).
    Dsr(crate::dsr::Request),
    /// An IPv6 packet at IPv4's program: for the entry to hand to IPv6's
    /// (tc ingress only).
    Ipv6,
    /// An IPv6 flow's first packet, its state in this CPU's scratch
    /// space: for the entry to hand to `kpx_tc_new6`.
    NewFlow,
    /// Translated (and counted), with the forwarding verdict.
    Translated(i32),
    /// Rewritten into a reply and redirected (and counted).
    Redirect(i32),
    Drop(DropReason),
}
