//! The HTTP API's listener: connection slots, deadlines and TLS, so a
//! client that opens sockets and sends nothing (or a header a byte at a
//! time, or never reads its response) cannot hold the API, and a flood of
//! such clients cannot lock a real user out.
//!
//! - Slots are [`Slots`] (shared with the PostgreSQL gateway): at most
//!   `server.max_connections` at once and `server.max_connections_per_source`
//!   from one address. A connection is *unauthenticated* until one of its
//!   requests carries a valid token (the `Auth` extractor marks it);
//!   unauthenticated connections never hold the `server.reserved_connections`
//!   reserve, and when no slot is free the one that has waited longest is
//!   closed to make room. A connection over a cap is answered `503` with a
//!   problem body that names the limit, then closed.
//! - An unauthenticated connection is closed `server.unauthenticated_timeout`
//!   after it opened (the TLS handshake included).
//! - A connection is closed when the server has sent nothing on it for
//!   `server.idle_timeout`: a whole request must arrive, and its answer
//!   start, within that time of the connection opening or of the last
//!   answer. Bytes from the client do not extend it, so trickling a header
//!   a byte at a time does not help; this also covers slow bodies, idle
//!   keep-alive connections and clients that stop reading. No API call
//!   runs anywhere near that long (there is no long polling;
//!   `request --wait` polls).
//! - With `server.tls_cert` and `server.tls_key` every connection is TLS;
//!   the handshake runs in the connection's task, not in the accept loop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use breakglass_core::slots::{Slot, SlotRefusal, Slots};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

use crate::dto::Problem;
use crate::metrics::Metrics;

/// How long the `503` for a connection over the cap may take to send.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The deadlines of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub idle: Duration,
    pub unauthenticated: Duration,
}

/// A [`TcpListener`] that gives every connection a slot and hands out
/// [`LimitedIo`] streams.
pub struct LimitedListener {
    inner: TcpListener,
    slots: Arc<Slots>,
    deadlines: Deadlines,
    tls: Option<TlsAcceptor>,
    metrics: Arc<Metrics>,
}

impl LimitedListener {
    pub fn new(
        inner: TcpListener,
        slots: Arc<Slots>,
        deadlines: Deadlines,
        tls: Option<TlsAcceptor>,
        metrics: Arc<Metrics>,
    ) -> LimitedListener {
        LimitedListener {
            inner,
            slots,
            deadlines,
            tls,
            metrics,
        }
    }
}

/// The 503 for a connection over a cap: the same problem document the
/// API's handlers send.
fn refusal(why: SlotRefusal) -> Vec<u8> {
    let code = "too_many_connections";
    let detail = match why {
        SlotRefusal::Full { max } => format!(
            "the API already serves {max} signed-in connections (server.max_connections); retry shortly"
        ),
        SlotRefusal::Source { max } => format!(
            "{max} connections from your address are open already (server.max_connections_per_source); close some and retry"
        ),
    };
    let body = serde_json::to_string(&Problem {
        type_: format!("urn:breakglass:problem:{code}"),
        title: "Service Unavailable".into(),
        status: 503,
        detail,
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
            match self.slots.open(addr.ip()) {
                Ok(slot) => {
                    let io = match &self.tls {
                        Some(acceptor) => Stream::Handshake(Box::new(acceptor.accept(stream))),
                        None => Stream::Plain(stream),
                    };
                    return (LimitedIo::new(io, slot, self.deadlines), addr);
                }
                Err(why) => {
                    self.metrics
                        .refused_connections
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(client = %addr, reason = %why, "API connection refused");
                    // A TLS client could not read a plaintext answer, and a
                    // handshake is what the cap saves: just close.
                    if self.tls.is_some() {
                        continue;
                    }
                    let msg = refusal(why);
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

/// What a request sees of its connection (axum's `ConnectInfo`): the slot,
/// so that a valid token can mark the connection as signed in.
#[derive(Clone, Debug)]
pub struct ApiConn {
    pub slot: Slot,
}

impl Connected<IncomingStream<'_, LimitedListener>> for ApiConn {
    fn connect_info(stream: IncomingStream<'_, LimitedListener>) -> Self {
        ApiConn {
            slot: stream.io().slot.clone(),
        }
    }
}

enum Stream {
    Plain(TcpStream),
    Handshake(Box<tokio_rustls::Accept<TcpStream>>),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// The handshake failed.
    Failed,
}

/// A served connection: holds its slot, fails with `TimedOut` past its
/// deadlines and with `ConnectionAborted` once evicted.
pub struct LimitedIo {
    io: Stream,
    slot: Slot,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    unauthenticated: Pin<Box<Sleep>>,
}

impl LimitedIo {
    fn new(io: Stream, slot: Slot, deadlines: Deadlines) -> LimitedIo {
        LimitedIo {
            io,
            slot,
            idle: deadlines.idle,
            timer: Box::pin(tokio::time::sleep(deadlines.idle)),
            unauthenticated: Box::pin(tokio::time::sleep(deadlines.unauthenticated)),
        }
    }

    fn active(&mut self) {
        let idle = self.idle;
        self.timer.as_mut().reset(Instant::now() + idle);
    }

    /// Drives the TLS handshake; ready once the stream can carry data.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Stream::Handshake(accept) = &mut self.io else {
            return Poll::Ready(Ok(()));
        };
        match Pin::new(accept).poll(cx) {
            Poll::Ready(Ok(tls)) => {
                self.io = Stream::Tls(Box::new(tls));
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "API TLS handshake failed");
                self.io = Stream::Failed;
                Poll::Ready(Err(e))
            }
            Poll::Pending => self.pending(cx),
        }
    }

    /// After a write: bytes sent count as activity; a write that would
    /// wait is subject to the deadlines.
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

    /// When an operation would wait: an error once the connection was
    /// evicted or is past a deadline, otherwise wait (the slot and the
    /// timers wake the task).
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if self.slot.poll_evicted(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "API connection closed to make room: it had not sent a valid token and was the oldest such connection",
            )));
        }
        if !self.slot.is_authenticated() && self.unauthenticated.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "API connection sent no request with a valid token within server.unauthenticated_timeout",
            )));
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "API connection got no answer for longer than server.idle_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn failed<T>() -> Poll<io::Result<T>> {
    Poll::Ready(Err(io::Error::new(
        io::ErrorKind::NotConnected,
        "the TLS handshake failed",
    )))
}

/// Forwards one poll to the stream under the handshake.
macro_rules! forward {
    ($this:ident, $io:ident => $call:expr) => {
        match &mut $this.io {
            Stream::Plain($io) => $call,
            Stream::Tls($io) => $call,
            Stream::Handshake(_) | Stream::Failed => return failed(),
        }
    };
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_handshake(cx))?;
        match forward!(this, io => Pin::new(io).poll_read(cx, buf)) {
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
        ready!(this.poll_handshake(cx))?;
        let r = forward!(this, io => Pin::new(io).poll_write(cx, data));
        this.wrote(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_handshake(cx))?;
        let r = forward!(this, io => Pin::new(io).poll_write_vectored(cx, bufs));
        this.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Stream::Plain(io) => io.is_write_vectored(),
            Stream::Tls(io) => io.is_write_vectored(),
            Stream::Handshake(_) | Stream::Failed => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_handshake(cx))?;
        match forward!(this, io => Pin::new(io).poll_flush(cx)) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => this.pending(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.io {
            Stream::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Stream::Tls(io) => Pin::new(io).poll_shutdown(cx),
            Stream::Handshake(_) | Stream::Failed => Poll::Ready(Ok(())),
        }
    }
}
