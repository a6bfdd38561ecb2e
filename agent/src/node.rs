//! The node the agent serves is the network namespace it runs in. This prepares it: forwarding on
//! (pods are routed, not bridged) and bpffs mounted where the pins go (under `ip netns exec` or a
//! fresh machine, /sys/fs/bpf is not mounted).

use std::path::{Path, PathBuf};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "setting sysctl {path} to {value}: {source}; the agent must run as root in the node's network namespace"
    )]
    Sysctl {
        path: &'static str,
        value: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "mounting bpffs at {path}: {source}; mount it yourself (`mount -t bpf bpf {path}`) or choose another --bpffs-dir"
    )]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Sysctls a routed-veth node needs.
const SYSCTLS: [(&str, &str); 2] = [
    ("/proc/sys/net/ipv4/ip_forward", "1"),
    ("/proc/sys/net/ipv6/conf/all/forwarding", "1"),
];

/// Turns forwarding on and makes sure `bpffs_dir` is on a bpf filesystem.
pub fn prepare(bpffs_dir: &Path) -> Result<(), NodeError> {
    for (path, value) in SYSCTLS {
        std::fs::write(path, value).map_err(|source| NodeError::Sysctl {
            path,
            value,
            source,
        })?;
    }
    ensure_bpffs(bpffs_dir)
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts bpffs at the conventional /sys/fs/bpf when `dir` lives under it, else at `dir` itself.
fn ensure_bpffs(dir: &Path) -> Result<(), NodeError> {
    let mount_point = if dir.starts_with("/sys/fs/bpf") {
        Path::new("/sys/fs/bpf")
    } else {
        dir
    };
    if !is_bpffs(mount_point) {
        std::fs::create_dir_all(mount_point).map_err(|source| NodeError::CreateDir {
            path: mount_point.to_owned(),
            source,
        })?;
        tracing::info!(path = %mount_point.display(), "mounting bpffs");
        mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| NodeError::MountBpffs {
            path: mount_point.to_owned(),
            source,
        })?;
    }
    std::fs::create_dir_all(dir).map_err(|source| NodeError::CreateDir {
        path: dir.to_owned(),
        source,
    })
}
