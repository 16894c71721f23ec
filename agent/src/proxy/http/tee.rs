//! The response body on its way to the client, with a copy of every data frame for the
//! observer, and its last byte held until the records are written (synced, in sync mode).
#![forbid(unsafe_code)]

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::{mpsc, oneshot};

/// The response body on its way to the client, with a copy of every data frame sent to the
/// observer. The channel is unbounded so that the client never waits on the audit, with one
/// exception, in both durability modes: the body's last byte (the frame that completes a
/// known length, or the end of a chunked or streamed body) is held until the observer has
/// recorded what the response carried (synced, in sync mode). Nothing the client fully saw
/// is then missing from the trail, even if the agent is killed, and only the end waits.
pub struct Tee {
    inner: Incoming,
    tx: Option<mpsc::UnboundedSender<Chunk>>,
    /// Body bytes still to come, when the length is known.
    remaining: Option<u64>,
    /// The final frame, waiting for the release.
    held: Option<Frame<Bytes>>,
    release: Option<oneshot::Receiver<()>>,
    /// The end was announced to the observer (and released, if it was held).
    ended: bool,
}

impl Tee {
    pub fn new(inner: Incoming, tx: mpsc::UnboundedSender<Chunk>) -> Self {
        let remaining = inner.size_hint().exact();
        Tee {
            inner,
            tx: Some(tx),
            remaining,
            held: None,
            release: None,
            ended: false,
        }
    }

    /// Tells the observer the body is over, and arranges to wait for its records.
    fn announce_end(&mut self) {
        self.ended = true;
        let Some(tx) = self.tx.take() else {
            return;
        };
        let (release, wait) = oneshot::channel();
        if tx.send(Chunk::End(release)).is_ok() {
            self.release = Some(wait);
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // Dropped before its end: the client is gone (and with it, the upstream stream).
        if !self.ended
            && let Some(tx) = self.tx.take()
        {
            let _ = tx.send(Chunk::ClientGone);
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(wait) = self.release.as_mut() {
            // A gone observer (Err) releases too: the client must never hang on the audit.
            let _ = std::task::ready!(Pin::new(wait).poll(cx));
            self.release = None;
            return Poll::Ready(self.held.take().map(Ok));
        }
        if self.ended && self.remaining == Some(0) {
            return Poll::Ready(None);
        }
        match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(tx) = &self.tx {
                        let _ = tx.send(Chunk::Trailers(trailers.clone()));
                    }
                    // Trailers are the body's last frame: hyper ends the stream with them and
                    // polls no more, so they are what waits for the records.
                    if !self.ended {
                        self.announce_end();
                        if self.release.is_some() {
                            self.held = Some(frame);
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if let Some(tx) = &self.tx {
                        let _ = tx.send(Chunk::Data(data.clone()));
                    }
                    if let Some(remaining) = self.remaining.as_mut() {
                        *remaining = remaining.saturating_sub(len);
                        // The last byte ends the body unless trailers follow (HTTP/2:
                        // the stream is still open); then the end is theirs to hold.
                        if *remaining == 0 && !self.ended && self.inner.is_end_stream() {
                            self.announce_end();
                            if self.release.is_some() {
                                self.held = Some(frame);
                                cx.waker().wake_by_ref();
                                return Poll::Pending;
                            }
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            None => {
                if !self.ended {
                    self.announce_end();
                    if self.release.is_some() {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                self.tx = None;
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.held.is_none() && self.release.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the tee hands the observer: the response's bytes, then its end, which waits to be
/// released when the body holds its last byte for the records (synced, in sync mode).
pub enum Chunk {
    Data(Bytes),
    /// The response's trailers (HTTP/2, or a chunked HTTP/1.1 body), before its end.
    Trailers(hyper::HeaderMap),
    End(oneshot::Sender<()>),
    /// The client went away before the body ended (hyper dropped it).
    ClientGone,
}
