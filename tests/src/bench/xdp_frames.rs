//! A flood that arrives as XDP frames, without an skb, as from a NIC driver with native XDP: the
//! kernel's own packet generator, `BPF_PROG_TEST_RUN` in live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`), runs a four-instruction XDP program that redirects every copy
//! of one frame out of the remote node's veth. The veth hands the frames to its peer (the node's
//! uplink) as XDP frames (`ndo_xdp_xmit`): with `weir_xdp` there, a denied frame is dropped
//! before any skb exists; without it, the veth builds an skb for each frame and the node's stack
//! routes it to where tc or iptables drops it.
//!
//! A veth accepts XDP frames only while its peer runs NAPI, i.e. has an XDP program: the tc and
//! iptables cases put `XDP_PASS` (two instructions) on the uplink, which adds no work of its own
//! worth measuring next to building the skb.
//!
//! Programs are loaded with raw `bpf(2)` calls: aya 0.14's `TestRun` has no live-frames flag.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use crate::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const BPF_FUNC_REDIRECT: i32 = 23;
const XDP_PASS: i32 = 2;
/// Frames per kernel batch (the kernel's maximum): one NAPI poll of the uplink per batch.
const BATCH: u32 = 256;
/// Copies of the frame per `BPF_PROG_TEST_RUN` call.
const REPEAT: u32 = 1 << 16;

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

/// The head of `union bpf_attr` for `BPF_PROG_TEST_RUN`.
#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// The head of `union bpf_attr` for `BPF_OBJ_PIN`.
#[repr(C)]
#[derive(Default)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `repr(C)` head of `union bpf_attr` of the size passed; the kernel reads
    // (and for test runs writes) only that many bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
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

/// `XDP_PASS` on the uplink, pinned at `pin` for `ip link set ... xdpdrv pinned`; detached and
/// unpinned on drop.
pub struct PassProgram {
    netns: String,
    device: String,
    pin: std::path::PathBuf,
}

impl PassProgram {
    pub fn attach(netns: &Netns, device: &str) -> anyhow::Result<Self> {
        let fd = load(&[mov64_imm(0, XDP_PASS), EXIT], "bench_pass")?;
        let pin = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/weir-bench-xdp-pass-{}",
            std::process::id()
        ));
        let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
        let mut attr = ObjPin {
            pathname: path.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            file_flags: 0,
        };
        bpf(BPF_OBJ_PIN, &mut attr)?;
        let this = Self {
            netns: netns.name.clone(),
            device: device.to_owned(),
            pin,
        };
        let pin_arg = this.pin.display().to_string();
        let status = Command::new("ip")
            .args(["-n", &this.netns, "link", "set", "dev", device, "xdpdrv"])
            .args(["pinned", &pin_arg])
            .status()?;
        anyhow::ensure!(status.success(), "attaching XDP_PASS to {device} failed");
        Ok(this)
    }
}

impl Drop for PassProgram {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "-n",
                &self.netns,
                "link",
                "set",
                "dev",
                &self.device,
                "xdpdrv",
                "off",
            ])
            .status();
        let _ = std::fs::remove_file(&self.pin);
    }
}

/// Sends copies of `frame` out of `ifindex` (in the calling thread's network namespace) as XDP
/// frames for `secs`; returns how many the generator handed to the device.
pub fn generate(ifindex: u32, frame: &[u8], secs: u64) -> io::Result<u64> {
    let prog = redirect_program(ifindex)?;
    let until = Instant::now() + Duration::from_secs(secs);
    let mut sent = 0u64;
    while Instant::now() < until {
        let mut attr = TestRun {
            prog_fd: prog.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: REPEAT,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size: BATCH,
            ..Default::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        sent += u64::from(REPEAT);
    }
    Ok(sent)
}
