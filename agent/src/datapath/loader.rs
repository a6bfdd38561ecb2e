//! Loading the kernel object: maps pinned (and adopted when already pinned) under a per-node bpffs
//! directory, programs loaded and verified.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, Xdp},
};
use weir_common::{
    MAP_CIDR_IDENTITIES, MAP_CONFIG, MAP_CONNTRACK, MAP_COUNTERS, MAP_ENDPOINTS, MAP_FRAGMENTS,
    MAP_IPCACHE, MAP_POLICY, MAP_PREFILTER, MAP_SUBJECTS, PROG_FROM_POD, PROG_TO_POD, PROG_XDP,
};

use super::{conntrack_upgrade, object::EBPF_OBJECT};

/// Maps that hold enforcement state and are pinned so it survives the agent (the fragment map
/// too: a datagram in flight while the agent restarts keeps its first fragment's verdict; and the
/// deny list, so the restarted agent's XDP program enforces it from its first packet).
pub const PINNED_MAPS: [&str; 10] = [
    MAP_CONFIG,
    MAP_ENDPOINTS,
    MAP_IPCACHE,
    MAP_CIDR_IDENTITIES,
    MAP_SUBJECTS,
    MAP_POLICY,
    MAP_CONNTRACK,
    MAP_FRAGMENTS,
    MAP_PREFILTER,
    MAP_COUNTERS,
];

/// Where the agent pins the object's maps under its bpffs directory.
pub fn pin_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join("maps")
}

/// aya-log levels (`aya_log_common::Level`; 0 is below every level: nothing is logged).
const LOG_LEVEL_OFF: u8 = 0;
const LOG_LEVEL_DEBUG: u8 = 4;

/// The tc programs in the object, in the order they are loaded (then `PROG_XDP`).
pub const PROGRAMS: [&str; 2] = [PROG_FROM_POD, PROG_TO_POD];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("creating the bpffs pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    ConntrackUpgrade(#[from] conntrack_upgrade::UpgradeError),
    #[error("loading the kernel object (is bpffs mounted at the pin directory's parent?): {0}")]
    Object(#[source] aya::EbpfError),
    #[error("the kernel object has no program {0}")]
    MissingProgram(&'static str),
    #[error("loading program {name} (the verifier's log follows): {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// Loads the embedded object. With `pin_dir`, every map in `PINNED_MAPS` is pinned there, or
/// adopted when a previous agent already pinned it (a conntrack table of the earlier layout is
/// converted: see `conntrack_upgrade`); without, nothing is pinned (TestRun tests).
/// Kernel-side logging is off.
pub fn load(pin_dir: Option<&Path>) -> Result<Ebpf, LoadError> {
    load_object(EBPF_OBJECT, pin_dir, false)
}

/// Loads `object` (the embedded one, or another build of it to compare with), as `load` does,
/// with kernel-side debug logging on when `bpf_log` (read it with `bpf_log::forward`).
pub fn load_object(
    object: &[u8],
    pin_dir: Option<&Path>,
    bpf_log: bool,
) -> Result<Ebpf, LoadError> {
    let mut loader = EbpfLoader::new();
    // aya-log's level is a `.rodata` global, frozen at load: with logging off the verifier
    // removes every log statement from the programs. Its default enables everything, so it is
    // always set; an object built without aya-log has no such global (`must_exist` false).
    let level = if bpf_log {
        LOG_LEVEL_DEBUG
    } else {
        LOG_LEVEL_OFF
    };
    loader.override_global(aya_log::LEVEL, &level, false);
    let paths: Vec<(&'static str, PathBuf)> = match pin_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| LoadError::PinDir {
                path: dir.to_owned(),
                source,
            })?;
            PINNED_MAPS
                .iter()
                .map(|name| (*name, dir.join(name)))
                .collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    if let Some(dir) = pin_dir {
        conntrack_upgrade::set_aside(dir)?;
    }
    let mut ebpf = loader.load(object).map_err(LoadError::Object)?;
    if let Some(dir) = pin_dir {
        let copied = conntrack_upgrade::copy(dir)?;
        if copied > 0 {
            tracing::info!(copied, "conntrack entries copied from the earlier table");
        }
    }
    for name in PROGRAMS {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))?
            .try_into()
            .map_err(|source| LoadError::Program { name, source })?;
        program
            .load()
            .map_err(|source| LoadError::Program { name, source })?;
    }
    let name = PROG_XDP;
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })?;
    program
        .load()
        .map_err(|source| LoadError::Program { name, source })?;
    Ok(ebpf)
}
