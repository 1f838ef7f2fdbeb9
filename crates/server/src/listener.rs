//! The HTTP API's listener: a cap on open connections and an inactivity
//! timeout, so a client that opens sockets and sends nothing (or a header a
//! byte at a time, or never reads its response) cannot hold the API.
//!
//! - At most `server.max_connections` connections are served at once. One
//!   more is answered `503` with a problem body that names the limit, then
//!   closed.
//! - A connection is closed when the server has sent nothing on it for
//!   `server.idle_timeout`: a whole request must arrive, and its answer
//!   start, within that time of the connection opening or of the last
//!   answer. Bytes from the client do not extend it, so trickling a header
//!   a byte at a time does not help; this also covers slow bodies, idle
//!   keep-alive connections and clients that stop reading. No API call
//!   runs anywhere near that long (there is no long polling;
//!   `request --wait` polls).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::dto::Problem;
use crate::metrics::Metrics;

/// How long the `503` for a connection over the cap may take to send.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// A [`TcpListener`] that enforces the connection cap and hands out
/// [`LimitedIo`] streams.
pub struct LimitedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    max: usize,
    idle: Duration,
    metrics: Arc<Metrics>,
}

impl LimitedListener {
    pub fn new(
        inner: TcpListener,
        max_connections: usize,
        idle: Duration,
        metrics: Arc<Metrics>,
    ) -> LimitedListener {
        LimitedListener {
            inner,
            permits: Arc::new(Semaphore::new(max_connections)),
            max: max_connections,
            idle,
            metrics,
        }
    }
}

/// The 503 for a connection over the cap: the same problem document the
/// API's handlers send.
fn refusal(max: usize) -> Vec<u8> {
    let code = "too_many_connections";
    let body = serde_json::to_string(&Problem {
        type_: format!("urn:breakglass:problem:{code}"),
        title: "Service Unavailable".into(),
        status: 503,
        detail: format!(
            "the API already serves {max} connections (server.max_connections); retry shortly"
        ),
        code: code.into(),
    })
    .unwrap_or_default();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (LimitedIo, SocketAddr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than
                    // spin; the connections already open go on.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => return (LimitedIo::new(stream, permit, self.idle), addr),
                Err(_) => {
                    self.metrics
                        .refused_connections
                        .fetch_add(1, Ordering::Relaxed);
                    let msg = refusal(self.max);
                    tokio::spawn(async move {
                        let mut stream = stream;
                        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
                            stream.write_all(&msg).await?;
                            stream.shutdown().await
                        })
                        .await;
                    });
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A served connection: holds its slot under the cap and fails with
/// `TimedOut` once nothing has moved for the idle timeout.
pub struct LimitedIo {
    io: TcpStream,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl LimitedIo {
    fn new(io: TcpStream, permit: OwnedSemaphorePermit, idle: Duration) -> LimitedIo {
        LimitedIo {
            io,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            _permit: permit,
        }
    }

    fn active(&mut self) {
        let idle = self.idle;
        self.timer.as_mut().reset(Instant::now() + idle);
    }

    /// After a write: bytes sent count as activity; a write that would
    /// wait is subject to the idle timeout.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.active();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.pending(cx),
        }
    }

    /// When an operation would wait: an error once the connection has been
    /// idle too long, otherwise wait (the timer wakes the task).
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "API connection got no answer for longer than server.idle_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            // Reading never extends the deadline (see the module doc).
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => this.pending(cx),
        }
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, data);
        this.wrote(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => this.pending(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
