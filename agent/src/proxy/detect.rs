//! What a redirected connection speaks, from its first bytes. The proxy reads (never peeks)
//! until the bytes decide, however slowly or finely split they come, bounded by a timeout;
//! what it read is replayed to whichever handler takes the connection. A client cannot pass
//! for opaque by sending its request line a byte at a time.
#![forbid(unsafe_code)]

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A method token longer than this is not HTTP (the longest registered one is 17 bytes).
const MAX_METHOD: usize = 32;
/// Empty lines a client may send before its request line (RFC 9112 §2.2 asks servers to
/// ignore at least one).
const MAX_LEADING_NEWLINES: usize = 8;
/// Never read more than this to decide.
pub const MAX_DECIDE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// An HTTP/1.x request line (or something shaped like one: hyper then judges it).
    Http1,
    /// A TLS record carrying a handshake.
    Tls,
    /// The HTTP/2 prior-knowledge preface (h2c).
    H2,
    /// Anything else.
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Tls => "tls",
            Protocol::H2 => "h2c",
            Protocol::Opaque => "opaque",
        }
    }
}

/// The verdict on the bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Is(Protocol),
    /// Not decided yet: more bytes are needed.
    NeedMore,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies a connection's first bytes. Pure. Anything shaped like an HTTP/1 request line
/// (a method token and a space) is HTTP: a malformed one is then refused by the HTTP parser,
/// never relayed unseen.
pub fn classify(first: &[u8]) -> Verdict {
    let leading = first
        .iter()
        .take(MAX_LEADING_NEWLINES * 2)
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let bytes = &first[leading..];
    if bytes.is_empty() {
        return if leading >= MAX_LEADING_NEWLINES * 2 {
            Verdict::Is(Protocol::Opaque)
        } else {
            Verdict::NeedMore
        };
    }
    if leading == 0 {
        let n = bytes.len().min(H2_PREFACE.len());
        if bytes[..n] == H2_PREFACE[..n] {
            return if n == H2_PREFACE.len() {
                Verdict::Is(Protocol::H2)
            } else {
                Verdict::NeedMore
            };
        }
        // A TLS handshake record: type 22, then major version 3.
        if bytes[0] == 0x16 {
            return match bytes.get(1) {
                None => Verdict::NeedMore,
                Some(3) => Verdict::Is(Protocol::Tls),
                Some(_) => Verdict::Is(Protocol::Opaque),
            };
        }
    }
    let token = bytes.iter().take_while(|b| is_tchar(**b)).count();
    match bytes.get(token) {
        Some(b' ') if token > 0 => Verdict::Is(Protocol::Http1),
        None if token < MAX_METHOD => Verdict::NeedMore,
        _ => Verdict::Is(Protocol::Opaque),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(
        "the client sent {got} bytes and then nothing for {waited:?}: too little to tell its protocol, so it was refused"
    )]
    Timeout { got: usize, waited: Duration },
    #[error("the client closed the connection after {got} bytes, before its protocol was known")]
    Closed { got: usize },
    #[error("reading the client's first bytes failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads from `stream` until its protocol is known or `timeout` passes since the start.
/// Returns the protocol and every byte read (to replay).
pub async fn read_first<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(Protocol, Vec<u8>), DetectError> {
    let mut buf = Vec::with_capacity(MAX_DECIDE);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Verdict::Is(p) = classify(&buf) {
            return Ok((p, buf));
        }
        if buf.len() >= MAX_DECIDE {
            return Ok((Protocol::Opaque, buf));
        }
        let mut chunk = [0u8; MAX_DECIDE];
        let want = MAX_DECIDE - buf.len();
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Err(_) => {
                return Err(DetectError::Timeout {
                    got: buf.len(),
                    waited: timeout,
                });
            }
            Ok(r) => r?,
        };
        if n == 0 {
            return Err(DetectError::Closed { got: buf.len() });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A stream whose first reads replay bytes already taken from it.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Rewind {
            prefix,
            at: 0,
            inner,
        }
    }

    /// Puts `bytes` back ahead of whatever is still to be replayed: what a reader took and
    /// did not use (hyper's read buffer when a connection is parked) is read again first.
    pub fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut prefix = Vec::with_capacity(bytes.len() + self.prefix.len() - self.at);
        prefix.extend_from_slice(bytes);
        prefix.extend_from_slice(&self.prefix[self.at..]);
        self.prefix = prefix;
        self.at = 0;
    }

    /// Whether bytes are waiting to be replayed.
    pub fn has_unread(&self) -> bool {
        self.at < self.prefix.len()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    // Vectored writes pass through: without them hyper copies every response body into its
    // header buffer ("flatten"), which then keeps the size of the largest answer for the
    // connection's life.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    /// Bytes put back are read first, before what was still to be replayed, then the stream.
    #[tokio::test]
    async fn unread_bytes_come_before_the_rest_of_the_prefix_and_the_stream() {
        use tokio::io::AsyncReadExt as _;
        let (mut far, near) = tokio::io::duplex(64);
        far.write_all(b" stream").await.unwrap();
        drop(far);
        let mut r = Rewind::new(b"prefix".to_vec(), near);
        let mut two = [0u8; 2];
        r.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"pr");
        r.unread(b"un");
        r.unread(b"");
        assert!(r.has_unread());
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"unefix stream");
        assert!(!r.has_unread());
        r.unread(b"x");
        let mut one = [0u8; 1];
        r.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
        assert!(!r.has_unread());
    }

    /// The client's side as the proxy stacks it (counted, stall-guarded, rewound) writes
    /// vectored over a TCP socket, so hyper queues a response's body instead of copying it
    /// into its header buffer, and the bytes of a vectored write are counted.
    #[tokio::test]
    async fn the_client_stack_writes_vectored_and_counts_it() {
        use crate::proxy::relay::{Counted, Counts};
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut theirs, _) = listener.accept().await.unwrap();
        let counts = std::sync::Arc::new(Counts::default());
        let mut stack = Rewind::new(
            b"GET".to_vec(),
            crate::proxy::stall::StallGuard::new(
                Counted::new(ours, counts.clone()),
                std::time::Duration::from_secs(5),
            ),
        );
        assert!(stack.is_write_vectored());
        let bufs = [
            std::io::IoSlice::new(b"HTTP/1.1 200 OK\r\n\r\n"),
            std::io::IoSlice::new(b"body"),
        ];
        let n = stack.write_vectored(&bufs).await.unwrap();
        assert!(n > 0);
        assert_eq!(
            counts.resp.load(std::sync::atomic::Ordering::Relaxed),
            n as u64
        );
        let mut got = vec![0u8; n];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], &b"HTTP/1.1 200 OK\r\n\r\nbody"[..n]);
    }

    #[test]
    fn protocols_are_told_apart() {
        assert_eq!(
            classify(b"POST /mcp HTTP/1.1\r\n"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(classify(b"GET / HTTP/1.0"), Verdict::Is(Protocol::Http1));
        assert_eq!(
            classify(b"\r\nGET / HTTP/1.1"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(
            classify(b"PROPFIND /x HTTP/1.1"),
            Verdict::Is(Protocol::Http1),
            "any method"
        );
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00\x01"),
            Verdict::Is(Protocol::Tls)
        );
        assert_eq!(classify(H2_PREFACE), Verdict::Is(Protocol::H2));
        assert_eq!(
            classify(b"\x00hello, not http"),
            Verdict::Is(Protocol::Opaque)
        );
        assert_eq!(classify(b"\x16\x07"), Verdict::Is(Protocol::Opaque));
        assert_eq!(classify(&[b'A'; 40]), Verdict::Is(Protocol::Opaque));
    }

    #[test]
    fn a_partial_first_line_waits_for_more() {
        for partial in [
            &b""[..],
            b"P",
            b"PO",
            b"POST",
            b"\r\n",
            b"PRI * HTTP/2",
            b"\x16",
        ] {
            assert_eq!(classify(partial), Verdict::NeedMore, "{partial:?}");
        }
        // Every prefix of a request line either waits or says HTTP; none says opaque.
        let line = b"DELETE /mcp HTTP/1.1\r\n";
        for n in 0..line.len() {
            assert_ne!(classify(&line[..n]), Verdict::Is(Protocol::Opaque), "{n}");
        }
    }

    #[tokio::test]
    async fn a_request_sent_a_byte_at_a_time_with_pauses_is_http() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for b in b"POST /mcp HTTP/1.1\r\n" {
                client.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client
        });
        let (p, read) = read_first(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http1);
        assert_eq!(read, b"POST ");
        // What was read comes first, then the rest.
        let mut rewound = Rewind::new(read, server);
        let _client = writer.await.unwrap();
        let mut line = vec![0u8; 20];
        rewound.read_exact(&mut line).await.unwrap();
        assert_eq!(line, b"POST /mcp HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn silence_is_refused_after_the_timeout_and_an_early_close_too() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"P").await.unwrap();
        let err = read_first(&mut server, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, DetectError::Timeout { got: 1, .. }), "{err}");
        drop(client);
        let err = read_first(&mut server, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, DetectError::Closed { got: 0 }), "{err}");
    }
}
