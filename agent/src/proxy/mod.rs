//! The proxy: accepts redirected connections, ties each to its origin, relays it to the
//! original destination, and records it.
//!
//! A connection whose origin the kernel did not record did not come through the redirect; it
//! is refused and the refusal recorded, so the agent is never an open relay.
#![forbid(unsafe_code)]

pub mod correlate;
pub mod detect;
pub mod http;
pub mod relay;
mod sse_props;
pub mod stall;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agent_common::Origin;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::audit::record::{
    Bytes, Connection, ConnectionEvent, Event, Outcome, RefusedEvent, Status, Timing, now_rfc3339,
    rfc3339,
};
use crate::intercept::{Interceptor, origin_destination};
use crate::policy::gateway::Opaque;
use crate::policy::live::Active;
use crate::policy::tls::Mode;

use self::detect::{DetectError, Protocol, Rewind};
use self::http::gateway::{BoxIo, Connect, Io};

/// Waits between origin look-ups. The kernel stores the origin before the client's final
/// handshake ACK is sent, so the first look-up should hit; the retries only cover scheduling
/// oddities and cost nothing on the normal path.
const ORIGIN_RETRIES: [Duration; 3] = [
    Duration::from_millis(1),
    Duration::from_millis(5),
    Duration::from_millis(20),
];

pub const REFUSED_NO_ORIGIN: &str = "no redirect origin: the connection did not come through mcptrail's redirect (the proxy is not an open relay)";
pub const REFUSED_AUDIT_DOWN: &str = "the audit trail cannot be written (see the agent's log); with --on-audit-failure block no connection passes until it can";
pub const REFUSED_SELF: &str = "the original destination is the proxy itself (loop guard)";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "cannot listen on {addr}: {source}; is another agent running? pick another port with --listen-port"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Detect(#[from] DetectError),
    #[error(
        "refused: the client speaks {}, which the proxy cannot check, and the policy refuses what it cannot check (set `[gateway] opaque = \"relay\"` to relay such connections, counted but unread)",
        .0.as_str()
    )]
    OpaqueRefused(Protocol),
    #[error("connecting to the gateway timed out after {0:?}")]
    UpstreamTimeout(Duration),
    #[error("connecting to the gateway failed: {0}")]
    UpstreamConnect(#[source] std::io::Error),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("relaying bytes failed: {0}")]
    Relay(#[source] std::io::Error),
    #[error("the agent stopped while the connection was open")]
    Shutdown,
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl ProxyError {
    /// The connection's recorded outcome: the one place a proxy error becomes one.
    pub fn outcome(&self) -> Outcome {
        let status = match self {
            ProxyError::Detect(DetectError::Closed { .. }) => Status::Closed,
            ProxyError::Detect(DetectError::Timeout { .. })
            | ProxyError::OpaqueRefused(_)
            | ProxyError::Http(http::HttpError::CutOff(_))
            | ProxyError::Tls(_) => Status::Refused,
            ProxyError::UpstreamTimeout(_) | ProxyError::UpstreamConnect(_) => {
                Status::UpstreamConnectFailed
            }
            ProxyError::Shutdown => Status::AgentShutdown,
            ProxyError::Bind { .. }
            | ProxyError::Detect(DetectError::Io(_))
            | ProxyError::Http(_)
            | ProxyError::Relay(_) => Status::RelayError,
        };
        Outcome {
            status,
            detail: Some(self.to_string()),
        }
    }
}

pub struct Settings {
    pub connect_timeout: Duration,
    /// A client's gateway connection unused this long is closed, and reopened by its next
    /// request (None: kept for as long as the client's).
    pub upstream_idle: Option<Duration>,
    /// Reads who the calling process is.
    pub identifier: Arc<crate::process::Identifier>,
    /// Verifies the service tokens requests carry.
    pub verifier: Arc<crate::identity::Verifier>,
    /// The policy in force (masking), swapped on reload.
    pub policy: Arc<crate::policy::live::Live>,
    /// Calls held for an operator's approval.
    pub approvals: Arc<crate::policy::approvals::Approvals>,
    /// SO_MARK for upstream sockets (0: none).
    pub mark: u32,
    /// Bytes of each HTTP body kept for the record (forwarding is never bounded by it).
    pub capture_limit: usize,
    pub on_audit_failure: OnAuditFailure,
    /// TLS termination (the host CA, the roots); None: TLS is opaque to the proxy.
    pub tls: Option<Arc<tls::TlsContext>>,
}

/// What to do with traffic when the trail cannot be written (a full disk, an I/O error).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum OnAuditFailure {
    /// Refuse it: calls get a clear error and nothing unaudited reaches the gateway.
    Block,
    /// Let it through; every lost record is counted and logged.
    Pass,
}

/// Userspace counters, reported by `status` and in the stop record.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    /// Connections refused because the kernel had no origin for them.
    pub origin_misses: AtomicU64,
    /// Connections refused by the userspace loop guard.
    pub self_calls: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub open: AtomicU64,
    /// Of the open connections, the idle HTTP/1.1 ones parked with no buffers (`http/park.rs`).
    pub parked: AtomicU64,
    /// Times a client connection was parked (its HTTP state let go), since the start.
    pub parks: AtomicU64,
    /// Records that could not be written (the trail failed).
    pub audit_losses: AtomicU64,
    /// Calls and connections refused because the trail could not be written.
    pub blocked: AtomicU64,
    /// Connections and requests refused because the proxy could not read them (`[gateway]`
    /// `opaque` and `unparsed`, the first-bytes timeout).
    pub unreadable_refused: AtomicU64,
    /// TLS handshakes that failed, with the client or with the gateway.
    pub tls_failures: AtomicU64,
    /// Clients whose TLS handshakes with the proxy failed since the start, by executable
    /// (the processes that do not trust the host CA): what `status` shows an operator.
    pub tls_clients: std::sync::Mutex<std::collections::BTreeMap<String, TlsClientFailures>>,
}

/// Failed client handshakes of one executable.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TlsClientFailures {
    pub count: u64,
    pub last_reason: String,
    pub last_time: String,
    pub last_pid: u32,
}

/// Executables `status` keeps failed handshakes for, at most.
const TLS_CLIENTS_MAX: usize = 1024;

impl Stats {
    /// Counts a failed handshake; a client-side one is also kept by executable.
    pub fn note_tls_failure(
        &self,
        side: &str,
        process: &crate::audit::record::Process,
        reason: &str,
    ) {
        self.tls_failures.fetch_add(1, Ordering::Relaxed);
        if side != "client" {
            return;
        }
        let exe = process.exe.clone().unwrap_or_else(|| process.comm.clone());
        let mut clients = self.tls_clients.lock().expect("tls clients lock");
        if clients.len() >= TLS_CLIENTS_MAX && !clients.contains_key(&exe) {
            return;
        }
        let e = clients.entry(exe).or_default();
        e.count += 1;
        e.last_reason = reason.to_owned();
        e.last_time = now_rfc3339();
        e.last_pid = process.pid;
    }
}

impl Stats {
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        [
            ("accepted", &self.accepted),
            ("origin_misses", &self.origin_misses),
            ("self_calls_refused", &self.self_calls),
            ("upstream_failures", &self.upstream_failures),
            ("open_connections", &self.open),
            ("parked_connections", &self.parked),
            ("connection_parks", &self.parks),
            ("audit_losses", &self.audit_losses),
            ("blocked_by_audit_failure", &self.blocked),
            ("refused_unreadable", &self.unreadable_refused),
            ("tls_failures", &self.tls_failures),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.load(Ordering::Relaxed)))
        .collect()
    }
}

struct Shared {
    interceptor: Arc<Interceptor>,
    audit: AuditLog,
    locals: Vec<SocketAddr>,
    settings: Settings,
    stats: Arc<Stats>,
    /// Connections served over HTTP, for exchange ids.
    connections: AtomicU64,
    /// Distinguishes this run's exchange ids from other runs'.
    run_id: String,
    /// Where connection tasks and response observers run; the agent waits on it at stop.
    tracker: TaskTracker,
    /// Requests waiting for answers that may come on another exchange or connection.
    correlator: Arc<correlate::Correlator>,
    /// Which plaintext gateways speak h2c.
    h2c: Arc<http::h2c::H2cProbe>,
}

pub struct Proxy {
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind { addr, source })
}

impl Proxy {
    pub fn new(
        listeners: Vec<TcpListener>,
        interceptor: Arc<Interceptor>,
        audit: AuditLog,
        settings: Settings,
        tracker: TaskTracker,
    ) -> std::io::Result<Self> {
        let locals = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Proxy {
            listeners,
            shared: Arc::new(Shared {
                interceptor,
                audit,
                locals,
                settings,
                stats: Arc::default(),
                connections: AtomicU64::new(0),
                run_id: format!("{:x}", chrono::Utc::now().timestamp()),
                tracker,
                correlator: Arc::default(),
                h2c: Arc::default(),
            }),
        })
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    /// Accepts on every listener until `stop_accepting` fires. Connection tasks are spawned
    /// on `tracker` and end when their peers close or when `cut` fires.
    pub async fn serve(
        self,
        stop_accepting: CancellationToken,
        cut: CancellationToken,
        tracker: TaskTracker,
    ) {
        let mut loops = tokio::task::JoinSet::new();
        for listener in self.listeners {
            let shared = self.shared.clone();
            let (stop, cut, tracker) = (stop_accepting.clone(), cut.clone(), tracker.clone());
            loops.spawn(accept_loop(listener, shared, stop, cut, tracker));
        }
        while loops.join_next().await.is_some() {}
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop_accepting: CancellationToken,
    cut: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop_accepting.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                let cut = cut.clone();
                tracker.spawn(async move { shared.handle(stream, peer, cut).await });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Shared {
    async fn find_origin(&self, peer: SocketAddr) -> Option<Origin> {
        for wait in std::iter::once(Duration::ZERO).chain(ORIGIN_RETRIES) {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            match self.interceptor.take_origin(peer) {
                Ok(Some(origin)) => return Some(origin),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, %peer, "origin look-up failed");
                    return None;
                }
            }
        }
        None
    }

    async fn refuse(&self, client: TcpStream, peer: SocketAddr, reason: &str) {
        tracing::warn!(%peer, reason, "refused connection");
        let proxy = client
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        drop(client);
        let event = Event::Refused(RefusedEvent {
            time: now_rfc3339(),
            client: peer.to_string(),
            proxy,
            reason: reason.to_owned(),
        });
        if let Err(e) = self.audit.append(event).await {
            self.stats.audit_losses.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, %peer, "could not record a refused connection");
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr, cut: CancellationToken) {
        let started = chrono::Utc::now();
        let t0 = Instant::now();
        let Some(origin) = self.find_origin(peer).await else {
            self.stats.origin_misses.fetch_add(1, Ordering::Relaxed);
            return self.refuse(client, peer, REFUSED_NO_ORIGIN).await;
        };
        let dst = origin_destination(&origin);
        if self.locals.contains(&dst) {
            self.stats.self_calls.fetch_add(1, Ordering::Relaxed);
            return self.refuse(client, peer, REFUSED_SELF).await;
        }
        let proxy_addr = client
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let active = self.settings.policy.current();
        if self.settings.on_audit_failure == OnAuditFailure::Block && !self.audit.healthy() {
            self.stats.blocked.fetch_add(1, Ordering::Relaxed);
            // An HTTP client gets told why, not just a closed connection.
            let mut client = client;
            if let Ok((Protocol::Http1, _)) =
                detect::read_first(&mut client, active.gateway.first_bytes_timeout).await
            {
                let body = format!("mcptrail: {REFUSED_AUDIT_DOWN}\n");
                let answer = format!(
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tokio::io::AsyncWriteExt::write_all(&mut client, answer.as_bytes()).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut client).await;
            }
            return self.refuse(client, peer, REFUSED_AUDIT_DOWN).await;
        }
        let target = self.interceptor.target_for(dst).map(|t| t.to_string());
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        // Read /proc at once: the caller may be short-lived.
        let identifier = self.settings.identifier.clone();
        let mut process = tokio::task::spawn_blocking(move || identifier.identify(&origin))
            .await
            .expect("identify does not panic");
        // What the caller put in its command line and environment is masked like its
        // messages: the trail stores it too.
        http::records::mask_process(&active, &mut process);

        let shared_process = Arc::new(std::sync::RwLock::new(process));
        let counts = Arc::new(relay::Counts::default());
        let _ = client.set_nodelay(true);
        let conn_info = Connection {
            client: peer.to_string(),
            original_dst: dst.to_string(),
            proxy: proxy_addr.clone(),
            target: target.clone(),
            tls: None,
        };
        let n = self.connections.fetch_add(1, Ordering::Relaxed);
        let conn = http::records::Conn::new(
            http::ConnParts {
                audit: self.audit.clone(),
                on_failure: self.settings.on_audit_failure,
                stats: self.stats.clone(),
                capture_limit: self.settings.capture_limit,
                tracker: self.tracker.clone(),
                correlator: self.correlator.clone(),
                verifier: self.settings.verifier.clone(),
                policy: self.settings.policy.clone(),
                approvals: self.settings.approvals.clone(),
                upstream_idle: self.settings.upstream_idle,
                header_timeout: http::HEADER_READ_TIMEOUT,
            },
            shared_process.clone(),
            conn_info,
            format!("{}.{n}", self.run_id),
        );
        let route = Route {
            dst,
            connect: http::gateway::timed(
                marked_connector(dst, self.settings.mark),
                self.settings.connect_timeout,
            ),
            connect_timeout: self.settings.connect_timeout,
            tls: self.settings.tls.clone(),
            h2c: self.h2c.clone(),
        };
        let client = relay::Counted::new(client, counts.clone());
        let served = tokio::select! {
            r = serve_client(client, route, active, conn) => r,
            _ = cut.cancelled() => Served {
                protocol: None,
                tls: None,
                result: Err(ProxyError::Shutdown),
            },
        };
        let (protocol, result) = (served.protocol, served.result);
        let outcome = match &result {
            Ok(()) => Outcome {
                status: Status::Closed,
                detail: None,
            },
            Err(e) => e.outcome(),
        };
        if matches!(
            result,
            Err(ProxyError::OpaqueRefused(_) | ProxyError::Detect(DetectError::Timeout { .. }))
        ) {
            self.stats
                .unreadable_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        if outcome.status == Status::UpstreamConnectFailed {
            self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
        }
        let ended = chrono::Utc::now();
        let event = Event::Connection(Box::new(ConnectionEvent {
            time: now_rfc3339(),
            connection: Connection {
                client: peer.to_string(),
                original_dst: dst.to_string(),
                proxy: proxy_addr,
                target,
                tls: served.tls,
            },
            timing: Timing {
                start: rfc3339(started),
                end: rfc3339(ended),
                duration_us: t0.elapsed().as_micros() as u64,
            },
            bytes: Bytes {
                req: counts.req.load(std::sync::atomic::Ordering::Relaxed),
                resp: counts.resp.load(std::sync::atomic::Ordering::Relaxed),
            },
            outcome,
            process: shared_process.read().expect("process lock").clone(),
            protocol: protocol.map(|p| p.as_str().to_owned()),
        }));
        if let Err(e) = self.audit.append(event).await {
            self.stats.audit_losses.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, %peer, %dst, "could not record a connection: it is missing from the trail");
        }
    }
}

/// How the proxy reaches a connection's gateway.
pub struct Route {
    /// The gateway's address (the connection's original destination).
    pub dst: SocketAddr,
    /// Opens a connection to the gateway (again, when it closes one between requests).
    pub connect: Connect,
    pub connect_timeout: Duration,
    /// TLS termination; None: TLS is relayed or refused like other opaque bytes.
    pub tls: Option<Arc<tls::TlsContext>>,
    /// Which plaintext gateways speak HTTP/2 with prior knowledge.
    pub h2c: Arc<http::h2c::H2cProbe>,
}

/// A connector that dials `dst` from sockets carrying the agent's mark.
pub fn marked_connector(dst: SocketAddr, mark: u32) -> Connect {
    Arc::new(move || {
        Box::pin(async move {
            let s = upstream::connect(dst, mark).await?;
            Ok(Box::new(s) as BoxIo)
        })
    })
}

/// How a connection went: what it spoke, what TLS it used, how it ended.
pub struct Served {
    pub protocol: Option<Protocol>,
    pub tls: Option<crate::audit::record::Tls>,
    pub result: Result<(), ProxyError>,
}

impl Served {
    fn ended(protocol: Option<Protocol>, result: Result<(), ProxyError>) -> Self {
        Served {
            protocol,
            tls: None,
            result,
        }
    }
}

async fn connect_upstream(route: &Route) -> Result<BoxIo, ProxyError> {
    match tokio::time::timeout(route.connect_timeout, (route.connect)()).await {
        Err(_) => Err(ProxyError::UpstreamTimeout(route.connect_timeout)),
        Ok(Err(e)) => Err(ProxyError::UpstreamConnect(e)),
        Ok(Ok(u)) => Ok(u),
    }
}

/// One redirected connection after its origin is known: its protocol is read from its first
/// bytes, then it is served as HTTP (every request through the pipeline), as TLS (terminated
/// into the same pipeline, or passed through), relayed (opaque bytes, when the policy
/// allows), or refused. Transport-generic, so the whole path runs in-process in tests.
pub async fn serve_client<C: Io>(
    client: C,
    route: Route,
    active: Arc<Active>,
    conn: http::records::Conn,
) -> Served {
    let gateway = active.gateway;
    let mut client = stall::StallGuard::new(client, gateway.stalled_client);
    let (protocol, first) = match detect::read_first(&mut client, gateway.first_bytes_timeout).await
    {
        Ok(found) => found,
        // Connected and left without a byte: nothing to relay or refuse.
        Err(DetectError::Closed { got: 0 }) => return Served::ended(None, Ok(())),
        Err(e) => return Served::ended(None, Err(e.into())),
    };
    let tls = route.tls.clone().filter(|_| protocol == Protocol::Tls);
    if !matches!(protocol, Protocol::Http1 | Protocol::H2)
        && tls.is_none()
        && gateway.opaque == Opaque::Refuse
    {
        return Served::ended(Some(protocol), Err(ProxyError::OpaqueRefused(protocol)));
    }
    let Some(ctx) = tls else {
        let upstream = match connect_upstream(&route).await {
            Ok(u) => u,
            Err(e) => return Served::ended(Some(protocol), Err(e)),
        };
        let client = Rewind::new(first, client);
        let result = match protocol {
            Protocol::Http1 => http::serve(
                client,
                upstream,
                route.connect,
                Arc::new(conn),
                http::Version::Http1,
                http::Version::Http1,
            )
            .await
            .map_err(ProxyError::from),
            // h2c with prior knowledge: HTTP/2 in plaintext to the gateway too, when it
            // speaks it; else HTTP/1.1 to it, each stream a request.
            Protocol::H2 => {
                let upstream_version = if route.h2c.speaks_h2c(route.dst, &route.connect).await {
                    http::Version::Http2
                } else {
                    http::Version::Http1
                };
                http::serve(
                    client,
                    upstream,
                    route.connect,
                    Arc::new(conn),
                    http::Version::Http2,
                    upstream_version,
                )
                .await
                .map_err(ProxyError::from)
            }
            // The client stream counts what passes; the relay's own counts are not needed.
            Protocol::Tls | Protocol::Opaque => {
                relay::relay(client, upstream, &relay::Counts::default())
                    .await
                    .map_err(ProxyError::Relay)
            }
        };
        return Served::ended(Some(protocol), result);
    };
    // Boxed: the TLS path's state is several times the plain path's, and a plain connection
    // would otherwise carry it in its task for as long as it stays open (about 6 KiB each,
    // measured on 2026-12-01).
    Box::pin(serve_tls(client, first, route, active, conn, ctx, protocol)).await
}

/// A connection that opened with a TLS ClientHello, with termination set up: its hello read,
/// then passed through or terminated into the HTTP pipeline, per its gateway's mode.
async fn serve_tls<C: Io>(
    mut client: stall::StallGuard<C>,
    first: Vec<u8>,
    route: Route,
    active: Arc<Active>,
    mut conn: http::records::Conn,
    ctx: Arc<tls::TlsContext>,
    protocol: Protocol,
) -> Served {
    let gateway = &active.gateway;
    let (hello, first) =
        match tls::read_client_hello(&mut client, first, gateway.first_bytes_timeout).await {
            Ok(h) => h,
            // A hello that does not parse, or never ends, is a failed handshake like any.
            Err(e) => {
                let info = crate::audit::record::Tls {
                    mode: ctx.default_mode.as_str().to_owned(),
                    ..Default::default()
                };
                return tls_failed(&mut conn, protocol, e, info).await;
            }
        };
    let entry = active
        .tls
        .gateway(
            &conn.connection.original_dst,
            conn.connection.target.as_deref(),
        )
        .cloned();
    let mode = entry
        .as_ref()
        .and_then(|g| g.mode)
        .unwrap_or(ctx.default_mode);
    let upstream = match connect_upstream(&route).await {
        Ok(u) => u,
        Err(e) => return Served::ended(Some(protocol), Err(e)),
    };
    let client = Rewind::new(first, client);
    if mode == Mode::Passthrough {
        let (info, result) =
            tls::passthrough(client, upstream, &hello, route.connect_timeout).await;
        return Served {
            protocol: Some(protocol),
            tls: Some(info),
            result: result.map_err(ProxyError::Relay),
        };
    }
    let target = conn.connection.target.clone();
    match tls::terminate(
        &ctx,
        client,
        upstream,
        route.connect.clone(),
        &hello,
        entry.as_ref(),
        target.as_deref(),
        route.dst,
        route.connect_timeout.max(gateway.first_bytes_timeout),
    )
    .await
    {
        Ok(t) => {
            conn.connection.tls = Some(t.info.clone());
            // The client was offered only what the gateway chose: the versions match.
            let version = match t.info.alpn.as_deref() {
                Some("h2") => http::Version::Http2,
                _ => http::Version::Http1,
            };
            let result = http::serve(
                t.client,
                t.upstream,
                t.connect,
                Arc::new(conn),
                version,
                version,
            )
            .await
            .map_err(ProxyError::from);
            Served {
                protocol: Some(protocol),
                tls: Some(t.info),
                result,
            }
        }
        Err(failed) => {
            let tls::Failed { error, info } = *failed;
            tls_failed(&mut conn, protocol, error, info).await
        }
    }
}

/// A TLS handshake that failed: a `tls_failure` record (side, reason, what to do), the
/// counters, and the connection's end.
async fn tls_failed(
    conn: &mut http::records::Conn,
    protocol: Protocol,
    e: tls::TlsError,
    info: crate::audit::record::Tls,
) -> Served {
    let (side, reason) = (e.side(), e.to_string());
    crate::metrics::get()
        .tls_failures
        .with_label_values(&[side, e.reason_class()])
        .inc();
    tracing::warn!(side, %reason, sni = ?info.sni, "a TLS handshake failed");
    conn.connection.tls = Some(info.clone());
    let process = conn.process();
    conn.parts.stats.note_tls_failure(side, &process, &reason);
    conn.record(crate::audit::record::Event::TlsFailure(Box::new(
        crate::audit::record::TlsFailureEvent {
            time: now_rfc3339(),
            side: side.to_owned(),
            reason,
            process,
            connection: conn.connection.clone(),
        },
    )))
    .await;
    Served {
        protocol: Some(protocol),
        tls: Some(info),
        result: Err(e.into()),
    }
}
