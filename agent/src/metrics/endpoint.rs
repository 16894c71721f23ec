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

/// Scrapers served at once: Prometheus needs one; any local user can connect, and must not
/// be able to hold the agent's file descriptors.
const MAX_CONNECTIONS: usize = 8;
/// A connection that has not sent its request head by then is closed.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves scrapes until `stop`; each reads `source` off the runtime's worker threads, since it
/// walks `/proc` and the state directory.
pub async fn serve(listener: TcpListener, source: Source, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
        // Past the limit the connection is closed at once (dropped), not queued.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("too many metrics connections; one closed");
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| answer(req, source.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn scrape(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn idle_connections_past_the_limit_are_closed_and_scrapes_go_on() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(Scrape::default), stop.clone()));

        let answer = scrape(addr, "/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("mcptrail_build_info"), "{answer}");
        assert!(scrape(addr, "/").await.starts_with("HTTP/1.1 404"));

        // Connections that send nothing hold every slot; one more is closed at once.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("the extra connection is closed, not left waiting")
            .unwrap_or(0);
        assert_eq!(n, 0);
        // Freed slots serve scrapes again.
        drop(idle);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(scrape(addr, "/metrics").await.starts_with("HTTP/1.1 200"));
        stop.cancel();
    }
}
