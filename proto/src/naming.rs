//! Names both the agent and the CNI plugin derive from an attachment, so that either can find
//! what the other created without asking (CNI DEL works while the agent is down).

/// Prefix of every host-side veth Weir creates.
pub const HOST_VETH_PREFIX: &str = "weir";

/// Number of hex characters after the prefix: 4 + 11 = 15, the kernel's limit (IFNAMSIZ - 1).
const HASH_HEX_CHARS: usize = 11;

/// The host-side veth name for an attachment: `weir` + 11 hex characters of the 64-bit FNV-1a
/// hash of `"<container_id>/<ifname>"`. Deterministic and stable across releases (FNV-1a is
/// fixed here, not a std hasher whose output may change).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let hash = fnv1a64(
        container_id
            .bytes()
            .chain(std::iter::once(b'/'))
            .chain(ifname.bytes()),
    );
    let hex = format!("{hash:016x}");
    format!("{HOST_VETH_PREFIX}{}", &hex[..HASH_HEX_CHARS])
}

/// Whether `name` has the shape of a name `host_veth_name` produces.
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == HOST_VETH_PREFIX.len() + HASH_HEX_CHARS
        && name.starts_with(HOST_VETH_PREFIX)
        && name[HOST_VETH_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// 64-bit FNV-1a: stable across builds, versions and machines, for names every node must derive
/// alike (host veths, Kubernetes Event names).
pub fn fnv1a64(bytes: impl Iterator<Item = u8>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.fold(OFFSET, |hash, b| (hash ^ u64::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_fifteen_chars_and_recognised() {
        let name = host_veth_name("0123456789abcdef", "eth0");
        assert_eq!(name.len(), 15);
        assert!(is_host_veth_name(&name));
        assert!(!is_host_veth_name("weir-uplink"));
        assert!(!is_host_veth_name("eth0"));
    }

    #[test]
    fn names_are_stable_and_distinct() {
        // FNV-1a 64 of "" is the offset basis; pins the algorithm.
        assert_eq!(fnv1a64("".bytes()), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a".bytes()), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(host_veth_name("c1", "eth0"), host_veth_name("c1", "eth0"));
        assert_ne!(host_veth_name("c1", "eth0"), host_veth_name("c1", "eth1"));
        assert_ne!(host_veth_name("c1", "eth0"), host_veth_name("c2", "eth0"));
    }
}
