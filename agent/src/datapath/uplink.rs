//! `weir_xdp` on the node's uplink: attached through a BPF link pinned under
//! `<bpffs-dir>/xdp/<device>`, so it stays attached when the agent exits or dies. A restarted
//! agent swaps its freshly loaded program into the pinned link (`BPF_LINK_UPDATE`, atomic: the
//! device is never without a program); `weir-agent uninstall` removes the pin, which detaches it.
//!
//! The mode (`--xdp-mode`): native (in the driver, before an skb exists) on a real NIC, but
//! generic on a veth. A veth has no driver ring: its native XDP runs on the skb the peer already
//! built (`veth_xdp_rcv_skb` in drivers/net/veth.c), so it saves nothing, and it costs the peer its
//! segmentation offloads: while a native program is attached, `veth_fix_features` clears
//! `NETIF_F_GSO_SOFTWARE` on the peer (with or without multi-buffer support), so every TCP burst
//! the peer sends (a forwarded 64 KiB GSO packet included) is cut into MTU-sized packets, each
//! copied into a page-pool page before the program runs. Generic XDP runs on the same skb in the
//! core receive path with the same verdicts, and the peer keeps TSO: one burst, one run.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::Array,
    programs::{
        Xdp, XdpMode as KernelXdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use weir_common::{MAP_UPLINK, PROG_XDP, UplinkConfig};

use super::uplink_link::{self, AttachedMode, UplinkLink};

/// The XDP mode of `weir_xdp` on the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Generic on a veth (see the module's doc), else native, or generic where the driver has no
    /// native XDP.
    Auto,
    /// In the driver only: fails where the driver has no native XDP.
    Native,
    /// In the core receive path, on the skb.
    Generic,
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("the kernel object has no loaded XDP program {PROG_XDP}: {0}")]
    Program(String),
    #[error("writing the XDP program's uplink settings ({MAP_UPLINK}): {0}")]
    Settings(String),
    #[error("creating the XDP pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "attaching {PROG_XDP} to {device} ({mode:?} XDP): {source}; pass --xdp-device with the \
         uplink's name, --xdp-mode auto, or --xdp-device none to run without the XDP filter"
    )]
    Attach {
        device: String,
        mode: XdpMode,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning the XDP link of {device} at {path}: {reason}")]
    Pin {
        device: String,
        path: PathBuf,
        reason: String,
    },
}

/// Where the XDP links are pinned.
pub fn pin_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join("xdp")
}

/// How the program came to be on the device.
#[derive(Debug, PartialEq, Eq)]
pub enum Attached {
    /// Swapped into the link an earlier agent pinned.
    Replaced,
    /// Attached anew, in native (driver) mode.
    Native,
    /// Attached anew in generic mode: the driver has no native XDP.
    Generic,
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, UplinkError> {
    ebpf.program_mut(PROG_XDP)
        .ok_or_else(|| UplinkError::Program("missing".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| UplinkError::Program(e.to_string()))
}

/// Puts `weir_xdp` on `device`: into the pinned link if an earlier agent left one (atomic
/// replacement), else a new link, pinned. Links pinned for other devices (the uplink changed)
/// are removed afterwards, which detaches them. `vxlan_port`: the node's VXLAN overlay port, whose
/// tunnel packets the program looks into; written before the program is attached, so it holds
/// from its first packet. A pinned link in another mode than `mode` asks for is replaced by a new
/// link: the device is without the filter for that moment (the tc programs still enforce policy).
pub fn attach(
    ebpf: &mut Ebpf,
    device: &str,
    vxlan_port: Option<u16>,
    bpffs_dir: &Path,
    mode: XdpMode,
) -> Result<Attached, UplinkError> {
    configure(ebpf, vxlan_port)?;
    let dir = pin_dir(bpffs_dir);
    std::fs::create_dir_all(&dir).map_err(|source| UplinkError::PinDir {
        path: dir.clone(),
        source,
    })?;
    let pin = dir.join(device);
    let program = program(ebpf)?;
    let ifindex = nix::net::if_::if_nametoindex(device).ok();
    let link = ifindex.and_then(|ifindex| uplink_link::query(ifindex).ok());
    let mode = resolve(mode, link);
    if let (Some(ifindex), Some(existing)) = (ifindex, link.and_then(|l| l.xdp))
        && pin.exists()
        && !keeps(mode, existing)
    {
        tracing::warn!(device, ?existing, wanted = ?mode, "the pinned XDP link is in another mode; replacing it (the uplink is without the filter for a moment)");
        let _ = std::fs::remove_file(&pin);
        wait_detached(ifindex);
    }
    let attached = match replace_pinned(program, &pin) {
        Some(attached) => attached,
        None => attach_new(program, device, &pin, mode)?,
    };
    for stale in pinned_devices(bpffs_dir)
        .into_iter()
        .filter(|d| d != device)
    {
        match std::fs::remove_file(dir.join(&stale)) {
            Ok(()) => tracing::info!(device = %stale, "took the XDP filter off the former uplink"),
            Err(e) => {
                tracing::warn!(device = %stale, error = %e, "could not remove the XDP link of the former uplink")
            }
        }
    }
    Ok(attached)
}

/// Writes the uplink settings `weir_xdp` reads (`WEIR_UPLINK`).
pub fn configure(ebpf: &mut Ebpf, vxlan_port: Option<u16>) -> Result<(), UplinkError> {
    let map = ebpf
        .map_mut(MAP_UPLINK)
        .ok_or_else(|| UplinkError::Settings("the kernel object has no such map".into()))?;
    let mut settings: Array<_, UplinkConfig> =
        Array::try_from(map).map_err(|e| UplinkError::Settings(e.to_string()))?;
    let config = UplinkConfig {
        vxlan_port: vxlan_port.unwrap_or(0).to_be(),
        _pad: [0; 6],
    };
    settings
        .set(0, config, 0)
        .map_err(|e| UplinkError::Settings(e.to_string()))
}

/// Swaps the program into the link pinned at `pin`. `None` when there is none, or it is defunct
/// (its device was deleted): its pin is removed and a new link is needed.
fn replace_pinned(program: &mut Xdp, pin: &Path) -> Option<Attached> {
    if !pin.exists() {
        return None;
    }
    let swapped = PinnedLink::from_pin(pin)
        .map_err(|e| e.to_string())
        .and_then(|pinned| XdpLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string()))
        .and_then(|link| program.attach_to_link(link).map_err(|e| e.to_string()));
    match swapped {
        Ok(id) => {
            // The pin keeps the link; the agent need not hold it.
            if let Ok(link) = program.take_link(id) {
                drop(link);
            }
            Some(Attached::Replaced)
        }
        Err(e) => {
            tracing::warn!(pin = %pin.display(), error = %e, "the pinned XDP link cannot be updated; attaching anew");
            let _ = std::fs::remove_file(pin);
            None
        }
    }
}

/// How long [`wait_detached`] waits for the kernel to release a link whose pin was removed.
const DETACH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits until `ifindex` has no XDP program, at most [`DETACH_WAIT`]. Removing a link's pin does
/// not detach it at once: the kernel releases the link from a workqueue (`bpf_link_put`), and
/// until then an attach in the other mode fails with EEXIST (one mode at a time on a device).
fn wait_detached(ifindex: u32) {
    let deadline = std::time::Instant::now() + DETACH_WAIT;
    while std::time::Instant::now() < deadline {
        match uplink_link::query(ifindex) {
            Ok(link) if link.xdp.is_some() => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // Gone, or the device cannot be read: the attach reports what is wrong.
            _ => return,
        }
    }
}

/// `Auto` made concrete for the device: `Generic` on a veth; `Native` and `Generic` as asked.
/// `Auto` stays for any other device: native, falling back to generic.
fn resolve(mode: XdpMode, link: Option<UplinkLink>) -> XdpMode {
    match mode {
        XdpMode::Auto if link.is_some_and(|l| l.is_veth) => XdpMode::Generic,
        other => other,
    }
}

/// Whether a link attached in `existing` mode serves a request for `mode`.
fn keeps(mode: XdpMode, existing: AttachedMode) -> bool {
    match mode {
        XdpMode::Auto => true,
        XdpMode::Native => existing == AttachedMode::Native,
        XdpMode::Generic => existing == AttachedMode::Generic,
    }
}

fn attach_new(
    program: &mut Xdp,
    device: &str,
    pin: &Path,
    mode: XdpMode,
) -> Result<Attached, UplinkError> {
    let failed = |source| UplinkError::Attach {
        device: device.to_owned(),
        mode,
        source,
    };
    let (id, attached) = match mode {
        XdpMode::Generic => (
            program.attach(device, KernelXdpMode::Skb).map_err(failed)?,
            Attached::Generic,
        ),
        XdpMode::Native => (
            program
                .attach(device, KernelXdpMode::Driver)
                .map_err(failed)?,
            Attached::Native,
        ),
        XdpMode::Auto => match program.attach(device, KernelXdpMode::Driver) {
            Ok(id) => (id, Attached::Native),
            Err(native) => {
                tracing::warn!(device, error = %native, "no native XDP on the uplink; attaching in generic mode");
                let id = program.attach(device, KernelXdpMode::Skb).map_err(failed)?;
                (id, Attached::Generic)
            }
        },
    };
    let pin_error = |reason: String| UplinkError::Pin {
        device: device.to_owned(),
        path: pin.to_owned(),
        reason,
    };
    let link = program
        .take_link(id)
        .map_err(|e| pin_error(e.to_string()))?;
    let link = FdLink::try_from(link).map_err(|e| pin_error(e.to_string()))?;
    link.pin(pin).map_err(|e| pin_error(e.to_string()))?;
    Ok(attached)
}

/// The devices with a pinned XDP link.
pub fn pinned_devices(bpffs_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(pin_dir(bpffs_dir)) else {
        return Vec::new();
    };
    let mut devices: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    devices.sort();
    devices
}

/// Takes `weir_xdp` off every device (removing a pin releases its link, which detaches the
/// program). Returns the devices.
pub fn detach_all(bpffs_dir: &Path) -> std::io::Result<Vec<String>> {
    let devices = pinned_devices(bpffs_dir);
    for device in &devices {
        std::fs::remove_file(pin_dir(bpffs_dir).join(device))?;
    }
    let _ = std::fs::remove_dir(pin_dir(bpffs_dir));
    Ok(devices)
}

/// The interface in this network namespace that holds `addr` (the node's InternalIP).
pub fn device_with_address(addr: IpAddr) -> Option<String> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let sa = ifa.address?;
        let found = match addr {
            IpAddr::V4(v4) => sa.as_sockaddr_in().map(|s| s.ip() == v4),
            IpAddr::V6(v6) => sa.as_sockaddr_in6().map(|s| s.ip() == v6),
        };
        found.unwrap_or(false).then_some(ifa.interface_name)
    })
}
