//! What the gRPC listener accepts. One accept loop takes TCP connections; a connection
//! from an address that already has `grpc.max_connections_per_address` open is closed at
//! once, before any byte is read, so one host cannot fill the coordinator's file
//! descriptors and memory with idle connections. Each accepted connection is a [`Conn`]
//! that gives its address's slot back when hyper drops it. With TLS the handshake
//! follows (`crate::tls::incoming`); without, the connections go to the server as they
//! are ([`plaintext`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Open connections per address.
#[derive(Debug, Default)]
struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// An address's slot, given back on drop.
#[derive(Debug)]
struct Slot {
    counts: Arc<PerAddress>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().expect("connection count lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// An accepted connection within its address's limit.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    _slot: Slot,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
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

/// Accepts connections on `listener` until `shutdown`, at most `max_per_address` open
/// at once from one IP address (0 = no limit); the accepted ones, in order.
pub fn accept(
    listener: TcpListener,
    max_per_address: usize,
    shutdown: CancellationToken,
) -> tokio::sync::mpsc::Receiver<Conn> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let counts = Arc::new(PerAddress::default());
    tokio::spawn(async move {
        // Refusals are logged at most every 10 s (a flood must not flood the log).
        let mut last_warned: Option<std::time::Instant> = None;
        let mut refused = 0u64;
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, typically: wait instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let ip = peer.ip();
            {
                let mut open = counts.open.lock().expect("connection count lock");
                let n = open.entry(ip).or_default();
                if max_per_address != 0 && *n >= max_per_address {
                    refused += 1;
                    if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(%peer, max_per_address, refused, "connection limit of an address reached (grpc.max_connections_per_address): connections closed");
                        last_warned = Some(std::time::Instant::now());
                    }
                    continue;
                }
                *n += 1;
            }
            let _ = stream.set_nodelay(true);
            let conn = Conn {
                stream,
                _slot: Slot {
                    counts: counts.clone(),
                    ip,
                },
            };
            if tx.send(conn).await.is_err() {
                break;
            }
        }
    });
    rx
}

/// The accepted connections as the server's plaintext incoming stream.
pub fn plaintext(
    accepted: tokio::sync::mpsc::Receiver<Conn>,
) -> impl futures::Stream<Item = Result<Conn, std::io::Error>> {
    use futures::StreamExt as _;
    tokio_stream::wrappers::ReceiverStream::new(accepted).map(Ok)
}
