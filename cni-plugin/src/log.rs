//! The plugin's log file: one appended line per call (what kubelet does not show).

use std::{io::Write as _, path::Path, time::Duration};

/// Appends one line; a log that cannot be written never fails the call.
pub fn line(
    path: &Path,
    verb: &str,
    container_id: &str,
    ifname: &str,
    took: Duration,
    outcome: &str,
) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let text = format!(
        "{}.{:03} {verb} container={} ifname={} took={:.1}ms {}\n",
        now.as_secs(),
        now.subsec_millis(),
        if container_id.is_empty() {
            "-"
        } else {
            container_id
        },
        if ifname.is_empty() { "-" } else { ifname },
        took.as_secs_f64() * 1000.0,
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
