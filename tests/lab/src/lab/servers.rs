//! The servers every lab pod runs: on each port a TCP server that writes back a line naming the
//! pod, and a UDP server that answers every datagram with the pod's name.
//!
//! They run as `xtask lab serve --pod NS/NAME --tcp P --udp P ...`, started detached inside the
//! pod's namespace.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::{netns, process};

/// What `lab serve` is given (the command line [`spawn`] writes).
#[derive(Debug)]
pub struct ServeOptions {
    /// The lab this server belongs to (so `lab down` finds it).
    pub lab: String,
    /// The pod's name, written back on every connection and datagram.
    pub pod: String,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
}

/// Serves forever. All sockets are bound before the first is served, so a pod whose first TCP
/// port answers serves all of them.
pub fn serve(options: &ServeOptions) -> anyhow::Result<()> {
    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let mut tcp = Vec::new();
    for &port in &options.tcp {
        tcp.push(TcpListener::bind(any(port)).with_context(|| format!("binding TCP {port}"))?);
    }
    let mut udp = Vec::new();
    for &port in &options.udp {
        udp.push(UdpSocket::bind(any(port)).with_context(|| format!("binding UDP {port}"))?);
    }
    let mut threads = Vec::new();
    for listener in tcp {
        let line = format!("{}\n", options.pod);
        threads.push(std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let _ = stream.write_all(line.as_bytes());
            }
        }));
    }
    for socket in udp {
        let name = options.pod.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            loop {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(name.as_bytes(), peer);
                }
            }
        }));
    }
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// Starts the server for a pod, detached, inside its namespace; returns the pid once the first
/// port accepts connections.
pub fn spawn(
    server_exe: &Path,
    pod_netns: &str,
    lab: &str,
    pod: &str,
    ports: &[u16],
    log: &Path,
) -> anyhow::Result<u32> {
    let mut cmd = netns::command_in(pod_netns, server_exe);
    cmd.args(["lab", "serve", "--lab", lab, "--pod", pod]);
    for port in ports {
        cmd.arg("--tcp").arg(port.to_string());
        cmd.arg("--udp").arg(port.to_string());
    }
    let log_file = std::fs::File::create(log).with_context(|| format!("creating {log:?}"))?;
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    process::detach(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting the server of {pod}"))?;
    let pid = child.id();
    // The child is reaped by nobody if we exit first: that is fine, it is detached.
    std::mem::forget(child);
    if let Some(&port) = ports.first() {
        wait_listening(pod_netns, port, pid)?;
    }
    Ok(pid)
}

fn wait_listening(pod_netns: &str, port: u16, pid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = netns::run_in(pod_netns, move || {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                Duration::from_millis(200),
            )
            .is_ok()
        })?;
        if up {
            return Ok(());
        }
        if !process::alive(pid) || Instant::now() > deadline {
            bail!("the server in {pod_netns} did not start listening on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
