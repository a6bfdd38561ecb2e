//! The agent's state files: small JSON documents in the state directory, written so that a crash
//! of the agent leaves either the old state or the new, never half of one.
//!
//! - [`write_json`] replaces a whole file (temp file, rename): for state that changes rarely
//!   (identities).
//! - [`SnapshotLog`] appends each new state as one line: for state that changes on every CNI ADD
//!   and DEL (IPAM, endpoints). On ext4 a rename that replaces a file also flushes the new file's
//!   blocks, paid twice per ADD; an append is one write into the page cache.
//!
//! No fsync, on purpose: it would put a disk flush (milliseconds, serialised) on every CNI ADD,
//! and it protects only against losing the machine, after which every pod, veth and pin these
//! files describe is gone too and start-up reconciliation rebuilds them from what exists.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("writing state file {path}: {source}; check that the state directory is writable")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is not valid ({source}); move it aside to start from empty state")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("reading state file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn write_error(path: &Path) -> impl Fn(std::io::Error) -> PersistError + '_ {
    |source| PersistError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `value` as JSON to `path`, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), PersistError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| write_error(path)(e.into()))?;
    replace_file(path, &bytes)
}

/// Replaces the file at `path` with `bytes` (temp file in the same directory, rename).
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    let err = write_error(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(&err)?;
    }
    // Unique per call: two threads saving the same file must not share a temp file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let mut file = File::create(&tmp).map_err(&err)?;
    file.write_all(bytes).map_err(&err)?;
    std::fs::rename(&tmp, path).map_err(&err)?;
    Ok(())
}

/// Reads JSON from `path`; `Ok(None)` when the file does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, PersistError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| PersistError::Decode {
                    path: path.display().to_string(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PersistError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// A state file that grows by appending: every [`save`](Self::save) appends the whole state as
/// one JSON line, and the last complete line is the state. A crash in the middle of an append
/// leaves a torn last line without its newline, which [`open`](Self::open) cuts off: its change
/// was never acknowledged. Past [`COMPACT_BYTES`](Self::COMPACT_BYTES) the file is rewritten
/// (temp file, rename) with the latest state alone.
///
/// One writer: the caller saves under the lock that orders its changes.
#[derive(Debug)]
pub struct SnapshotLog {
    path: PathBuf,
    /// Open for appending; `None` until the first save of a log that did not exist.
    file: Option<File>,
    /// Bytes in the file, all complete lines.
    len: u64,
}

impl SnapshotLog {
    /// A log of 100 pods' IPAM state (~20 kB a line) is compacted about every 50 saves.
    pub const COMPACT_BYTES: u64 = 1 << 20;

    /// Opens the log at `path` and returns the last state saved in it. When there is no log yet
    /// but `legacy` (a whole-file JSON state of earlier versions) exists, its state is moved into
    /// the log and the legacy file removed.
    pub fn open<T: Serialize + DeserializeOwned>(
        path: &Path,
        legacy: &Path,
    ) -> Result<(Self, Option<T>), PersistError> {
        let read_err = |source| PersistError::Read {
            path: path.display().to_string(),
            source,
        };
        let mut log = SnapshotLog {
            path: path.to_owned(),
            file: None,
            len: 0,
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let state: Option<T> = read_json(legacy)?;
                if let Some(state) = &state {
                    log.compact(&line_of(path, state)?)?;
                    std::fs::remove_file(legacy).map_err(write_error(legacy))?;
                }
                return Ok((log, state));
            }
            Err(e) => return Err(read_err(e)),
        };
        // Everything after the last newline is a torn append: cut it off, so the next line
        // starts clean.
        let complete = bytes
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |last| last + 1);
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(read_err)?;
        if complete < bytes.len() {
            file.set_len(complete as u64).map_err(write_error(path))?;
        }
        let state = bytes[..complete]
            .split(|b| *b == b'\n')
            .rfind(|line| !line.is_empty())
            .map(|line| {
                serde_json::from_slice(line).map_err(|source| PersistError::Decode {
                    path: path.display().to_string(),
                    source,
                })
            })
            .transpose()?;
        log.file = Some(file);
        log.len = complete as u64;
        Ok((log, state))
    }

    /// Appends `state` as the new current state; when this returns `Ok`, it is in the file.
    pub fn save<T: Serialize>(&mut self, state: &T) -> Result<(), PersistError> {
        let line = line_of(&self.path, state)?;
        let Some(file) = self
            .file
            .as_mut()
            .filter(|_| self.len + line.len() as u64 <= Self::COMPACT_BYTES)
        else {
            return self.compact(&line);
        };
        if let Err(e) = file.write_all(&line) {
            // A partial line would glue itself to the next one: take it back.
            let _ = file.set_len(self.len);
            return Err(write_error(&self.path)(e));
        }
        self.len += line.len() as u64;
        Ok(())
    }

    /// Replaces the file with `line` alone.
    fn compact(&mut self, line: &[u8]) -> Result<(), PersistError> {
        replace_file(&self.path, line)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(write_error(&self.path))?;
        self.file = Some(file);
        self.len = line.len() as u64;
        Ok(())
    }
}

/// `state` as one line of JSON, newline included.
fn line_of<T: Serialize>(path: &Path, state: &T) -> Result<Vec<u8>, PersistError> {
    let mut line = serde_json::to_vec(state).map_err(|e| write_error(path)(e.into()))?;
    line.push(b'\n');
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing() {
        let path = std::env::temp_dir().join(format!("weir-persist-{}.json", std::process::id()));
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), None);
        write_json(&path, &vec![1u32, 2]).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), Some(vec![1, 2]));
        std::fs::remove_file(&path).unwrap();
    }

    /// A fresh directory, and the paths of a log and of its legacy file in it.
    fn log_paths(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("weir-persist-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (path, legacy) = (dir.join("s.jsonl"), dir.join("s.json"));
        (dir, path, legacy)
    }

    #[test]
    fn snapshot_log_returns_the_last_state_saved() {
        let (dir, path, legacy) = log_paths("last");
        let (mut log, state) = SnapshotLog::open::<Vec<u32>>(&path, &legacy).unwrap();
        assert_eq!(state, None);
        log.save(&vec![1u32]).unwrap();
        log.save(&vec![1u32, 2]).unwrap();
        drop(log);
        let (mut log, state) = SnapshotLog::open::<Vec<u32>>(&path, &legacy).unwrap();
        assert_eq!(state, Some(vec![1, 2]));
        log.save(&vec![3u32]).unwrap();
        let (_, state) = SnapshotLog::open::<Vec<u32>>(&path, &legacy).unwrap();
        assert_eq!(state, Some(vec![3]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_append_is_cut_off_and_the_previous_state_kept() {
        let (dir, path, legacy) = log_paths("torn");
        std::fs::write(&path, b"[1]\n[1,2]\n[1,2,").unwrap();
        let (mut log, state) = SnapshotLog::open::<Vec<u32>>(&path, &legacy).unwrap();
        assert_eq!(state, Some(vec![1, 2]));
        // The next save starts on a line of its own.
        log.save(&vec![7u32]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"[1]\n[1,2]\n[7]\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_garbled_last_line_is_an_error_that_names_the_file() {
        let (dir, path, legacy) = log_paths("garbled");
        std::fs::write(&path, b"[1]\n{not json\n").unwrap();
        let err = SnapshotLog::open::<Vec<u32>>(&path, &legacy).unwrap_err();
        assert!(err.to_string().contains("s.jsonl"), "{err}");
        assert!(err.to_string().contains("move it aside"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_legacy_file_moves_into_the_log() {
        let (dir, path, legacy) = log_paths("legacy");
        write_json(&legacy, &vec![4u32, 5]).unwrap();
        let (_, state) = SnapshotLog::open::<Vec<u32>>(&path, &legacy).unwrap();
        assert_eq!(state, Some(vec![4, 5]));
        assert!(!legacy.exists());
        let (_, state) = SnapshotLog::open::<Vec<u32>>(&path, &legacy).unwrap();
        assert_eq!(state, Some(vec![4, 5]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_log_is_compacted_to_the_latest_state() {
        let (dir, path, legacy) = log_paths("compact");
        let (mut log, _) = SnapshotLog::open::<Vec<u32>>(&path, &legacy).unwrap();
        let big: Vec<u32> = (0..20_000).collect();
        let line = serde_json::to_vec(&big).unwrap().len() as u64 + 1;
        let saves = SnapshotLog::COMPACT_BYTES / line + 2;
        for i in 0..saves {
            let mut state = big.clone();
            state.push(i as u32);
            log.save(&state).unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= SnapshotLog::COMPACT_BYTES, "{len} bytes");
        let (_, state) = SnapshotLog::open::<Vec<u32>>(&path, &legacy).unwrap();
        assert_eq!(state.unwrap().last(), Some(&(saves as u32 - 1)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
