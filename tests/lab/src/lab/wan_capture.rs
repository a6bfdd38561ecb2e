//! A packet capture on a lab namespace's links (the mesh lab's WAN), from Rust: an AF_PACKET
//! socket opened inside the namespace sees every frame arriving on any of its interfaces (each
//! routed packet once, on the link it came in by). Nothing to install, no tcpdump.
//!
//! [`Capture::analyse`] answers what the mesh lab must show: that the WAN carries only TCP to or
//! from the mesh port, that each such stream is a sequence of well-formed TLS records (starting
//! with a handshake), and that a known payload marker sent pod to pod never appears in clear, in
//! any frame or across the segments of a stream.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use anyhow::{Context as _, bail};

use crate::netns;

/// At most this much is kept (a demo or test carries far less; a bench should not capture).
const MAX_CAPTURED_BYTES: usize = 256 << 20;
/// The largest TLS record: 2^14 bytes of plaintext plus 256 of expansion (RFC 8446 §5.2).
const MAX_TLS_RECORD: usize = (1 << 14) + 256;

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const PACKET_OUTGOING: u8 = 4;

/// A running capture; [`WanCapture::stop`] ends it and returns the frames.
pub struct WanCapture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Captured>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

#[derive(Default)]
struct Captured {
    frames: Vec<Vec<u8>>,
    bytes: usize,
    /// Frames not kept (over the limit) or cut short (larger than the read buffer).
    lost: usize,
}

/// What a capture saw: every frame arriving on the namespace's interfaces, Ethernet headers
/// included, in arrival order.
pub struct Capture {
    pub frames: Vec<Vec<u8>>,
    pub lost: usize,
}

impl WanCapture {
    /// Opens the socket inside `netns` and starts reading; returns once frames are captured.
    pub fn start(netns: &str) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Captured::default()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let name = netns.to_string();
        let (stop2, frames2) = (Arc::clone(&stop), Arc::clone(&frames));
        let thread = std::thread::Builder::new()
            .name(format!("capture {netns}"))
            .spawn(move || -> anyhow::Result<()> {
                let socket = netns::enter(&name).and_then(|()| open_socket());
                let socket = match socket {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return Ok(());
                    }
                };
                read_frames(&socket, &stop2, &frames2)
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("capturing in {netns}: {e}"),
            Err(_) => bail!("the capture thread of {netns} ended before it started"),
        }
        Ok(WanCapture {
            stop,
            frames,
            thread: Some(thread),
        })
    }

    /// How many frames so far.
    pub fn len(&self) -> usize {
        self.frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .frames
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops reading and returns what was captured.
    pub fn stop(mut self) -> anyhow::Result<Capture> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the capture thread panicked"))??;
        }
        let captured = std::mem::take(&mut *self.frames.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(Capture {
            frames: captured.frames,
            lost: captured.lost,
        })
    }
}

impl Drop for WanCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn open_socket() -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket calls; the descriptor is owned by the OwnedFd from here on.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        let fd = OwnedFd::from_raw_fd(fd);
        // A large buffer, so bursts are not dropped while the reader sleeps (root may force it).
        let size: libc::c_int = 32 << 20;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as u32,
        );
        // Wake up regularly to see the stop flag.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        if libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO");
        }
        Ok(fd)
    }
}

fn read_frames(
    socket: &OwnedFd,
    stop: &AtomicBool,
    frames: &Mutex<Captured>,
) -> anyhow::Result<()> {
    // GRO can hand a packet socket frames of up to 64 KiB (more with BIG TCP).
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: recvfrom writes at most buf.len() bytes into buf and at most `len` bytes of
        // address into `from`, both owned here.
        let (n, from) = unsafe {
            let mut from: libc::sockaddr_ll = std::mem::zeroed();
            let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            let n = libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
                (&raw mut from).cast(),
                &mut len,
            );
            (n, from)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e).context("reading the capture socket"),
            }
        }
        // Each forwarded packet leaves by another link: keep the arrival only.
        if from.sll_pkttype == PACKET_OUTGOING {
            continue;
        }
        let n = n as usize;
        let mut captured = frames.lock().unwrap_or_else(|p| p.into_inner());
        if n > buf.len() || captured.bytes + n > MAX_CAPTURED_BYTES {
            captured.lost += 1;
            continue;
        }
        captured.bytes += n;
        captured.frames.push(buf[..n].to_vec());
    }
    Ok(())
}

/// A TCP segment as the analysis needs it.
struct Segment<'a> {
    from: SocketAddrV4,
    to: SocketAddrV4,
    seq: u32,
    syn: bool,
    payload: &'a [u8],
}

/// Parses an Ethernet frame holding IPv4 TCP; `Err` describes any other frame.
fn tcp_segment(frame: &[u8]) -> Result<Option<Segment<'_>>, String> {
    if frame.len() < 14 {
        return Err(format!("a runt frame of {} bytes", frame.len()));
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_ARP => return Ok(None),
        ETH_P_IP => {}
        other => return Err(format!("a frame of ethertype {other:#06x}")),
    }
    let ip = &frame[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Err("a malformed IPv4 packet".into());
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    // A GRO'd packet's length field may be 0 (BIG TCP); take the frame's then.
    let end = if total == 0 {
        ip.len()
    } else {
        total.min(ip.len())
    };
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    if ip[9] != 6 {
        return Err(format!("IPv4 protocol {} from {src} to {dst}", ip[9]));
    }
    let tcp = &ip[ihl.min(end)..end];
    if tcp.len() < 20 {
        return Err(format!("a truncated TCP segment from {src} to {dst}"));
    }
    let offset = usize::from(tcp[12] >> 4) * 4;
    Ok(Some(Segment {
        from: SocketAddrV4::new(src, u16::from_be_bytes([tcp[0], tcp[1]])),
        to: SocketAddrV4::new(dst, u16::from_be_bytes([tcp[2], tcp[3]])),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        syn: tcp[13] & 0x02 != 0,
        payload: &tcp[offset.min(tcp.len())..],
    }))
}

/// One direction of one TCP connection seen on the WAN.
#[derive(Clone, Debug, Default)]
pub struct StreamReport {
    pub from: Option<SocketAddrV4>,
    pub to: Option<SocketAddrV4>,
    /// Payload bytes in sequence from the SYN on (0 when the SYN was not captured).
    pub bytes: usize,
    pub saw_syn: bool,
    /// TLS records by content type (20 change_cipher_spec, 21 alert, 22 handshake, 23
    /// application_data).
    pub records: BTreeMap<u8, usize>,
    /// What is not TLS about this stream, if anything.
    pub not_tls: Option<String>,
    /// The capture missed a segment: records are checked up to the gap.
    pub gap: bool,
    pub marker_found: bool,
}

/// What [`Capture::analyse`] found.
#[derive(Clone, Debug, Default)]
pub struct WanReport {
    pub frames: usize,
    pub lost: usize,
    pub tcp_frames: usize,
    /// Frames that are neither ARP nor TCP to or from the mesh port, described.
    pub foreign: Vec<String>,
    pub streams: Vec<StreamReport>,
    /// Frames holding the marker as it was sent.
    pub marker_frames: usize,
}

impl Capture {
    /// How many frames hold `needle` anywhere.
    pub fn frames_containing(&self, needle: &[u8]) -> usize {
        self.frames.iter().filter(|f| contains(f, needle)).count()
    }

    pub fn analyse(&self, mesh_port: u16, marker: &[u8]) -> WanReport {
        let mut report = WanReport {
            frames: self.frames.len(),
            lost: self.lost,
            marker_frames: self.frames_containing(marker),
            ..WanReport::default()
        };
        let mut streams: BTreeMap<(SocketAddrV4, SocketAddrV4), Vec<Segment<'_>>> = BTreeMap::new();
        for frame in &self.frames {
            match tcp_segment(frame) {
                Ok(None) => {}
                Ok(Some(s)) if s.from.port() == mesh_port || s.to.port() == mesh_port => {
                    report.tcp_frames += 1;
                    streams.entry((s.from, s.to)).or_default().push(s);
                }
                Ok(Some(s)) => report
                    .foreign
                    .push(format!("TCP from {} to {}", s.from, s.to)),
                Err(what) => report.foreign.push(what),
            }
        }
        for ((from, to), segments) in streams {
            report
                .streams
                .push(check_stream(from, to, segments, marker));
        }
        report
    }
}

/// Puts one direction's payload back in order from its SYN and reads it as TLS records.
fn check_stream(
    from: SocketAddrV4,
    to: SocketAddrV4,
    mut segments: Vec<Segment<'_>>,
    marker: &[u8],
) -> StreamReport {
    let mut out = StreamReport {
        from: Some(from),
        to: Some(to),
        ..StreamReport::default()
    };
    let Some(syn) = segments.iter().find(|s| s.syn) else {
        // Started before the capture: record boundaries are unknown. Frames were still
        // searched for the marker.
        return out;
    };
    out.saw_syn = true;
    let base = syn.seq.wrapping_add(1);
    segments.retain(|s| !s.payload.is_empty());
    segments.sort_by_key(|s| s.seq.wrapping_sub(base));
    let mut stream: Vec<u8> = Vec::new();
    for s in &segments {
        let offset = s.seq.wrapping_sub(base) as usize;
        if offset > stream.len() {
            out.gap = true;
            break;
        }
        let end = offset + s.payload.len();
        if end > stream.len() {
            stream.extend_from_slice(&s.payload[stream.len() - offset..]);
        }
    }
    out.bytes = stream.len();
    out.marker_found = contains(&stream, marker);
    let mut at = 0;
    while at + 5 <= stream.len() {
        let (kind, major, minor) = (stream[at], stream[at + 1], stream[at + 2]);
        let len = usize::from(u16::from_be_bytes([stream[at + 3], stream[at + 4]]));
        let problem = if !(20..=23).contains(&kind) {
            Some(format!("content type {kind}"))
        } else if major != 3 || !(1..=3).contains(&minor) {
            Some(format!("record version {major}.{minor}"))
        } else if len > MAX_TLS_RECORD {
            Some(format!("a record of {len} bytes"))
        } else if at == 0 && kind != 22 {
            Some(format!("a first record of type {kind}, not a handshake"))
        } else {
            None
        };
        if let Some(p) = problem {
            out.not_tls = Some(format!("{p} at stream offset {at}"));
            break;
        }
        *out.records.entry(kind).or_default() += 1;
        at += 5 + len;
    }
    out
}

impl WanReport {
    /// Everything that contradicts "the WAN carries only TLS and no pod payload in clear".
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.marker_frames > 0 {
            out.push(format!(
                "{} frame(s) carry the pod payload marker in clear",
                self.marker_frames
            ));
        }
        for f in &self.foreign {
            out.push(format!("not mesh TLS: {f}"));
        }
        for s in &self.streams {
            let name = format!(
                "{} -> {}",
                s.from.map(|a| a.to_string()).unwrap_or_default(),
                s.to.map(|a| a.to_string()).unwrap_or_default()
            );
            if let Some(why) = &s.not_tls {
                out.push(format!("stream {name} is not TLS: {why}"));
            }
            if s.marker_found {
                out.push(format!("stream {name} carries the marker in clear"));
            }
        }
        if self.lost > 0 {
            out.push(format!("{} frame(s) were not captured whole", self.lost));
        }
        // A capture that saw no complete TLS exchange proves nothing.
        if !self
            .streams
            .iter()
            .any(|s| s.saw_syn && s.records.get(&23).copied().unwrap_or(0) > 0)
        {
            out.push("no TLS stream with application data was captured from its start".into());
        }
        out
    }

    /// A few lines for people.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} frames on the WAN, {} of them TCP to or from the mesh port, {} other\n",
            self.frames,
            self.tcp_frames,
            self.foreign.len()
        );
        for s in &self.streams {
            let records: Vec<String> = s
                .records
                .iter()
                .map(|(k, n)| {
                    let name = match k {
                        20 => "change_cipher_spec",
                        21 => "alert",
                        22 => "handshake",
                        _ => "application_data",
                    };
                    format!("{n} {name}")
                })
                .collect();
            let _ = writeln!(
                out,
                "  {} -> {}: {}",
                s.from.map(|a| a.to_string()).unwrap_or_default(),
                s.to.map(|a| a.to_string()).unwrap_or_default(),
                if !s.saw_syn {
                    "began before the capture (searched for the marker only)".to_string()
                } else {
                    format!(
                        "{} bytes from the SYN, TLS records: {}{}",
                        s.bytes,
                        if records.is_empty() {
                            "none".to_string()
                        } else {
                            records.join(", ")
                        },
                        if s.gap { " (capture gap)" } else { "" }
                    )
                }
            );
        }
        out
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame.
    fn frame(sport: u16, dport: u16, seq: u32, syn: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let total = (20 + 20 + payload.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0, 64, 6, 0, 0, 192, 0, 2, 1, 192, 0, 2, 5]);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&[
            0,
            0,
            0,
            0,
            0x50,
            if syn { 0x02 } else { 0x10 },
            0,
            0,
            0,
            0,
            0,
            0,
        ]);
        f.extend_from_slice(payload);
        f
    }

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn tls_records_split_across_segments_are_read_in_order() {
        let mut stream = record(22, b"hello");
        stream.extend(record(23, &[0xaa; 40]));
        let (a, b) = stream.split_at(9);
        // Out of order and with a retransmission: still one clean stream.
        let capture = Capture {
            frames: vec![
                frame(40000, 4243, 99, true, &[]),
                frame(40000, 4243, 100 + 9, false, b),
                frame(40000, 4243, 100, false, a),
                frame(40000, 4243, 100, false, a),
            ],
            lost: 0,
        };
        let report = capture.analyse(4243, b"MARKER");
        assert_eq!(report.streams.len(), 1);
        let s = &report.streams[0];
        assert!(s.saw_syn && !s.gap, "{s:?}");
        assert_eq!(s.records.get(&22), Some(&1));
        assert_eq!(s.records.get(&23), Some(&1));
        assert!(report.problems().is_empty(), "{:?}", report.problems());
    }

    #[test]
    fn clear_payload_and_other_traffic_are_problems() {
        let mut payload = b"GET / HTTP/1.1\r\nX: MAR".to_vec();
        let rest = b"KER\r\n";
        let capture = Capture {
            frames: vec![
                frame(40000, 4243, 0, true, &[]),
                frame(40000, 4243, 1, false, &payload),
                frame(40000, 4243, 1 + payload.len() as u32, false, rest),
                frame(5000, 80, 7, false, b"MARKER"),
            ],
            lost: 0,
        };
        payload.extend_from_slice(rest);
        let report = capture.analyse(4243, b"MARKER");
        let problems = report.problems().join("\n");
        assert_eq!(report.marker_frames, 1, "the marker in one frame");
        assert!(problems.contains("not TLS: content type 71"), "{problems}");
        assert!(
            problems.contains("carries the marker in clear"),
            "split across two segments: {problems}"
        );
        assert!(problems.contains("TCP from 192.0.2.1:5000"), "{problems}");
    }

    #[test]
    fn a_capture_without_tls_application_data_proves_nothing() {
        let capture = Capture {
            frames: Vec::new(),
            lost: 0,
        };
        assert!(!capture.analyse(4243, b"MARKER").problems().is_empty());
    }
}
