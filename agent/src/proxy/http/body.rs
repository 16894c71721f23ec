//! Request and response bodies: read up to a bound, decoded per `Content-Encoding` for the
//! rules and the record, re-encoded when a wire rule rewrites them. What is forwarded is the
//! bytes as they came unless a rule rewrote them.
#![forbid(unsafe_code)]

use std::pin::Pin;
use std::task::{Context, Poll};

use async_compression::tokio::bufread::{
    BrotliDecoder, BrotliEncoder, DeflateDecoder, GzipDecoder, GzipEncoder, ZlibDecoder,
    ZlibEncoder, ZstdDecoder, ZstdEncoder,
};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_ENCODING, HeaderMap};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt as _};

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(
        "the content encoding {0:?} is not one mcptrail reads (gzip, deflate, br, zstd, identity)"
    )]
    UnknownEncoding(String),
    #[error("the {encoding} body does not decode: {source}")]
    Decode {
        encoding: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the body is larger than the parse limit ({limit} bytes{}); raise --capture-limit to read bigger ones",
        if *.decoded { ", decoded" } else { "" }
    )]
    TooLarge { limit: usize, decoded: bool },
    #[error("reading the body failed: {0}")]
    Read(#[from] hyper::Error),
    #[error("re-encoding the rewritten body as {encoding} failed: {source}")]
    Encode {
        encoding: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A content coding the proxy reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    /// The zlib format, as HTTP's `deflate` means; raw deflate is accepted on decoding too,
    /// since some senders use it.
    Deflate,
    Br,
    Zstd,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
            Encoding::Br => "br",
            Encoding::Zstd => "zstd",
        }
    }
}

/// The codings of a `Content-Encoding` header (every line of it), in the order the sender
/// applied them; `identity` is no coding. Pure.
pub fn encodings(headers: &HeaderMap) -> Result<Vec<Encoding>, BodyError> {
    let mut out = Vec::new();
    for value in headers.get_all(CONTENT_ENCODING) {
        let text = value.to_str().map_err(|_| {
            BodyError::UnknownEncoding(String::from_utf8_lossy(value.as_bytes()).into())
        })?;
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            out.push(match token.to_ascii_lowercase().as_str() {
                "gzip" | "x-gzip" => Encoding::Gzip,
                "deflate" => Encoding::Deflate,
                "br" => Encoding::Br,
                "zstd" => Encoding::Zstd,
                "identity" => continue,
                _ => return Err(BodyError::UnknownEncoding(token.to_owned())),
            });
        }
    }
    Ok(out)
}

/// Undoes `codings` (applied in that order), never producing more than `limit` bytes: a
/// small body that inflates past the parse limit (a decompression bomb) stops there.
pub async fn decode(data: Bytes, codings: &[Encoding], limit: usize) -> Result<Bytes, BodyError> {
    let mut data = data;
    for &coding in codings.iter().rev() {
        data = decode_one(&data, coding, limit).await?;
    }
    Ok(data)
}

async fn decode_one(data: &[u8], coding: Encoding, limit: usize) -> Result<Bytes, BodyError> {
    let result = match coding {
        Encoding::Gzip => {
            let mut d = GzipDecoder::new(data);
            d.multiple_members(true);
            read_limited(d, limit).await
        }
        Encoding::Deflate => match read_limited(ZlibDecoder::new(data), limit).await {
            Err(_) => read_limited(DeflateDecoder::new(data), limit).await,
            ok => ok,
        },
        Encoding::Br => read_limited(BrotliDecoder::new(data), limit).await,
        Encoding::Zstd => read_limited(ZstdDecoder::new(data), limit).await,
    };
    match result {
        Ok(Some(out)) => Ok(out),
        Ok(None) => Err(BodyError::TooLarge {
            limit,
            decoded: true,
        }),
        Err(source) => Err(BodyError::Decode {
            encoding: coding.name(),
            source,
        }),
    }
}

/// What `reader` yields, or None past `limit` bytes.
async fn read_limited<R: AsyncRead + Unpin>(
    reader: R,
    limit: usize,
) -> std::io::Result<Option<Bytes>> {
    let mut out = Vec::new();
    reader.take(limit as u64 + 1).read_to_end(&mut out).await?;
    Ok((out.len() <= limit).then(|| Bytes::from(out)))
}

/// Applies `codings` in order to a rewritten body, so that it goes on with the headers it
/// came with.
pub async fn encode(data: Bytes, codings: &[Encoding]) -> Result<Bytes, BodyError> {
    let mut data = data;
    for &coding in codings {
        let slice: &[u8] = &data;
        let mut out = Vec::new();
        let r = match coding {
            Encoding::Gzip => GzipEncoder::new(slice).read_to_end(&mut out).await,
            Encoding::Deflate => ZlibEncoder::new(slice).read_to_end(&mut out).await,
            Encoding::Br => BrotliEncoder::new(slice).read_to_end(&mut out).await,
            Encoding::Zstd => ZstdEncoder::new(slice).read_to_end(&mut out).await,
        };
        r.map_err(|source| BodyError::Encode {
            encoding: coding.name(),
            source,
        })?;
        data = Bytes::from(out);
    }
    Ok(data)
}

/// A decoding reader over a stream of encoded bytes, for responses read as they come (SSE).
pub fn decoding_reader(
    encoded: impl AsyncBufRead + Send + Unpin + 'static,
    codings: &[Encoding],
) -> Pin<Box<dyn AsyncRead + Send>> {
    let mut reader: Pin<Box<dyn AsyncRead + Send>> = Box::pin(PassBufRead(encoded));
    // The outermost coding was applied last: it comes off first.
    for &coding in codings.iter().rev() {
        let buffered = tokio::io::BufReader::new(reader);
        reader = match coding {
            Encoding::Gzip => {
                let mut d = GzipDecoder::new(buffered);
                d.multiple_members(true);
                Box::pin(d)
            }
            Encoding::Deflate => Box::pin(ZlibDecoder::new(buffered)),
            Encoding::Br => Box::pin(BrotliDecoder::new(buffered)),
            Encoding::Zstd => Box::pin(ZstdDecoder::new(buffered)),
        };
    }
    reader
}

/// An `AsyncBufRead` seen as a plain `AsyncRead`.
struct PassBufRead<R>(R);

impl<R: AsyncBufRead + Unpin> AsyncRead for PassBufRead<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let available = std::task::ready!(Pin::new(&mut self.0).poll_fill_buf(cx))?;
        let n = available.len().min(buf.remaining());
        buf.put_slice(&available[..n]);
        Pin::new(&mut self.0).consume(n);
        Poll::Ready(Ok(()))
    }
}

/// Reads a body until it ends or passes `limit` bytes; returns what was read and, when the
/// body goes on, the rest of it.
pub async fn read_prefix(
    mut body: Incoming,
    limit: usize,
) -> Result<(Bytes, Option<Incoming>), hyper::Error> {
    let mut buf = BytesMut::new();
    while buf.len() <= limit {
        match body.frame().await {
            None => return Ok((buf.freeze(), None)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err(e),
        }
    }
    Ok((buf.freeze(), Some(body)))
}

/// How much of a refused body's rest is read and dropped before the answer, and for how
/// long: a client still sending when the proxy closes would get a reset instead of the
/// refusal (the lingering close of RFC 9112 §9.6).
const DRAIN_LIMIT: usize = 64 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and drops the rest of a body the proxy will not forward, within bounds.
pub async fn drain(mut rest: Incoming) {
    let mut read = 0usize;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while read < DRAIN_LIMIT {
            match rest.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
    })
    .await;
}

/// A request body already partly read: the prefix, then the rest as it comes.
pub struct Prefixed {
    pub prefix: Option<Bytes>,
    pub rest: Option<Incoming>,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let Some(rest) = self.rest.as_ref() else {
            return SizeHint::with_exact(prefix);
        };
        let inner = rest.size_hint();
        let mut hint = SizeHint::new();
        // Upper first: SizeHint refuses a lower bound above the current upper one.
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + prefix);
        }
        hint.set_lower(inner.lower() + prefix);
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_ENCODING, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn codings_are_read_in_order_and_unknown_ones_named() {
        assert_eq!(
            encodings(&headers("gzip, br")).unwrap(),
            [Encoding::Gzip, Encoding::Br]
        );
        assert_eq!(encodings(&headers("identity")).unwrap(), []);
        assert_eq!(encodings(&HeaderMap::new()).unwrap(), []);
        let err = encodings(&headers("gzip, compress")).unwrap_err();
        assert!(err.to_string().contains("\"compress\""), "{err}");
    }

    #[tokio::test]
    async fn every_coding_round_trips_and_stacks() {
        let body = Bytes::from_static(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#);
        for codings in [
            vec![Encoding::Gzip],
            vec![Encoding::Deflate],
            vec![Encoding::Br],
            vec![Encoding::Zstd],
            vec![Encoding::Gzip, Encoding::Br],
        ] {
            let encoded = encode(body.clone(), &codings).await.unwrap();
            assert_ne!(encoded, body);
            assert_eq!(
                decode(encoded, &codings, 1024).await.unwrap(),
                body,
                "{codings:?}"
            );
        }
    }

    #[tokio::test]
    async fn raw_deflate_is_accepted_and_garbage_is_an_error() {
        let body = Bytes::from_static(b"hello deflate");
        let mut raw = Vec::new();
        async_compression::tokio::bufread::DeflateEncoder::new(&body[..])
            .read_to_end(&mut raw)
            .await
            .unwrap();
        assert_eq!(
            decode(raw.into(), &[Encoding::Deflate], 100).await.unwrap(),
            body
        );
        let err = decode(Bytes::from_static(b"not gzip"), &[Encoding::Gzip], 100)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                BodyError::Decode {
                    encoding: "gzip",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_decompression_bomb_stops_at_the_limit() {
        let big = Bytes::from(vec![b'a'; 10 << 20]);
        let bomb = encode(big, &[Encoding::Gzip]).await.unwrap();
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        let err = decode(bomb, &[Encoding::Gzip], 1 << 20).await.unwrap_err();
        assert!(
            matches!(err, BodyError::TooLarge { decoded: true, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_stream_decodes_as_it_comes() {
        let text = b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n".repeat(50);
        let encoded = encode(Bytes::from(text.clone()), &[Encoding::Gzip])
            .await
            .unwrap();
        let chunks: Vec<std::io::Result<Bytes>> = encoded
            .chunks(7)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let reader = tokio_util::io::StreamReader::new(tokio_stream::iter(chunks));
        let mut out = Vec::new();
        decoding_reader(reader, &[Encoding::Gzip])
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!(out, text);
    }
}
