//! Any bytes into `mcp::parse`: it answers (messages or an error), never panics, and what it
//! calls a message has the shape its kind says. `bounded` keeps any value within its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../agent/src/mcp/mod.rs"]
#[allow(dead_code)]
mod mcp;

fuzz_target!(|data: &[u8]| {
    let Ok((messages, batch)) = mcp::parse(data) else {
        return;
    };
    assert!(!messages.is_empty());
    assert!(batch || messages.len() == 1);
    for m in messages {
        match m.kind {
            mcp::Kind::Request => assert!(m.method.is_some() && m.id.is_some()),
            mcp::Kind::Notification => assert!(m.method.is_some() && m.id.is_none()),
            mcp::Kind::Response => assert!(m.result.is_some()),
            mcp::Kind::Error => assert!(m.error.is_some()),
        }
        for value in [m.params, m.result, m.error].into_iter().flatten() {
            let bounded = mcp::bounded(value, 256);
            // A cut value is a small marker object: far below the limit plus its head.
            assert!(bounded.to_string().len() <= 256 * 8 + 256);
        }
    }
});
