//! The admin API's HTTP server: hyper under the axum router, with a cap on
//! open connections and a timer.
//!
//! Every connection holds a descriptor, and the appliance's descriptors are
//! also its tunnels' sockets and its forwards' listeners: clients that open
//! connections and never finish a request (the API's port reachable beyond the
//! backend, say) must not be able to take them all. Past [`MAX_CONNECTIONS`]
//! the listener stops accepting until one closes; the kernel's backlog holds
//! the next ones meanwhile. A connection has [`HEADER_TIMEOUT`] to send each
//! request's header, also while it idles between requests (axum's own `serve`
//! runs hyper without a timer, so neither a trickled header nor an idle
//! keep-alive connection ever ended), and an answer that makes no progress
//! for [`WRITE_TIMEOUT`] (a client that asked and stopped reading) ends its
//! connection: the answer, a scrape of 54 MB at 100,000 peers (13 MB
//! gzip-compressed), is not kept for it. What this leaves out: per-client
//! fairness (a client that sends a request every few seconds on every
//! connection can still hold them all: the API is for the backend alone).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutStream;

/// How long a connection may take to send a request's header, counted from
/// when the server waits for it (after the previous answer, on a kept-alive
/// connection).
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long an answer may wait for the client to take any of it (an event
/// stream's too: a subscriber that stops reading is let go).
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `app` on `listener` until `stop` completes, then waits for the open
/// connections to finish (event streams end when the appliance stops).
pub async fn serve(
    listener: Capped,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()>,
) {
    serve_with(listener, app, stop, HEADER_TIMEOUT).await;
}

async fn serve_with(
    mut listener: Capped,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()>,
    header_timeout: std::time::Duration,
) {
    use axum::serve::Listener as _;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (io, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(io), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "API connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Open API connections at most: far above what the backend, a Prometheus
/// and a few event streams need, far below the descriptor limit
/// (`io::limits` raises it to the hard limit at start).
pub const MAX_CONNECTIONS: usize = 512;

/// A listener that holds at most `limit` connections open at once.
pub struct Capped {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    write_timeout: std::time::Duration,
}

impl Capped {
    pub fn new(listener: TcpListener, limit: usize) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(limit)),
            write_timeout: WRITE_TIMEOUT,
        }
    }

    #[cfg(test)]
    fn with_write_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.write_timeout = timeout;
        self
    }
}

/// A connection with its slot: the slot is free again when it is dropped.
/// Its writes fail once one waited [`WRITE_TIMEOUT`] for the client.
pub struct Counted {
    stream: Pin<Box<TimeoutStream<TcpStream>>>,
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
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(Some(self.write_timeout));
        (
            Counted {
                stream: Box::pin(stream),
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
        self.stream.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.as_mut().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;

    /// A connection that sends half a header, or idles after its answer, is
    /// closed once its time to send a header is up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_or_idle_connections_are_closed() {
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let limit = Duration::from_millis(300);
        let server = tokio::spawn(serve_with(
            Capped::new(listener, 4),
            app,
            async {
                let _ = stopped.await;
            },
            limit,
        ));
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 512];
        let n = idle.read(&mut answer).await.unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
        // Closed once the limit is up: well before these 10 s (a guard).
        for (what, stream) in [("half a header", &mut half), ("idle", &mut idle)] {
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest));
            assert!(read.await.is_ok(), "the {what} connection is still open");
        }
        let _ = stop.send(());
        server.await.unwrap();
    }

    /// A client that asks for a large answer and stops reading loses its
    /// connection once the answer has waited the write timeout: its slot
    /// (the only one here) takes the next client.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_is_let_go() {
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route(
                "/big",
                axum::routing::get(|| async { vec![b'x'; 64 << 20] }),
            );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let capped = Capped::new(listener, 1).with_write_timeout(Duration::from_millis(300));
        let server = tokio::spawn(serve_with(
            capped,
            app,
            async {
                let _ = stopped.await;
            },
            HEADER_TIMEOUT,
        ));
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Never read. The next client waits for the slot, then is answered
        // (well before these 10 s: a guard).
        let mut next = TcpStream::connect(addr).await.unwrap();
        next.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), next.read_to_end(&mut answer));
        assert!(
            read.await.is_ok(),
            "the stalled client still holds the slot"
        );
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        drop(stalled);
        let _ = stop.send(());
        server.await.unwrap();
    }

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
