//! Every answer the proxy gives in the gateway's place, built here and nowhere else: refusals
//! by policy, refusals of what cannot be read, a trail that cannot be written, a gateway that
//! failed. JSON-RPC errors for the requests that are owed an answer, plain text otherwise.
#![forbid(unsafe_code)]

use bytes::Bytes;
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::header::CONTENT_TYPE;
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use super::plan::Refusal;
use crate::audit::record::DecisionAction;

pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// JSON-RPC error codes of the proxy's own refusals (the server-defined range).
pub const CODE_DENIED: i64 = -32001;
pub const CODE_RATE_LIMITED: i64 = -32002;
pub const CODE_AUDIT_DOWN: i64 = -32003;
pub const CODE_GATEWAY_FAILED: i64 = -32000;
/// JSON-RPC's own: the body is not a valid request.
pub const CODE_INVALID_REQUEST: i64 = -32600;

/// An answer and the error object each refused request's record carries.
pub struct Refused {
    pub response: Response<ProxyBody>,
    pub error: Value,
}

/// The answer to a refused request: a JSON-RPC error for each request id in it (a batch
/// gets a batch), or, with none, a plain answer saying why.
pub fn refusal(refusal: &Refusal, ids: &[Value], batch: bool) -> Refused {
    let (code, mut message, status_without_ids) = match refusal {
        Refusal::Policy(d) => {
            let rule = d.rule.as_deref().map_or_else(
                || "the policy's default".to_owned(),
                |r| format!("policy rule {r:?}"),
            );
            let (code, mut message) = match d.action {
                DecisionAction::RateLimited => (
                    CODE_RATE_LIMITED,
                    format!("mcptrail: rate limit of {rule} exceeded; try again later"),
                ),
                _ => (CODE_DENIED, format!("mcptrail: denied by {rule}")),
            };
            if let Some(m) = &d.message {
                message.push_str(": ");
                message.push_str(m);
            }
            (code, message, StatusCode::FORBIDDEN)
        }
        Refusal::Unparsed(why) => (
            CODE_INVALID_REQUEST,
            format!(
                "mcptrail: refused because the proxy cannot read it: {why}; the policy refuses \
                 what it cannot check (set `[gateway] unparsed = \"forward\"` to let such \
                 requests through unchecked)"
            ),
            StatusCode::BAD_REQUEST,
        ),
    };
    if batch {
        message.push_str(" (the whole batch was refused)");
    }
    let error = json!({"code": code, "message": message});
    let response = match (ids, refusal) {
        ([], Refusal::Policy(_)) => text(status_without_ids, format!("{message}\n")),
        // A body with no readable id still gets a JSON-RPC answer: the client spoke JSON-RPC,
        // or tried to.
        ([], Refusal::Unparsed(_)) => json_response(
            status_without_ids,
            &json!({"jsonrpc": "2.0", "id": null, "error": error}),
        ),
        _ => json_response(StatusCode::OK, &errors_for(ids, batch, &error)),
    };
    Refused { response, error }
}

/// The trail cannot be written and `--on-audit-failure block` is in force.
pub fn audit_down(ids: &[Value], batch: bool) -> Response<ProxyBody> {
    let why = "mcptrail: the audit trail cannot be written (see the agent's log), so this call was not forwarded";
    match ids {
        [] => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        _ => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &errors_for(
                ids,
                batch,
                &json!({"code": CODE_AUDIT_DOWN, "message": why}),
            ),
        ),
    }
}

/// The gateway could not be reached or broke off before answering.
pub fn gateway_failed(ids: &[Value], batch: bool, why: &str) -> Response<ProxyBody> {
    let message = format!("mcptrail: {why}");
    match ids {
        [] => text(StatusCode::BAD_GATEWAY, format!("{message}\n")),
        _ => json_response(
            StatusCode::BAD_GATEWAY,
            &errors_for(
                ids,
                batch,
                &json!({"code": CODE_GATEWAY_FAILED, "message": message}),
            ),
        ),
    }
}

/// The client's body broke off or could not be read at all.
pub fn bad_request(why: &str) -> Response<ProxyBody> {
    text(StatusCode::BAD_REQUEST, format!("mcptrail: {why}\n"))
}

/// A request handler died (a bug): the client hears so rather than nothing.
pub fn handler_failed() -> Response<ProxyBody> {
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "mcptrail: the proxy failed on this request (see the agent's log)\n".into(),
    )
}

/// The gateway's answer broke off while a wire rule was reading it whole.
pub fn response_broke_off(why: &str) -> Response<ProxyBody> {
    text(
        StatusCode::BAD_GATEWAY,
        format!("mcptrail: the gateway's response broke off: {why}\n"),
    )
}

fn errors_for(ids: &[Value], batch: bool, error: &Value) -> Value {
    let mut errors: Vec<Value> = ids
        .iter()
        .map(|id| json!({"jsonrpc": "2.0", "id": id, "error": error}))
        .collect();
    if batch || errors.len() != 1 {
        Value::Array(errors)
    } else {
        errors.swap_remove(0)
    }
}

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json_response(status: StatusCode, body: &Value) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(full(
            serde_json::to_vec(body).expect("JSON values serialise"),
        ))
        .expect("static response parts")
}

pub fn text(status: StatusCode, text: String) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(text))
        .expect("static response parts")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Decision;

    async fn body_json(r: Response<ProxyBody>) -> Value {
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn deny(rule: &str) -> Refusal {
        Refusal::Policy(Decision {
            action: DecisionAction::Deny,
            rule: Some(rule.into()),
            message: Some("ask a human".into()),
            timeout_secs: None,
        })
    }

    #[tokio::test]
    async fn a_refused_request_gets_an_error_per_id() {
        let r = refusal(&deny("no-deploys"), &[json!(7)], false);
        assert_eq!(r.response.status(), StatusCode::OK);
        let v = body_json(r.response).await;
        assert_eq!(v["id"], 7);
        assert_eq!(v["error"]["code"], CODE_DENIED);
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("\"no-deploys\"") && m.ends_with("ask a human"),
            "{m}"
        );
        let r = refusal(&deny("x"), &[json!(1), json!(2)], true);
        let v = body_json(r.response).await;
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert!(
            v[0]["error"]["message"]
                .as_str()
                .unwrap()
                .contains("whole batch")
        );
    }

    #[tokio::test]
    async fn unreadable_bodies_are_answered_in_json_rpc_even_without_ids() {
        let r = refusal(&Refusal::Unparsed("not JSON".into()), &[], false);
        assert_eq!(r.response.status(), StatusCode::BAD_REQUEST);
        let v = body_json(r.response).await;
        assert_eq!(v["id"], Value::Null);
        assert_eq!(v["error"]["code"], CODE_INVALID_REQUEST);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("unparsed = \"forward\"")
        );
        let r = refusal(&deny("x"), &[], false);
        assert_eq!(
            r.response.status(),
            StatusCode::FORBIDDEN,
            "notifications only"
        );
    }

    #[tokio::test]
    async fn gateway_and_trail_failures_name_the_ids_they_fail() {
        let v = body_json(gateway_failed(&[json!("a")], false, "down")).await;
        assert_eq!(
            (v["id"].clone(), v["error"]["code"].clone()),
            (json!("a"), json!(CODE_GATEWAY_FAILED))
        );
        let r = audit_down(&[json!(3)], false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body_json(r).await["id"], 3);
        assert_eq!(
            audit_down(&[], false).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
