//! Where the traffic benchmark's time goes inside Weir's programs: the kernel's run-time
//! statistics (`BPF_ENABLE_STATS`, on only while this guard lives, since they add two clock reads
//! to every program run) of the programs of the tc filters in a node namespace (the agent's clsact
//! filters), read with `BPF_OBJ_GET_INFO_BY_FD` (aya 0.14's `ProgramInfo` does not expose them).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use weir_agent::datapath::tc::{Hook, Tc};

use crate::bpf_syscall::bpf;
use crate::netns::{Netns, spawn_in};

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// `struct bpf_prog_info` up to `run_cnt`; the kernel fills what fits.
#[repr(C)]
struct ProgInfo {
    head: [u8; 192],
    run_time_ns: u64,
    run_cnt: u64,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Run-time statistics switched on for every program until dropped.
pub struct Stats {
    _enabled: OwnedFd,
}

impl Stats {
    pub fn enable() -> io::Result<Self> {
        let mut ty = BPF_STATS_RUN_TIME;
        let fd = bpf(BPF_ENABLE_STATS, &mut ty)?;
        // SAFETY: a new file descriptor the kernel returned, owned by nobody else.
        Ok(Self {
            _enabled: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }
}

/// Total run time and runs of Weir's tc programs attached (TCX) to any device of `node`.
#[derive(Clone, Copy, Default, Debug)]
pub struct RunTime {
    pub runs: u64,
    pub ns: u64,
}

impl RunTime {
    pub fn since(self, earlier: RunTime) -> RunTime {
        RunTime {
            runs: self.runs.saturating_sub(earlier.runs),
            ns: self.ns.saturating_sub(earlier.ns),
        }
    }
}

/// Total run time and runs of the programs of every tc filter (clsact, where the agent attaches
/// Weir's) on the devices of `node`.
pub fn weir_programs(node: &Netns) -> RunTime {
    spawn_in(node.path(), || {
        let mut total = RunTime::default();
        let (Ok(links), Ok(mut tc)) = (nix::net::if_::if_nameindex(), Tc::open()) else {
            return total;
        };
        // Each program once, however many filters (devices, hooks) it sits in.
        let mut ids = std::collections::BTreeSet::new();
        for link in links.iter() {
            for hook in [Hook::Ingress, Hook::Egress] {
                ids.extend(tc.filter_programs(link.index(), hook).unwrap_or_default());
            }
        }
        for id in ids {
            if let Some((ns, runs)) = program_fd(id).and_then(|fd| run_time(&fd)) {
                total.ns += ns;
                total.runs += runs;
            }
        }
        total
    })
    .join()
    .unwrap_or_default()
}

/// A descriptor of the program with `id` (`BPF_PROG_GET_FD_BY_ID`).
fn program_fd(id: u32) -> Option<OwnedFd> {
    let mut attr = [id, 0, 0];
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).ok()?;
    // SAFETY: a new file descriptor the kernel returned, owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn run_time(fd: &OwnedFd) -> Option<(u64, u64)> {
    let mut info = ProgInfo {
        head: [0; 192],
        run_time_ns: 0,
        run_cnt: 0,
    };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<ProgInfo>() as u32,
        info: &mut info as *mut ProgInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).ok()?;
    Some((info.run_time_ns, info.run_cnt))
}
