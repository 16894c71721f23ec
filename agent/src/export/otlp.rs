//! Trail items as OpenTelemetry log records. Pure: items in, an `ExportLogsServiceRequest` out.
//!
//! Each record becomes one log record whose body is the stored record JSON, byte for byte (so
//! a receiver can recompute the chain), with the OpenTelemetry semantic-convention attributes
//! where they exist (`mcp.*`, `gen_ai.*`, `jsonrpc.request.id`, `server.*`, `client.*`,
//! `process.*`, `user.id`, `enduser.id`, `error.type`) and `mcptrail.seq`, `mcptrail.hash`,
//! `mcptrail.prev_hash`, `mcptrail.kind` to order and deduplicate. Checkpoints and retention
//! anchors are log records of their own (`mcptrail.kind` `checkpoint` / `anchor`).
#![forbid(unsafe_code)]

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde_json::Value as Json;

use super::feed::Item;

/// What names the sender: the resource of every request.
#[derive(Debug, Clone)]
pub struct Origin {
    pub host: String,
    pub version: String,
    /// The trail's public key (hex ed25519): checkpoints verify against it.
    pub public_key: String,
}

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(key: &str, v: impl Into<String>) -> KeyValue {
    kv(key, Value::StringValue(v.into()))
}

fn i(key: &str, v: i64) -> KeyValue {
    kv(key, Value::IntValue(v))
}

/// RFC 3339 → nanoseconds since the epoch (0 when it does not parse).
fn nanos(time: &str) -> u64 {
    chrono::DateTime::parse_from_rfc3339(time)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .map_or(0, |n| n.max(0) as u64)
}

/// `127.0.0.1:8811` or `[::1]:8811` → (address, port).
fn split_addr(addr: &str) -> Option<(String, i64)> {
    let sa: std::net::SocketAddr = addr.parse().ok()?;
    Some((sa.ip().to_string(), i64::from(sa.port())))
}

/// How much a record should stand out: refusals, denials, failed handshakes, malformed or
/// mismatched messages, errors and lost connections are warnings.
pub fn severity(record: &Json) -> (SeverityNumber, &'static str) {
    let kind = record["kind"].as_str().unwrap_or("");
    let decision = record["decision"]["action"].as_str().unwrap_or("allow");
    let warn = matches!(kind, "refused" | "tls_failure")
        || matches!(decision, "deny" | "rate_limited")
        || record.get("malformed").is_some_and(|m| !m.is_null())
        || record.get("header_mismatch").is_some_and(|m| !m.is_null())
        || record.get("error").is_some_and(|e| !e.is_null())
        || (kind == "connection"
            && record["outcome"]
                .as_str()
                .is_some_and(|o| o != "closed" && o != "agent_shutdown"));
    if warn {
        (SeverityNumber::Warn, "WARN")
    } else {
        (SeverityNumber::Info, "INFO")
    }
}

/// The semantic-convention attributes of one record.
pub fn attributes(record: &Json, hash: &str) -> Vec<KeyValue> {
    let mut out = vec![
        i("mcptrail.seq", record["seq"].as_i64().unwrap_or(0)),
        s("mcptrail.hash", hash),
        s(
            "mcptrail.prev_hash",
            record["prev_hash"].as_str().unwrap_or(""),
        ),
        s("mcptrail.kind", record["kind"].as_str().unwrap_or("")),
    ];
    let text = |v: &Json| v.as_str().map(str::to_owned);
    if let Some(m) = text(&record["method"]) {
        match m.as_str() {
            "tools/call" => {
                if let Some(n) = text(&record["name"]) {
                    out.push(s("gen_ai.tool.name", n));
                }
            }
            "prompts/get" => {
                if let Some(n) = text(&record["name"]) {
                    out.push(s("gen_ai.prompt.name", n));
                }
            }
            _ => {}
        }
        out.push(s("mcp.method.name", m));
    }
    if let Some(v) = text(&record["http"]["session_id"]) {
        out.push(s("mcp.session.id", v));
    }
    if let Some(v) = text(&record["http"]["protocol_version"]) {
        out.push(s("mcp.protocol.version", v));
    }
    if let Some(v) = text(&record["uri"]) {
        out.push(s("mcp.resource.uri", v));
    }
    match &record["jsonrpc_id"] {
        Json::Null => {}
        Json::String(id) => out.push(s("jsonrpc.request.id", id.clone())),
        other => out.push(s("jsonrpc.request.id", other.to_string())),
    }
    if let Some(code) = record["error"]["code"].as_i64() {
        out.push(s("error.type", code.to_string()));
    } else if record["kind"] == "tls_failure" {
        out.push(s("error.type", "tls_failure"));
    }
    let conn = &record["connection"];
    let server = text(&conn["original_dst"]).or_else(|| text(&record["original_dst"]));
    if let Some((addr, port)) = server.as_deref().and_then(split_addr) {
        out.push(s("server.address", addr));
        out.push(i("server.port", port));
    }
    let client = text(&conn["client"]).or_else(|| text(&record["client"]));
    if let Some((addr, port)) = client.as_deref().and_then(split_addr) {
        out.push(s("client.address", addr));
        out.push(i("client.port", port));
    }
    let p = &record["process"];
    if let Some(pid) = p["pid"].as_i64() {
        out.push(i("process.pid", pid));
    }
    if let Some(exe) = text(&p["exe"]) {
        out.push(s("process.executable.path", exe));
    }
    if let Some(args) = p["cmdline"].as_array() {
        // As stored: already masked and scrubbed of credentials.
        let line: Vec<&str> = args.iter().filter_map(Json::as_str).collect();
        out.push(s("process.command_line", line.join(" ")));
    }
    if let Some(uid) = p["uid"].as_i64() {
        out.push(s("user.id", uid.to_string()));
    }
    let token = &record["token"];
    if token["verified"] == Json::Bool(true)
        && let Some(sub) = text(&token["sub"])
    {
        out.push(s("enduser.id", sub));
    }
    if let Some(action) = text(&record["decision"]["action"]) {
        out.push(s("mcptrail.decision", action));
    }
    out
}

/// One item as a log record.
pub fn log_record(item: &Item, observed: u64) -> LogRecord {
    match item {
        Item::Record { raw, hash, .. } => {
            let body = String::from_utf8_lossy(raw).into_owned();
            let record: Json = serde_json::from_slice(raw).unwrap_or(Json::Null);
            let (severity, text) = severity(&record);
            LogRecord {
                time_unix_nano: nanos(record["time"].as_str().unwrap_or("")),
                observed_time_unix_nano: observed,
                severity_number: severity as i32,
                severity_text: text.to_owned(),
                body: Some(AnyValue {
                    value: Some(Value::StringValue(body)),
                }),
                attributes: attributes(&record, hash),
                ..Default::default()
            }
        }
        Item::Checkpoint { checkpoint, anchor } => {
            let kind = if *anchor { "anchor" } else { "checkpoint" };
            let mut body = serde_json::to_value(checkpoint).expect("checkpoints serialise");
            body["kind"] = Json::String(kind.to_owned());
            LogRecord {
                time_unix_nano: nanos(&checkpoint.time),
                observed_time_unix_nano: observed,
                severity_number: SeverityNumber::Info as i32,
                severity_text: "INFO".to_owned(),
                body: Some(AnyValue {
                    value: Some(Value::StringValue(body.to_string())),
                }),
                attributes: vec![
                    i("mcptrail.seq", checkpoint.seq as i64),
                    s("mcptrail.hash", checkpoint.hash.clone()),
                    s("mcptrail.kind", kind),
                ],
                ..Default::default()
            }
        }
    }
}

/// One request carrying `items`, from `origin`.
pub fn request(origin: &Origin, items: &[Item], observed: u64) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![
                    s("host.name", origin.host.clone()),
                    s("service.name", "mcptrail"),
                    s("service.version", origin.version.clone()),
                    s("mcptrail.public_key", origin.public_key.clone()),
                ],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "mcptrail".to_owned(),
                    version: origin.version.clone(),
                    ..Default::default()
                }),
                log_records: items.iter().map(|it| log_record(it, observed)).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_tool_call_carries_the_conventions() {
        let record = json!({
            "v": 1, "seq": 42, "host": "runner-7", "prev_hash": "ab", "kind": "mcp",
            "time": "2026-12-01T10:00:00.5Z", "method": "tools/call", "name": "deploy",
            "jsonrpc_id": 7, "http": {"session_id": "s-1", "protocol_version": "2026-07-28"},
            "connection": {"client": "127.0.0.1:5555", "original_dst": "10.0.0.5:8811"},
            "process": {"pid": 99, "exe": "/usr/bin/python3", "cmdline": ["python3", "job.py"], "uid": 1000},
            "token": {"verified": true, "sub": "svc-ci"},
            "decision": {"action": "deny"}
        });
        let a = attributes(&record, "cd");
        let get = |k: &str| {
            a.iter()
                .find(|kv| kv.key == k)
                .and_then(|kv| kv.value.clone())
                .and_then(|v| v.value)
        };
        assert_eq!(get("mcptrail.seq"), Some(Value::IntValue(42)));
        assert_eq!(get("mcptrail.hash"), Some(Value::StringValue("cd".into())));
        assert_eq!(
            get("mcp.method.name"),
            Some(Value::StringValue("tools/call".into()))
        );
        assert_eq!(
            get("gen_ai.tool.name"),
            Some(Value::StringValue("deploy".into()))
        );
        assert_eq!(
            get("mcp.session.id"),
            Some(Value::StringValue("s-1".into()))
        );
        assert_eq!(
            get("jsonrpc.request.id"),
            Some(Value::StringValue("7".into()))
        );
        assert_eq!(
            get("server.address"),
            Some(Value::StringValue("10.0.0.5".into()))
        );
        assert_eq!(get("server.port"), Some(Value::IntValue(8811)));
        assert_eq!(get("client.port"), Some(Value::IntValue(5555)));
        assert_eq!(get("process.pid"), Some(Value::IntValue(99)));
        assert_eq!(
            get("process.command_line"),
            Some(Value::StringValue("python3 job.py".into()))
        );
        assert_eq!(get("user.id"), Some(Value::StringValue("1000".into())));
        assert_eq!(get("enduser.id"), Some(Value::StringValue("svc-ci".into())));
        assert_eq!(severity(&record).1, "WARN", "a denial stands out");
        assert_eq!(nanos("2026-12-01T10:00:00.5Z") % 1_000_000_000, 500_000_000);
    }

    #[test]
    fn an_unverified_subject_is_not_an_end_user_and_a_plain_call_is_info() {
        let record = json!({"seq": 1, "kind": "mcp", "method": "tools/list",
            "token": {"verified": false, "sub": "someone"}});
        assert!(
            attributes(&record, "")
                .iter()
                .all(|kv| kv.key != "enduser.id")
        );
        assert_eq!(severity(&record).1, "INFO");
        assert_eq!(severity(&json!({"kind": "refused"})).1, "WARN");
        assert_eq!(
            severity(&json!({"kind": "connection", "outcome": "upstream_connect_failed"})).1,
            "WARN"
        );
    }
}
