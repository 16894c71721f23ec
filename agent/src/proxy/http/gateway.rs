//! The gateway side of one client connection: an HTTP client that starts on the connection
//! the proxy opened and, when the gateway closes it (between HTTP/1.1 requests, or with an
//! HTTP/2 GOAWAY), sends the next request over a new one. HTTP/1.1 carries one request at a
//! time; HTTP/2 multiplexes the client's streams on one gateway connection, so a slow call
//! does not hold up the others.
#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::respond::ProxyBody;

/// A byte stream to or from a peer: a TCP socket, or an in-memory pipe in tests.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub type BoxIo = Box<dyn Io>;

/// Opens another connection to the same gateway.
pub type Connect =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = std::io::Result<BoxIo>> + Send>> + Send + Sync>;

/// `connect` bounded by `limit`: a reconnect (after the gateway closed a connection, or the
/// agent closed an unused one) waits no longer for the gateway than the first connection did.
pub fn timed(connect: Connect, limit: Duration) -> Connect {
    Arc::new(move || {
        let connect = connect.clone();
        Box::pin(async move {
            match tokio::time::timeout(limit, connect()).await {
                Ok(io) => io,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the gateway did not accept a connection within {} s (--connect-timeout): check that it is up and reachable",
                        limit.as_secs_f64()
                    ),
                )),
            }
        })
    })
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("the HTTP handshake with the gateway failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("reconnecting to the gateway failed: {0}")]
    Reconnect(#[source] std::io::Error),
    #[error("the gateway failed the request: {0}")]
    Send(#[source] hyper::Error),
    #[error("the gateway closed every connection offered")]
    Closed,
}

/// The HTTP version spoken with the gateway: the client's (the proxy never translates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

pub struct Gateway {
    version: Version,
    state: tokio::sync::Mutex<State>,
    /// Requests between their start and their answer's head (a pooled connection is out of
    /// the pool meanwhile, so the pool alone does not show it in use).
    sending: AtomicUsize,
    /// When the connections were last seen in use: a request's start or the arrival of its
    /// answer's head, or a check that found one mid-exchange (milliseconds since `born`).
    used_ms: AtomicU64,
    born: Instant,
}

struct State {
    connect: Connect,
    sender: Option<Sender>,
    /// HTTP/1.1 connections for an HTTP/2 client's streams (one per stream in flight, reused
    /// once its answer is over), so a long answer (an SSE stream) holds up no other stream.
    pool: Vec<hyper::client::conn::http1::SendRequest<ProxyBody>>,
    /// The connection tasks still running (one per live gateway connection, at most a few:
    /// finished ones are reaped at each reconnect). Dropping the set aborts them.
    tasks: tokio::task::JoinSet<()>,
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<ProxyBody>),
    Http2(hyper::client::conn::http2::SendRequest<ProxyBody>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }
}

/// An HTTP/1.1 gateway connection in the middle of an exchange: hyper takes the next request
/// only once the last answer has been read to its end.
fn in_use(s: &hyper::client::conn::http1::SendRequest<ProxyBody>) -> bool {
    !s.is_closed() && !s.is_ready()
}

/// Counts a request in `sending` until it is dropped, and marks the connections used at
/// both ends.
struct Sending<'a>(&'a Gateway);

impl<'a> Sending<'a> {
    fn new(gateway: &'a Gateway) -> Self {
        gateway.sending.fetch_add(1, Ordering::AcqRel);
        gateway.mark_used();
        Sending(gateway)
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.mark_used();
        self.0.sending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gateway {
    pub async fn new(
        first: BoxIo,
        connect: Connect,
        version: Version,
    ) -> Result<Self, GatewayError> {
        let mut state = State {
            connect,
            sender: None,
            pool: Vec::new(),
            tasks: tokio::task::JoinSet::new(),
        };
        state.attach(first, version).await?;
        Ok(Gateway {
            version,
            state: tokio::sync::Mutex::new(state),
            sending: AtomicUsize::new(0),
            used_ms: AtomicU64::new(0),
            born: Instant::now(),
        })
    }

    fn mark_used(&self) {
        let now = self.born.elapsed().as_millis() as u64;
        self.used_ms.fetch_max(now, Ordering::AcqRel);
    }

    fn unused_for(&self) -> Duration {
        let used = Duration::from_millis(self.used_ms.load(Ordering::Acquire));
        self.born.elapsed().saturating_sub(used)
    }

    /// Closes this client's HTTP/1.1 gateway connections once nothing has used them for
    /// `idle`; the next request opens a new one. An answer's end is seen by these checks
    /// (`serve` makes one every quarter of `idle`), so a connection goes between ¾ and 1¼ of
    /// `idle` after its last exchange ended. An idle keep-alive client then holds no gateway
    /// connection (over a quarter of the memory of an idle connection through the agent,
    /// measured, and one connection fewer at the gateway). HTTP/2 gateway connections are kept: hyper
    /// does not tell whether streams are open on one. True when it closed any still open.
    pub fn release_if_idle(&self, idle: Duration) -> bool {
        if self.version == Version::Http2 {
            return false;
        }
        // Held across a request on the connection of an HTTP/1.1 client: in use.
        let Ok(mut state) = self.state.try_lock() else {
            self.mark_used();
            return false;
        };
        let busy = self.sending.load(Ordering::Acquire) > 0
            || matches!(&state.sender, Some(Sender::Http1(s)) if in_use(s))
            || state.pool.iter().any(in_use);
        if busy {
            self.mark_used();
            return false;
        }
        if state.sender.is_none() && state.pool.is_empty() || self.unused_for() < idle {
            return false;
        }
        let open = matches!(&state.sender, Some(s) if !s.is_closed())
            || state.pool.iter().any(|s| !s.is_closed());
        state.sender = None;
        state.pool.clear();
        // Dropping the set ends the connection tasks, and with them the sockets; a task that
        // had already ended is reaped with it.
        state.tasks = tokio::task::JoinSet::new();
        open
    }

    /// No exchange under way on any of its HTTP/1.1 connections (held or not), and none for
    /// `idle`: the client's connection may be parked.
    pub fn is_idle(&self, idle: Duration) -> bool {
        let Ok(state) = self.state.try_lock() else {
            return false;
        };
        let busy = self.sending.load(Ordering::Acquire) > 0
            || matches!(&state.sender, Some(Sender::Http1(s)) if in_use(s))
            || state.pool.iter().any(in_use);
        !busy && self.unused_for() >= idle
    }

    /// Connection tasks alive now (for the test that they do not grow with reconnects).
    pub async fn live_tasks(&self) -> usize {
        self.state.lock().await.tasks.len()
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Sends one request: over HTTP/1.1 one at a time (the connection carries one exchange
    /// at a time anyway), over HTTP/2 on a shared connection, each stream on its own.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, GatewayError> {
        let _sending = Sending::new(self);
        match self.version {
            Version::Http1 if req.version() == hyper::Version::HTTP_2 => {
                downgrade(&mut req);
                self.send_pooled(req).await
            }
            Version::Http1 => self.state.lock().await.send_http1(req).await,
            Version::Http2 => self.send_http2(req).await,
        }
    }

    /// An HTTP/2 client's stream to an HTTP/1.1 gateway: on an idle connection of the pool,
    /// or a new one; the lock is held to pick or dial, never across a call.
    async fn send_pooled(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, GatewayError> {
        for _ in 0..2 {
            let mut sender = {
                let mut state = self.state.lock().await;
                if let Some(Sender::Http1(first)) = state.sender.take() {
                    state.pool.push(first);
                }
                state.pool.retain(|s| !s.is_closed());
                match state.pool.iter().position(|s| s.is_ready()) {
                    Some(i) => state.pool.swap_remove(i),
                    None => {
                        let io = (state.connect)().await.map_err(GatewayError::Reconnect)?;
                        state.handshake_http1(io).await?
                    }
                }
            };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    // Back in the pool: ready again once this answer has been read.
                    self.state.lock().await.pool.push(sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(GatewayError::Send(e.into_error())),
                },
            }
        }
        Err(GatewayError::Closed)
    }

    async fn send_http2(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, GatewayError> {
        for _ in 0..2 {
            // The lock is held only to find (or open) the connection, never across a call.
            let mut sender = {
                let mut state = self.state.lock().await;
                if state.sender.as_ref().is_none_or(Sender::is_closed) {
                    let io = (state.connect)().await.map_err(GatewayError::Reconnect)?;
                    state.attach(io, Version::Http2).await?;
                }
                match &state.sender {
                    Some(Sender::Http2(s)) => s.clone(),
                    _ => return Err(GatewayError::Closed),
                }
            };
            if sender.ready().await.is_err() {
                self.state.lock().await.sender = None;
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // Refused before it was sent (a GOAWAY): once more on a new connection.
                    Some(unsent) => {
                        req = unsent;
                        self.state.lock().await.sender = None;
                    }
                    None => return Err(GatewayError::Send(e.into_error())),
                },
            }
        }
        Err(GatewayError::Closed)
    }
}

/// An HTTP/2 request made HTTP/1.1: its authority becomes the Host header and its target the
/// origin form, as an HTTP/1.1 server expects. (hyper's HTTP/2 server strips the
/// connection-specific headers of the HTTP/1.1 answer on the way back.)
fn downgrade(req: &mut Request<ProxyBody>) {
    *req.version_mut() = hyper::Version::HTTP_11;
    if let Some(authority) = req.uri().authority().map(|a| a.as_str().to_owned())
        && !req.headers().contains_key(hyper::header::HOST)
        && let Ok(host) = hyper::header::HeaderValue::from_str(&authority)
    {
        req.headers_mut().insert(hyper::header::HOST, host);
    }
    if let Some(origin) = req
        .uri()
        .path_and_query()
        .and_then(|p| p.as_str().parse::<hyper::Uri>().ok())
    {
        *req.uri_mut() = origin;
    }
}

impl State {
    async fn attach(&mut self, io: BoxIo, version: Version) -> Result<(), GatewayError> {
        while self.tasks.try_join_next().is_some() {}
        match version {
            Version::Http1 => {
                let sender = self.handshake_http1(io).await?;
                self.sender = Some(Sender::Http1(sender));
            }
            Version::Http2 => {
                let (sender, connection) =
                    hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .timer(hyper_util::rt::TokioTimer::new())
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(GatewayError::Handshake)?;
                self.tasks.spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "gateway connection ended with an error");
                    }
                });
                self.sender = Some(Sender::Http2(sender));
            }
        }
        Ok(())
    }

    async fn handshake_http1(
        &mut self,
        io: BoxIo,
    ) -> Result<hyper::client::conn::http1::SendRequest<ProxyBody>, GatewayError> {
        while self.tasks.try_join_next().is_some() {}
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(GatewayError::Handshake)?;
        self.tasks.spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "gateway connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn send_http1(
        &mut self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, GatewayError> {
        for _ in 0..2 {
            if self.sender.as_ref().is_none_or(Sender::is_closed) {
                let io = (self.connect)().await.map_err(GatewayError::Reconnect)?;
                self.attach(io, Version::Http1).await?;
            }
            let Some(Sender::Http1(sender)) = self.sender.as_mut() else {
                return Err(GatewayError::Closed);
            };
            if sender.ready().await.is_err() {
                self.sender = None;
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection was gone already; try once more on a new one.
                    Some(unsent) => {
                        req = unsent;
                        self.sender = None;
                    }
                    None => return Err(GatewayError::Send(e.into_error())),
                },
            }
        }
        Err(GatewayError::Closed)
    }
}
