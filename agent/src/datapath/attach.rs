//! Attaching the programs to a pod's host-side veth with TCX, and pinning the links so they stay
//! attached when the agent exits or dies. A restarted agent swaps its freshly loaded programs into
//! the pinned links atomically (`BPF_LINK_UPDATE`), so a veth is never without a program.

use std::{
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{ProgramFd, SchedClassifier},
};
use weir_common::{PROG_FROM_POD, PROG_TO_POD};

use super::tcx;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the kernel object has no loaded program {name}: {reason}")]
    Program { name: &'static str, reason: String },
    #[error("{ifname} does not exist in this network namespace: {source}")]
    NoInterface {
        ifname: String,
        #[source]
        source: nix::Error,
    },
    #[error("{what} {program} on {ifname} (pin {path}): {source}")]
    Link {
        what: &'static str,
        program: &'static str,
        ifname: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the link pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The loaded programs' fds, cloned out of the object so attaching needs no lock on it.
pub struct Programs {
    from_pod: ProgramFd,
    to_pod: ProgramFd,
}

impl Programs {
    pub fn from_ebpf(ebpf: &Ebpf) -> Result<Self, AttachError> {
        let fd = |name: &'static str| -> Result<ProgramFd, AttachError> {
            let err = |reason: String| AttachError::Program { name, reason };
            let program: &SchedClassifier = ebpf
                .program(name)
                .ok_or_else(|| err("missing".to_owned()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| err(e.to_string()))?;
            program
                .fd()
                .map_err(|e| err(e.to_string()))?
                .try_clone()
                .map_err(|e| err(e.to_string()))
        };
        Ok(Self {
            from_pod: fd(PROG_FROM_POD)?,
            to_pod: fd(PROG_TO_POD)?,
        })
    }

    /// (program name, its fd, tc ingress?, pin name) for each hook on a pod's host-side veth:
    /// tc ingress sees what the pod sends, tc egress what it receives.
    fn hooks(&self) -> [(&'static str, &ProgramFd, bool, &'static str); 2] {
        [
            (PROG_FROM_POD, &self.from_pod, true, "from_pod"),
            (PROG_TO_POD, &self.to_pod, false, "to_pod"),
        ]
    }
}

/// The pin names of an interface's links.
pub const LINK_PINS: [&str; 2] = ["from_pod", "to_pod"];

/// Where the links of one veth are pinned: a directory per interface (bpffs reserves dots in
/// names, so `<ifname>.<hook>` is not an option).
pub fn link_pin(links_dir: &Path, ifname: &str, hook: &str) -> PathBuf {
    links_dir.join(ifname).join(hook)
}

/// Attaches both programs to `ifname` (or re-points its pinned links at them) and pins the
/// links under `links_dir`. Idempotent; safe to run for different interfaces in parallel.
pub fn attach_endpoint(
    programs: &Programs,
    links_dir: &Path,
    ifname: &str,
) -> Result<(), AttachError> {
    let dir = links_dir.join(ifname);
    std::fs::create_dir_all(&dir).map_err(|source| AttachError::PinDir { path: dir, source })?;
    let ifindex =
        nix::net::if_::if_nametoindex(ifname).map_err(|source| AttachError::NoInterface {
            ifname: ifname.to_owned(),
            source,
        })?;
    for (program, fd, ingress, hook) in programs.hooks() {
        let pin = link_pin(links_dir, ifname, hook);
        let err = |what: &'static str, source: io::Error| AttachError::Link {
            what,
            program,
            ifname: ifname.to_owned(),
            path: pin.clone(),
            source,
        };
        match tcx::obj_get(&pin) {
            // A previous agent attached it: swap our program in, atomically.
            Ok(link) => tcx::link_update(link.as_fd(), fd.as_fd())
                .map_err(|e| err("re-pointing the pinned link of", e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let link = tcx::link_create(fd.as_fd(), ifindex, ingress)
                    .map_err(|e| err("attaching", e))?;
                // The pin holds the link once our fd is closed.
                tcx::obj_pin(link.as_fd(), &pin).map_err(|e| err("pinning the link of", e))?;
            }
            Err(e) => return Err(err("opening the pinned link of", e)),
        }
    }
    Ok(())
}

/// Detaches `ifname`'s programs by removing their pins (the link goes with its last reference).
/// Idempotent; fine when the veth is already gone.
pub fn detach_endpoint(links_dir: &Path, ifname: &str) {
    let dir = links_dir.join(ifname);
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(pins = %dir.display(), error = %e, "could not remove an interface's link pins");
    }
}

/// The veth names that have pinned links (to reconcile at start-up).
pub fn pinned_interfaces(links_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(links_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}
