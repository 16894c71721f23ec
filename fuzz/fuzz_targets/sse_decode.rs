//! The proxy's SSE path (sse-stream's decoder, then `mcp::parse` on each event's data) over
//! any bytes delivered in any chunking: the same events come out however the bytes are cut,
//! and nothing panics. The first input byte seeds where the cuts go.
#![no_main]

use bytes::Bytes;
use futures::StreamExt;
use libfuzzer_sys::fuzz_target;

#[path = "../../agent/src/mcp/mod.rs"]
#[allow(dead_code)]
mod mcp;

type Events = Vec<(Option<String>, Option<String>, Option<String>)>;

fn decode(chunks: Vec<Bytes>) -> (Events, bool) {
    futures::executor::block_on(async {
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(Ok::<Bytes, std::convert::Infallible>),
        );
        let mut events = sse_stream::SseByteStream::new(stream);
        let mut out = Vec::new();
        let mut failed = false;
        while let Some(e) = events.next().await {
            match e {
                Ok(e) => {
                    if let Some(data) = &e.data {
                        let _ = mcp::parse(data.as_bytes());
                    }
                    out.push((e.event, e.data, e.id));
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        (out, failed)
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, body)) = input.split_first() else {
        return;
    };
    let whole = decode(vec![Bytes::copy_from_slice(body)]);
    // Cut every `step` bytes (1..=16), so CR/LF pairs and UTF-8 sequences get split too.
    let step = usize::from(seed % 16) + 1;
    let chunks: Vec<Bytes> = body.chunks(step).map(Bytes::copy_from_slice).collect();
    let cut = decode(chunks);
    if !whole.1 && !cut.1 {
        assert_eq!(whole.0, cut.0, "chunking changed the events");
    }
});
