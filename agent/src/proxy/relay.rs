//! The raw TCP relay: bytes both ways, counted as they pass, half-closes carried over.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const BUF: usize = 16 * 1024;

/// Bytes relayed so far. Kept outside the relay future so that the counts survive an error or
/// a cancellation and still reach the record.
#[derive(Debug, Default)]
pub struct Counts {
    /// Client to upstream.
    pub req: AtomicU64,
    /// Upstream to client.
    pub resp: AtomicU64,
}

/// A stream that counts the bytes read from it (the client's requests) and written to it
/// (the responses), for protocols the proxy parses instead of relaying blindly.
pub struct Counted<S> {
    inner: S,
    counts: std::sync::Arc<Counts>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, counts: std::sync::Arc<Counts>) -> Self {
        Counted { inner, counts }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counts.req.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.counts.resp.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    // Passed through, so that hyper writes a response's head and body in one call instead of
    // copying the body into its header buffer (see `detect::Rewind`).
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.counts.resp.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies until both directions have finished. When one side finishes sending, the other
/// side's write half is shut down, so request/response protocols that half-close still work.
pub async fn relay<C, U>(client: C, upstream: U, counts: &Counts) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (client_r, client_w) = tokio::io::split(client);
    let (up_r, up_w) = tokio::io::split(upstream);
    tokio::try_join!(
        pump(client_r, up_w, &counts.req),
        pump(up_r, client_w, &counts.resp)
    )?;
    Ok(())
}

async fn pump<R, W>(mut from: R, mut to: W, count: &AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(n) => n,
            // A peer that closes with data still unread by it resets instead of finishing
            // (a TLS server answered by a late close_notify, say): the end of its direction,
            // not a failure of the relay.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            // The other side may be gone already; there is nothing left to tell it.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Says `bytes`, then resets.
    struct Resetting(Option<&'static [u8]>);

    impl AsyncRead for Resetting {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(match self.0.take() {
                Some(b) => {
                    buf.put_slice(b);
                    Ok(())
                }
                None => Err(std::io::ErrorKind::ConnectionReset.into()),
            })
        }
    }

    #[tokio::test]
    async fn a_reset_ends_its_direction_and_everything_before_it_arrives() {
        let (mut theirs, ours) = tokio::io::duplex(64);
        let count = AtomicU64::new(0);
        pump(Resetting(Some(b"bye")), ours, &count).await.unwrap();
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        assert_eq!(count.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn relays_both_ways_and_counts() {
        let (mut client, client_side) = tokio::io::duplex(64);
        let (upstream_side, mut server) = tokio::io::duplex(64);
        let counts = Counts::default();
        let relay = relay(client_side, upstream_side, &counts);
        let peers = async {
            client.write_all(b"hello gateway").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello gateway");
            let big = vec![7u8; 100_000];
            // Concurrently: the pipes hold 64 bytes, so the writer needs a reader.
            let send = async {
                server.write_all(&big).await.unwrap();
                server.shutdown().await.unwrap();
            };
            let mut back = Vec::new();
            let (_, read) = tokio::join!(send, client.read_to_end(&mut back));
            read.unwrap();
            assert_eq!(back, big);
        };
        let (r, ()) = tokio::join!(relay, peers);
        r.unwrap();
        assert_eq!(counts.req.load(Ordering::Relaxed), 13);
        assert_eq!(counts.resp.load(Ordering::Relaxed), 100_000);
    }
}
