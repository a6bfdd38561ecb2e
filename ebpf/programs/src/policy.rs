//! Policy evaluation of one side of a connection: a fixed number of map lookups (one hash,
//! two address LPMs, at most three policy LPMs), never a scan over rules.

use aya_ebpf::maps::lpm_trie::Key;
use weir_common::{
    Addr, AddrKey, DIR_EGRESS, IDENTITY_ANY, IDENTITY_WORLD, POLICY_PREFIX_FULL, PolicyKey,
    REASON_NOT_ISOLATED, REASON_POLICY_DENIED, REASON_RULE, SUBJECT_ISOLATED_EGRESS,
    SUBJECT_ISOLATED_INGRESS, SubjectKey,
};

use crate::maps::{WEIR_CIDR_IDS, WEIR_IPCACHE, WEIR_POLICY, WEIR_SUBJECTS};

/// Full-length prefix of a 16-byte address.
const ADDR_PREFIX_FULL: u32 = 128;

/// The identities a peer address resolves to.
#[derive(Clone, Copy)]
pub struct Peer {
    /// `WEIR_IPCACHE` identity, if the address is a known pod or node.
    pub pod: Option<u32>,
    /// `WEIR_CIDR_IDS` identity, if a policy prefix contains the address.
    pub cidr: Option<u32>,
}

impl Peer {
    /// The identity events report: pod identity, else CIDR identity, else world.
    #[inline(always)]
    pub fn reported(&self) -> u32 {
        match (self.pod, self.cidr) {
            (Some(p), _) => p,
            (None, Some(c)) => c,
            (None, None) => IDENTITY_WORLD,
        }
    }
}

#[inline(always)]
pub fn resolve_peer(addr: &Addr) -> Peer {
    let key = Key::new(ADDR_PREFIX_FULL, AddrKey { addr: *addr });
    Peer {
        pod: WEIR_IPCACHE.get(&key).map(|v| v.identity),
        cidr: WEIR_CIDR_IDS.get(&key).map(|v| v.identity),
    }
}

/// `(version, flags)` of the subject's `WEIR_SUBJECTS` entry; `(0, 0)` (not isolated) without one.
#[inline(always)]
pub fn subject_policy(subject: u32) -> (u32, u32) {
    match WEIR_SUBJECTS.get_ptr(&SubjectKey { identity: subject }) {
        // SAFETY: the pointer comes from a successful lookup; the fields are plain integers.
        Some(sp) => unsafe { ((*sp).version, (*sp).flags) },
        None => (0, 0),
    }
}

/// The outcome of evaluating one side.
#[derive(Clone, Copy)]
pub struct Eval {
    pub allowed: bool,
    /// `REASON_NOT_ISOLATED`, `REASON_RULE` or `REASON_POLICY_DENIED`.
    pub reason: u8,
    /// The allowing rule, 0 otherwise.
    pub rule: u32,
    /// The subject's live rule version (0 when it has no `WEIR_SUBJECTS` entry).
    pub version: u32,
    /// The peer identity reported in events.
    pub peer: u32,
}

/// Evaluates subject `subject`'s policy in direction `dir` for a connection with `peer_addr`,
/// `proto` and destination port `dport` (network order; 0 for ICMP).
#[inline(always)]
pub fn evaluate(subject: u32, dir: u8, peer_addr: &Addr, proto: u8, dport: u16) -> Eval {
    evaluate_under(
        subject,
        subject_policy(subject),
        dir,
        peer_addr,
        proto,
        dport,
    )
}

/// Whether `flags` (a subject's `WEIR_SUBJECTS` flags) isolate it in direction `dir`.
#[inline(always)]
pub fn is_isolated(flags: u32, dir: u8) -> bool {
    let isolated = if dir == DIR_EGRESS {
        SUBJECT_ISOLATED_EGRESS
    } else {
        SUBJECT_ISOLATED_INGRESS
    };
    flags & isolated != 0
}

/// `evaluate` with the subject's `(version, flags)` already looked up (`subject_policy`).
#[inline(always)]
pub fn evaluate_under(
    subject: u32,
    (version, flags): (u32, u32),
    dir: u8,
    peer_addr: &Addr,
    proto: u8,
    dport: u16,
) -> Eval {
    let peer = resolve_peer(peer_addr);
    let mut eval = Eval {
        allowed: true,
        reason: REASON_NOT_ISOLATED,
        rule: 0,
        version,
        peer: peer.reported(),
    };
    if !is_isolated(flags, dir) {
        return eval;
    }
    let candidates = [
        Some(peer.pod.unwrap_or(IDENTITY_WORLD)),
        peer.cidr,
        Some(IDENTITY_ANY),
    ];
    for candidate in candidates {
        let Some(id) = candidate else { continue };
        let key = Key::new(
            POLICY_PREFIX_FULL,
            PolicyKey {
                subject: subject.to_be(),
                version: version.to_be(),
                peer: id.to_be(),
                direction: dir,
                proto,
                port: dport,
            },
        );
        if let Some(v) = WEIR_POLICY.get(&key) {
            eval.reason = REASON_RULE;
            eval.rule = v.rule;
            return eval;
        }
    }
    eval.allowed = false;
    eval.reason = REASON_POLICY_DENIED;
    eval
}
