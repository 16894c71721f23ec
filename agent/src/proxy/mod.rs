//! The proxy: accepts redirected connections, ties each to its origin, relays it to the
//! original destination, and records it.
//!
//! A connection whose origin the kernel did not record did not come through the redirect; it
//! is refused and the refusal recorded, so the agent is never an open relay.
#![forbid(unsafe_code)]

pub mod correlate;
pub mod http;
pub mod relay;
mod sse_props;
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
}

pub struct Settings {
    pub connect_timeout: Duration,
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
    /// Hold each response's last byte until its records are durable (sync durability).
    pub hold_end: bool,
    pub on_audit_failure: OnAuditFailure,
}

/// What to do with traffic when the trail cannot be written (a full disk, an I/O error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
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
    /// Records that could not be written (the trail failed).
    pub audit_losses: AtomicU64,
    /// Calls and connections refused because the trail could not be written.
    pub blocked: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        [
            ("accepted", &self.accepted),
            ("origin_misses", &self.origin_misses),
            ("self_calls_refused", &self.self_calls),
            ("upstream_failures", &self.upstream_failures),
            ("open_connections", &self.open),
            ("audit_losses", &self.audit_losses),
            ("blocked_by_audit_failure", &self.blocked),
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

/// How long to wait for a client's first bytes before treating the connection as one where
/// the server speaks first (relayed raw).
const SNIFF_WAIT: Duration = Duration::from_millis(500);

/// Whether the client opens with an HTTP/1.x request line. Peeks, so nothing is consumed.
async fn sniff_http(client: &TcpStream) -> bool {
    let mut buf = [0u8; 8];
    match tokio::time::timeout(SNIFF_WAIT, client.peek(&mut buf)).await {
        Ok(Ok(n)) => http::looks_like_http(&buf[..n]),
        _ => false,
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
        if self.settings.on_audit_failure == OnAuditFailure::Block && !self.audit.healthy() {
            self.stats.blocked.fetch_add(1, Ordering::Relaxed);
            // An HTTP client gets told why, not just a closed connection.
            let mut client = client;
            if sniff_http(&client).await {
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
        let process = tokio::task::spawn_blocking(move || identifier.identify(&origin))
            .await
            .expect("identify does not panic");

        let shared_process = Arc::new(std::sync::RwLock::new(process));
        let counts = Arc::new(relay::Counts::default());
        let outcome = match tokio::time::timeout(
            self.settings.connect_timeout,
            upstream::connect(dst, self.settings.mark),
        )
        .await
        {
            Err(_) => Outcome {
                status: Status::UpstreamConnectFailed,
                detail: Some(format!(
                    "timed out after {:?}",
                    self.settings.connect_timeout
                )),
            },
            Ok(Err(e)) => Outcome {
                status: Status::UpstreamConnectFailed,
                detail: Some(e.to_string()),
            },
            Ok(Ok(upstream)) => {
                let _ = client.set_nodelay(true);
                let http = sniff_http(&client).await;
                let conn_info = Connection {
                    client: peer.to_string(),
                    original_dst: dst.to_string(),
                    proxy: proxy_addr.clone(),
                    target: target.clone(),
                };
                let relayed = async {
                    if http {
                        let n = self.connections.fetch_add(1, Ordering::Relaxed);
                        let conn = Arc::new(http::Conn::new(
                            http::ConnParts {
                                audit: self.audit.clone(),
                                on_failure: self.settings.on_audit_failure,
                                stats: self.stats.clone(),
                                capture_limit: self.settings.capture_limit,
                                tracker: self.tracker.clone(),
                                correlator: self.correlator.clone(),
                                hold_end: self.settings.hold_end,
                                verifier: self.settings.verifier.clone(),
                                policy: self.settings.policy.clone(),
                                approvals: self.settings.approvals.clone(),
                            },
                            shared_process.clone(),
                            conn_info,
                            format!("{}.{n}", self.run_id),
                        ));
                        let client = relay::Counted::new(client, counts.clone());
                        http::serve(client, upstream, dst, self.settings.mark, conn).await
                    } else {
                        relay::relay(client, upstream, &counts)
                            .await
                            .map_err(|e| e.to_string())
                    }
                };
                tokio::select! {
                    r = relayed => match r {
                        Ok(()) => Outcome { status: Status::Closed, detail: None },
                        Err(e) => Outcome { status: Status::RelayError, detail: Some(e) },
                    },
                    _ = cut.cancelled() => Outcome {
                        status: Status::AgentShutdown,
                        detail: Some("the agent stopped while the connection was open".into()),
                    },
                }
            }
        };
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
        }));
        if let Err(e) = self.audit.append(event).await {
            self.stats.audit_losses.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, %peer, %dst, "could not record a connection: it is missing from the trail");
        }
    }
}
