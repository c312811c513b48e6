//! The admin API's TCP listener, with a cap on open connections.
//!
//! Every connection holds a descriptor, and the appliance's descriptors are
//! also its tunnels' sockets and its forwards' listeners: clients that open
//! connections and never finish a request (the API's port reachable beyond the
//! backend, say) must not be able to take them all. Past [`MAX_CONNECTIONS`]
//! the listener stops accepting until one closes; the kernel's backlog holds
//! the next ones meanwhile. What this leaves out: per-client fairness (one
//! client can still take every slot, which then costs the API, not the tunnels).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Open API connections at most: far above what the backend, a Prometheus
/// and a few event streams need, far below the descriptor limit
/// (`io::limits` raises it to the hard limit at start).
pub const MAX_CONNECTIONS: usize = 512;

/// A listener that holds at most `limit` connections open at once.
pub struct Capped {
    listener: TcpListener,
    slots: Arc<Semaphore>,
}

impl Capped {
    pub fn new(listener: TcpListener, limit: usize) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(limit)),
        }
    }
}

/// A connection with its slot: the slot is free again when it is dropped.
pub struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl axum::serve::Listener for Capped {
    type Io = Counted;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Never closed: a slot always comes once a connection ends.
        let slot = loop {
            if let Ok(slot) = Arc::clone(&self.slots).acquire_owned().await {
                break slot;
            }
        };
        let (stream, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        (
            Counted {
                stream,
                _slot: slot,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;

    /// With every slot taken the next connection waits in the backlog, and is
    /// accepted as soon as one closes.
    #[tokio::test]
    async fn past_the_cap_the_next_connection_waits_for_a_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut capped = Capped::new(listener, 2);
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let _c3 = TcpStream::connect(addr).await.unwrap();
        let (first, _) = capped.accept().await;
        let (_second, _) = capped.accept().await;
        let third = tokio::time::timeout(std::time::Duration::from_millis(200), capped.accept());
        assert!(third.await.is_err(), "a third was accepted past the cap");
        drop(first);
        let third = tokio::time::timeout(std::time::Duration::from_secs(5), capped.accept());
        assert!(third.await.is_ok(), "a freed slot takes the next");
    }
}
