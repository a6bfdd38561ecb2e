//! The TCP probe the end-to-end tests share: a server in a pod's namespace that answers every
//! connection with `hi`, and a client that counts a connection as made only when that answer
//! arrives, so a completed connect proves the path in both directions.
//!
//! Two probes: [`eventually_connects`] for a path that must be allowed (it tries again until
//! the path answers or a bound passes, since one try can miss its timeout on a loaded machine),
//! and [`connects`], one try, for a path that must be denied (a denial cannot be told from a
//! slow answer any sooner than the try's timeout, so repeating it would only make it slower).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use crate::netns::{Netns, spawn_in};

/// The port the server listens on.
pub const PORT: u16 = 8080;

/// How long a probe waits for the connection and for the answer: a dropped SYN is a denial.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// How long an allowed path may take to answer [`eventually_connects`]: a bound for failures
/// only, far above what an allowed connection takes, so a loaded machine does not fail a test.
pub const ALLOWED_WITHIN: Duration = Duration::from_secs(10);

/// Serves on `ip`:[`PORT`] inside `pod` until the test process ends; returns once it listens.
pub fn serve(pod: &Netns, ip: IpAddr) {
    let (listening, bound) = std::sync::mpsc::channel();
    spawn_in(pod.path(), move || {
        let listener = TcpListener::bind((ip, PORT)).unwrap();
        let _ = listening.send(());
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"hi");
        }
    });
    bound.recv().expect("the server listens");
}

/// Whether a connection from inside `from` to `to`:[`PORT`] is made and answered, in one try:
/// the probe for a path that must be denied.
pub fn connects(from: &Netns, to: IpAddr) -> bool {
    spawn_in(from.path(), move || {
        let addr = SocketAddr::from((to, PORT));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else {
            return false;
        };
        s.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).is_ok() && &buf == b"hi"
    })
    .join()
    .unwrap()
}

/// Whether a connection from inside `from` to `to`:[`PORT`] is made and answered within
/// [`ALLOWED_WITHIN`], trying again after each miss: the probe for a path that must be allowed.
pub fn eventually_connects(from: &Netns, to: IpAddr) -> bool {
    let deadline = Instant::now() + ALLOWED_WITHIN;
    loop {
        if connects(from, to) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
