//! Arbitrary request heads and bodies into the request plan (`proxy/http/plan.rs`): it
//! answers, never panics, and its action agrees with its items: a denied message refuses the
//! request; what cannot be read is refused when the policy refuses it; held items are
//! requests the rules held; nothing with a body passes as plain HTTP under a strict policy.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../agent/src/mcp/mod.rs"]
#[allow(dead_code)]
mod mcp;

// The modules the plan names by their crate paths (`crate::audit::record`, ...), included
// by path (a `#[path]` inside an inline module would resolve below a folder that does not
// exist) and re-exported where the plan looks for them.
#[path = "../../agent/src/audit/record.rs"]
#[allow(dead_code)]
mod record_rs;
#[path = "../../agent/src/policy/approvals.rs"]
#[allow(dead_code)]
mod approvals_rs;
#[path = "../../agent/src/policy/gateway.rs"]
#[allow(dead_code)]
mod gateway_rs;
#[path = "../../agent/src/proxy/http/plan.rs"]
#[allow(dead_code)]
mod plan_rs;

mod audit {
    pub(crate) use super::record_rs as record;
}
mod policy {
    pub(crate) use super::approvals_rs as approvals;
    pub(crate) use super::gateway_rs as gateway;
}
mod proxy {
    pub mod http {
        pub(crate) use crate::plan_rs as plan;
    }
}

use audit::record::{Decision, DecisionAction};
use policy::gateway::Unparsed;
use proxy::http::plan::{Action, BodyView, Head, Refusal, plan};

const CONTENT_TYPES: [Option<&str>; 4] = [
    None,
    Some("application/json"),
    Some("text/plain"),
    Some("application/json; charset=utf-8"),
];

/// A stand-in for the access rules: a verdict from the name's first letter.
fn decide(m: &mcp::Message) -> Decision {
    let action = match m.name.as_deref().and_then(|n| n.bytes().next()) {
        Some(b'd') => DecisionAction::Deny,
        Some(b'r') => DecisionAction::Held,
        Some(b'l') => DecisionAction::RateLimited,
        _ => DecisionAction::Allow,
    };
    Decision {
        action,
        rule: Some("fuzz".into()),
        message: None,
        timeout_secs: (action == DecisionAction::Held).then_some(1),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let unparsed = if selector & 1 == 0 {
        Unparsed::Refuse
    } else {
        Unparsed::Forward
    };
    let head = Head {
        method: "POST",
        content_type: CONTENT_TYPES[usize::from(selector >> 1) % CONTENT_TYPES.len()],
        mcp_method: (selector & 0x10 != 0).then_some("tools/call"),
        mcp_name: (selector & 0x20 != 0).then_some("deploy"),
        switches_protocol: selector & 0x08 != 0,
    };
    let body = match selector >> 6 {
        0 if rest.is_empty() => BodyView::Empty,
        1 => BodyView::Unreadable(String::from_utf8_lossy(rest).into_owned()),
        _ => BodyView::Read(bytes::Bytes::copy_from_slice(rest)),
    };
    let p = plan(&head, &body, unparsed, decide);
    let denied = p.items.iter().any(|i| {
        i.decision
            .as_ref()
            .is_some_and(|d| matches!(d.action, DecisionAction::Deny | DecisionAction::RateLimited))
    });
    let unreadable = p.unparsed_why().is_some();
    match &p.action {
        Action::Refuse(Refusal::Policy(_)) => assert!(denied),
        Action::Refuse(Refusal::Unparsed(_)) => {
            assert!(!denied && unreadable && unparsed == Unparsed::Refuse)
        }
        Action::Hold(held) => {
            assert!(!denied && !unreadable && !held.is_empty());
            for &i in held {
                let item = &p.items[i];
                assert_eq!(item.decision.as_ref().unwrap().action, DecisionAction::Held);
            }
        }
        Action::Forward => assert!(!denied && (!unreadable || unparsed == Unparsed::Forward)),
        Action::Plain => {
            assert!(p.items.is_empty());
            assert!(matches!(body, BodyView::Empty) || unparsed == Unparsed::Forward);
        }
    }
    // Every request id is owed an answer, and the plan names each once.
    let requests = p
        .items
        .iter()
        .filter(|i| {
            i.message
                .as_ref()
                .is_ok_and(|m| m.kind == mcp::Kind::Request)
        })
        .count();
    assert_eq!(p.request_ids().len(), requests);
    if p.batch {
        assert!(p.items.iter().all(|i| i.header_mismatch.is_none()));
    }
});
