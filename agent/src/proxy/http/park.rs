//! An HTTP/1.1 client connection, served in rounds: while it is idle it is parked, with
//! none of hyper's buffers.
//!
//! hyper keeps a connection's read buffer (8 KiB to start, more after a large call) and its
//! header buffer (8 KiB) for as long as the connection lives, and has no setting to let them
//! go. An agent with thousands of idle keep-alive clients held 24 KiB per connection that
//! way. So once a connection has had no exchange under way for `--upstream-idle` (when its
//! gateway connection is closed too), hyper is asked to end it without shutting the socket
//! (`graceful_shutdown` on an idle connection, `poll_without_shutdown`); the socket is kept,
//! a read of one byte waits for the client's next request, and a new round of hyper serves
//! it, that byte and whatever hyper had read and not used first. The client sees one
//! keep-alive connection throughout.
//!
//! A round ends in one of three ways: parked (the loop goes on), hyper done (the client
//! closed, or keep-alive ended: the socket is shut as hyper would have), or a protocol
//! switch (101, or a CONNECT the gateway agreed to: the handler left the gateway's side in a
//! `Switch`, and the client's raw stream, read buffer first, is joined to it here, which is
//! what hyper's own upgrade machinery would have done).
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::gateway::{Gateway, Io};
use super::records::Conn;
use super::respond::ProxyBody;
use crate::proxy::detect::Rewind;

/// What a round of hyper's serving returns: any error it ended with.
type Ended = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Whether a connection's requests are under way, and since when none has been.
struct Activity {
    /// Requests whose answers hyper has not finished sending (or dropped).
    in_flight: AtomicUsize,
    /// When the last one started or ended, in microseconds since `base`.
    last: AtomicU64,
    /// Requests started on the connection.
    started: AtomicU64,
    base: Instant,
}

impl Activity {
    fn new() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            started: AtomicU64::new(0),
            base: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    fn touch(&self) {
        self.last.store(self.now(), Ordering::Release);
    }

    /// No request under way, and none started or ended for `idle`.
    fn quiet_for(&self, idle: Duration) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.now().saturating_sub(self.last.load(Ordering::Acquire))
                >= idle.as_micros() as u64
    }
}

/// One request under way: from hyper's call of the service until the answer's body is sent
/// or dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.started.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body that holds its request's `InFlight` until hyper is done with it.
pub struct Tracked {
    body: ProxyBody,
    _in_flight: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Where a request's handler leaves the gateway's side of a protocol switch, for the loop
/// to join to the client's stream once hyper has sent the switch and handed the socket back.
/// In the request's extensions, so that the handler knows its connection is served here.
#[derive(Clone, Default)]
pub struct Switch(Arc<std::sync::Mutex<Option<hyper::upgrade::OnUpgrade>>>);

impl Switch {
    pub fn set(&self, upstream: hyper::upgrade::OnUpgrade) {
        *self.0.lock().expect("switch lock") = Some(upstream);
    }

    fn take(&self) -> Option<hyper::upgrade::OnUpgrade> {
        self.0.lock().expect("switch lock").take()
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send>>;

/// Serves an HTTP/1.1 client until it closes, parking it whenever it is idle for
/// `conn.parts.upstream_idle` (never, when that is unset).
pub async fn serve<C: Io>(client: C, conn: Arc<Conn>, gateway: Arc<Gateway>) -> Ended {
    let activity = Arc::new(Activity::new());
    let switch = Switch::default();
    let mut service = {
        let (conn, gateway, activity, switch) = (
            conn.clone(),
            gateway.clone(),
            activity.clone(),
            switch.clone(),
        );
        hyper::service::service_fn(move |mut req: Request<Incoming>| -> Answer {
            // A switch left by a request that then failed is not this request's.
            drop(switch.take());
            req.extensions_mut().insert(switch.clone());
            let in_flight = InFlight::start(&activity);
            let answer = super::exchange(&conn, &gateway, req, None);
            Box::pin(async move {
                Ok(answer.await.map(|body| Tracked {
                    body,
                    _in_flight: in_flight,
                }))
            })
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .preserve_header_case(true)
        // A client that never finishes its request head holds a task and a gateway
        // connection: it gets this long (hyper's own default, which needs a timer). hyper
        // counts it from when it starts waiting for a head, so an idle connection is parked
        // (and waits with no timer) well before it would run out.
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(conn.parts.header_timeout)
        .max_buf_size(super::CLIENT_READ_BUF);
    let idle = conn.parts.upstream_idle;
    let mut io = Watched::new(Rewind::new(Vec::new(), client));
    let waiting = io.waiting.clone();
    loop {
        let started = activity.started.load(Ordering::Acquire);
        // Boxed: while parked, the connection's task holds none of hyper's state.
        let mut round = Box::new(builder.serve_connection(TokioIo::new(io), service));
        // hyper can report a round done with the end of an answer still in its write buffer:
        // an answer sent before the request's body had all arrived is followed by the body's
        // end, flushed or not, and hyper flushes only on the way to shutting the socket,
        // which a round skips. So the round is over when the last write did not wait too
        // (hyper tries to flush on every poll; a write that waits has the task woken when
        // the socket drains).
        macro_rules! finished {
            () => {
                std::future::poll_fn(|cx| match round.poll_without_shutdown(cx) {
                    Poll::Ready(Ok(())) if waiting.load(Ordering::Acquire) => Poll::Pending,
                    done => done,
                })
            };
        }
        let parking = match idle {
            None => {
                finished!().await?;
                false
            }
            Some(idle) => {
                let park_after = idle.min(MAX_PARK_AFTER);
                let mut check = tokio::time::interval((park_after / 4).max(super::MIN_IDLE_CHECK));
                check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut parking = false;
                loop {
                    tokio::select! {
                        r = finished!() => {
                            r?;
                            break parking;
                        }
                        _ = check.tick(), if !parking => {
                            if gateway.release_if_idle(idle) {
                                tracing::debug!(
                                    client = %conn.connection.client,
                                    "closed an idle gateway connection; the next request opens another"
                                );
                            }
                            // Checked on this task, between two polls of hyper's. Only once
                            // an exchange has ended in this round: hyper then waits for the
                            // next head, and ends the round at once, keeping any bytes of a
                            // head it has begun to read. A round that has served nothing yet
                            // (one that began with a client's first bytes after a park) would
                            // instead finish its first request with `Connection: close`; it
                            // runs until that request is done, or hyper's timeout for its
                            // head ends the connection, a clock no park restarts. Not while
                            // a write waits: hyper may be closing the connection (the client
                            // asked it to) behind an answer the client is slow to read.
                            let served = activity.started.load(Ordering::Acquire) != started;
                            if served
                                && !waiting.load(Ordering::Acquire)
                                && gateway.is_idle(park_after)
                                && activity.quiet_for(park_after)
                            {
                                Pin::new(&mut *round).graceful_shutdown();
                                parking = true;
                            }
                        }
                    }
                }
            }
        };
        let parts = (*round).into_parts();
        io = parts.io.into_inner();
        service = parts.service;
        // What hyper read and did not use, copied: the `Bytes` it comes in holds hyper's
        // whole read buffer (16 KiB, measured), which must not outlive the round.
        let read_buf = parts.read_buf;
        io.inner.unread(&read_buf);
        drop(read_buf);
        match switch.take() {
            // A switch ends a round by itself, never by a park.
            Some(upstream) if !parking => return join(io.inner, upstream, &conn.id).await,
            Some(_) => {
                tracing::warn!(conn = %conn.id, "a protocol switch left behind by a failed request was dropped")
            }
            None => {}
        }
        if !parking {
            // The client closed or keep-alive ended: shut the socket as hyper would have.
            if let Err(e) = io.shutdown().await {
                tracing::debug!(conn = %conn.id, error = %e, "shutting a client connection failed");
            }
            return Ok(());
        }
        conn.parts.stats.parks.fetch_add(1, Ordering::Relaxed);
        // A parked connection holds no gateway connection either (with `--upstream-idle`
        // past `MAX_PARK_AFTER`, it goes now rather than at that time).
        gateway.release_if_idle(Duration::ZERO);
        // With part of a head in hand, the next round starts at once.
        if !io.inner.has_unread() {
            if !wait_for_bytes(&mut io.inner, &conn).await? {
                return Ok(());
            }
            activity.touch();
        }
    }
}

/// The longest a client connection waits idle before it is parked, whatever
/// `--upstream-idle` says: hyper's timeout for a request head (30 s) runs while it waits for
/// the next one, so a connection left longer would be closed instead (checked every quarter
/// of this: parked at most 25 s after its last exchange).
const MAX_PARK_AFTER: Duration = Duration::from_secs(20);

/// The client's stream, noting whether its last write waited (the client not reading).
struct Watched<S> {
    inner: S,
    waiting: Arc<AtomicBool>,
}

impl<S> Watched<S> {
    fn new(inner: S) -> Self {
        Watched {
            inner,
            waiting: Arc::default(),
        }
    }

    fn note<T>(&self, r: Poll<T>) -> Poll<T> {
        self.waiting.store(r.is_pending(), Ordering::Release);
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Parked: waits, holding no buffer, until the client sends again (true) or closes (false).
async fn wait_for_bytes<C: Io>(io: &mut Rewind<C>, conn: &Conn) -> Result<bool, std::io::Error> {
    let _parked = Parked::count(&conn.parts.stats.parked);
    tracing::debug!(client = %conn.connection.client, "parked an idle client connection");
    let mut first = [0u8; 1];
    match io.read(&mut first).await {
        Ok(0) => Ok(false),
        Ok(_) => {
            io.unread(&first);
            Ok(true)
        }
        // A client that resets an idle connection has closed it, as hyper counts it.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Counts a parked connection for as long as it waits (also when its task is dropped, as
/// at the agent's stop).
struct Parked<'a>(&'a AtomicU64);

impl<'a> Parked<'a> {
    fn count(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Parked(gauge)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// After a protocol switch, the client's raw stream (what hyper had read of it first) and
/// the gateway's, relayed as they are.
async fn join<C: Io>(client: Rewind<C>, upstream: hyper::upgrade::OnUpgrade, conn: &str) -> Ended {
    match upstream.await {
        Ok(upstream) => {
            let mut client = client;
            let mut upstream = TokioIo::new(upstream);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(%conn, error = %e, "upgraded stream ended with an error");
            }
        }
        Err(e) => tracing::warn!(%conn, error = %e, "protocol upgrade failed"),
    }
    Ok(())
}
