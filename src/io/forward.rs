//! Management forwarding: a TCP listener on the host whose connections are carried
//! through a tunnel's userspace stack to one router's address and port, so the
//! backend reaches `10.100.1.1:8728` with no kernel route and no privileges.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::bridge::{HostPipes, PIPE_DEPTH};
use super::tunnel::Command;

/// Bytes read from the host per chunk.
const READ_CHUNK: usize = 32 * 1024;

/// A running forward; stops (and closes its port) when dropped, at once with
/// [`Forward::close`].
pub struct Forward {
    task: Option<JoinHandle<()>>,
    /// The bound listen address.
    pub listen: SocketAddr,
    /// Where connections go.
    pub target: SocketAddrV4,
}

impl Forward {
    /// Stops the forward and returns once its listening port is closed
    /// (dropping only asks the task to stop).
    pub async fn close(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Cancelled: the task, and the listener it owned, are gone.
            let _ = task.await;
        }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Binds `listen` and forwards every connection to `target` through the tunnel
/// whose task takes `commands` and wakes on `work`.
pub async fn start(
    listen: SocketAddr,
    target: SocketAddrV4,
    commands: mpsc::Sender<Command>,
    work: Arc<Notify>,
) -> std::io::Result<Forward> {
    let listener = TcpListener::bind(listen).await?;
    let listen = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%listen, error = %e, "forward accept failed");
                    continue;
                }
            };
            let (commands, work) = (commands.clone(), Arc::clone(&work));
            tokio::spawn(async move {
                if let Err(e) = serve(stream, target, commands, work).await {
                    tracing::warn!(%listen, %from, %target, error = %e, "forwarded connection failed");
                }
            });
        }
    });
    tracing::info!(%listen, %target, "forward up");
    Ok(Forward {
        task: Some(task),
        listen,
        target,
    })
}

async fn serve(
    stream: TcpStream,
    target: SocketAddrV4,
    commands: mpsc::Sender<Command>,
    work: Arc<Notify>,
) -> Result<(), super::bridge::ForwardError> {
    let _ = stream.set_nodelay(true);
    let (to_stack, from_host) = mpsc::channel::<Vec<u8>>(PIPE_DEPTH);
    let (to_host, mut from_stack) = mpsc::channel::<Vec<u8>>(PIPE_DEPTH);
    let (opened_tx, opened) = oneshot::channel();
    let pipes = HostPipes {
        from_host,
        to_host,
        opened: opened_tx,
    };
    let gone = super::bridge::ForwardError::NoStack;
    commands
        .send(Command::OpenTcp {
            remote: target,
            pipes,
        })
        .await
        .map_err(|_| gone.clone())?;
    match opened.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            // Tell the client plainly: reset rather than an empty, clean close.
            let _ = stream.set_zero_linger();
            return Err(e);
        }
        Err(_) => return Err(gone),
    }
    let (mut rd, mut wr) = stream.into_split();
    let reader_work = Arc::clone(&work);
    let reader = async move {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_stack.send(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                    reader_work.notify_one();
                }
            }
        }
        // Dropping the sender tells the tunnel task: host EOF, send FIN.
        drop(to_stack);
        reader_work.notify_one();
    };
    let writer = async move {
        while let Some(chunk) = from_stack.recv().await {
            work.notify_one();
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
        work.notify_one();
    };
    tokio::join!(reader, writer);
    Ok(())
}
