//! Keys and values of the subject and policy maps.
//!
//! A subject is the identity of a local endpoint. `WEIR_SUBJECTS[identity]` says whether it is
//! isolated per direction and which version of its rules is live. Its rules live in the
//! `WEIR_POLICY` LPM trie under that version, so the agent writes a new version beside the old,
//! flips the subject's version with one map update, then deletes the old: a packet sees the old
//! rules or the new, never a mix.

/// `WEIR_SUBJECTS` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SubjectKey {
    pub identity: u32,
}
const _: () = assert!(core::mem::size_of::<SubjectKey>() == 4);

/// `WEIR_SUBJECTS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubjectPolicy {
    /// The live rule version in `WEIR_POLICY`.
    pub version: u32,
    /// `SUBJECT_ISOLATED_*` flags.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<SubjectPolicy>() == 8);

/// Key data of the `WEIR_POLICY` LPM trie. Field order is match order: the LPM matches from the
/// first byte, so the fields that are always exact come first, then protocol, then the port,
/// whose prefix expresses port ranges. All multi-byte fields are network order (big-endian).
///
/// Prefix lengths: `POLICY_PREFIX_ANY_PROTO` (any protocol, any port),
/// `POLICY_PREFIX_ANY_PORT` (one protocol, any port), `POLICY_PREFIX_ANY_PORT + n` (a port
/// prefix of n bits; 16 is one port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    /// Subject identity, big-endian.
    pub subject: u32,
    /// Rule version of the subject, big-endian.
    pub version: u32,
    /// Peer identity (`IDENTITY_ANY` for any peer), big-endian.
    pub peer: u32,
    /// `DIR_EGRESS` or `DIR_INGRESS`.
    pub direction: u8,
    /// IP protocol number.
    pub proto: u8,
    /// Destination port, big-endian.
    pub port: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 16);

/// Bits of `PolicyKey` through `direction`: matches any protocol and port.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 13 * 8;
/// Bits of `PolicyKey` through `proto`: matches any port of that protocol.
pub const POLICY_PREFIX_ANY_PORT: u32 = 14 * 8;
/// Bits of the whole `PolicyKey`: one port.
pub const POLICY_PREFIX_FULL: u32 = 16 * 8;

/// `WEIR_POLICY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// Agent-assigned id of the rule that allows this (for verdict events and `explain`).
    pub rule: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    unsafe impl aya::Pod for SubjectKey {}
    unsafe impl aya::Pod for SubjectPolicy {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
}
