//! The pinned maps' layout across kpx versions: what a new kpx does with the
//! maps an older (or newer) one left pinned.
//!
//! The layout version lives in its own pinned map (`KPX_LAYOUT`, one u32)
//! written once the new maps are in place. At start, before the object is
//! loaded (which would take over every pin of a known name):
//! - same version: the pins are shared as they are, each still checked
//!   against this build's key and value sizes and map type;
//! - version 1 (before versioning: no `KPX_LAYOUT`, one LRU `KPX_CT`):
//!   migrated, the flows carried into the two tables this layout has,
//!   established TCP into `KPX_CT_TCP`, the rest into `KPX_CT_ANY`;
//! - versions 1 and 2 (slots holding a backend id, backends in
//!   `KPX_BACKENDS`): each slot carried with its backend in it, so the
//!   services already pinned serve new flows from the first moment, before
//!   the first sync;
//! - versions 2 and 3 (established tables keyed by the whole `CtKey`):
//!   both families' established flows read out, their pins replaced, and
//!   the flows written into this layout's tables (keyed by `CtTuple`);
//! - any other version (a downgrade, or a layout this kpx does not know):
//!   nothing is shared; its conntrack entries are counted as not carried,
//!   every `KPX_*` pin is removed and fresh maps are created. The
//!   control-plane maps are refilled by the first sync either way.

use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, Map, MapData, MapInfo};
use proxy_common::{
    legacy_map_names, map_names, Backend, CtKey, CtValue, In6, Slot, SlotKey, CT_DIR_ORIGINAL,
    CT_F_SEEN_REPLY, LAYOUT_VERSION,
};

use crate::dataplane::{
    conntrack::CtFamily,
    maps::{CtEntry, CtTable, MapSet, IPV6_SIZED},
};

/// What a start found pinned, and what became of it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// The layout version found (None: nothing pinned yet).
    pub from: Option<u32>,
    /// Conntrack entries carried into this layout's tables.
    pub carried: u64,
    /// Conntrack entries that could not be carried (an unknown layout, or
    /// no room in the new table).
    pub lost: u64,
}

/// What [`prepare`] took out of the old pins, to be written into the new
/// maps once the object is loaded ([`finish`]).
pub struct Pending {
    upgrade: Upgrade,
    entries: Vec<CtEntry>,
    entries6: Vec<CtEntry<In6>>,
    slots: Vec<(SlotKey, Slot)>,
    late: Late,
}

/// An old layout's established tables, kept open after their pins went:
/// the old programs go on writing them until this build's replace them.
/// [`carry_late`] carries what they added meanwhile.
#[derive(Default)]
pub struct Late {
    v4: Option<Map>,
    v6: Option<Map>,
}

/// The version of the maps pinned under `dir`: None when nothing of kpx's
/// is there, 1 for the unversioned layout.
pub fn pinned_version(dir: &Path) -> Result<Option<u32>> {
    let layout = dir.join(map_names::LAYOUT);
    if layout.exists() {
        let data =
            MapData::from_pin(&layout).with_context(|| format!("opening {}", layout.display()))?;
        let map: aya::maps::Array<MapData, u32> = Map::from_map_data(data)?
            .try_into()
            .with_context(|| format!("{} is not a layout version", layout.display()))?;
        return Ok(Some(map.get(&0, 0)?));
    }
    let any_pin = map_names::ALL
        .iter()
        .chain(&legacy_map_names::ALL)
        .any(|name| dir.join(name).exists());
    Ok(any_pin.then_some(1))
}

/// Makes the pins under `dir` safe to share with this build's object:
/// migrates or removes what another layout left. Call before loading.
pub fn prepare(dir: &Path) -> Result<Pending> {
    let from = pinned_version(dir)?;
    let mut pending = Pending {
        upgrade: Upgrade {
            from,
            ..Default::default()
        },
        entries: Vec::new(),
        entries6: Vec::new(),
        slots: Vec::new(),
        late: Late::default(),
    };
    if matches!(from, Some(1 | 2)) {
        pending.slots = take_v2_slots(dir);
    }
    match from {
        None => {}
        Some(LAYOUT_VERSION) => replace_mismatched_pins(dir)?,
        // Layouts 2 and 3 differ from this one in the established tables'
        // keys (and 2 in the slots, taken above).
        Some(2 | 3) => {
            let up = &mut pending.upgrade;
            (pending.entries, pending.late.v4) =
                take_keyed_established::<u32>(dir, map_names::CT_TCP, up)?;
            (pending.entries6, pending.late.v6) =
                take_keyed_established::<In6>(dir, map_names::CT6_TCP, up)?;
            replace_mismatched_pins(dir)?;
        }
        Some(1) => {
            let legacy = dir.join(legacy_map_names::CONNTRACK);
            if legacy.exists() {
                match read_v1_conntrack(&legacy) {
                    Ok(entries) => pending.entries = entries,
                    Err(e) => {
                        pending.upgrade.lost = count_entries(&legacy).unwrap_or(0);
                        log::warn!(
                            "the conntrack table of layout 1 ({}) cannot be read: {e:#}",
                            legacy.display()
                        );
                    }
                }
                fs::remove_file(&legacy)
                    .with_context(|| format!("removing {}", legacy.display()))?;
            }
            // Every other map of layout 1 is layout 2's, which differs
            // from this one in the slots alone (taken above).
            replace_mismatched_pins(dir)?;
        }
        Some(other) => {
            for name in [
                map_names::CT_TCP,
                map_names::CT_ANY,
                map_names::CT6_TCP,
                map_names::CT6_ANY,
                legacy_map_names::CONNTRACK,
            ] {
                let path = dir.join(name);
                if path.exists() {
                    pending.upgrade.lost += count_entries(&path).unwrap_or(0);
                }
            }
            log::warn!(
                "the maps under {} are of layout {other}, which this kpx (layout {LAYOUT_VERSION}) cannot migrate: replacing them all; {} conntrack entries (their flows) are not carried over",
                dir.display(),
                pending.upgrade.lost
            );
            remove_all_pins(dir)?;
        }
    }
    Ok(pending)
}

/// Writes what [`prepare`] carried into the loaded maps, then the layout
/// version: only a complete migration is marked done. Returns the old
/// tables still to be read once this build's programs are attached
/// ([`carry_late`]).
pub fn finish(maps: &mut MapSet, pending: Pending) -> Result<(Upgrade, Late)> {
    let mut up = pending.upgrade;
    let mut slots_lost = 0usize;
    for (k, v) in &pending.slots {
        if let Err(e) = maps.slots.insert(k, v, 0) {
            slots_lost += 1;
            log::debug!("carrying slot {k:?}: {e}");
        }
    }
    if slots_lost > 0 {
        log::warn!(
            "{slots_lost} slots of the old layout could not be carried: the first sync writes them"
        );
    }
    carry(maps, pending.entries, &mut up);
    carry(maps, pending.entries6, &mut up);
    maps.layout
        .set(0, LAYOUT_VERSION, 0)
        .context("writing the layout version")?;
    if up.from.is_some_and(|v| v != LAYOUT_VERSION) {
        log::warn!(
            "maps of layout {} upgraded to layout {LAYOUT_VERSION}: {} conntrack entries carried, {} not",
            up.from.unwrap_or(0),
            up.carried,
            up.lost
        );
    }
    Ok((up, pending.late))
}

/// Carries the established flows the old programs set up after [`prepare`]
/// read their tables (between the read and the attachment of this build's
/// programs, which the caller has done: nothing writes the old tables
/// now), counted in `up`. A tuple this build's tables hold already is left
/// as it is. Returns how many entries were carried.
pub fn carry_late(maps: &mut MapSet, late: Late, up: &mut Upgrade) -> u64 {
    let before = up.carried;
    late_into::<u32>(maps, late.v4, up);
    late_into::<In6>(maps, late.v6, up);
    let n = up.carried - before;
    if n > 0 {
        log::info!("{n} conntrack entries the old programs made during the upgrade carried");
    }
    n
}

fn late_into<A: CtFamily>(maps: &mut MapSet, old: Option<Map>, up: &mut Upgrade)
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    let Some(old) = old else { return };
    match old_established::<A>(&old) {
        Ok(mut late) => {
            late.retain(|(t, k, _)| A::get(maps, *t, k).is_none());
            carry(maps, late, up);
        }
        Err(e) => log::warn!("reading the old layout's established table again: {e:#}"),
    }
}

/// The entries of an established table of layouts 2 and 3 (keyed by the
/// whole [`CtKey`]), each for this layout's established table.
fn old_established<A: Copy>(map: &Map) -> Result<Vec<CtEntry<A>>>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    let table: HashMap<&MapData, CtKey<A>, CtValue<A>> = map.try_into()?;
    Ok(table
        .iter()
        .filter_map(|kv| kv.ok())
        .map(|(k, v)| (CtTable::Tcp, k, v))
        .collect())
}

/// Writes conntrack entries an old layout held into this layout's tables
/// (a reply entry noted in the reply filter), counted in `up`.
fn carry<A: CtFamily>(maps: &mut MapSet, entries: Vec<CtEntry<A>>, up: &mut Upgrade) {
    for (table, k, v) in entries {
        match A::insert(maps, table, &k, &v) {
            Ok(()) => up.carried += 1,
            Err(e) => {
                up.lost += 1;
                log::debug!("carrying conntrack entry {k:?}: {e}");
            }
        }
    }
}

/// The entries of an established table of layouts 2 and 3 (`name`, keyed
/// by the whole [`CtKey`]), its pin removed so that the load creates this
/// layout's table in its place, and the table itself, kept open for
/// [`carry_late`]. One that cannot be read is counted as lost in `up`,
/// and replaced all the same.
fn take_keyed_established<A: Copy>(
    dir: &Path,
    name: &str,
    up: &mut Upgrade,
) -> Result<(Vec<CtEntry<A>>, Option<Map>)>
where
    CtKey<A>: aya::Pod + std::fmt::Debug,
    CtValue<A>: aya::Pod,
{
    let path = dir.join(name);
    if !path.exists() {
        return Ok((Vec::new(), None));
    }
    let read = || -> Result<(Vec<CtEntry<A>>, Map)> {
        let map = Map::from_map_data(MapData::from_pin(&path)?)?;
        Ok((old_established(&map)?, map))
    };
    let taken = match read() {
        Ok((entries, map)) => (entries, Some(map)),
        Err(e) => {
            up.lost += count_entries(&path).unwrap_or(0);
            log::warn!(
                "the established flows of the old layout ({}) cannot be read: {e:#}",
                path.display()
            );
            (Vec::new(), None)
        }
    };
    fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(taken)
}

/// Layouts 1 and 2's slots (a backend id each) joined with their
/// backends (`KPX_BACKENDS`), as this layout's slots; the old backend map's
/// pin removed (the slot map's, of another value size, is replaced by
/// [`replace_mismatched_pins`]). Whatever cannot be read is left to the
/// first sync, said once.
fn take_v2_slots(dir: &Path) -> Vec<(SlotKey, Slot)> {
    let slots_pin = dir.join(map_names::SLOTS);
    let backends_pin = dir.join(legacy_map_names::BACKENDS);
    let read = || -> Result<Vec<(SlotKey, Slot)>> {
        if !slots_pin.exists() || !backends_pin.exists() {
            return Ok(Vec::new());
        }
        let open = |p: &Path| -> Result<Map> {
            Ok(Map::from_map_data(
                MapData::from_pin(p).with_context(|| format!("opening {}", p.display()))?,
            )?)
        };
        let slots: HashMap<MapData, SlotKey, u32> = open(&slots_pin)?.try_into()?;
        let backends: HashMap<MapData, u32, Backend> = open(&backends_pin)?.try_into()?;
        let backends: std::collections::HashMap<u32, Backend> =
            backends.iter().filter_map(|kv| kv.ok()).collect();
        Ok(slots
            .iter()
            .filter_map(|kv| kv.ok())
            .filter_map(|(k, id)| {
                let backend = *backends.get(&id)?;
                Some((
                    k,
                    Slot {
                        backend_id: id,
                        backend,
                    },
                ))
            })
            .collect())
    };
    let slots = read().unwrap_or_else(|e| {
        log::warn!("the old layout's slots cannot be read ({e:#}): the first sync writes them");
        Vec::new()
    });
    if backends_pin.exists() {
        if let Err(e) = fs::remove_file(&backends_pin) {
            log::warn!("removing {}: {e}", backends_pin.display());
        }
    }
    slots
}

/// Layout 1's conntrack entries, each with the table it belongs in now: a
/// TCP flow whose reply was seen is established, both its entries together.
fn read_v1_conntrack(path: &Path) -> Result<Vec<CtEntry>> {
    let data = MapData::from_pin(path)?;
    let map: HashMap<MapData, CtKey, CtValue> = Map::from_map_data(data)?.try_into()?;
    let all: std::collections::HashMap<CtKey, CtValue> =
        map.iter().filter_map(|kv| kv.ok()).collect();
    Ok(all
        .iter()
        .map(|(k, v)| {
            // The entry of the original direction and its partner decide.
            let (orig_key, orig) = if v.dir == CT_DIR_ORIGINAL {
                (*k, Some(*v))
            } else {
                let ok = v.partner(k);
                (ok, all.get(&ok).copied())
            };
            let reply = orig.and_then(|o| all.get(&o.partner(&orig_key)));
            let replied = reply.is_some_and(|r| r.flags & CT_F_SEEN_REPLY != 0);
            (CtTable::of(k, replied), *k, *v)
        })
        .collect())
}

/// Pinned maps whose key or value size, or type, is not this build's
/// cannot be shared with the new programs: each such pin is removed, so a
/// map of this layout is created and pinned in its place, and the loss is
/// said. A safety net within one layout version (a build that changed a
/// map without bumping the version).
fn replace_mismatched_pins(dir: &Path) -> Result<()> {
    // The object's own map definitions: what the programs were built for.
    let obj = aya_obj::Object::parse(crate::dataplane::maps::OBJECT)
        .context("parsing the kpx eBPF object")?;
    for name in map_names::ALL {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let def = obj
            .maps
            .get(name)
            .with_context(|| format!("map {name} missing from the object"))?;
        let want = (def.map_type(), def.key_size(), def.value_size());
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading the pinned map {}", path.display()))?;
        let have = (info.map_type()? as u32, info.key_size(), info.value_size());
        let ct = [
            map_names::CT_TCP,
            map_names::CT_ANY,
            map_names::CT6_TCP,
            map_names::CT6_ANY,
        ]
        .contains(&name);
        // The size too, except conntrack's (and IPv6's other tables'),
        // which the agent sets at load:
        // a counter array one element short would drop the new counter's
        // increments without a word.
        let sized = ct || IPV6_SIZED.contains(&name) || info.max_entries() == def.max_entries();
        if have == want && sized {
            continue;
        }
        let lost = if ct {
            count_entries(&path).unwrap_or(0)
        } else {
            0
        };
        log::warn!(
            "pinned map {} has another layout (type {}, key {} and value {} bytes, {} entries; this kpx uses type {}, {} and {}, {}): replaced by a new map{}",
            path.display(),
            have.0,
            have.1,
            have.2,
            info.max_entries(),
            want.0,
            want.1,
            want.2,
            def.max_entries(),
            if ct {
                format!("; {lost} conntrack entries are not carried over")
            } else {
                "; the first sync fills it again".into()
            }
        );
        fs::remove_file(&path)
            .with_context(|| format!("removing the pinned map {}", path.display()))?;
    }
    Ok(())
}

/// Removes every kpx pin under `dir` (`KPX_*`), known to this build or not.
fn remove_all_pins(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("KPX_") {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// IPv6's tables created small (a node that served no IPv6, see
/// `LoadOptions::ipv6`) and pinned in `dir`: removed when IPv6 is now
/// configured, so that this load creates them at IPv4's size. Their few
/// flows are not carried over (said in the log). Returns how many went.
pub fn grow_ipv6(dir: &Path, small: u32) -> Result<usize> {
    let mut removed = 0;
    for name in IPV6_SIZED {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading the pinned map {}", path.display()))?;
        if info.max_entries() != small {
            continue;
        }
        let lost = count_entries(&path).unwrap_or(0);
        log::warn!(
            "{name} was created for a node without IPv6 ({small} entries); IPv6 is configured now: replaced at full size, {lost} IPv6 entries not carried over"
        );
        fs::remove_file(&path)
            .with_context(|| format!("removing the pinned map {}", path.display()))?;
        removed += 1;
    }
    Ok(removed)
}

/// The number of keys in the hash map pinned at `path`, whatever its key
/// and value types: a walk with `BPF_MAP_GET_NEXT_KEY` on raw key bytes.
pub fn count_entries(path: &Path) -> Result<u64> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let info = MapInfo::from_pin(path)?;
    let data = MapData::from_pin(path)?;
    let fd = data.fd().as_fd().as_raw_fd();
    let size = info.key_size() as usize;
    let (mut key, mut next) = (vec![0u8; size], vec![0u8; size]);
    let mut n = 0u64;
    let mut first = true;
    loop {
        // union bpf_attr for map element commands: map_fd, pad, key, next_key.
        let mut attr: [u64; 4] = [
            fd as u64,
            if first { 0 } else { key.as_ptr() as u64 },
            next.as_mut_ptr() as u64,
            0,
        ];
        // SAFETY: `attr` is GET_NEXT_KEY's bpf_attr, its pointers naming
        // buffers of the map's key size, alive for the call.
        match unsafe { crate::dataplane::sys::bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e).context("walking the map's keys"),
        }
        n += 1;
        std::mem::swap(&mut key, &mut next);
        first = false;
    }
}
