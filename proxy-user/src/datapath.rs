//! The eBPF datapath as userspace sees it: the embedded object, loading it
//! (optionally with pinned maps), and typed access to its maps.

use std::path::PathBuf;

use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::SchedClassifier,
    Ebpf, EbpfLoader,
};
use proxy_common::{
    map_names, prog_names, Backend, Counter, CtKey, CtValue, DropReason, ServiceKey, ServiceStats,
    ServiceValue, SlotKey,
};

/// The datapath object built by build.rs from proxy-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpx-ebpf"));

#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    /// Pin (or reuse already pinned) maps in this bpffs directory.
    pub pin_dir: Option<PathBuf>,
    /// Conntrack capacity in entries (two per flow); default in `proxy_common::capacity`.
    pub conntrack_entries: Option<u32>,
}

pub struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the object and its tc program into the kernel (the verifier runs here).
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = &opts.pin_dir {
            for name in map_names::ALL {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        if let Some(n) = opts.conntrack_entries {
            loader.map_max_entries(map_names::CONNTRACK, n);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the kpx eBPF object (needs root: CAP_BPF and CAP_NET_ADMIN)")?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(prog_names::TC_INGRESS)
            .ok_or_else(|| anyhow!("program {} missing from the object", prog_names::TC_INGRESS))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel rejected {}", prog_names::TC_INGRESS))?;
        Ok(Self { ebpf })
    }

    /// The tc ingress classifier (loaded).
    pub fn ingress(&mut self) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(prog_names::TC_INGRESS)
            .ok_or_else(|| anyhow!("program {} missing", prog_names::TC_INGRESS))?
            .try_into()?)
    }

    fn map_data(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))
    }

    pub fn services(&mut self) -> Result<HashMap<&mut MapData, ServiceKey, ServiceValue>> {
        Ok(HashMap::try_from(self.map_data(map_names::SERVICES)?)?)
    }

    pub fn service_addrs(&mut self) -> Result<HashMap<&mut MapData, u32, u32>> {
        Ok(HashMap::try_from(self.map_data(map_names::SERVICE_ADDRS)?)?)
    }

    pub fn slots(&mut self) -> Result<HashMap<&mut MapData, SlotKey, u32>> {
        Ok(HashMap::try_from(self.map_data(map_names::SLOTS)?)?)
    }

    pub fn backends(&mut self) -> Result<HashMap<&mut MapData, u32, Backend>> {
        Ok(HashMap::try_from(self.map_data(map_names::BACKENDS)?)?)
    }

    pub fn conntrack(&mut self) -> Result<HashMap<&mut MapData, CtKey, CtValue>> {
        Ok(HashMap::try_from(self.map_data(map_names::CONNTRACK)?)?)
    }

    /// Global counters summed over CPUs, in `Counter::ALL` order.
    pub fn counters(&mut self) -> Result<Vec<(Counter, u64)>> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map_data(map_names::COUNTERS)?)?;
        Counter::ALL
            .iter()
            .map(|&c| Ok((c, map.get(&(c as u32), 0)?.iter().sum())))
            .collect()
    }

    /// Drop counters summed over CPUs, in `DropReason::ALL` order.
    pub fn drops(&mut self) -> Result<Vec<(DropReason, u64)>> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map_data(map_names::DROPS)?)?;
        DropReason::ALL
            .iter()
            .map(|&r| Ok((r, map.get(&(r as u32), 0)?.iter().sum())))
            .collect()
    }

    /// Statistics of one service frontend summed over CPUs.
    pub fn service_stats(&mut self, svc_id: u32) -> Result<ServiceStats> {
        let map: PerCpuArray<_, ServiceStats> =
            PerCpuArray::try_from(self.map_data(map_names::SERVICE_STATS)?)?;
        Ok(map
            .get(&svc_id, 0)?
            .iter()
            .fold(ServiceStats::default(), |a, s| ServiceStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
                new_flows: a.new_flows + s.new_flows,
            }))
    }
}
