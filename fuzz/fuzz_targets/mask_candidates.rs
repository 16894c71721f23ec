//! Any text into the masking prefilter (`policy/prefilter.rs`) and into the rule set it stands
//! in for: for ASCII text both name the same candidate rules, and for other text the
//! prefilter declines. The members are the default pack's (`policies/default.toml`), built into
//! the set the way `Masker::new` builds it.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

#[path = "../../agent/src/policy/prefilter.rs"]
#[allow(dead_code)]
mod prefilter;

use prefilter::{Member, Prefilter};

/// The default pack's set members, in its order: each rule's keywords, or its pattern.
fn members() -> Vec<(Vec<String>, Option<String>)> {
    let pack: toml::Value =
        toml::from_str(include_str!("../../policies/default.toml")).expect("the pack parses");
    let mut out = Vec::new();
    for rule in pack["masking"]["rules"].as_array().expect("rules") {
        let Some(pattern) = rule.get("pattern").and_then(|p| p.as_str()) else {
            continue;
        };
        if rule.get("fields").is_some() {
            continue;
        }
        let keywords: Vec<String> = rule
            .get("keywords")
            .and_then(|k| k.as_array())
            .map(|k| {
                k.iter()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let bare = keywords.is_empty().then(|| pattern.to_string());
        out.push((keywords, bare));
    }
    out
}

static ENGINES: LazyLock<(regex::RegexSet, Prefilter)> = LazyLock::new(|| {
    let members = members();
    let set = regex::RegexSet::new(members.iter().map(|(keywords, bare)| match bare {
        Some(p) => p.clone(),
        None => {
            let alts: Vec<String> = keywords.iter().map(|k| regex::escape(k)).collect();
            format!("(?i:{})", alts.join("|"))
        }
    }))
    .expect("the set compiles");
    let as_members: Vec<Member<'_>> = members
        .iter()
        .map(|(keywords, bare)| match bare {
            Some(p) => Member::Pattern(p),
            None => Member::Keywords(keywords),
        })
        .collect();
    let prefilter = Prefilter::new(&as_members).expect("the default pack suits the prefilter");
    (set, prefilter)
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (set, prefilter) = &*ENGINES;
    let mut named = Vec::new();
    if prefilter.candidates(text, &mut named) {
        named.sort_unstable();
        named.dedup();
        let truth: Vec<usize> = set.matches(text).into_iter().collect();
        assert_eq!(named, truth, "{text:?}");
    } else {
        assert!(
            !text.is_ascii(),
            "the prefilter declined ASCII text {text:?}"
        );
        assert!(named.is_empty());
    }
});
