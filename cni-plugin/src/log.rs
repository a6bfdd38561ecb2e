//! The plugin's log file: one appended line per call (what kubelet does not show).

use std::{
    io::Write as _,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Phase marks of this call (`connect=1.2ms alloc=0.8ms ...`), appended to the log line so a
/// slow ADD says where its time went.
static PHASES: Mutex<Vec<(&'static str, Instant)>> = Mutex::new(Vec::new());

/// Marks the end of a phase.
pub fn mark(phase: &'static str) {
    if let Ok(mut p) = PHASES.lock() {
        p.push((phase, Instant::now()));
    }
}

fn phases(start: Instant) -> String {
    let Ok(p) = PHASES.lock() else {
        return String::new();
    };
    let mut last = start;
    let mut out = String::new();
    for (name, at) in p.iter() {
        out.push_str(&format!(
            " {name}={:.1}ms",
            at.saturating_duration_since(last).as_secs_f64() * 1000.0
        ));
        last = *at;
    }
    out
}

/// Appends one line; a log that cannot be written never fails the call.
pub fn line(
    path: &Path,
    verb: &str,
    container_id: &str,
    ifname: &str,
    started: Instant,
    outcome: &str,
) {
    let took: Duration = started.elapsed();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let text = format!(
        "{}.{:03} {verb} container={} ifname={} took={:.1}ms{} {}\n",
        now.as_secs(),
        now.subsec_millis(),
        if container_id.is_empty() {
            "-"
        } else {
            container_id
        },
        if ifname.is_empty() { "-" } else { ifname },
        took.as_secs_f64() * 1000.0,
        phases(started),
        outcome.replace('\n', " "),
    );
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    };
    let file = open().or_else(|_| {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        open()
    });
    if let Ok(mut f) = file {
        // One write call per line: O_APPEND keeps concurrent plugins' lines whole.
        let _ = f.write_all(text.as_bytes());
    }
}
