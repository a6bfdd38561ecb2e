//! Attaching the programs to a pod's host-side veth with TCX, and pinning the links so they stay
//! attached when the agent exits or dies. A restarted agent swaps its freshly loaded programs into
//! the pinned links atomically (`bpf_link_update`), so a veth is never without a program.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use weir_common::{PROG_FROM_POD, PROG_TO_POD};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the kernel object has no program {0}")]
    MissingProgram(&'static str),
    #[error("attaching {program} to {ifname}: {source}")]
    Attach {
        program: &'static str,
        ifname: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning the link of {program} on {ifname} at {path}: {reason}")]
    Pin {
        program: &'static str,
        ifname: String,
        path: PathBuf,
        reason: String,
    },
    #[error("creating the link pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// (program, tc direction, pin suffix) for each hook on a pod's host-side veth.
const HOOKS: [(&str, TcAttachType, &str); 2] = [
    (PROG_FROM_POD, TcAttachType::Ingress, "from_pod"),
    (PROG_TO_POD, TcAttachType::Egress, "to_pod"),
];

/// Where the links of one veth are pinned: a directory per interface (bpffs reserves dots in
/// names, so `<ifname>.<hook>` is not an option).
pub fn link_pin(links_dir: &Path, ifname: &str, suffix: &str) -> PathBuf {
    links_dir.join(ifname).join(suffix)
}

/// Attaches both programs to `ifname` (or re-points pinned links at the loaded programs) and
/// pins the links under `links_dir`. Idempotent.
pub fn attach_endpoint(ebpf: &mut Ebpf, links_dir: &Path, ifname: &str) -> Result<(), AttachError> {
    let dir = links_dir.join(ifname);
    std::fs::create_dir_all(&dir).map_err(|source| AttachError::PinDir { path: dir, source })?;
    for (program, attach_type, suffix) in HOOKS {
        let pin = link_pin(links_dir, ifname, suffix);
        let prog: &mut SchedClassifier = ebpf
            .program_mut(program)
            .ok_or(AttachError::MissingProgram(program))?
            .try_into()
            .map_err(|source| AttachError::Attach {
                program,
                ifname: ifname.to_owned(),
                source,
            })?;
        let attach_err = |source| AttachError::Attach {
            program,
            ifname: ifname.to_owned(),
            source,
        };
        let pin_err = |reason: String| AttachError::Pin {
            program,
            ifname: ifname.to_owned(),
            path: pin.clone(),
            reason,
        };
        let link_id = match PinnedLink::from_pin(&pin) {
            // A previous agent attached it: swap our program in, atomically.
            Ok(pinned) => {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .map_err(|e| pin_err(e.to_string()))?;
                prog.attach_to_link(link).map_err(attach_err)?
            }
            Err(_) => prog
                .attach_with_options(
                    ifname,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(attach_err)?,
        };
        let link = prog.take_link(link_id).map_err(attach_err)?;
        let fd_link: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| pin_err(e.to_string()))?;
        if !pin.exists() {
            fd_link.pin(&pin).map_err(|e| pin_err(e.to_string()))?;
        }
        // Dropping the fd keeps the link: the pin holds it.
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
