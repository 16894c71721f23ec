//! `GET /metrics` over HTTP/1.1 for Prometheus; anything else is a 404 that says where to look.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{MetricsError, Scrape, render};

/// The text format's content type, as Prometheus asks for it.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub type Source = Arc<dyn Fn() -> Scrape + Send + Sync>;

/// Binds the endpoint (a failure stops the start, with the fix in the message).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves scrapes until `stop`; each reads `source` off the runtime's worker threads, since it
/// walks `/proc` and the state directory.
pub async fn serve(listener: TcpListener, source: Source, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a metrics connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let source = source.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, source.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "a metrics connection ended with an error");
            }
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    source: Source,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "mcptrail serves Prometheus metrics on /metrics only\n".into(),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".into(),
        ));
    }
    let rendered = tokio::task::spawn_blocking(move || render(&source()))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    Ok(match rendered {
        Ok(text) => reply(StatusCode::OK, CONTENT_TYPE, text),
        Err(e) => {
            tracing::error!(error = %e, "rendering the metrics failed");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            )
        }
    })
}
