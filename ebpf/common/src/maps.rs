//! Keys and values of the endpoint, ipcache and config maps.

/// A 16-byte address in network order; IPv4 is mapped into `::ffff:0:0/96`.
pub type Addr = [u8; 16];

/// Prefix length offset of an IPv4 prefix inside the mapped IPv6 space.
pub const IPV4_MAPPED_PREFIX_BITS: u32 = 96;

/// Maps an IPv4 address (network order octets) into the shared 16-byte form.
pub const fn ipv4_mapped(octets: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// `WEIR_CONFIG[0]`: node-wide settings the programs read on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Bumped by the agent after every applied change; conntrack entries remember the
    /// generation they were checked under and are re-checked when it moved.
    pub generation: u32,
    /// `CONFIG_*` flags.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 8);

/// `WEIR_ENDPOINTS` key: a local pod's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 16);

/// `WEIR_ENDPOINTS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// ifindex of the host-side veth the pod is behind; a packet from the pod on any other
    /// interface is spoofed.
    pub ifindex: u32,
    /// The pod's identity: the subject its policy is looked up under.
    pub identity: u32,
    /// Reserved, zero.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 16);

/// Key data of `WEIR_IPCACHE` and `WEIR_CIDR_IDS` (LPM tries; wrapped in the LPM key with a
/// prefix length, IPv4 prefixes offset by 96 bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 16);

/// `WEIR_IPCACHE` value: the identity of a pod or node address;
/// `WEIR_CIDR_IDS` value: the CIDR identity of a policy prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityValue {
    pub identity: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<IdentityValue>() == 8);

/// `WEIR_PREFILTER` value (an LPM trie keyed by `AddrKey`, as the ipcache): a prefix of the
/// operator's deny list. Packets from it are dropped at XDP on the node's uplink.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefilterValue {
    /// 1-based position of the prefix in the deny list file, reported as the event's rule.
    pub entry: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PrefilterValue>() == 8);

/// `WEIR_UPLINK[0]`: what `weir_xdp` needs to know about the node's uplink. Written by the agent
/// before it attaches (or swaps in) the program; not pinned, as each agent writes it anew.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkConfig {
    /// The UDP port of the node's VXLAN overlay, network order; 0 without an overlay. A UDP
    /// packet to this port that is not for a local pod is a tunnel packet: `weir_xdp` filters the
    /// pod packet inside it.
    pub vxlan_port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<UplinkConfig>() == 8);

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    unsafe impl aya::Pod for UplinkConfig {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for IdentityValue {}
    unsafe impl aya::Pod for PrefilterValue {}
}
