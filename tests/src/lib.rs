//! Helpers shared by the root-only tests: packet builders, namespace guards, agent processes.

pub mod agent;
pub mod netns;
pub mod packet;
