//! A client that stops reading what the proxy sends it (a response, or the ACKs of a flood of
//! HTTP/2 SETTINGS frames) would hold its connection, a task and a gateway connection for as
//! long as it likes: the proxy's writes to it would wait for ever. `StallGuard` fails a write
//! that has made no progress for the configured time, which ends the connection (recorded
//! as refused).
#![forbid(unsafe_code)]

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The error a stalled write fails with (inside an `io::Error` of kind `TimedOut`).
#[derive(Debug, thiserror::Error)]
#[error(
    "the client read nothing the proxy sent it for {0:?}: cut off (`[gateway] stalled_client_secs`)"
)]
pub struct Stalled(pub Duration);

pub struct StallGuard<S> {
    inner: S,
    limit: Duration,
    /// Armed while a write is waiting; reset by any progress.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> StallGuard<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        StallGuard {
            inner,
            limit,
            timer: None,
        }
    }

    /// A write that could not go on: arm the timer, or fail if it has run out.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                Stalled(limit),
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What every stalled write's message ends with.
const MARK: &str = "(`[gateway] stalled_client_secs`)";

/// Whether an error (from hyper, say) was a stalled client's. h2 keeps an I/O error's kind
/// and text but not the error itself, so the text counts too.
pub fn is_stalled(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        let ours = c
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.get_ref().is_some_and(|i| i.is::<Stalled>()));
        if ours || c.to_string().contains(MARK) {
            return true;
        }
        cause = c.source();
    }
    false
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.blocked(cx).map(Err),
            done => {
                self.timer = None;
                done
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.blocked(cx).map(Err),
            done => {
                self.timer = None;
                done
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.blocked(cx).map(Err),
            done => {
                self.timer = None;
                done
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn a_reader_that_stops_fails_the_write_and_one_that_reads_does_not() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut guarded = StallGuard::new(ours, Duration::from_millis(200));
        // Slow but reading: every write goes through.
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            let mut got = 0;
            while got < 4096 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                got += theirs.read(&mut buf).await.unwrap();
            }
            theirs
        });
        guarded.write_all(&[7u8; 4096]).await.unwrap();
        // Not reading any more: the write fails once 200 ms pass without progress.
        let _theirs = reader.await.unwrap();
        let err = guarded.write_all(&[7u8; 8192]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(is_stalled(&err));
        assert!(err.to_string().contains("stalled_client_secs"));
    }
}
