//! Helpers shared by the root-only tests: packet builders, namespace guards.
