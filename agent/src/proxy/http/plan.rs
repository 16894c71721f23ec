//! The request plan: given a request's head, its body (as read and decoded), the policy in
//! force and the caller, what to do. Pure: every path is a value a test (and the fuzz target)
//! can look at, and `mcptrail policy test` asks the same function as the proxy
//! (`super::plan_request`), so the two cannot disagree. The access rules come in as a
//! function from message to decision; the IO around the plan (records, approvals,
//! forwarding) only carries it out.
#![forbid(unsafe_code)]

use bytes::Bytes;

use crate::audit::record::{Decision, DecisionAction};
use crate::mcp::{self, Kind, McpError, Message};
use crate::policy::gateway::Unparsed;

/// The rule name a refusal of unreadable traffic carries in its decision.
pub const UNPARSED_RULE: &str = "[gateway] unparsed";

/// The parts of a request head the plan looks at.
#[derive(Debug, Clone, Copy, Default)]
pub struct Head<'a> {
    pub method: &'a str,
    pub content_type: Option<&'a str>,
    /// `Mcp-Method` and `Mcp-Name` (2026-07-28), compared with the body.
    pub mcp_method: Option<&'a str>,
    pub mcp_name: Option<&'a str>,
    /// The request asks to leave HTTP (`Upgrade`, or `CONNECT`): past a switch nothing is
    /// read, so a strict policy refuses it like any other traffic it cannot check.
    pub switches_protocol: bool,
}

/// A request body as the proxy could read it.
#[derive(Debug, Clone)]
pub enum BodyView {
    /// No body (GET streams, DELETE, most non-MCP requests).
    Empty,
    /// Every byte, decoded.
    Read(Bytes),
    /// Why it could not be read whole: over the parse limit, an unknown or broken encoding.
    Unreadable(String),
}

/// One element of the body, with what the access rules said of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub message: Result<Message, McpError>,
    /// For requests and notifications the client sent.
    pub decision: Option<Decision>,
    /// Where the mirror headers say something else than a lone message.
    pub header_mismatch: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// An access rule (or the default) refused a message: the whole request goes unsent.
    Policy(Decision),
    /// What the proxy cannot read, under `unparsed = "refuse"`.
    Unparsed(String),
}

impl Refusal {
    /// The decision the records of a refused request carry.
    pub fn decision(&self) -> Decision {
        match self {
            Refusal::Policy(d) => d.clone(),
            Refusal::Unparsed(why) => Decision {
                action: DecisionAction::Deny,
                rule: Some(UNPARSED_RULE.to_owned()),
                message: Some(why.clone()),
                timeout_secs: None,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Not MCP (no body, or a non-JSON body under `unparsed = "forward"`): forwarded, and
    /// recorded as an `http` exchange.
    Plain,
    /// MCP messages (and, under `unparsed = "forward"`, what could not be read of them):
    /// recorded, then forwarded.
    Forward,
    Refuse(Refusal),
    /// These items (indexes) wait for one operator decision, listed together.
    Hold(Vec<usize>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub items: Vec<Item>,
    pub batch: bool,
    /// Why the body as a whole could not be read as JSON-RPC, when it could not.
    pub unreadable: Option<String>,
    pub action: Action,
}

impl Plan {
    /// The ids of the requests in the body, in order (each is owed an answer).
    pub fn request_ids(&self) -> Vec<serde_json::Value> {
        self.items
            .iter()
            .filter_map(|i| i.message.as_ref().ok())
            .filter(|m| m.kind == Kind::Request)
            .filter_map(|m| m.id.clone())
            .collect()
    }

    /// Why some of the body cannot be read, when some cannot: the whole body, or the first
    /// bad element of a batch.
    pub fn unparsed_why(&self) -> Option<String> {
        if let Some(why) = &self.unreadable {
            return Some(why.clone());
        }
        self.items.iter().enumerate().find_map(|(n, i)| {
            i.message.as_ref().err().map(|e| {
                if self.batch {
                    format!("element {} of the batch: {e}", n + 1)
                } else {
                    e.to_string()
                }
            })
        })
    }
}

/// Decides what to do with a request: `decide` is the access rules' verdict on a request or
/// notification, `unparsed` what to do with what cannot be read.
pub fn plan(
    head: &Head<'_>,
    body: &BodyView,
    unparsed: Unparsed,
    mut decide: impl FnMut(&Message) -> Decision,
) -> Plan {
    if head.switches_protocol && unparsed == Unparsed::Refuse {
        return Plan {
            items: Vec::new(),
            batch: false,
            unreadable: Some(
                "it asks to switch protocols (Upgrade or CONNECT), and past the switch the proxy reads nothing".into(),
            ),
            action: Action::Refuse(Refusal::Unparsed(
                "a protocol switch (Upgrade or CONNECT) the proxy cannot check".into(),
            )),
        };
    }
    let (parsed, batch, unreadable) = match body {
        BodyView::Empty => {
            return Plan {
                items: Vec::new(),
                batch: false,
                unreadable: None,
                action: Action::Plain,
            };
        }
        BodyView::Unreadable(why) => (Vec::new(), false, Some(why.clone())),
        BodyView::Read(bytes) => match mcp::parse_each(bytes) {
            Ok(p) => (p.items, p.batch, None),
            Err(e) => (Vec::new(), false, Some(e.to_string())),
        },
    };
    let items: Vec<Item> = parsed
        .into_iter()
        .map(|message| {
            let decision = message
                .as_ref()
                .ok()
                .filter(|m| matches!(m.kind, Kind::Request | Kind::Notification))
                .map(&mut decide);
            let header_mismatch = match (&message, batch) {
                (Ok(m), false) => header_mismatch(head, m),
                _ => None,
            };
            Item {
                message,
                decision,
                header_mismatch,
            }
        })
        .collect();
    let mut plan = Plan {
        items,
        batch,
        unreadable,
        action: Action::Forward,
    };
    let refused = plan.items.iter().find_map(|i| {
        i.decision
            .as_ref()
            .filter(|d| matches!(d.action, DecisionAction::Deny | DecisionAction::RateLimited))
    });
    plan.action = if let Some(d) = refused {
        Action::Refuse(Refusal::Policy(d.clone()))
    } else if let Some(why) = plan.unparsed_why() {
        match unparsed {
            Unparsed::Refuse => Action::Refuse(Refusal::Unparsed(why)),
            // Nothing of it is JSON and nothing says it should be: not MCP traffic.
            Unparsed::Forward
                if plan.items.is_empty()
                    && !head.content_type.is_some_and(|c| c.contains("json")) =>
            {
                Action::Plain
            }
            Unparsed::Forward => Action::Forward,
        }
    } else {
        let held: Vec<usize> = plan
            .items
            .iter()
            .enumerate()
            .filter(|(_, i)| {
                i.decision
                    .as_ref()
                    .is_some_and(|d| d.action == DecisionAction::Held)
            })
            .map(|(n, _)| n)
            .collect();
        if held.is_empty() {
            Action::Forward
        } else {
            Action::Hold(held)
        }
    };
    plan
}

/// Where the 2026-07-28 mirror headers say something else than the body.
pub fn header_mismatch(head: &Head<'_>, m: &Message) -> Option<String> {
    let mut problems = Vec::new();
    if let Some(h) = head.mcp_method
        && m.method.as_deref() != Some(h)
    {
        problems.push(format!(
            "Mcp-Method is {h:?} but the body's method is {:?}",
            m.method.as_deref().unwrap_or("")
        ));
    }
    let body_name = m.name.as_deref().or(m.uri.as_deref());
    if let Some(h) = head.mcp_name
        && body_name != Some(h)
    {
        problems.push(format!(
            "Mcp-Name is {h:?} but the body names {:?}",
            body_name.unwrap_or("")
        ));
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Process;
    use crate::identity::Caller;
    use crate::policy::access::{Access, AccessConfig, Call};
    use crate::policy::gateway::{Gateway, GatewayConfig};

    struct Fixture {
        access: Access,
        gateway: Gateway,
    }

    fn fixture(policy: &str) -> Fixture {
        #[derive(serde::Deserialize)]
        struct F {
            #[serde(default)]
            access: AccessConfig,
            #[serde(default)]
            gateway: GatewayConfig,
        }
        let f: F = toml::from_str(policy).unwrap();
        Fixture {
            access: Access::new(&f.access).unwrap(),
            gateway: Gateway::new(&f.gateway, f.access.can_refuse()),
        }
    }

    const DENY_DEPLOY: &str = r#"
        [[access.rules]]
        name = "no-deploys"
        action = "deny"
        match = { method = "tools/call", tool = "deploy*" }
        [[access.rules]]
        name = "ask"
        action = "approve"
        match = { tool = "release*" }
    "#;

    fn run(f: &Fixture, head: Head<'_>, body: &BodyView) -> Plan {
        let process = Process::default();
        plan(&head, body, f.gateway.unparsed, |m| {
            f.access.decide(&Call {
                caller: Caller {
                    process: &process,
                    token: None,
                },
                method: m.method.as_deref(),
                name: m.name.as_deref(),
                uri: m.uri.as_deref(),
                destination: "10.0.0.5:8811",
            })
        })
    }

    fn post(ct: &str) -> Head<'_> {
        Head {
            method: "POST",
            content_type: Some(ct),
            ..Default::default()
        }
    }

    fn read(text: &str) -> BodyView {
        BodyView::Read(Bytes::copy_from_slice(text.as_bytes()))
    }

    const CALL: &str =
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"deploy_prod"}}"#;

    #[test]
    fn a_denied_call_is_refused_with_its_rule() {
        let f = fixture(DENY_DEPLOY);
        let p = run(&f, post("application/json"), &read(CALL));
        let Action::Refuse(Refusal::Policy(d)) = &p.action else {
            panic!("{:?}", p.action)
        };
        assert_eq!(d.rule.as_deref(), Some("no-deploys"));
        assert_eq!(p.request_ids(), [serde_json::json!(1)]);
    }

    #[test]
    fn an_allowed_call_is_forwarded_and_an_empty_body_is_plain() {
        let f = fixture(DENY_DEPLOY);
        let ok = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add"}}"#;
        let p = run(&f, post("application/json"), &read(ok));
        assert_eq!(p.action, Action::Forward);
        assert_eq!(
            p.items[0].decision.as_ref().unwrap().action,
            DecisionAction::Allow
        );
        let get = Head {
            method: "GET",
            ..Default::default()
        };
        assert_eq!(run(&f, get, &BodyView::Empty).action, Action::Plain);
    }

    #[test]
    fn a_bad_batch_element_hides_nothing_from_the_rules() {
        let f = fixture(DENY_DEPLOY);
        let batch = format!(r#"[{{"jsonrpc":"2.0","id":2,"method":"ping"}}, 17, {CALL}]"#);
        let p = run(&f, post("application/json"), &read(&batch));
        assert!(p.batch);
        assert_eq!(p.items.len(), 3);
        assert!(
            matches!(&p.action, Action::Refuse(Refusal::Policy(d)) if d.rule.as_deref() == Some("no-deploys")),
            "the denied call in the batch is seen: {:?}",
            p.action
        );
        // Without a denied call, the bad element itself refuses the batch.
        let batch = r#"[{"jsonrpc":"2.0","id":2,"method":"ping"}, 17]"#;
        let p = run(&f, post("application/json"), &read(batch));
        let Action::Refuse(Refusal::Unparsed(why)) = &p.action else {
            panic!("{:?}", p.action)
        };
        assert!(why.contains("element 2 of the batch"), "{why}");
        assert_eq!(p.request_ids(), [serde_json::json!(2)]);
    }

    #[test]
    fn what_cannot_be_read_is_refused_when_rules_can_refuse() {
        let f = fixture(DENY_DEPLOY);
        for (head, body) in [
            (post("application/json"), read("{nope")),
            (post("text/plain"), read("deploy please")),
            (
                post("application/json"),
                BodyView::Unreadable("over the parse limit".into()),
            ),
            (post("application/cbor"), read("\u{a1}")),
        ] {
            let p = run(&f, head, &body);
            assert!(
                matches!(p.action, Action::Refuse(Refusal::Unparsed(_))),
                "{body:?}: {:?}",
                p.action
            );
            let d = match &p.action {
                Action::Refuse(r) => r.decision(),
                _ => unreachable!(),
            };
            assert_eq!(d.rule.as_deref(), Some(UNPARSED_RULE));
        }
    }

    #[test]
    fn what_cannot_be_read_is_forwarded_when_nothing_can_be_refused_or_when_told() {
        let record_only = fixture("");
        let p = run(&record_only, post("application/json"), &read("{nope"));
        assert_eq!(p.action, Action::Forward, "recorded as malformed MCP");
        assert!(p.unparsed_why().unwrap().contains("JSON"));
        let p = run(&record_only, post("text/plain"), &read("hello"));
        assert_eq!(p.action, Action::Plain, "not MCP at all");
        let told = fixture(&format!(
            "{DENY_DEPLOY}\n[gateway]\nunparsed = \"forward\"\n"
        ));
        let p = run(&told, post("application/json"), &read("{nope"));
        assert_eq!(p.action, Action::Forward);
        // A denied call still is refused, whatever `unparsed` says.
        let p = run(
            &told,
            post("application/json"),
            &read(&format!("[{CALL}, 1]")),
        );
        assert!(matches!(p.action, Action::Refuse(Refusal::Policy(_))));
    }

    #[test]
    fn every_held_message_of_a_batch_is_listed_together() {
        let f = fixture(DENY_DEPLOY);
        let batch = r#"[
            {"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"release_a"}},
            {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"add"}},
            {"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"release_b"}}
        ]"#;
        let p = run(&f, post("application/json"), &read(batch));
        assert_eq!(p.action, Action::Hold(vec![0, 2]));
    }

    #[test]
    fn a_protocol_switch_is_refused_when_rules_can_refuse_and_plain_otherwise() {
        let head = Head {
            method: "GET",
            switches_protocol: true,
            ..Default::default()
        };
        let strict = fixture(DENY_DEPLOY);
        assert!(matches!(
            run(&strict, head, &BodyView::Empty).action,
            Action::Refuse(Refusal::Unparsed(_))
        ));
        assert_eq!(
            run(&fixture(""), head, &BodyView::Empty).action,
            Action::Plain
        );
    }

    #[test]
    fn answers_the_client_sends_get_no_decision() {
        let f = fixture("[access]\ndefault = \"deny\"\n");
        let p = run(
            &f,
            post("application/json"),
            &read(r#"{"jsonrpc":"2.0","id":"s1","result":{}}"#),
        );
        assert_eq!(p.items[0].decision, None);
        assert_eq!(p.action, Action::Forward);
    }

    #[test]
    fn mirror_headers_are_compared_with_a_lone_message() {
        let (m, _) = mcp::parse(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add"}}"#,
        )
        .unwrap();
        let mut head = Head {
            mcp_method: Some("tools/call"),
            mcp_name: Some("add"),
            ..Default::default()
        };
        assert_eq!(header_mismatch(&head, &m[0]), None);
        head.mcp_name = Some("rm_rf");
        let why = header_mismatch(&head, &m[0]).unwrap();
        assert!(why.contains("Mcp-Name is \"rm_rf\""), "{why}");
        head.mcp_method = Some("tools/list");
        assert!(
            header_mismatch(&head, &m[0])
                .unwrap()
                .contains("Mcp-Method")
        );
        assert_eq!(header_mismatch(&Head::default(), &m[0]), None);
    }
}
