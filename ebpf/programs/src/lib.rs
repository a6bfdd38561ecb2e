//! Empty library target: lets weir-agent list this crate as a build-dependency, so cargo reruns
//! the agent's build.rs (which builds the programs) when their sources change.
#![no_std]
