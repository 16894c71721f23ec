//! Whether a plaintext gateway speaks HTTP/2 with prior knowledge (h2c). A client that opens
//! with the HTTP/2 preface is served in HTTP/2 either way; the gateway gets HTTP/2 when it
//! speaks it, else HTTP/1.1 (each stream a request of its own). Found by a probe connection
//! (the preface and an empty SETTINGS frame; an HTTP/2 server answers with a SETTINGS frame of
//! its own), remembered per gateway for a while so that most connections pay nothing.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::gateway::Connect;
use crate::proxy::detect::H2_PREFACE;

/// How long a verdict holds before the gateway is probed again (it may be upgraded).
const REMEMBERED: Duration = Duration::from_secs(300);
/// How long a probe that could not tell (no connection, no answer in time) holds: briefly,
/// so that a gateway restarting is not taken for HTTP/1.1 for minutes.
const UNSURE: Duration = Duration::from_secs(10);
/// How long the probe waits for the gateway's first bytes.
const PROBE_WAIT: Duration = Duration::from_secs(3);

/// What a gateway's first bytes, after the proxy's preface, say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A SETTINGS frame: HTTP/2.
    Http2,
    /// Anything else (an HTTP/1.1 error, a close): not HTTP/2.
    Http1,
    /// Too few bytes to tell yet.
    NeedMore,
}

/// A pure look at the first bytes a gateway answered the preface with.
pub fn classify(first: &[u8]) -> Verdict {
    if first.len() < 9 {
        // An HTTP/1 answer starts "HTTP/": no frame header does (its type byte would be 'P').
        if first.len() >= 4 && first.starts_with(b"HTTP") {
            return Verdict::Http1;
        }
        return Verdict::NeedMore;
    }
    // The frame header: 24-bit length, type (4: SETTINGS), flags, stream 0.
    if first[3] == 4 && first[5..9] == [0, 0, 0, 0] && first[4] & 1 == 0 {
        Verdict::Http2
    } else {
        Verdict::Http1
    }
}

/// The verdicts so far, per gateway address.
pub struct H2cProbe {
    /// The verdict, and until when it holds.
    seen: Mutex<lru::LruCache<SocketAddr, (bool, Instant)>>,
}

impl Default for H2cProbe {
    fn default() -> Self {
        H2cProbe {
            seen: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(1024).expect("not zero"),
            )),
        }
    }
}

impl H2cProbe {
    /// Whether `dst` speaks h2c: remembered, or probed now over a connection of its own.
    pub async fn speaks_h2c(&self, dst: SocketAddr, connect: &Connect) -> bool {
        if let Some((yes, until)) = self.seen.lock().expect("h2c cache lock").get(&dst).copied()
            && Instant::now() < until
        {
            return yes;
        }
        let found = probe(connect).await;
        tracing::debug!(%dst, h2c = ?found, "probed the gateway for HTTP/2 with prior knowledge");
        let (yes, holds) = match found {
            Some(yes) => (yes, REMEMBERED),
            // Unsure: HTTP/1.1, which any HTTP gateway reads, for a little while.
            None => (false, UNSURE),
        };
        self.seen
            .lock()
            .expect("h2c cache lock")
            .put(dst, (yes, Instant::now() + holds));
        yes
    }
}

/// Some(verdict), or None when the gateway could not be reached or said nothing in time.
async fn probe(connect: &Connect) -> Option<bool> {
    let run = async {
        let mut io = connect().await?;
        io.write_all(H2_PREFACE).await?;
        // An empty SETTINGS frame: the rest of the client's preface.
        io.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?;
        io.flush().await?;
        let mut first = Vec::with_capacity(16);
        let mut buf = [0u8; 64];
        loop {
            let n = io.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(false);
            }
            first.extend_from_slice(&buf[..n]);
            match classify(&first) {
                Verdict::Http2 => return Ok(true),
                Verdict::Http1 => return Ok(false),
                Verdict::NeedMore => {}
            }
        }
    };
    tokio::time::timeout(PROBE_WAIT, run).await.ok()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settings_frame_is_http2_and_an_http1_answer_is_not() {
        // hyper's server preface: SETTINGS with a few parameters.
        assert_eq!(
            classify(&[0, 0, 12, 4, 0, 0, 0, 0, 0, 0, 3]),
            Verdict::Http2
        );
        assert_eq!(classify(b"HTTP/1.1 400 Bad Request\r\n"), Verdict::Http1);
        assert_eq!(classify(b"HTT"), Verdict::NeedMore);
        assert_eq!(classify(&[0, 0, 0]), Verdict::NeedMore);
        // A SETTINGS ACK is not a server preface; nor is a frame on a stream.
        assert_eq!(classify(&[0, 0, 0, 4, 1, 0, 0, 0, 0]), Verdict::Http1);
        assert_eq!(classify(&[0, 0, 0, 4, 0, 0, 0, 0, 1]), Verdict::Http1);
    }
}
