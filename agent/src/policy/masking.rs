//! Masking: finds sensitive values in JSON-RPC messages and rewrites only JSON string values,
//! so every message stays valid JSON. Fast on clean payloads: each string's candidate rules
//! are named first (a rule's keywords or, for a rule without keywords, its pattern), and only
//! candidates run their own regex (and validator). For ASCII text `prefilter` names them,
//! mostly with SIMD; other text goes to one `RegexSet` of the same keywords and patterns, a
//! plain search of which rejects most strings in one pass before the overlapping search that
//! names the candidates.
#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use hmac::{Hmac, Mac};
use regex::{Regex, RegexSet};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

use super::prefilter::{Member, Prefilter};
use super::validators::Validator;

#[derive(Debug, thiserror::Error)]
pub enum MaskingError {
    #[error("masking rule {rule:?}: the pattern does not compile: {why}")]
    Pattern { rule: String, why: String },
    #[error("masking rule {rule:?}: {why}")]
    Rule { rule: String, why: String },
    #[error("masking rule {rule:?}: {case:?} should {expected} but does not")]
    Example {
        rule: String,
        case: String,
        expected: &'static str,
    },
}

/// Replaces every occurrence of `literal` in the string values of `value` with
/// `replacement`; true when one was found. For values the agent knows are secret (a request's
/// own token, a brokered credential), whatever the rules say.
pub fn scrub_literal(value: &mut Value, literal: &str, replacement: &str) -> bool {
    if literal.len() < 4 {
        return false;
    }
    match value {
        Value::String(s) if s.contains(literal) => {
            *s = s.replace(literal, replacement);
            true
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |hit, v| scrub_literal(v, literal, replacement) | hit),
        Value::Object(map) => map
            .values_mut()
            .fold(false, |hit, v| scrub_literal(v, literal, replacement) | hit),
        _ => false,
    }
}

/// Where in a message a rule looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Request and notification `params` (either direction).
    Params,
    /// Response `result`s.
    Result,
    /// Error objects.
    Error,
    /// The request's URL (path and query, as recorded) and, for `wire` rules, the values of
    /// the request headers that are forwarded (the caller's token headers excepted).
    Headers,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `[MASKED:rule]`.
    #[default]
    Redact,
    /// `[HASH:rule:16 hex]`, a keyed HMAC: equal values correlate, the value does not show.
    Hash,
    /// `[MASKED:rule]` followed by the last four characters.
    Partial,
}

/// Whether `rule` looks at `scope` (None: everywhere, for what is recorded about a caller).
fn in_scope(rule: &Rule, scope: Option<Scope>) -> bool {
    scope.is_none_or(|s| rule.scope.contains(&s))
}

/// A JSON number's text, written on the stack: every message has some (`took_ms`, ids, counts)
/// and most are masked by nothing, so a `String` for each was an allocation for nothing.
#[derive(Default)]
struct NumberText {
    buf: [u8; 32],
    len: usize,
    /// Past the buffer (serde_json's arbitrary-precision numbers can be long).
    spill: String,
}

impl std::fmt::Write for NumberText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.spill.is_empty() && self.len + s.len() <= self.buf.len() {
            self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
            self.len += s.len();
        } else {
            if self.spill.is_empty() {
                self.spill
                    .push_str(std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default());
            }
            self.spill.push_str(s);
        }
        Ok(())
    }
}

impl NumberText {
    fn of(&mut self, n: &serde_json::Number) -> &str {
        use std::fmt::Write as _;
        // Writing to memory does not fail.
        let _ = write!(self, "{n}");
        if self.spill.is_empty() {
            // Only whole `str`s were copied in.
            std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
        } else {
            &self.spill
        }
    }
}

/// One rule as a policy file states it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// A regex over string values. A group named `secret` limits masking to that part.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Literal prefilter (case-insensitive): the pattern runs only on strings holding one.
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub validator: Option<Validator>,
    #[serde(default = "default_entropy")]
    pub entropy_min: f64,
    /// Object keys (case-insensitive) whose string values are masked whatever they hold.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Field paths (`arguments.password`, `content.*.text`; `**` for any depth) the rule is
    /// limited to; without a pattern, the whole value at those paths is masked.
    #[serde(default)]
    pub fields: Vec<String>,
    #[serde(default = "default_scope")]
    pub scope: Vec<Scope>,
    #[serde(default)]
    pub action: Action,
    /// Also rewrite what is forwarded, not only what is recorded.
    #[serde(default)]
    pub wire: bool,
    /// Texts the rule must mask, and texts it must leave alone; checked by `policy check`.
    #[serde(default)]
    pub examples: Vec<String>,
    #[serde(default)]
    pub counterexamples: Vec<String>,
}

fn default_entropy() -> f64 {
    3.5
}

fn default_scope() -> Vec<Scope> {
    vec![Scope::Params, Scope::Result, Scope::Error]
}

struct Rule {
    name: String,
    regex: Option<Regex>,
    /// Index of the `secret` capture group: only that part of a match is replaced.
    secret_group: Option<usize>,
    validator: Option<Validator>,
    entropy_min: f64,
    fields: Option<GlobSet>,
    scope: Vec<Scope>,
    action: Action,
    wire: bool,
}

/// The compiled rules.
pub struct Masker {
    rules: Vec<Rule>,
    /// Each rule's keywords, or its pattern when it has none.
    set: RegexSet,
    /// Set index to rule index.
    set_rule: Vec<usize>,
    /// The set's `matches`, faster, for ASCII text (`None`: the set alone).
    prefilter: Option<Prefilter>,
    /// Rules that run whatever the prefilters say (a pattern limited to fields).
    always: Vec<usize>,
    /// Key rules by lowercased key, sorted by length (see `key_rule`).
    keys: Vec<(String, usize)>,
    /// Bit `n` set: some key is `n` bytes long (bit 63: 63 or more).
    key_lengths: u64,
    hash_key: [u8; 32],
    /// Some rule has `wire = true` (asked on every request).
    any_wire: bool,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field(
                "rules",
                &self.rules.iter().map(|r| &r.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What masking did to a message: the rules that fired, in rule order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Masked {
    pub rules: BTreeSet<String>,
    /// A rule with `wire = true` fired: the forwarded message changes too.
    pub wire: bool,
}

impl Masker {
    pub fn new(configs: &[RuleConfig], hash_key: [u8; 32]) -> Result<Self, MaskingError> {
        let mut rules = Vec::new();
        let mut set_patterns = Vec::new();
        let mut set_rule = Vec::new();
        let mut set_members = Vec::new();
        let mut always = Vec::new();
        let mut keys = HashMap::new();
        for (i, c) in configs.iter().enumerate() {
            let err = |why: String| MaskingError::Rule {
                rule: c.name.clone(),
                why,
            };
            if c.pattern.is_none() && c.keys.is_empty() && c.fields.is_empty() {
                return Err(err("give a pattern, keys or fields".into()));
            }
            if c.scope.is_empty() {
                return Err(err("the scope is empty".into()));
            }
            let regex = c
                .pattern
                .as_deref()
                .map(|p| {
                    Regex::new(p).map_err(|e| MaskingError::Pattern {
                        rule: c.name.clone(),
                        why: e.to_string(),
                    })
                })
                .transpose()?;
            let fields = if c.fields.is_empty() {
                None
            } else {
                let mut b = GlobSetBuilder::new();
                for f in &c.fields {
                    let glob = GlobBuilder::new(&f.replace('.', "/"))
                        .literal_separator(true)
                        .build()
                        .map_err(|e| err(format!("field {f:?}: {e}")))?;
                    b.add(glob);
                }
                Some(b.build().map_err(|e| err(e.to_string()))?)
            };
            if fields.is_some() {
                always.push(i);
            } else if let Some(p) = &c.pattern {
                if c.keywords.is_empty() {
                    set_patterns.push(p.clone());
                    set_members.push(Member::Pattern(p));
                } else {
                    set_members.push(Member::Keywords(&c.keywords));
                    let alts: Vec<String> = c.keywords.iter().map(|k| regex::escape(k)).collect();
                    set_patterns.push(format!("(?i:{})", alts.join("|")));
                }
                set_rule.push(i);
            }
            for k in &c.keys {
                keys.insert(k.to_ascii_lowercase(), i);
            }
            rules.push(Rule {
                name: c.name.clone(),
                secret_group: regex
                    .as_ref()
                    .and_then(|r| r.capture_names().position(|n| n == Some("secret"))),
                regex,
                validator: c.validator,
                entropy_min: c.entropy_min,
                fields,
                scope: c.scope.clone(),
                action: c.action,
                wire: c.wire,
            });
        }
        let set = RegexSet::new(&set_patterns).map_err(|e| MaskingError::Pattern {
            rule: "(set)".into(),
            why: e.to_string(),
        })?;
        Ok(Masker {
            any_wire: rules.iter().any(|r| r.wire),
            prefilter: Prefilter::new(&set_members),
            rules,
            set,
            set_rule,
            always,
            key_lengths: keys
                .keys()
                .fold(0, |bits, k: &String| bits | 1 << k.len().min(63)),
            keys: {
                // A later rule's key wins, as the map's last insert did.
                let mut keys: Vec<(String, usize)> = keys.into_iter().collect();
                keys.sort_unstable_by(|a, b| (a.0.len(), &a.0).cmp(&(b.0.len(), &b.0)));
                keys
            },
            hash_key,
        })
    }

    /// Checks every rule's examples and counterexamples.
    pub fn check_examples(&self, configs: &[RuleConfig]) -> Result<usize, MaskingError> {
        let mut n = 0;
        for (i, c) in configs.iter().enumerate() {
            for (cases, want, expected) in [
                (&c.examples, true, "be masked"),
                (&c.counterexamples, false, "be left alone"),
            ] {
                for case in cases {
                    let masked = self.mask_with(i, case).is_some();
                    if masked != want {
                        return Err(MaskingError::Example {
                            rule: c.name.clone(),
                            case: case.clone(),
                            expected,
                        });
                    }
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Masks the string and number values of `value` in place for `scope` (a number a rule
    /// matches, such as a card number sent as a JSON number, becomes the masked string).
    pub fn mask_value(&self, value: &mut Value, scope: Scope) -> Masked {
        let mut out = Masked::default();
        let mut path = Vec::new();
        self.walk(value, Some(scope), false, &mut path, None, &mut out);
        out
    }

    /// Masks with every rule, whatever its scope: for what the trail stores about a caller
    /// beside its messages (command lines, CI variables, the URL, header values). A rule's
    /// scope says where in a message it looks; nothing a caller supplied is stored in clear
    /// because it came by another way.
    pub fn mask_recorded(&self, value: &mut Value) -> Masked {
        let mut out = Masked::default();
        let mut path = Vec::new();
        self.walk(value, None, false, &mut path, None, &mut out);
        out
    }

    /// `mask_recorded` over plain strings; true when one changed.
    pub fn mask_recorded_strings<'a>(
        &self,
        strings: impl IntoIterator<Item = &'a mut String>,
        fired: &mut BTreeSet<String>,
    ) -> bool {
        let mut changed = false;
        for s in strings {
            if let Some((masked, rules)) = self.mask_str(s, None, false, &[]) {
                *s = masked;
                changed = true;
                fired.extend(rules.into_iter().map(|i| self.rules[i].name.clone()));
            }
        }
        changed
    }

    /// Masks with the `wire = true` rules only: what is forwarded.
    pub fn mask_value_wire(&self, value: &mut Value, scope: Scope) -> Masked {
        let mut out = Masked::default();
        if self.any_wire {
            let mut path = Vec::new();
            self.walk(value, Some(scope), true, &mut path, None, &mut out);
        }
        out
    }

    /// True when some rule also rewrites what is forwarded.
    pub fn has_wire_rules(&self) -> bool {
        self.any_wire
    }

    /// `scope` None: every rule applies (see `mask_recorded`).
    fn walk(
        &self,
        value: &mut Value,
        scope: Option<Scope>,
        wire_only: bool,
        path: &mut Vec<String>,
        key_rule: Option<usize>,
        out: &mut Masked,
    ) {
        match value {
            Value::String(s) => {
                if let Some(i) = key_rule {
                    let rule = &self.rules[i];
                    if in_scope(rule, scope) && !s.is_empty() && (rule.wire || !wire_only) {
                        *s = self.replacement(rule, s);
                        out.rules.insert(rule.name.clone());
                        out.wire |= rule.wire;
                        return;
                    }
                }
                if let Some((masked, fired)) = self.mask_str(s, scope, wire_only, path) {
                    *s = masked;
                    for i in fired {
                        out.rules.insert(self.rules[i].name.clone());
                        out.wire |= self.rules[i].wire;
                    }
                }
            }
            // A number is its JSON text to the rules: a card or account number sent as a
            // number is as sensitive as one sent as a string. A match makes it a string.
            Value::Number(n) => {
                let mut digits = NumberText::default();
                let text = digits.of(n);
                if let Some(i) = key_rule {
                    let rule = &self.rules[i];
                    if in_scope(rule, scope) && (rule.wire || !wire_only) {
                        *value = Value::String(self.replacement(rule, text));
                        out.rules.insert(rule.name.clone());
                        out.wire |= rule.wire;
                        return;
                    }
                }
                if let Some((masked, fired)) = self.mask_str(text, scope, wire_only, path) {
                    *value = Value::String(masked);
                    for i in fired {
                        out.rules.insert(self.rules[i].name.clone());
                        out.wire |= self.rules[i].wire;
                    }
                }
            }
            Value::Array(items) => {
                // Paths are only built when a rule looks at them (`fields`): a hot loop.
                let track = !self.always.is_empty();
                for (n, item) in items.iter_mut().enumerate() {
                    if track {
                        path.push(n.to_string());
                    }
                    self.walk(item, scope, wire_only, path, key_rule, out);
                    if track {
                        path.pop();
                    }
                }
            }
            Value::Object(map) => {
                let track = !self.always.is_empty();
                for (k, v) in map.iter_mut() {
                    let rule = self.key_rule(k);
                    if track {
                        path.push(k.clone());
                    }
                    self.walk(v, scope, wire_only, path, rule.or(key_rule), out);
                    if track {
                        path.pop();
                    }
                }
            }
            _ => {}
        }
    }

    /// The key rule for an object key, ASCII case-insensitively. Asked for every key of every
    /// message: most keys have a length no rule's key has; otherwise the keys of that length
    /// alone are compared, with no hashing and no lowercased copy (hashing every key with
    /// SipHash was 7% of masking's instructions).
    fn key_rule(&self, key: &str) -> Option<usize> {
        if self.key_lengths & 1 << key.len().min(63) == 0 {
            return None;
        }
        let from = self.keys.partition_point(|(k, _)| k.len() < key.len());
        self.keys[from..]
            .iter()
            .take_while(|(k, _)| k.len() == key.len())
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|&(_, i)| i)
    }

    /// The masked text and the rules that fired, or `None` when nothing matched.
    fn mask_str(
        &self,
        s: &str,
        scope: Option<Scope>,
        wire_only: bool,
        path: &[String],
    ) -> Option<(String, Vec<usize>)> {
        let mut candidates: Vec<usize> = Vec::new();
        if !self.set_rule.is_empty() {
            self.set_matches(s, &mut candidates);
            candidates.iter_mut().for_each(|i| *i = self.set_rule[*i]);
        }
        candidates.extend(self.always.iter().copied());
        if candidates.is_empty() {
            return None;
        }
        candidates.sort_unstable();
        candidates.dedup();
        let joined = path.join("/");
        let mut text = std::borrow::Cow::Borrowed(s);
        let mut fired = Vec::new();
        for i in candidates {
            let rule = &self.rules[i];
            if !in_scope(rule, scope) || (wire_only && !rule.wire) {
                continue;
            }
            if let Some(fields) = &rule.fields
                && !fields.is_match(&joined)
            {
                continue;
            }
            let replaced = match &rule.regex {
                Some(_) => self.apply(rule, &text),
                // Fields only: the whole value.
                None => Some(self.replacement(rule, &text)),
            };
            if let Some(r) = replaced {
                text = std::borrow::Cow::Owned(r);
                fired.push(i);
            }
        }
        (!fired.is_empty()).then(|| (text.into_owned(), fired))
    }

    /// The set members that match `s` (possibly repeated), through the prefilter when it can
    /// judge `s`; else a plain search of the set first, which rejects most strings faster than
    /// the overlapping search that names them.
    fn set_matches(&self, s: &str, out: &mut Vec<usize>) {
        if self
            .prefilter
            .as_ref()
            .is_some_and(|p| p.candidates(s, out))
        {
            return;
        }
        if self.set.is_match(s) {
            out.extend(self.set.matches(s).iter());
        }
    }

    /// Runs one rule's regex over `s`; `None` when no match survives its validator.
    fn apply(&self, rule: &Rule, s: &str) -> Option<String> {
        let regex = rule.regex.as_ref()?;
        let mut targets: Vec<std::ops::Range<usize>> = Vec::new();
        if let Some(secret) = rule.secret_group {
            // One search per match, into reusable slots: `captures_iter` would allocate a
            // set of captures for each call and each match.
            let mut locs = regex.capture_locations();
            let mut at = 0;
            while at <= s.len() {
                let Some(m) = regex.captures_read_at(&mut locs, s, at) else {
                    break;
                };
                if let Some((a, b)) = locs.get(secret) {
                    targets.push(a..b);
                }
                at = if m.end() > m.start() {
                    m.end()
                } else {
                    // An empty match: step over one character.
                    m.end() + s[m.end()..].chars().next().map_or(1, char::len_utf8)
                };
            }
        } else {
            targets.extend(regex.find_iter(s).map(|m| m.range()));
        }
        // An empty match hides nothing: leave it be rather than insert a marker.
        targets.retain(|t| !t.is_empty());
        if let Some(v) = rule.validator {
            targets.retain(|t| v.check(&s[t.clone()], rule.entropy_min));
        }
        if targets.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(s.len());
        let mut last = 0;
        for t in targets {
            out.push_str(&s[last..t.start]);
            out.push_str(&self.replacement(rule, &s[t.clone()]));
            last = t.end;
        }
        out.push_str(&s[last..]);
        Some(out)
    }

    fn replacement(&self, rule: &Rule, value: &str) -> String {
        match rule.action {
            Action::Redact => format!("[MASKED:{}]", rule.name),
            Action::Hash => {
                let mut mac =
                    Hmac::<Sha256>::new_from_slice(&self.hash_key).expect("HMAC takes any key");
                mac.update(rule.name.as_bytes());
                mac.update(&[0]);
                mac.update(value.as_bytes());
                let digest = hex::encode(mac.finalize().into_bytes());
                format!("[HASH:{}:{}]", rule.name, &digest[..16])
            }
            Action::Partial => {
                let tail: String = value
                    .chars()
                    .rev()
                    .filter(|c| c.is_alphanumeric())
                    .take(4)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!("[MASKED:{}]{tail}", rule.name)
            }
        }
    }

    /// One rule alone over a text (for its examples).
    fn mask_with(&self, i: usize, s: &str) -> Option<String> {
        let rule = &self.rules[i];
        match &rule.regex {
            Some(_) => self.apply(rule, s),
            None => None,
        }
        .or_else(|| {
            // Key-only rules: the example is a key name.
            self.key_rule(s).filter(|&k| k == i).map(|_| String::new())
        })
    }

    /// The naive way, for the benchmark: every rule's regex over every string, no prefilter.
    pub fn mask_value_naive(&self, value: &mut Value, scope: Scope) -> usize {
        let mut fired = 0;
        match value {
            Value::String(s) => {
                for rule in &self.rules {
                    if rule.regex.is_some()
                        && rule.scope.contains(&scope)
                        && let Some(r) = self.apply(rule, s)
                    {
                        *s = r;
                        fired += 1;
                    }
                }
            }
            Value::Number(n) => {
                let mut text = n.to_string();
                let mut hit = 0;
                for rule in &self.rules {
                    if rule.regex.is_some()
                        && rule.scope.contains(&scope)
                        && let Some(r) = self.apply(rule, &text)
                    {
                        text = r;
                        hit += 1;
                    }
                }
                if hit > 0 {
                    *value = Value::String(text);
                    fired += hit;
                }
            }
            Value::Array(items) => {
                for item in items {
                    fired += self.mask_value_naive(item, scope);
                }
            }
            Value::Object(map) => {
                for v in map.values_mut() {
                    fired += self.mask_value_naive(v, scope);
                }
            }
            _ => {}
        }
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(toml_text: &str) -> Vec<RuleConfig> {
        #[derive(Deserialize)]
        struct F {
            rules: Vec<RuleConfig>,
        }
        toml::from_str::<F>(toml_text).unwrap().rules
    }

    fn default_masker() -> Masker {
        let p = crate::policy::Policy::embedded_default().unwrap();
        p.masker([9; 32]).unwrap()
    }

    #[test]
    fn only_string_values_change_and_json_stays_valid() {
        let m = default_masker();
        let mut v = json!({
            "name": "pay",
            "arguments": {"card": "4111 1111 1111 1111", "amount": 4111111111111111u64,
                          "notes": ["mail bob@example.com", "nothing here"], "password": "hunter2"}
        });
        let masked = m.mask_value(&mut v, Scope::Params);
        assert_eq!(v["arguments"]["card"], "[MASKED:payment_card]1111");
        assert_eq!(
            v["arguments"]["amount"], "[MASKED:payment_card]1111",
            "a card number sent as a JSON number is masked, recorded as a string"
        );
        assert!(
            v["arguments"]["notes"][0]
                .as_str()
                .unwrap()
                .starts_with("mail [HASH:email:")
        );
        assert_eq!(v["arguments"]["notes"][1], "nothing here");
        assert_eq!(v["arguments"]["password"], "[MASKED:sensitive_keys]");
        assert_eq!(
            masked.rules.iter().map(String::as_str).collect::<Vec<_>>(),
            ["email", "payment_card", "sensitive_keys"]
        );
        assert!(!masked.wire);
        serde_json::from_str::<Value>(&v.to_string()).unwrap();
    }

    #[test]
    fn hashes_correlate_and_depend_on_the_key() {
        let m = default_masker();
        let mut a = json!("a@example.com and a@example.com");
        m.mask_value(&mut a, Scope::Result);
        let parts: Vec<&str> = a.as_str().unwrap().split(" and ").collect();
        assert_eq!(parts[0], parts[1]);
        let other = crate::policy::Policy::embedded_default()
            .unwrap()
            .masker([8; 32])
            .unwrap();
        let mut b = json!("a@example.com");
        other.mask_value(&mut b, Scope::Result);
        assert_ne!(b.as_str().unwrap(), parts[0]);
    }

    #[test]
    fn scopes_fields_and_wire() {
        let rs = rules(
            r#"
            [[rules]]
            name = "ticket"
            pattern = 'T-\d{4}'
            scope = ["result"]
            wire = true
            [[rules]]
            name = "query"
            fields = ["arguments.query", "items.*.text"]
            "#,
        );
        let m = Masker::new(&rs, [0; 32]).unwrap();
        assert!(m.has_wire_rules());
        let mut both = json!({"text": "T-1234", "arguments": {"query": "q"}});
        let masked = m.mask_value_wire(&mut both, Scope::Result);
        assert_eq!(
            both["text"], "[MASKED:ticket]",
            "a wire rule rewrites what is forwarded"
        );
        assert_eq!(
            both["arguments"]["query"], "q",
            "a record-only rule does not"
        );
        assert_eq!(masked.rules.len(), 1);
        let mut p = json!({"q": "T-1234", "arguments": {"query": "select *", "other": "x"}});
        let masked = m.mask_value(&mut p, Scope::Params);
        assert_eq!(p["q"], "T-1234", "out of scope");
        assert_eq!(p["arguments"]["query"], "[MASKED:query]");
        assert_eq!(p["arguments"]["other"], "x");
        assert!(!masked.wire);
        let mut r = json!({"text": "see T-1234", "items": [{"text": "a"}, {"text": "b"}]});
        let masked = m.mask_value(&mut r, Scope::Result);
        assert_eq!(r["text"], "see [MASKED:ticket]");
        assert_eq!(r["items"][1]["text"], "[MASKED:query]");
        assert!(masked.wire);
    }

    #[test]
    fn secret_groups_mask_every_match_and_empty_matches_end() {
        let rs = rules(
            r#"
            [[rules]]
            name = "pin"
            pattern = 'pin=(?P<secret>\d*)'
            keywords = ["PIN="]
            [[rules]]
            name = "dots"
            pattern = '(?P<secret>\.*)'
            "#,
        );
        let m = Masker::new(&rs, [0; 32]).unwrap();
        let mut v = json!("pin=1234 pin= and pin=99, é..é");
        let masked = m.mask_value(&mut v, Scope::Result);
        assert_eq!(
            v, "pin=[MASKED:pin] pin= and pin=[MASKED:pin], é[MASKED:dots]é",
            "each secret group is replaced but an empty one; a pattern that can match \
             nothing steps over multi-byte characters and ends"
        );
        assert_eq!(masked.rules.len(), 2);
    }

    #[test]
    fn numbers_are_masked_like_their_text_and_other_numbers_stay() {
        let m = default_masker();
        let mut v = json!({"card": 4111111111111111u64, "qty": 3, "price": 12.5, "pin": 1234});
        let masked = m.mask_value(&mut v, Scope::Params);
        assert_eq!(v["card"], "[MASKED:payment_card]1111");
        assert_eq!(
            (v["qty"].clone(), v["price"].clone()),
            (json!(3), json!(12.5))
        );
        assert!(masked.rules.contains("payment_card"));
        let mut naive = json!({"card": 4111111111111111u64});
        m.mask_value_naive(&mut naive, Scope::Params);
        assert_eq!(naive["card"], "[MASKED:payment_card]1111");
    }

    #[test]
    fn recorded_metadata_is_masked_by_every_rule_whatever_its_scope() {
        let rs =
            rules("[[rules]]\nname = \"ticket\"\npattern = 'T-\\d{4}'\nscope = [\"result\"]\n");
        let m = Masker::new(&rs, [0; 32]).unwrap();
        let mut args = ["deploy".to_owned(), "--ticket=T-1234".to_owned()];
        let mut fired = BTreeSet::new();
        assert!(m.mask_recorded_strings(args.iter_mut(), &mut fired));
        assert_eq!(args[1], "--ticket=[MASKED:ticket]");
        assert_eq!(fired.into_iter().collect::<Vec<_>>(), ["ticket"]);
        let mut vars = json!({"JOB_TICKET": "T-9999", "N": 12});
        assert_eq!(m.mask_recorded(&mut vars).rules.len(), 1);
        assert_eq!(vars["JOB_TICKET"], "[MASKED:ticket]");
    }

    #[test]
    fn near_misses_are_left_alone() {
        let m = default_masker();
        let mut v = json!({"text": "order 4111 1111 1111 1112, build 20261126101500, 2026-11-26, see the api_key docs"});
        let before = v.clone();
        assert!(m.mask_value(&mut v, Scope::Params).rules.is_empty());
        assert_eq!(v, before);
    }

    #[test]
    fn header_scope_is_opt_in() {
        let rs = rules(
            "[[rules]]\nname = \"mail\"\npattern = '[a-z]+@[a-z]+\\.com'\nscope = [\"headers\"]\n",
        );
        let m = Masker::new(&rs, [0; 32]).unwrap();
        let mut url = json!("/mcp?user=bob@example.com");
        assert_eq!(m.mask_value(&mut url, Scope::Headers).rules.len(), 1);
        assert_eq!(url, "/mcp?user=[MASKED:mail]");
        let mut body = json!("bob@example.com");
        assert!(m.mask_value(&mut body, Scope::Params).rules.is_empty());
        // The default pack leaves headers alone unless a rule says otherwise.
        let mut url = json!("/mcp?user=bob@example.com");
        assert!(
            default_masker()
                .mask_value(&mut url, Scope::Headers)
                .rules
                .is_empty()
        );
    }

    #[test]
    fn rules_need_something_to_match() {
        let rs = rules("[[rules]]\nname = \"empty\"\n");
        assert!(matches!(
            Masker::new(&rs, [0; 32]),
            Err(MaskingError::Rule { .. })
        ));
    }

    /// Texts that hold, nearly hold or do not hold what the default pack looks for: every
    /// rule's examples and counterexamples, in several cases, amid prose, at the edges of the
    /// prefilter's chunks, and with characters that are not ASCII next to them.
    fn corpus() -> Vec<String> {
        let p = crate::policy::Policy::embedded_default().unwrap();
        let prose = [
            "The build failed on the integration step because the migration timed out.",
            "2026-11-26T10:00:00Z INFO worker-3 processed 1532 jobs in 12.4s (p99 41ms)",
            "SELECT id FROM orders WHERE status = 'open' ORDER BY created_at DESC LIMIT 50;",
            "pod api-7d9f8c6b5-x2x4z restarted 3 times: OOMKilled, limit 512Mi",
            "point out any security issues, especially around private input and access",
            "        indented            with runs of spaces   and -- dashes ---",
            "",
            "é",
        ];
        let mut texts: Vec<String> = prose.iter().map(|s| s.to_string()).collect();
        for rule in &p.masking {
            for case in rule.examples.iter().chain(&rule.counterexamples) {
                for variant in [case.clone(), case.to_uppercase(), case.to_lowercase()] {
                    texts.push(variant.clone());
                    texts.push(format!("{} {variant} {}", prose[0], prose[1]));
                    texts.push(format!("x{variant}x"));
                    texts.push(format!("é{variant}é"));
                    texts.push(format!("{variant}\u{17f}"));
                }
                for at in [16 * 1024 - 3, 16 * 1024 - 1] {
                    texts.push(format!("{}{case}", "a".repeat(at)));
                }
            }
        }
        // Keywords that Unicode case folding matches and ASCII lowercasing does not.
        texts.push("the paſſword=hunter22 and ſecret: abcdefgh".into());
        texts.push("\u{212a}ey".into());
        texts
    }

    #[test]
    fn the_prefilter_names_the_members_the_set_does_and_masking_agrees_with_naive() {
        let m = default_masker();
        let mut judged = 0;
        let prefilter = m
            .prefilter
            .as_ref()
            .expect("the default pack suits the prefilter");
        for text in corpus() {
            let truth: Vec<usize> = m.set.matches(&text).into_iter().collect();
            let mut quick = Vec::new();
            if prefilter.candidates(&text, &mut quick) {
                quick.sort_unstable();
                quick.dedup();
                assert_eq!(quick, truth, "{text:?}");
                judged += 1;
            } else {
                assert!(!text.is_ascii(), "{text:?} is ASCII");
            }
            for scope in [Scope::Params, Scope::Result] {
                let (mut a, mut b) = (json!(text), json!(text));
                m.mask_value(&mut a, scope);
                m.mask_value_naive(&mut b, scope);
                assert_eq!(a, b, "{text:?}");
            }
        }
        assert!(judged > 1000, "{judged} judged by the prefilter");
    }

    #[test]
    fn prefilter_and_naive_agree() {
        let m = default_masker();
        let text = "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 and 4111 1111 1111 1111 and AKIAIOSFODNN7EXAMPLE";
        let mut a = json!(text);
        let mut b = json!(text);
        m.mask_value(&mut a, Scope::Params);
        m.mask_value_naive(&mut b, Scope::Params);
        assert_eq!(a, b);
    }
}
