//! The policy compiler: a pure function from cluster state (Namespaces, Pods, NetworkPolicies,
//! Nodes) to the desired contents of the datapath maps.

pub mod cidr;
pub mod compile;
pub mod identity;
pub mod model;
pub mod output;
pub mod selector;
pub mod validate;

pub use compile::{CompileError, CompileInput, compile};
pub use identity::IdentityAllocator;
