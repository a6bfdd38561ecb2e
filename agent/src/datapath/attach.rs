//! Putting the programs on a pod's host-side veth: a clsact qdisc and one direct-action cls_bpf
//! filter per direction (see `tc` for why not TCX). The kernel keeps filters, and the programs
//! they hold, when the agent exits or dies; a restarted agent replaces each filter's program with
//! its freshly loaded one atomically, so a veth is never without a program.

use std::{io, os::fd::AsFd, path::Path};

use aya::{
    Ebpf,
    programs::{ProgramFd, SchedClassifier},
};
use weir_common::{PROG_FROM_POD, PROG_TO_POD};

use super::tc::{Hook, Tc};

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
    #[error("opening a netlink socket to attach to {ifname}: {source}")]
    Netlink {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} on {ifname}: {source}")]
    Tc {
        what: String,
        ifname: String,
        #[source]
        source: io::Error,
    },
}

/// One loaded program: its fd (cloned out of the object, so attaching needs no lock on it) and
/// its kernel id (to tell our filters from stale ones).
struct Loaded {
    fd: ProgramFd,
    id: u32,
}

/// The loaded programs.
pub struct Programs {
    from_pod: Loaded,
    to_pod: Loaded,
}

impl Programs {
    pub fn from_ebpf(ebpf: &Ebpf) -> Result<Self, AttachError> {
        let loaded = |name: &'static str| -> Result<Loaded, AttachError> {
            let err = |reason: String| AttachError::Program { name, reason };
            let program: &SchedClassifier = ebpf
                .program(name)
                .ok_or_else(|| err("missing".to_owned()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| err(e.to_string()))?;
            Ok(Loaded {
                fd: program
                    .fd()
                    .map_err(|e| err(e.to_string()))?
                    .try_clone()
                    .map_err(|e| err(e.to_string()))?,
                id: program.info().map_err(|e| err(e.to_string()))?.id(),
            })
        };
        Ok(Self {
            from_pod: loaded(PROG_FROM_POD)?,
            to_pod: loaded(PROG_TO_POD)?,
        })
    }

    /// (program name, the program, hook) for each direction on a pod's host-side veth: tc
    /// ingress sees what the pod sends, tc egress what it receives.
    fn hooks(&self) -> [(&'static str, &Loaded, Hook); 2] {
        [
            (PROG_FROM_POD, &self.from_pod, Hook::Ingress),
            (PROG_TO_POD, &self.to_pod, Hook::Egress),
        ]
    }
}

fn ifindex(ifname: &str) -> Result<u32, AttachError> {
    nix::net::if_::if_nametoindex(ifname).map_err(|source| AttachError::NoInterface {
        ifname: ifname.to_owned(),
        source,
    })
}

/// What a failed tc request on `ifname` becomes.
fn tc_error(ifname: &str, what: String) -> impl FnOnce(io::Error) -> AttachError {
    let ifname = ifname.to_owned();
    move |source| AttachError::Tc {
        what,
        ifname,
        source,
    }
}

fn open(ifname: &str) -> Result<Tc, AttachError> {
    Tc::open().map_err(|source| AttachError::Netlink {
        ifname: ifname.to_owned(),
        source,
    })
}

/// Attaches both programs to `ifname`, or swaps them in for what an earlier agent attached.
/// Idempotent; safe to run for different interfaces in parallel (each call has its own socket).
pub fn attach_endpoint(programs: &Programs, ifname: &str) -> Result<(), AttachError> {
    let ifindex = ifindex(ifname)?;
    let mut tc = open(ifname)?;
    tc.ensure_clsact(ifindex)
        .map_err(tc_error(ifname, "adding the clsact qdisc".into()))?;
    for (name, program, hook) in programs.hooks() {
        tc.replace_filter(ifindex, hook, program.fd.as_fd(), name)
            .map_err(tc_error(ifname, format!("attaching {name} at tc {hook:?}")))?;
    }
    Ok(())
}

/// Whether `ifname` runs exactly our loaded programs on both hooks.
pub fn is_attached(programs: &Programs, ifname: &str) -> bool {
    let Ok(ifindex) = ifindex(ifname) else {
        return false;
    };
    let Ok(mut tc) = open(ifname) else {
        return false;
    };
    programs.hooks().iter().all(|(_, program, hook)| {
        tc.filter_programs(ifindex, *hook)
            .is_ok_and(|ids| ids.contains(&program.id))
    })
}

/// Takes Weir's programs off `ifname` (its clsact qdisc goes, with every filter on it).
/// `Ok(false)` when it had none or the interface is gone.
pub fn detach_endpoint(ifname: &str) -> Result<bool, AttachError> {
    let Ok(ifindex) = ifindex(ifname) else {
        return Ok(false);
    };
    open(ifname)?
        .delete_clsact(ifindex)
        .map_err(tc_error(ifname, "removing the clsact qdisc".into()))
}

/// Retires the TCX links that earlier Weir versions pinned under `links_dir` (one directory per
/// interface). A veth's links go only once our clsact filters are on it (attached here if they
/// are not yet), or when the veth is gone, so no veth is ever left without a program.
pub fn retire_legacy_tcx_links(programs: &Programs, links_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(links_dir) else {
        return;
    };
    for ifname in entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
    {
        let exists = ifindex(&ifname).is_ok();
        if exists
            && !is_attached(programs, &ifname)
            && let Err(e) = attach_endpoint(programs, &ifname)
        {
            tracing::warn!(veth = %ifname, error = %e, "keeping the TCX links of an earlier Weir: the clsact filters could not be attached");
            continue;
        }
        let dir = links_dir.join(&ifname);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(veth = %ifname, "replaced the TCX links of an earlier Weir by clsact filters")
            }
            Err(e) => {
                tracing::warn!(pins = %dir.display(), error = %e, "could not remove the TCX links of an earlier Weir")
            }
        }
    }
    let _ = std::fs::remove_dir(links_dir);
}
