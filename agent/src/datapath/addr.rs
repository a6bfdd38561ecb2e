//! Addresses and prefixes in the kernel's 16-byte form (IPv4 mapped into `::ffff:0:0/96`).

use std::net::IpAddr;

use ipnet::IpNet;
use weir_common::{Addr, IPV4_MAPPED_PREFIX_BITS, ipv4_mapped};

/// An address as the kernel programs see it.
pub fn to_kernel(addr: IpAddr) -> Addr {
    match addr {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// A prefix as an LPM key of the ipcache and CIDR tries: (prefix length in the 128-bit space,
/// address with host bits cleared).
pub fn prefix_to_kernel(net: IpNet) -> (u32, Addr) {
    let net = net.trunc();
    match net {
        IpNet::V4(v4) => (
            IPV4_MAPPED_PREFIX_BITS + u32::from(v4.prefix_len()),
            ipv4_mapped(v4.addr().octets()),
        ),
        IpNet::V6(v6) => (u32::from(v6.prefix_len()), v6.addr().octets()),
    }
}

/// The address back from the kernel's form, for events and logs.
pub fn from_kernel(addr: Addr) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_is_mapped_and_back() {
        let a: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(from_kernel(to_kernel(a)), a);
        let (len, key) = prefix_to_kernel("10.1.2.3/8".parse().unwrap());
        assert_eq!(len, 104);
        assert_eq!(from_kernel(key), "10.0.0.0".parse::<IpAddr>().unwrap());
        let (len, _) = prefix_to_kernel("fd00::/64".parse().unwrap());
        assert_eq!(len, 64);
    }
}
