//! Types shared by Weir's kernel programs (`weir-ebpf`) and user space (`weir-agent`, tests).
//!
//! Every type here is `#[repr(C)]`, `Copy`, made of fixed-width integers and byte arrays, with
//! explicit zeroed padding: hash keys compare byte by byte, so garbage in padding is a silent miss.
//! Addresses are 16 bytes in network order; IPv4 addresses are IPv4-mapped IPv6
//! (`::ffff:a.b.c.d`), so one map serves both families. Ports are in network order.
#![no_std]

pub mod conntrack;
pub mod consts;
pub mod event;
pub mod fragments;
pub mod maps;
pub mod nexthop;
pub mod policy;
pub mod ports;
pub mod throttle;
pub mod xdp_denials;

pub use conntrack::*;
pub use consts::*;
pub use event::*;
pub use fragments::*;
pub use maps::*;
pub use nexthop::*;
pub use policy::*;
pub use throttle::*;
pub use xdp_denials::*;
