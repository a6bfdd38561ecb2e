//! The pinned conntrack table across a change of its value's layout.
//!
//! `WEIR_CONNTRACK` is pinned so that connections survive the agent. A kernel object whose
//! `CtValue` has another size cannot use a table pinned by an earlier version, and starting with
//! an empty one would cut every established connection whose replies the other pod's ingress
//! does not admit as new connections. So an agent that finds a table of the earlier layout:
//!
//! 1. moves its pin aside (`WEIR_CONNTRACK_EARLIER`) before the object is loaded, which then
//!    creates and pins a table of the current layout (`set_aside`);
//! 2. copies the earlier table's entries into it, converted, right after the load (`copy`);
//! 3. once its programs are attached to every adopted veth, so that the earlier programs add no
//!    more entries, copies again what they added meanwhile and unpins the earlier table
//!    (`finish`).
//!
//! Entries already in the current table win: they are newer. A converted entry records no veth
//! for either side, so each side is checked once more, by policy, on its next packet; that check
//! records the veth. An agent stopped between the steps finds the earlier pin at its next start
//! and copies from it again.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError};
use weir_common::{CtKey, CtValue, MAP_CONNTRACK, MAX_CONNTRACK};

/// `bpf_map_update_elem`'s flag: insert only where the key has no entry.
const BPF_NOEXIST: u64 = 1;

/// `CtValue` before it recorded each side's veth (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct CtValueBeforeVeths {
    last_seen_ns: u64,
    egress_generation: u32,
    ingress_generation: u32,
    flags: u32,
    egress_rule: u32,
    ingress_rule: u32,
    _pad: u32,
}
const _: () = assert!(size_of::<CtValueBeforeVeths>() == 32);

// SAFETY: `repr(C)`, plain integers, no padding beyond the explicit field.
unsafe impl aya::Pod for CtValueBeforeVeths {}

impl From<CtValueBeforeVeths> for CtValue {
    fn from(earlier: CtValueBeforeVeths) -> Self {
        CtValue {
            last_seen_ns: earlier.last_seen_ns,
            egress_generation: earlier.egress_generation,
            ingress_generation: earlier.ingress_generation,
            flags: earlier.flags,
            egress_rule: earlier.egress_rule,
            ingress_rule: earlier.ingress_rule,
            egress_ifindex: 0,
            ingress_ifindex: 0,
            _pad: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "the pinned conntrack table {path} has {key_size}-byte keys and {value_size}-byte values, \
         a layout this agent cannot convert (it reads 40-byte keys with 32- or 40-byte values); \
         stop the agent, remove the pin to start with an empty table (established connections \
         are checked again as new ones), and start it again"
    )]
    UnknownLayout {
        path: PathBuf,
        key_size: u32,
        value_size: u32,
    },
    #[error("reading the pinned conntrack table {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("moving the pinned conntrack table {from} aside to {to}: {source}")]
    Move {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing the earlier conntrack table's pin {path}: {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn current_pin(pin_dir: &Path) -> PathBuf {
    pin_dir.join(MAP_CONNTRACK)
}

/// Where step 1 pins the earlier table.
pub fn earlier_pin(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("{MAP_CONNTRACK}_EARLIER"))
}

/// Step 1, before the object is loaded: moves a pinned table of the earlier layout aside, so
/// that the load creates a current one. Returns whether it did. A table of the current layout
/// stays; one of any other layout is an error (the object could not use it).
pub fn set_aside(pin_dir: &Path) -> Result<bool, UpgradeError> {
    let path = current_pin(pin_dir);
    if !path.exists() {
        return Ok(false);
    }
    let read = |source| UpgradeError::Read {
        path: path.clone(),
        source,
    };
    let earlier = MapData::from_pin(&path).map_err(read)?;
    let info = earlier.info().map_err(read)?;
    let (key_size, value_size) = (info.key_size(), info.value_size());
    if key_size as usize == size_of::<CtKey>() && value_size as usize == size_of::<CtValue>() {
        return Ok(false);
    }
    if key_size as usize != size_of::<CtKey>()
        || value_size as usize != size_of::<CtValueBeforeVeths>()
    {
        return Err(UpgradeError::UnknownLayout {
            path,
            key_size,
            value_size,
        });
    }
    // bpffs renames no pin (nor takes a name with a dot): the table is pinned a second time,
    // then its first pin goes. An earlier pin already there is this same table, from an agent
    // stopped between the two.
    let to = earlier_pin(pin_dir);
    let _ = std::fs::remove_file(&to);
    let moved = earlier
        .pin(&to)
        .map_err(std::io::Error::other)
        .and_then(|()| std::fs::remove_file(&path));
    moved.map_err(|source| UpgradeError::Move {
        from: path.clone(),
        to: to.clone(),
        source,
    })?;
    tracing::info!(from = %path.display(), to = %to.display(),
        "the pinned conntrack table has the earlier layout; its entries move to a new table");
    Ok(true)
}

/// Step 2 (and part of step 3): copies the earlier table's entries, converted, into the current
/// one where it has none for their key. Returns how many were copied; 0 when there is no earlier
/// table.
pub fn copy(pin_dir: &Path) -> Result<usize, UpgradeError> {
    let from = earlier_pin(pin_dir);
    if !from.exists() {
        return Ok(0);
    }
    let to = current_pin(pin_dir);
    let read_from = |source| UpgradeError::Read {
        path: from.clone(),
        source,
    };
    let read_to = |source| UpgradeError::Read {
        path: to.clone(),
        source,
    };
    let earlier_map = Map::LruHashMap(MapData::from_pin(&from).map_err(read_from)?);
    let earlier =
        HashMap::<_, CtKey, CtValueBeforeVeths>::try_from(&earlier_map).map_err(read_from)?;
    let mut current_map = Map::LruHashMap(MapData::from_pin(&to).map_err(read_to)?);
    let mut current = HashMap::<_, CtKey, CtValue>::try_from(&mut current_map).map_err(read_to)?;
    let mut copied = 0;
    // The kernel restarts a walk whose last key was evicted meanwhile, so it is bounded; what
    // an early end misses, the walk after the attach picks up.
    for entry in earlier.iter().take(2 * MAX_CONNTRACK as usize) {
        let Ok((key, value)) = entry else {
            break;
        };
        // BPF_NOEXIST: an entry already in the current table is newer. A full table (the
        // current one has the same capacity) or a key the current programs inserted since the
        // walk began are the only failures, and both leave the current entry.
        if current
            .insert(key, CtValue::from(value), BPF_NOEXIST)
            .is_ok()
        {
            copied += 1;
        }
    }
    Ok(copied)
}

/// Step 3, once the programs are attached to every adopted veth: copies what the earlier
/// programs added since step 2 and removes the earlier table's pin (the kernel frees it with its
/// last program). Returns how many entries were copied.
pub fn finish(pin_dir: &Path) -> Result<usize, UpgradeError> {
    let from = earlier_pin(pin_dir);
    if !from.exists() {
        return Ok(0);
    }
    let copied = copy(pin_dir)?;
    std::fs::remove_file(&from).map_err(|source| UpgradeError::Unpin {
        path: from.clone(),
        source,
    })?;
    tracing::info!(copied, "the earlier conntrack table is retired");
    Ok(copied)
}
