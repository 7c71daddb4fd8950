//! Service lookup: one hash lookup on (destination address, port, protocol).

use proxy_common::{ServiceKey, ServiceValue};

use crate::maps::{SERVICES, SERVICE_ADDRS};

#[inline(always)]
pub fn lookup(addr: u32, port: u16, proto: u8) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr,
        port,
        proto,
        _pad: 0,
    };
    // Copied out at once: the agent may replace the entry concurrently.
    SERVICES.get_ptr(key).map(|v| {
        // SAFETY: a valid map value pointer; NO_PREALLOC keeps it alive for
        // this RCU read section.
        unsafe { *v }
    })
}

/// Whether `addr` is a frontend address of any service.
#[inline(always)]
pub fn is_service_addr(addr: u32) -> bool {
    addr != 0 && SERVICE_ADDRS.get_ptr(addr).is_some()
}
