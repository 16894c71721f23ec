//! Wire rules: what the gateway gets and what the client gets back, rewritten where a
//! `wire = true` masking rule matches. A body no wire rule matches goes byte for byte.
#![forbid(unsafe_code)]

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::header::{HeaderMap, HeaderValue};
use serde_json::Value;
use tokio_stream::StreamExt as _;

use super::respond::ProxyBody;
use crate::policy::masking::{Masker, Scope};

/// An SSE response with the wire rules applied to each event's JSON data, re-framed as
/// `event:`/`id:`/`retry:`/`data:` lines. Comments (keep-alives) are not passed on; a stream
/// that stops decoding ends there (the observer records why).
pub fn wire_sse<S, E>(bytes: S, active: Arc<crate::policy::live::Active>) -> ProxyBody
where
    S: tokio_stream::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let events = sse_stream::SseByteStream::new(bytes);
    let frames = events.map_while(|event| event.ok()).map(move |mut event| {
        if let Some(data) = &event.data
            && let Some(rewritten) = wire_rewrite(&active.masker, data.as_bytes())
        {
            event.data = Some(String::from_utf8_lossy(&rewritten).into_owned());
        }
        Ok::<_, hyper::Error>(hyper::body::Frame::data(encode_sse(&event)))
    });
    http_body_util::StreamBody::new(frames).boxed_unsync()
}

/// One SSE event block. The decoder guarantees no line breaks in `event` and `id`.
fn encode_sse(event: &sse_stream::Sse) -> Bytes {
    let mut s = String::new();
    if let Some(e) = &event.event {
        s.push_str("event: ");
        s.push_str(e);
        s.push('\n');
    }
    if let Some(id) = &event.id {
        s.push_str("id: ");
        s.push_str(id);
        s.push('\n');
    }
    if let Some(retry) = event.retry {
        s.push_str(&format!("retry: {retry}\n"));
    }
    if let Some(data) = &event.data {
        for line in data.split('\n') {
            s.push_str("data: ");
            s.push_str(line);
            s.push('\n');
        }
    }
    s.push('\n');
    Bytes::from(s)
}

/// Rewrites forwarded header values that a `wire` rule with the `headers` scope matches; the
/// caller's token headers are left to the token handling.
pub fn mask_header_values(masker: &Masker, headers: &mut HeaderMap, token_headers: &[String]) {
    let names: Vec<hyper::header::HeaderName> = headers.keys().cloned().collect();
    for name in names {
        if token_headers.iter().any(|t| t == name.as_str()) {
            continue;
        }
        let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
        let mut changed = false;
        let mut rewritten = Vec::with_capacity(values.len());
        for value in values {
            let Ok(text) = value.to_str() else {
                rewritten.push(value);
                continue;
            };
            let mut v = Value::String(text.to_owned());
            if masker
                .mask_value_wire(&mut v, Scope::Headers)
                .rules
                .is_empty()
            {
                rewritten.push(value);
                continue;
            }
            match v.as_str().and_then(|s| HeaderValue::from_str(s).ok()) {
                Some(new) => {
                    rewritten.push(new);
                    changed = true;
                }
                None => rewritten.push(value),
            }
        }
        if changed {
            headers.remove(&name);
            for v in rewritten {
                headers.append(name.clone(), v);
            }
        }
    }
}

/// The body with the wire rules applied to every message's params, result and error, or
/// `None` when no wire rule matched (the body then goes as it came, byte for byte).
pub fn wire_rewrite(masker: &Masker, body: &[u8]) -> Option<Bytes> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let mut fired = false;
    let mut each = |m: &mut Value| {
        if let Value::Object(obj) = m {
            for (key, scope) in [
                ("params", Scope::Params),
                ("result", Scope::Result),
                ("error", Scope::Error),
            ] {
                if let Some(v) = obj.get_mut(key) {
                    fired |= !masker.mask_value_wire(v, scope).rules.is_empty();
                }
            }
        }
    };
    match &mut value {
        Value::Array(items) => items.iter_mut().for_each(&mut each),
        one => each(one),
    }
    fired.then(|| Bytes::from(serde_json::to_vec(&value).expect("JSON values serialise")))
}
