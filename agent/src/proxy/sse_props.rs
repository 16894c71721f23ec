//! The SSE path must decode the same events whatever the chunking, since TCP and hyper hand
//! the observer bytes at arbitrary boundaries (CRLF split across chunks included).
#![cfg(test)]

use bytes::Bytes;
use proptest::prelude::*;
use tokio_stream::StreamExt as _;

/// Decodes a stream delivered as `chunks`, returning (event, data) pairs.
fn decode(chunks: Vec<Vec<u8>>) -> Vec<(Option<String>, Option<String>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let stream = tokio_stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<Bytes, std::convert::Infallible>(Bytes::from(c))),
        );
        let mut events = sse_stream::SseByteStream::new(stream);
        let mut out = Vec::new();
        while let Some(e) = events.next().await {
            match e {
                Ok(e) => out.push((e.event, e.data)),
                Err(_) => break,
            }
        }
        out
    })
}

fn stream_text(events: &[(Option<String>, Vec<String>, bool)], newline: &str) -> Vec<u8> {
    let mut s = String::from(": a comment first");
    s.push_str(newline);
    for (event, lines, with_id) in events {
        if let Some(e) = event {
            s.push_str(&format!("event: {e}{newline}"));
        }
        if *with_id {
            s.push_str(&format!("id: 42{newline}"));
        }
        for l in lines {
            s.push_str(&format!("data: {l}{newline}"));
        }
        s.push_str(newline);
    }
    s.into_bytes()
}

proptest! {
    #[test]
    fn any_chunking_gives_the_same_events(
        events in proptest::collection::vec(
            (proptest::option::of("[a-z]{1,8}"), proptest::collection::vec("[ -~]{0,30}", 1..4), any::<bool>()),
            1..6,
        ),
        newline in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let bytes = stream_text(&events, newline);
        let whole = decode(vec![bytes.clone()]);
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        points.dedup();
        let mut chunks = Vec::new();
        let mut last = 0;
        for p in points {
            chunks.push(bytes[last..p].to_vec());
            last = p;
        }
        chunks.push(bytes[last..].to_vec());
        prop_assert_eq!(decode(chunks), whole.clone());
        // And the decoder found every data block, lines joined with LF.
        let datas: Vec<String> = whole.iter().filter_map(|(_, d)| d.clone()).collect();
        let expected: Vec<String> = events.iter().map(|(_, lines, _)| lines.join("\n")).collect();
        prop_assert_eq!(datas, expected);
    }
}
