//! The datapath owner: loads the embedded kernel programs, pins their maps under the node's
//! bpffs directory, attaches programs to pods' veths (tc clsact), and writes map contents.

pub mod addr;
pub mod attach;
pub mod bpf_log;
pub mod conntrack_upgrade;
pub mod desired;
pub mod events;
pub mod loader;
pub mod maps;
pub mod object;
pub mod rtnl;
pub mod tc;
pub mod uplink;
pub mod uplink_link;
pub mod writer;
