//! Batched map operations: `BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`
//! and `BPF_MAP_LOOKUP_BATCH` (Linux 5.6), which aya 0.14 does not expose.
//! One call writes a run of elements of one map, in order, or reads a
//! bucketful; at 50,000 services a first sync, and every resync's read of
//! the maps, is about a million elements, and two syscalls each (next key,
//! lookup) was most of a resync's time.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{maps::MapData, Pod};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Elements per call: bounds the time one syscall holds the CPU and the
/// kernel's copy of the arrays.
const CHUNK: usize = 8192;

/// How far a batch got: the elements written before `error`.
#[derive(Debug)]
pub struct Partial {
    pub done: usize,
    pub error: io::Error,
}

/// Whether the kernel cannot batch this map at all (older kernel, or a map
/// type without batch operations): the caller writes one element at a time.
pub fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524) // the kernel's ENOTSUPP
    )
}

/// Writes `keys[i]` → `values[i]` into `map`, in order.
pub fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> Result<(), Partial> {
    update_per_key(map, keys, values, 1)
}

/// Writes `keys[i]` → `values[i * per_key..][..per_key]`: for per-CPU maps,
/// one value per possible CPU.
pub fn update_per_key<K: Pod, V: Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
    per_key: usize,
) -> Result<(), Partial> {
    assert_eq!(keys.len() * per_key, values.len(), "per_key values per key");
    let mut done = 0;
    for (k, v) in keys.chunks(CHUNK).zip(values.chunks(CHUNK * per_key)) {
        call(BPF_MAP_UPDATE_BATCH, map, k, Some(v)).map_err(|(n, error)| Partial {
            done: done + n,
            error,
        })?;
        done += k.len();
    }
    Ok(())
}

/// Deletes `keys` from `map`, in order. A key that is already gone is not
/// an error (the planner may delete what an interrupted sync removed).
pub fn delete<K: Pod>(map: &MapData, keys: &[K]) -> Result<(), Partial> {
    let mut done = 0;
    while done < keys.len() {
        let end = (done + CHUNK).min(keys.len());
        match call::<K, K>(BPF_MAP_DELETE_BATCH, map, &keys[done..end], None) {
            Ok(()) => done = end,
            // Stopped at a missing key: skip it and go on.
            Err((n, e)) if e.raw_os_error() == Some(libc::ENOENT) => done += n + 1,
            Err((n, error)) => {
                return Err(Partial {
                    done: done + n,
                    error,
                })
            }
        }
    }
    Ok(())
}

/// Every element of a hash `map`, read a batch at a time. Not a snapshot:
/// elements written meanwhile may or may not be seen, as with iteration.
/// Fails with [`unsupported`] errors where the kernel or map type cannot.
pub fn lookup_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    lookup_each(map, |k, v| out.push((k, v)))?;
    Ok(out)
}

/// As [`lookup_all`], handing each element to `f` instead of keeping them
/// all: a read of a million entries needs room for one batch.
pub fn lookup_each<K: Pod, V: Pod>(map: &MapData, mut f: impl FnMut(K, V)) -> io::Result<()> {
    let mut chunk = CHUNK;
    // The position between calls: opaque to us, a bucket index for hash
    // maps; room for a key, whatever the map type wants.
    let token_words = std::mem::size_of::<K>().div_ceil(8).max(1);
    let (mut token, mut first) = (vec![0u64; token_words], true);
    let mut next = vec![0u64; token_words];
    let (mut keys, mut values): (Vec<K>, Vec<V>) = (zeroed(chunk), zeroed(chunk));
    loop {
        let mut attr = Attr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is the batch member of bpf_attr; keys and values
        // hold `count` elements of the map's key and value sizes (aya's
        // typed maps checked them), the tokens room for a key; the kernel
        // writes at most that much into each, and `count` back.
        let r = unsafe { crate::dataplane::sys::bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let n = (attr.count as usize).min(chunk);
        match r {
            Ok(_) => {}
            // The last batch: what it holds is valid.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                keys[..n]
                    .iter()
                    .zip(&values[..n])
                    .for_each(|(k, v)| f(*k, *v));
                return Ok(());
            }
            // One bucket holds more than a batch: retry it with more room.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 && chunk < 1 << 20 => {
                chunk *= 2;
                (keys, values) = (zeroed(chunk), zeroed(chunk));
                continue;
            }
            Err(e) => return Err(e),
        }
        keys[..n]
            .iter()
            .zip(&values[..n])
            .for_each(|(k, v)| f(*k, *v));
        std::mem::swap(&mut token, &mut next);
        first = false;
    }
}

/// `n` all-zero elements: room for the kernel to write into.
fn zeroed<T: Pod>(n: usize) -> Vec<T> {
    // SAFETY: a Pod type is plain bytes (aya's contract for map keys and
    // values), so all-zero bytes are one of its values.
    (0..n).map(|_| unsafe { std::mem::zeroed() }).collect()
}

/// union bpf_attr, batch commands: in_batch, out_batch, keys, values
/// (u64 each), count, map_fd (u32 each), elem_flags, flags (u64 each).
#[repr(C)]
struct Attr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// One batch command; on failure, how many elements it processed.
fn call<K: Pod, V: Pod>(
    cmd: libc::c_long,
    map: &MapData,
    keys: &[K],
    values: Option<&[V]>,
) -> Result<(), (usize, io::Error)> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = Attr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: keys.len() as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is the batch member of bpf_attr, its pointers naming
    // `count` keys (and values) of the map's sizes (aya's typed maps checked
    // them), alive for the call; the kernel writes back only `count`.
    match unsafe { crate::dataplane::sys::bpf(cmd, &mut attr) } {
        Ok(_) => Ok(()),
        // How many it processed before the error.
        Err(e) => Err((attr.count as usize, e)),
    }
}
