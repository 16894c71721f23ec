//! Pure MCP parsing: JSON-RPC 2.0 messages as MCP sends them over HTTP, one object or a batch.
//! Functions over bytes and values; no IO.
#![forbid(unsafe_code)]

use serde_json::Value;

/// Why bytes are not MCP messages. The bytes are relayed unchanged all the same; the record
/// says this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum McpError {
    #[error("not valid UTF-8 JSON: {0}")]
    Json(String),
    #[error("an empty batch")]
    EmptyBatch,
    #[error("not a JSON-RPC 2.0 message: {0}")]
    NotJsonRpc(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Request,
    Notification,
    Response,
    Error,
}

/// One JSON-RPC message, with the MCP names pulled out of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub kind: Kind,
    pub id: Option<Value>,
    pub method: Option<String>,
    /// `params.name` of `tools/call` and `prompts/get`.
    pub name: Option<String>,
    /// `params.uri` of `resources/read`, `resources/subscribe` and friends.
    pub uri: Option<String>,
    pub params: Option<Value>,
    pub result: Option<Value>,
    pub error: Option<Value>,
}

/// Parses an HTTP body (or SSE `data`) holding one message or a batch of them.
/// Returns the messages and whether they came as a batch; one bad element fails the whole.
pub fn parse(bytes: &[u8]) -> Result<(Vec<Message>, bool), McpError> {
    let Parsed { items, batch } = parse_each(bytes)?;
    let messages = items.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok((messages, batch))
}

/// A body's elements, each classified on its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub items: Vec<Result<Message, McpError>>,
    pub batch: bool,
}

impl Parsed {
    /// Whether every element is a JSON-RPC message.
    pub fn all_valid(&self) -> bool {
        self.items.iter().all(Result::is_ok)
    }
}

/// Parses a body into its elements, each classified on its own: one bad element of a batch
/// must not hide the others from the access rules. Errs only when the body as a whole is not
/// JSON, or is an empty batch.
pub fn parse_each(bytes: &[u8]) -> Result<Parsed, McpError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| McpError::Json(e.to_string()))?;
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(McpError::EmptyBatch);
            }
            Ok(Parsed {
                items: items.into_iter().map(classify).collect(),
                batch: true,
            })
        }
        other => Ok(Parsed {
            items: vec![classify(other)],
            batch: false,
        }),
    }
}

/// Sorts one JSON value into request, notification, response or error.
pub fn classify(value: Value) -> Result<Message, McpError> {
    let Value::Object(mut obj) = value else {
        return Err(McpError::NotJsonRpc("not an object"));
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(McpError::NotJsonRpc("no \"jsonrpc\": \"2.0\""));
    }
    let id = obj.remove("id");
    let method = match obj.remove("method") {
        Some(Value::String(m)) => Some(m),
        Some(_) => return Err(McpError::NotJsonRpc("\"method\" is not a string")),
        None => None,
    };
    let params = obj.remove("params");
    let result = obj.remove("result");
    let error = obj.remove("error");
    let kind = match (&method, &id, &result, &error) {
        (Some(_), Some(_), _, _) => Kind::Request,
        (Some(_), None, _, _) => Kind::Notification,
        (None, _, Some(_), None) => Kind::Response,
        (None, _, None, Some(_)) => Kind::Error,
        _ => {
            return Err(McpError::NotJsonRpc(
                "neither a request, a notification nor a response",
            ));
        }
    };
    let str_param = |key: &str| {
        params
            .as_ref()
            .and_then(|p| p.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let (name, uri) = match method.as_deref() {
        Some("tools/call" | "prompts/get") => (str_param("name"), None),
        Some(m) if m.starts_with("resources/") => (None, str_param("uri")),
        _ => (None, None),
    };
    Ok(Message {
        kind,
        id,
        method,
        name,
        uri,
        params,
        result,
        error,
    })
}

/// `_meta` key of a 2026-07-28 request naming the client (`{name, version}`).
pub const CLIENT_INFO_META_KEY: &str = "io.modelcontextprotocol/clientInfo";
/// `_meta` key on every frame of a `subscriptions/listen` stream: the listen request's id.
pub const SUBSCRIPTION_ID_META_KEY: &str = "io.modelcontextprotocol/subscriptionId";

fn meta(m: &Message) -> Option<&serde_json::Map<String, Value>> {
    m.params.as_ref()?.get("_meta")?.as_object()
}

/// Who the client says it is: `_meta` client info (2026-07-28, on every request) or the
/// `clientInfo` of `initialize` (earlier versions).
pub fn client_info(m: &Message) -> Option<Value> {
    if let Some(info) = meta(m).and_then(|meta| meta.get(CLIENT_INFO_META_KEY)) {
        return Some(info.clone());
    }
    (m.method.as_deref() == Some("initialize"))
        .then(|| m.params.as_ref()?.get("clientInfo").cloned())
        .flatten()
}

/// The `requestState` a retried request echoes (2026-07-28 `input_required` rounds).
pub fn request_state(m: &Message) -> Option<String> {
    m.params
        .as_ref()?
        .get("requestState")?
        .as_str()
        .map(str::to_owned)
}

/// For a result that asks for more input (`resultType: "input_required"`): the
/// `requestState` the retry will echo, if the server sent one.
pub fn input_required(m: &Message) -> Option<Option<String>> {
    let result = m.result.as_ref()?;
    (result.get("resultType")?.as_str()? == "input_required").then(|| {
        result
            .get("requestState")
            .and_then(Value::as_str)
            .map(str::to_owned)
    })
}

/// The listen request (its id as JSON text) a `subscriptions/listen` stream frame belongs to.
pub fn subscription_id(m: &Message) -> Option<String> {
    meta(m)?.get(SUBSCRIPTION_ID_META_KEY).map(Value::to_string)
}

/// A JSON value bounded for the record: itself when its JSON text fits in `limit` bytes,
/// else a marker saying it was cut, how big it was, and its first `limit` bytes of text.
pub fn bounded(value: serde_json::Value, limit: usize) -> serde_json::Value {
    // Measured without building the text: most values fit, and are kept as they are.
    if json_len(&value) <= limit {
        return value;
    }
    let text = value.to_string();
    let mut cut = limit;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    serde_json::json!({
        "mcptrail_truncated": true,
        "bytes": text.len(),
        "head": &text[..cut],
    })
}

/// The length of a value's JSON text, counted as it is written, with no allocation.
fn json_len(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).expect("counting never fails");
    count.0
}

/// The JSON-RPC error body the proxy answers with when the gateway cannot be reached.
pub fn error_body(id: &Value, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": -32000, "message": message},
    }))
    .expect("JSON values serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(v: serde_json::Value) -> Message {
        classify(v).unwrap()
    }

    #[test]
    fn client_info_input_required_and_listen_frames() {
        let m = one(
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x",
            "_meta": {CLIENT_INFO_META_KEY: {"name": "cli", "version": "1"}}, "requestState": "s1"}}),
        );
        assert_eq!(
            client_info(&m),
            Some(json!({"name": "cli", "version": "1"}))
        );
        assert_eq!(request_state(&m).as_deref(), Some("s1"));
        let init = one(
            json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"clientInfo": {"name": "old"}}}),
        );
        assert_eq!(client_info(&init), Some(json!({"name": "old"})));
        let r = one(
            json!({"jsonrpc": "2.0", "id": 1, "result": {"resultType": "input_required", "requestState": "s2"}}),
        );
        assert_eq!(input_required(&r), Some(Some("s2".into())));
        let done = one(json!({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}));
        assert_eq!(input_required(&done), None);
        let n = one(
            json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed",
            "params": {"_meta": {SUBSCRIPTION_ID_META_KEY: "listen-1"}}}),
        );
        assert_eq!(subscription_id(&n).as_deref(), Some("\"listen-1\""));
    }

    #[test]
    fn a_tool_call() {
        let (m, batch) = parse(
            br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}}"#,
        )
        .unwrap();
        assert!(!batch);
        assert_eq!(m[0].kind, Kind::Request);
        assert_eq!(m[0].id, Some(json!(3)));
        assert_eq!(m[0].method.as_deref(), Some("tools/call"));
        assert_eq!(m[0].name.as_deref(), Some("add"));
    }

    #[test]
    fn resources_name_their_uri() {
        let (m, _) = parse(
            br#"{"jsonrpc":"2.0","id":"r1","method":"resources/read","params":{"uri":"config://build"}}"#,
        )
        .unwrap();
        assert_eq!(m[0].uri.as_deref(), Some("config://build"));
        assert_eq!(m[0].name, None);
    }

    #[test]
    fn notifications_responses_and_errors() {
        let (m, _) = parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert_eq!(m[0].kind, Kind::Notification);
        let (m, _) = parse(br#"{"jsonrpc":"2.0","id":1,"result":{"ok":true}}"#).unwrap();
        assert_eq!(
            (m[0].kind, m[0].result.clone()),
            (Kind::Response, Some(json!({"ok": true})))
        );
        let (m, _) =
            parse(br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}"#).unwrap();
        assert_eq!(m[0].kind, Kind::Error);
    }

    #[test]
    fn batches() {
        let (m, batch) = parse(
            br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/progress","params":{}}]"#,
        )
        .unwrap();
        assert!(batch);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].kind, Kind::Notification);
    }

    #[test]
    fn batch_elements_are_classified_one_by_one() {
        let p = parse_each(
            br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"deploy"}},42,{"id":2}]"#,
        )
        .unwrap();
        assert!(p.batch && !p.all_valid());
        assert_eq!(p.items.len(), 3);
        assert_eq!(p.items[0].as_ref().unwrap().name.as_deref(), Some("deploy"));
        assert!(matches!(p.items[1], Err(McpError::NotJsonRpc(_))));
        assert!(matches!(p.items[2], Err(McpError::NotJsonRpc(_))));
        assert!(parse(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},42]"#).is_err());
    }

    #[test]
    fn malformed_input_says_why() {
        assert!(matches!(parse(b"{nope"), Err(McpError::Json(_))));
        assert!(matches!(parse(b"\xff\xfe"), Err(McpError::Json(_))));
        assert_eq!(parse(b"[]"), Err(McpError::EmptyBatch));
        assert!(matches!(parse(b"42"), Err(McpError::NotJsonRpc(_))));
        assert!(matches!(
            parse(br#"{"id":1,"method":"x"}"#),
            Err(McpError::NotJsonRpc(_))
        ));
        assert!(matches!(
            parse(br#"{"jsonrpc":"2.0","id":1}"#),
            Err(McpError::NotJsonRpc(_))
        ));
    }

    #[test]
    fn lengths_are_counted_like_the_text() {
        let v = json!({"a": "quote \" tab \t café 🚀", "n": [1, 2.5, null, true]});
        assert_eq!(json_len(&v), v.to_string().len());
    }

    #[test]
    fn big_values_are_cut_with_a_marker() {
        let small = json!({"a": 1});
        assert_eq!(bounded(small.clone(), 100), small);
        let big = json!({"text": "é".repeat(100)});
        let cut = bounded(big.clone(), 21);
        assert_eq!(cut["mcptrail_truncated"], true);
        assert_eq!(cut["bytes"], big.to_string().len());
        let head = cut["head"].as_str().unwrap();
        assert!(
            head.len() <= 21 && big.to_string().starts_with(head),
            "{head}"
        );
    }

    #[test]
    fn error_bodies_are_json_rpc() {
        let body = error_body(&json!(7), "gateway down");
        let (m, _) = parse(&body).unwrap();
        assert_eq!((m[0].kind, m[0].id.clone()), (Kind::Error, Some(json!(7))));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever bytes arrive, parsing answers (never panics), and what it accepts
        /// re-serialises to JSON that parses the same way.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn arbitrary_json_values_are_classified_or_refused(
            id in prop_oneof![Just(None), any::<i64>().prop_map(|i| Some(serde_json::json!(i))), "[a-z0-9]{0,8}".prop_map(|s| Some(serde_json::json!(s)))],
            method in proptest::option::of("[a-z/]{1,20}"),
            has_result in any::<bool>(),
            has_error in any::<bool>(),
        ) {
            let mut obj = serde_json::Map::new();
            obj.insert("jsonrpc".into(), "2.0".into());
            if let Some(id) = &id { obj.insert("id".into(), id.clone()); }
            if let Some(m) = &method { obj.insert("method".into(), m.clone().into()); }
            if has_result { obj.insert("result".into(), serde_json::json!({})); }
            if has_error { obj.insert("error".into(), serde_json::json!({"code": 1})); }
            let bytes = serde_json::to_vec(&serde_json::Value::Object(obj)).unwrap();
            match parse(&bytes) {
                Ok((m, false)) => {
                    let kind = m[0].kind;
                    match (&method, &id) {
                        (Some(_), Some(_)) => prop_assert_eq!(kind, Kind::Request),
                        (Some(_), None) => prop_assert_eq!(kind, Kind::Notification),
                        (None, _) => prop_assert!(matches!(kind, Kind::Response | Kind::Error)),
                    }
                }
                Ok((_, true)) => prop_assert!(false, "a single object is not a batch"),
                Err(McpError::NotJsonRpc(_)) => prop_assert!(method.is_none() && has_result == has_error),
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }
}
