//! The gateway side of one client connection: an HTTP/1.1 client that starts on the
//! connection the proxy opened and, when the gateway closes it between requests (as HTTP/1.1
//! servers may), sends the next request over a new one.
#![forbid(unsafe_code)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

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

pub struct Gateway {
    connect: Connect,
    sender: Option<hyper::client::conn::http1::SendRequest<ProxyBody>>,
    /// The connection tasks still running (one per live gateway connection, at most a few:
    /// finished ones are reaped at each reconnect). Dropping the set aborts them.
    tasks: tokio::task::JoinSet<()>,
}

impl Gateway {
    pub async fn new(first: BoxIo, connect: Connect) -> Result<Self, GatewayError> {
        let mut g = Gateway {
            connect,
            sender: None,
            tasks: tokio::task::JoinSet::new(),
        };
        g.attach(first).await?;
        Ok(g)
    }

    /// Connection tasks alive now (for the test that they do not grow with reconnects).
    pub fn live_tasks(&self) -> usize {
        self.tasks.len()
    }

    async fn attach(&mut self, io: BoxIo) -> Result<(), GatewayError> {
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
        self.sender = Some(sender);
        Ok(())
    }

    pub async fn send(
        &mut self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, GatewayError> {
        for _ in 0..2 {
            if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
                let io = (self.connect)().await.map_err(GatewayError::Reconnect)?;
                self.attach(io).await?;
            }
            let Some(sender) = self.sender.as_mut() else {
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
