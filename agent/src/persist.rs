//! Small JSON state files in the agent's state directory, written atomically (temp file, rename)
//! so a crash of the agent leaves either the old file or the new, never half of one.
//!
//! No fsync, on purpose: it would put a disk flush (milliseconds, serialised) on every CNI ADD,
//! and it protects only against losing the machine, after which every pod, veth and pin these
//! files describe is gone too and start-up reconciliation rebuilds them from what exists.

use std::{io::Write as _, path::Path};

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

/// Writes `value` as JSON to `path`, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), PersistError> {
    let err = |source| PersistError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // Unique per call: two threads saving the same file must not share a temp file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| err(e.into()))?;
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    file.write_all(&bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
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
}
