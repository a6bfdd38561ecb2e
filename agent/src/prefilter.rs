//! The operator's deny list (in the spirit of Cilium's prefilter): source prefixes that
//! `weir_xdp` drops on the node's uplink before an skb exists.
//!
//! It is a file (`--prefilter-file`), one CIDR or address per line, `#` starts a comment. In
//! Kubernetes mode mount a ConfigMap (e.g. `weir-prefilter`, key `deny`) as that file: the kubelet
//! updates it in place and the agent follows. A file that does not parse is an error naming the
//! line; at start-up the agent refuses to run with it, later the last applied list stays.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{LpmTrie, MapData, MapError, lpm_trie::Key};
use ipnet::IpNet;
use weir_common::{AddrKey, MAX_PREFILTER, PrefilterValue};

use crate::datapath::addr::prefix_to_kernel;

#[derive(Debug, thiserror::Error)]
pub enum PrefilterError {
    #[error("reading the prefilter file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} line {line}: {text:?} is not a CIDR or an address (e.g. 203.0.113.0/24, 2001:db8::/32, 198.51.100.7); fix or remove the line"
    )]
    Parse {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error(
        "{path} lists {count} prefixes; at most {MAX_PREFILTER} fit: merge them into wider ones"
    )]
    TooMany { path: PathBuf, count: usize },
    #[error("writing the deny list map: {0}")]
    Map(#[source] MapError),
}

/// One prefix of the list and the line it is on (reported as the drop's rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub net: IpNet,
    pub line: u32,
}

/// Parses the file's text. A prefix listed twice keeps its first line.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, PrefilterError> {
    let mut entries: Vec<Entry> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let net = content
            .parse::<IpNet>()
            .or_else(|_| content.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| PrefilterError::Parse {
                path: path.to_owned(),
                line: index + 1,
                text: content.to_owned(),
            })?
            .trunc();
        if !entries.iter().any(|e| e.net == net) {
            entries.push(Entry {
                net,
                line: (index + 1) as u32,
            });
        }
    }
    if entries.len() > MAX_PREFILTER as usize {
        return Err(PrefilterError::TooMany {
            path: path.to_owned(),
            count: entries.len(),
        });
    }
    Ok(entries)
}

/// Reads and parses the file.
pub fn read(path: &Path) -> Result<Vec<Entry>, PrefilterError> {
    let text = std::fs::read_to_string(path).map_err(|source| PrefilterError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Kernel key of a prefix: (prefix length, address bytes).
type KernelPrefix = (u32, [u8; 16]);

/// The pinned `WEIR_PREFILTER` map and what it holds.
pub struct Prefilter {
    map: LpmTrie<MapData, AddrKey, PrefilterValue>,
    applied: BTreeMap<KernelPrefix, u32>,
}

impl Prefilter {
    /// Adopts the map (as an earlier agent left it: kept until the first `apply`).
    pub fn adopt(map: LpmTrie<MapData, AddrKey, PrefilterValue>) -> Result<Self, PrefilterError> {
        let mut applied = BTreeMap::new();
        for key in map.keys() {
            let key = key.map_err(PrefilterError::Map)?;
            let value = map.get(&key, 0).map_err(PrefilterError::Map)?;
            applied.insert((key.prefix_len(), key.data().addr), value.entry);
        }
        Ok(Self { map, applied })
    }

    /// Makes the map hold exactly `entries`: new and changed prefixes first, then the ones that
    /// went, so a prefix in both the old and the new list is never missing in between.
    pub fn apply(&mut self, entries: &[Entry]) -> Result<(), PrefilterError> {
        let desired: BTreeMap<KernelPrefix, u32> = entries
            .iter()
            .map(|e| (prefix_to_kernel(e.net), e.line))
            .collect();
        for (&(len, addr), &line) in &desired {
            if self.applied.get(&(len, addr)) != Some(&line) {
                let value = PrefilterValue {
                    entry: line,
                    _pad: 0,
                };
                self.map
                    .insert(&Key::new(len, AddrKey { addr }), value, 0)
                    .map_err(PrefilterError::Map)?;
                self.applied.insert((len, addr), line);
            }
        }
        let gone: Vec<KernelPrefix> = self
            .applied
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for (len, addr) in gone {
            match self.map.remove(&Key::new(len, AddrKey { addr })) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(PrefilterError::Map(e)),
            }
            self.applied.remove(&(len, addr));
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.applied.len()
    }

    pub fn is_empty(&self) -> bool {
        self.applied.is_empty()
    }
}

/// Re-reads `path` every `interval` and applies it when its content changed. A file that does
/// not parse, or is gone, keeps the last applied list (and says so).
pub async fn follow(path: PathBuf, mut prefilter: Prefilter, interval: Duration) {
    let mut last = std::fs::read_to_string(&path).ok();
    loop {
        tokio::time::sleep(interval).await;
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                if last.is_some() {
                    tracing::error!(path = %path.display(), error = %e, "cannot read the prefilter file; the last applied deny list stays");
                    last = None;
                }
                continue;
            }
        };
        if last.as_deref() == Some(text.as_str()) {
            continue;
        }
        last = Some(text.clone());
        match parse(&path, &text).and_then(|entries| prefilter.apply(&entries)) {
            Ok(()) => {
                tracing::info!(path = %path.display(), prefixes = prefilter.len(), "applied the prefilter deny list")
            }
            Err(e) => {
                tracing::error!(error = %e, "the prefilter deny list was not changed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_comments_addresses_and_errors() {
        let path = Path::new("/etc/weir/prefilter");
        let entries = parse(
            path,
            "# bad actors\n203.0.113.0/24\n\n198.51.100.7 # one host\n2001:db8::/32\n203.0.113.9/24\n",
        )
        .unwrap();
        let nets: Vec<String> = entries.iter().map(|e| e.net.to_string()).collect();
        assert_eq!(
            nets,
            ["203.0.113.0/24", "198.51.100.7/32", "2001:db8::/32"],
            "host bits cleared, duplicates once"
        );
        assert_eq!(
            entries.iter().map(|e| e.line).collect::<Vec<_>>(),
            [2, 4, 5]
        );
        let err = parse(path, "10.0.0.0/8\n10.0.0.0/33\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/weir/prefilter line 2") && err.contains("10.0.0.0/33"),
            "{err}"
        );
    }
}
