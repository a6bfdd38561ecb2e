//! gRPC over our mutual TLS: the listener (no plaintext one exists) hands tonic connections
//! whose peer cluster was taken from the certificate during the handshake, and the client dials
//! a peer's gateway through the same TLS configuration.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, server::Connected};

use crate::tls;

/// The authenticated peer of a connection, in every request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCluster {
    pub name: String,
    pub remote: SocketAddr,
}

/// A TLS connection whose peer is authenticated.
pub struct MeshConn {
    stream: TlsStream<TcpStream>,
    peer: PeerCluster,
}

impl Connected for MeshConn {
    type ConnectInfo = PeerCluster;

    fn connect_info(&self) -> PeerCluster {
        self.peer.clone()
    }
}

impl AsyncRead for MeshConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A handshake that does not finish in this time is dropped (a slow or silent client must not
/// hold a task forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and completes the TLS handshake of each in its own task; yields only
/// authenticated connections. Refused handshakes are logged with the reason and counted.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<MeshConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "mesh listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            bound_unsent(&tcp);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, error = %tls::handshake_error(&e), "mesh handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%remote, "mesh handshake timed out");
                        return;
                    }
                };
                let name = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(tls::cluster_of);
                let Some(Ok(name)) = name else {
                    // The verifier already required this; never serve an unnamed peer.
                    tracing::warn!(%remote, "mesh connection without a cluster name; closed");
                    return;
                };
                let _ = tx
                    .send(Ok(MeshConn {
                        stream,
                        peer: PeerCluster { name, remote },
                    }))
                    .await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// HTTP/2 flow-control windows of a lane: room for a full batch queue in flight on a WAN round
/// trip of tens of milliseconds at a few Gbit/s, so the window never throttles a lane that its
/// receiver keeps up with (hyper's defaults are 1–2 MiB per stream).
pub const STREAM_WINDOW: u32 = 8 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Unsent bytes a lane's socket holds before it stops taking more (TCP_NOTSENT_LOWAT): beyond
/// this, batches wait in the lane's bounded queue, which drops when full, instead of in a socket
/// buffer that autotuning grows to megabytes and that delays every packet behind it.
pub const UNSENT_LIMIT: u32 = 256 << 10;

/// The largest HTTP/2 frame a lane accepts (SETTINGS_MAX_FRAME_SIZE), for connections made
/// from now on; [`set_max_frame_size`] changes it.
static MAX_FRAME_SIZE: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(DEFAULT_MAX_FRAME_SIZE);
/// 1 MiB, where HTTP/2's own default is 16 KiB: a 256 KiB batch crosses as one DATA frame
/// instead of 16, with fewer frame headers, flow-control updates and wake-ups per byte. Single-
/// stream throughput through the link rose with it in `cargo xtask bench mesh` (README, the
/// `mesh` bench), and request/response latency did not suffer: small packets cross in small
/// frames, and the latency lane is a connection of its own. A peer that advertises less still
/// gets frames no larger than it asked for (the setting bounds what each side receives).
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 1 << 20;

/// Sets the largest HTTP/2 frame this process's mesh connections accept (clamped to what
/// HTTP/2 allows), for servers built and channels dialled from now on. Larger frames carry a
/// batch in fewer frames: fewer frame headers, flow-control updates and wake-ups per byte.
pub fn set_max_frame_size(bytes: u32) {
    MAX_FRAME_SIZE.store(
        bytes.clamp(16 << 10, (1 << 24) - 1),
        std::sync::atomic::Ordering::Relaxed,
    );
}

fn max_frame_size() -> u32 {
    MAX_FRAME_SIZE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets [`UNSENT_LIMIT`] on a lane's socket (best effort: without it the link still works,
/// with more delay under load).
fn bound_unsent(tcp: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let value: libc::c_int = UNSENT_LIMIT as libc::c_int;
    // SAFETY: setsockopt reads an int we own for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "TCP_NOTSENT_LOWAT not set on a mesh connection");
    }
}

/// The gRPC server for [`incoming`] connections. HTTP/2 keepalive closes a connection whose
/// peer went silent (link down), so its streams, and the packets queued for them, move to the
/// peer's next session instead of waiting for TCP to give up.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(1)))
        .http2_keepalive_timeout(Some(Duration::from_secs(3)))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(max_frame_size())
}

/// A gRPC channel to a peer's gateway at `addr`, over TLS towards `config` (which checks that
/// the certificate names the peer). Connects lazily and reconnects on failure.
pub fn channel(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Channel {
    let connector = TlsConnector::from(config);
    // The scheme only shapes the URI; the connector below always speaks TLS.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI authority")
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(max_frame_size());
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            bound_unsent(&tcp);
            let tls = connector.connect(tls::sni(), tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    }))
}
