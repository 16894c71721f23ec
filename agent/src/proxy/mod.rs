//! The proxy: accepts redirected connections, ties each to its origin, relays it to the
//! original destination, and records it.
//!
//! A connection whose origin the kernel did not record did not come through the redirect; it
//! is refused and the refusal recorded, so the agent is never an open relay.
#![forbid(unsafe_code)]

pub mod relay;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
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
use crate::process;

/// Waits between origin look-ups. The kernel stores the origin before the client's final
/// handshake ACK is sent, so the first look-up should hit; the retries only cover scheduling
/// oddities and cost nothing on the normal path.
const ORIGIN_RETRIES: [Duration; 3] = [
    Duration::from_millis(1),
    Duration::from_millis(5),
    Duration::from_millis(20),
];

pub const REFUSED_NO_ORIGIN: &str = "no redirect origin: the connection did not come through mcptrail's redirect (the proxy is not an open relay)";
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
    pub proc_root: PathBuf,
}

struct Shared {
    interceptor: Arc<Interceptor>,
    audit: AuditLog,
    local: SocketAddr,
    settings: Settings,
}

pub struct Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind { addr, source })
}

impl Proxy {
    pub fn new(
        listener: TcpListener,
        interceptor: Arc<Interceptor>,
        audit: AuditLog,
        settings: Settings,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Proxy {
            listener,
            shared: Arc::new(Shared {
                interceptor,
                audit,
                local,
                settings,
            }),
        })
    }

    /// Accepts until `stop_accepting` fires. Connection tasks are spawned on `tracker` and end
    /// when their peers close or when `cut` fires.
    pub async fn serve(
        self,
        stop_accepting: CancellationToken,
        cut: CancellationToken,
        tracker: TaskTracker,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = stop_accepting.cancelled() => break,
                r = self.listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let shared = self.shared.clone();
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
        drop(client);
        let event = Event::Refused(RefusedEvent {
            time: now_rfc3339(),
            client: peer.to_string(),
            proxy: self.local.to_string(),
            reason: reason.to_owned(),
        });
        if let Err(e) = self.audit.append(event).await {
            tracing::error!(error = %e, %peer, "could not record a refused connection");
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr, cut: CancellationToken) {
        let started = chrono::Utc::now();
        let t0 = Instant::now();
        let Some(origin) = self.find_origin(peer).await else {
            return self.refuse(client, peer, REFUSED_NO_ORIGIN).await;
        };
        let dst = origin_destination(&origin);
        if dst == self.local {
            return self.refuse(client, peer, REFUSED_SELF).await;
        }
        // Read /proc at once: the caller may be short-lived.
        let proc_root = self.settings.proc_root.clone();
        let process = tokio::task::spawn_blocking(move || process::identify(&origin, &proc_root))
            .await
            .expect("identify does not panic");

        let counts = relay::Counts::default();
        let outcome = match tokio::time::timeout(
            self.settings.connect_timeout,
            TcpStream::connect(dst),
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
                let _ = upstream.set_nodelay(true);
                let _ = client.set_nodelay(true);
                tokio::select! {
                    r = relay::relay(client, upstream, &counts) => match r {
                        Ok(()) => Outcome { status: Status::Closed, detail: None },
                        Err(e) => Outcome { status: Status::RelayError, detail: Some(e.to_string()) },
                    },
                    _ = cut.cancelled() => Outcome {
                        status: Status::AgentShutdown,
                        detail: Some("the agent stopped while the connection was open".into()),
                    },
                }
            }
        };
        let ended = chrono::Utc::now();
        let event = Event::Connection(ConnectionEvent {
            time: now_rfc3339(),
            connection: Connection {
                client: peer.to_string(),
                original_dst: dst.to_string(),
                proxy: self.local.to_string(),
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
            process,
        });
        if let Err(e) = self.audit.append(event).await {
            tracing::error!(error = %e, %peer, %dst, "could not record a connection");
        }
    }
}
