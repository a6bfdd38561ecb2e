//! Waiting for an observable state, never for a fixed time: the tests poll what they wait for,
//! and a deadline only bounds how long a failure takes to be reported.

use std::time::{Duration, Instant};

/// Polls `f` until it holds; panics naming `what` if it does not within `within`.
pub fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
