//! pathlen: how long is a packet's path through an eBPF program?
//!
//! Runs the tc and XDP programs of an eBPF object (as aya links it: maps relocated,
//! bpf-to-bpf calls appended) in a small userspace interpreter and counts
//! what one packet costs: BPF instructions executed and helper calls, by
//! helper. Unlike a time from `BPF_PROG_TEST_RUN`, the count is exact and
//! repeatable (the same object, maps and packet give the same numbers on any
//! machine, under any load, without root), so tests can hold each path of
//! the datapath to a budget and the benchmark can print it next to the
//! nanoseconds.
//!
//! What it counts is the bytecode as compiled, before the kernel's verifier
//! rewrites it (context field accesses, inlined map lookups): a measure of
//! the program's path, not of the JIT's output. Helpers are emulated as far
//! as a path needs them: maps (hash, LRU, array, per-CPU array on one CPU,
//! LPM trie), the skb load/store/checksum helpers with the kernel's
//! arithmetic, XDP's metadata (`bpf_xdp_adjust_meta`; an XDP run's context
//! is an `xdp_md`, [`Vm::run_xdp`]), `fib_lookup` answering as [`Fib`] says, redirects, tail
//! calls ([`Vm::set_tail`]), clocks and a seeded random source. An instruction or helper it does not know is an
//! error naming it, never a guess.

mod helpers;
mod interp;
mod maps;
mod mem;

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{anyhow, Context as _, Result};
use aya_obj::generated::bpf_insn;

use crate::{maps::MapState, mem::Memory};

/// What `bpf_fib_lookup` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fib {
    /// No route: `BPF_FIB_LKUP_RET_NOT_FWDED` (what an empty namespace says).
    NoRoute,
    /// A route and a resolved neighbour: `BPF_FIB_LKUP_RET_SUCCESS` with
    /// this egress interface, source address (network order; `src6` for
    /// an IPv6 request) and MACs.
    Forward {
        ifindex: u32,
        src: [u8; 4],
        src6: [u8; 16],
        smac: [u8; 6],
        dmac: [u8; 6],
    },
}

/// The skb a run starts with, besides its bytes.
#[derive(Clone, Copy, Debug)]
pub struct Skb {
    /// `skb->ifindex`.
    pub ifindex: u32,
    /// `skb->skb_iif`: the interface a forwarded packet came in on; 0 for
    /// one the node sent (and in `BPF_PROG_TEST_RUN`, unless given).
    pub ingress_ifindex: u32,
    pub mark: u32,
    /// Bytes in the linear part (direct packet access sees only these);
    /// None: all of them.
    pub linear: Option<usize>,
}

impl Default for Skb {
    fn default() -> Self {
        // The loopback device, as `BPF_PROG_TEST_RUN` gives.
        Self {
            ifindex: 1,
            ingress_ifindex: 0,
            mark: 0,
            linear: None,
        }
    }
}

/// One run of a program on one packet.
#[derive(Clone, Debug)]
pub struct Run {
    /// The program's return value (the tc verdict), as a signed 32-bit value.
    pub verdict: i32,
    /// BPF instructions executed (a 16-byte `ld_imm64` counts once).
    pub insns: u64,
    /// Helper calls, all helpers together.
    pub helper_calls: u64,
    /// Helper calls by helper name.
    pub by_helper: BTreeMap<&'static str, u64>,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// `skb->mark` as the program left it.
    pub mark: u32,
}

/// A loaded object: its programs, linked, and its maps, emulated. Map
/// contents persist across runs, as in the kernel.
pub struct Vm {
    programs: HashMap<String, Vec<bpf_insn>>,
    /// Program names by the id a program array holds ([`Vm::set_tail`]).
    prog_ids: Vec<String>,
    /// Where a `bpf_tail_call` that found its program goes.
    tail_to: Option<String>,
    maps: Vec<MapState>,
    by_name: HashMap<String, usize>,
    mem: Memory,
    /// `bpf_ktime_get_ns()`: advances by 1 µs per call.
    clock_ns: u64,
    /// xorshift state of `bpf_get_prandom_u32()`.
    rand: u64,
    /// What `bpf_fib_lookup` answers.
    pub fib: Fib,
}

/// First fake file descriptor handed to the map relocation: map `i` is
/// `MAP_FD_BASE + i` in the linked instructions.
const MAP_FD_BASE: i32 = 1000;

impl Vm {
    /// Moves the clock `ns` on, as time passing between two packets.
    pub fn advance_clock(&mut self, ns: u64) {
        self.clock_ns += ns;
    }

    /// Parses and links an eBPF object as aya's loader does.
    pub fn load(object: &[u8]) -> Result<Self> {
        let mut obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
        let mut maps = Vec::new();
        let mut by_name = HashMap::new();
        let mut names: Vec<String> = obj.maps.keys().cloned().collect();
        names.sort();
        for name in &names {
            by_name.insert(name.clone(), maps.len());
            maps.push(MapState::new(&obj.maps[name]));
        }
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        let fds: Vec<(String, i32, aya_obj::Map)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), MAP_FD_BASE + i as i32, obj.maps[n].clone()))
            .collect();
        obj.relocate_maps(
            fds.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)),
            &text_sections,
        )
        .map_err(|e| anyhow!("relocating maps: {e}"))?;
        obj.relocate_calls(&text_sections)
            .map_err(|e| anyhow!("linking calls: {e}"))?;
        let mut programs = HashMap::new();
        for (name, prog) in &obj.programs {
            let f = obj
                .functions
                .get(&prog.function_key())
                .with_context(|| format!("program {name} has no function"))?;
            programs.insert(name.clone(), f.instructions.clone());
        }
        let mut prog_ids: Vec<String> = programs.keys().cloned().collect();
        prog_ids.sort();
        let mut vm = Self {
            programs,
            prog_ids,
            tail_to: None,
            maps,
            by_name,
            mem: Memory::default(),
            clock_ns: 1_000_000_000_000,
            rand: 0x9e37_79b9_7f4a_7c15,
            fib: Fib::NoRoute,
        };
        // Global data sections (.rodata, .data, .bss) start with their bytes.
        for (i, name) in names.iter().enumerate() {
            let data = obj.maps[name].data();
            if !data.is_empty() {
                let key = 0u32.to_ne_bytes();
                vm.maps[i].update(&mut vm.mem, &key, data, 0);
            }
        }
        Ok(vm)
    }

    fn map(&self, name: &str) -> Result<usize> {
        self.by_name
            .get(name)
            .copied()
            .with_context(|| format!("no map named {name}"))
    }

    /// Writes `key` → `value` into map `name` (`BPF_ANY`).
    pub fn map_insert(&mut self, name: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let i = self.map(name)?;
        let m = &mut self.maps[i];
        anyhow::ensure!(
            key.len() == m.key_size && value.len() == m.value_size,
            "{name}: key/value of {}/{} bytes, the map has {}/{}",
            key.len(),
            value.len(),
            m.key_size,
            m.value_size
        );
        match m.update(&mut self.mem, key, value, 0) {
            0 => Ok(()),
            e => Err(anyhow!("{name}: update failed ({e})")),
        }
    }

    /// Puts program `prog` at `index` of the program array `map`, as the
    /// loader does with its descriptor.
    pub fn set_tail(&mut self, map: &str, index: u32, prog: &str) -> Result<()> {
        let id = self
            .prog_ids
            .iter()
            .position(|p| p == prog)
            .with_context(|| format!("no program named {prog}"))?;
        self.map_insert(map, &index.to_ne_bytes(), &(id as u32).to_ne_bytes())
    }

    /// The value at `key` in map `name`.
    pub fn map_get(&self, name: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let i = self.map(name)?;
        Ok(self.maps[i]
            .lookup(key)
            .map(|r| self.mem.region(r).to_vec()))
    }

    /// Runs program `prog` once on the Ethernet frame `packet`.
    pub fn run(&mut self, prog: &str, packet: &[u8], skb: Skb) -> Result<Run> {
        self.mem.start_run(packet, skb);
        self.execute(prog)
    }

    /// Runs the XDP program `prog` on `frame`, received on
    /// `ingress_ifindex`; the verdict is its XDP action.
    pub fn run_xdp(&mut self, prog: &str, frame: &[u8], ingress_ifindex: u32) -> Result<Run> {
        self.mem.start_xdp(frame, ingress_ifindex);
        self.execute(prog)
    }

    fn execute(&mut self, prog: &str) -> Result<Run> {
        let code = self
            .programs
            .get(prog)
            .with_context(|| format!("no program named {prog}"))?
            .clone();
        let mut counts = interp::Counts::default();
        let ret =
            interp::execute(self, &code, &mut counts).with_context(|| format!("running {prog}"))?;
        Ok(Run {
            verdict: ret as u32 as i32,
            insns: counts.insns,
            helper_calls: counts.by_helper.values().sum(),
            by_helper: counts.by_helper,
            packet: self.mem.packet().to_vec(),
            mark: self.mem.mark(),
        })
    }
}
