//! A flood that reaches the node's uplink as XDP frames, without an skb, as from a NIC driver with
//! native XDP. The remote node sends it from a UDP socket bound to a second veth pair (`gen0` ↔
//! `gen1`, inside the remote node); an XDP program on `gen1` redirects every packet out of the
//! remote's uplink veth (`bpf_redirect`), which hands it to its peer, the node's uplink, as an XDP
//! frame (`ndo_xdp_xmit`): the skb the socket built is freed inside the remote node. With
//! `weir_xdp` on the uplink a denied frame is dropped before the node builds any skb; without
//! it, the veth builds an skb for each frame and the node's stack routes it to where tc or
//! iptables drops it. (The kernel's own frame generator, `BPF_PROG_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES`, is refused on this machine with EPERM.)
//!
//! A veth accepts XDP frames only while its peer runs NAPI, i.e. has an XDP program (or GRO on):
//! the tc and iptables cases put `XDP_PASS` (two instructions) on the uplink, which adds no work
//! of its own worth measuring next to building the skb.
//!
//! Programs are loaded and attached with raw `bpf(2)` calls (four instructions between them; not
//! worth an object file).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::bpf_syscall::bpf;
use crate::netns::{Netns, spawn_in};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_FUNC_REDIRECT: i32 = 23;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn mov64_imm(dst: u8, imm: i32) -> Insn {
    // BPF_ALU64 | BPF_MOV | BPF_K
    Insn {
        code: 0xb7,
        regs: dst,
        off: 0,
        imm,
    }
}
const fn call(helper: i32) -> Insn {
    // BPF_JMP | BPF_CALL
    Insn {
        code: 0x85,
        regs: 0,
        off: 0,
        imm: helper,
    }
}
const EXIT: Insn = Insn {
    // BPF_JMP | BPF_EXIT
    code: 0x95,
    regs: 0,
    off: 0,
    imm: 0,
};

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The head of `union bpf_attr` for `BPF_LINK_CREATE`.
#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn load(insns: &[Insn], name: &str) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    prog_name[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: a new file descriptor the kernel returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The generator's program: every frame out of `ifindex` (`bpf_redirect`).
fn redirect_program(ifindex: u32) -> io::Result<OwnedFd> {
    load(
        &[
            mov64_imm(1, ifindex as i32),
            mov64_imm(2, 0),
            call(BPF_FUNC_REDIRECT),
            EXIT,
        ],
        "bench_redirect",
    )
}

/// An XDP program attached (native mode) to a device of a network namespace through a BPF link;
/// detached when dropped (the link's last descriptor closes).
pub struct XdpLink {
    _link: OwnedFd,
}

impl XdpLink {
    /// `XDP_PASS` on `device`.
    pub fn pass(netns: &Netns, device: &str) -> anyhow::Result<Self> {
        Self::attach(netns, device, |_| {
            load(&[mov64_imm(0, XDP_PASS), EXIT], "bench_pass")
        })
    }

    /// `XDP_DROP` of everything on `device`.
    pub fn drop_all(netns: &Netns, device: &str) -> anyhow::Result<Self> {
        Self::attach(netns, device, |_| {
            load(&[mov64_imm(0, XDP_DROP), EXIT], "bench_drop")
        })
    }

    /// Every packet arriving on `device` out of `to` (`bpf_redirect`).
    pub fn redirect(netns: &Netns, device: &str, to: &str) -> anyhow::Result<Self> {
        let to = to.to_owned();
        Self::attach(netns, device, move |_| {
            redirect_program(nix::net::if_::if_nametoindex(to.as_str())?)
        })
    }

    fn attach(
        netns: &Netns,
        device: &str,
        program: impl FnOnce(u32) -> io::Result<OwnedFd> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let device = device.to_owned();
        let link = spawn_in(netns.path(), move || -> anyhow::Result<OwnedFd> {
            let ifindex = nix::net::if_::if_nametoindex(device.as_str())?;
            let prog = program(ifindex)?;
            let mut attr = LinkCreate {
                prog_fd: prog.as_raw_fd() as u32,
                target_ifindex: ifindex,
                attach_type: BPF_XDP,
                flags: XDP_FLAGS_DRV_MODE,
            };
            let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
            // SAFETY: a new file descriptor the kernel returned, owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("attaching an XDP program panicked"))??;
        Ok(Self { _link: link })
    }
}

/// The remote node's second veth pair: `gen0` (addressed, with a route to the server's subnet
/// through `gen1`) and `gen1` (the uplink's MAC, so the redirected frames are addressed to the
/// node), with the redirect to the remote's uplink veth `eth0` on `gen1`.
pub struct RedirectHop {
    _redirect: XdpLink,
}

/// The remote's side of the hop and the gateway it resolves to.
const GEN_ADDR: &str = "10.78.9.2/30";
const GEN_GATEWAY: &str = "10.78.9.1";
/// The device a flood socket binds to, to leave through the hop.
pub const GEN_DEVICE: &str = "gen0";

impl RedirectHop {
    pub fn new(remote: &Netns, uplink_mac: &str, subnet: &str) -> anyhow::Result<Self> {
        remote.ip(&[
            "link", "add", "gen0", "type", "veth", "peer", "name", "gen1",
        ]);
        remote.ip(&["link", "set", "gen1", "address", uplink_mac]);
        remote.ip(&["addr", "add", GEN_ADDR, "dev", "gen0"]);
        remote.ip(&["link", "set", "gen0", "up"]);
        remote.ip(&["link", "set", "gen1", "up"]);
        remote.ip(&[
            "neigh",
            "add",
            GEN_GATEWAY,
            "lladdr",
            uplink_mac,
            "dev",
            "gen0",
            "nud",
            "permanent",
        ]);
        // Behind the uplink's own route (metric 0): only a socket bound to gen0 takes it.
        remote.ip(&[
            "route",
            "add",
            subnet,
            "via",
            GEN_GATEWAY,
            "dev",
            "gen0",
            "metric",
            "100",
        ]);
        Ok(Self {
            _redirect: XdpLink::redirect(remote, "gen1", "eth0")?,
        })
    }
}
