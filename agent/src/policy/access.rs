//! Access rules: who may call what. Rules are tried in order and the first that matches
//! decides: allow, deny (the client gets a JSON-RPC error naming the rule), hold for approval
//! (an operator decides; see `approvals.rs`), or rate limit (a token bucket per token
//! subject, per process or for the whole rule). No match: the
//! section's default (allow unless told otherwise). Pure apart from the buckets' clock.
#![forbid(unsafe_code)]

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Instant;

use globset::{Glob, GlobMatcher};
use lru::LruCache;
use serde::Deserialize;

use crate::audit::record::{Decision, DecisionAction};
use crate::identity::Caller;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("access rule {rule:?}: {field} {pattern:?} is not a glob: {why}")]
    Glob {
        rule: String,
        field: &'static str,
        pattern: String,
        why: String,
    },
    #[error("access rule {rule:?}: {why}")]
    Rule { rule: String, why: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAction {
    #[default]
    Allow,
    Deny,
}

/// The `[access]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// What happens to a call no rule matches.
    #[serde(default)]
    pub default: DefaultAction,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

impl AccessConfig {
    /// Whether some call can be refused: then what cannot be judged must not pass unjudged
    /// (the `[gateway]` defaults).
    pub fn can_refuse(&self) -> bool {
        self.default == DefaultAction::Deny
            || self.rules.iter().any(|r| {
                matches!(
                    r.action,
                    ActionConfig::Deny | ActionConfig::Approve | ActionConfig::RateLimit
                )
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionConfig {
    Allow,
    Deny,
    /// Hold the call until an operator approves it (or deny it when `timeout_secs` pass).
    Approve,
    RateLimit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// The verified token subject (callers without one share one bucket).
    #[default]
    Sub,
    /// The calling process (pid and start time).
    Process,
    /// One bucket for everything the rule matches.
    Rule,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    #[serde(default)]
    pub per: Per,
    /// Calls allowed at once.
    pub burst: u32,
    /// Calls added back per second.
    pub per_second: f64,
}

/// One rule as the policy states it. Every condition given must hold; globs use `*`, `?`,
/// `[...]` and `{a,b}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    pub action: ActionConfig,
    /// Said to the client when the rule denies.
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub rate: Option<RateConfig>,
    /// For `approve`: how long a held call waits before it is denied.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default, rename = "match")]
    pub when: MatchConfig,
}

/// How long a held call waits when the rule does not say.
pub const DEFAULT_APPROVAL_TIMEOUT_SECS: u64 = 300;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    pub exe: Option<String>,
    pub uid: Option<u32>,
    pub unit: Option<String>,
    /// Container id glob (`*`: any container).
    pub container: Option<String>,
    pub ci_provider: Option<String>,
    pub ci_repository: Option<String>,
    pub token_verified: Option<bool>,
    pub iss: Option<String>,
    pub sub: Option<String>,
    /// A group (or role) the verified token holds.
    pub group: Option<String>,
    pub method: Option<String>,
    pub tool: Option<String>,
    pub resource: Option<String>,
    /// The gateway, `ADDR:PORT` as the record shows it.
    pub destination: Option<String>,
}

/// What a call is, for matching.
pub struct Call<'a> {
    pub caller: Caller<'a>,
    pub method: Option<&'a str>,
    /// Tool or prompt name.
    pub name: Option<&'a str>,
    pub uri: Option<&'a str>,
    pub destination: &'a str,
}

struct Rule {
    name: String,
    action: ActionConfig,
    timeout_secs: u64,
    message: Option<String>,
    rate: Option<RateConfig>,
    exe: Option<GlobMatcher>,
    uid: Option<u32>,
    unit: Option<GlobMatcher>,
    container: Option<GlobMatcher>,
    ci_provider: Option<String>,
    ci_repository: Option<GlobMatcher>,
    token_verified: Option<bool>,
    iss: Option<String>,
    sub: Option<GlobMatcher>,
    group: Option<String>,
    method: Option<GlobMatcher>,
    tool: Option<GlobMatcher>,
    resource: Option<GlobMatcher>,
    destination: Option<GlobMatcher>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Rate-limit buckets kept at most (over all rules). When the table is full the least
/// recently used bucket is dropped, never the lot: emptying it would let a caller who mints
/// fresh subjects or processes reset everyone's limits, their own included.
const BUCKET_CAPACITY: usize = 100_000;

/// A rule's index and the caller's key under its `per`.
type BucketKey = (usize, String);

pub struct Access {
    default: DefaultAction,
    rules: Vec<Rule>,
    buckets: Mutex<LruCache<BucketKey, Bucket>>,
}

fn glob(
    rule: &str,
    field: &'static str,
    p: &Option<String>,
) -> Result<Option<GlobMatcher>, AccessError> {
    p.as_ref()
        .map(|p| {
            Glob::new(p)
                .map(|g| g.compile_matcher())
                .map_err(|e| AccessError::Glob {
                    rule: rule.to_owned(),
                    field,
                    pattern: p.clone(),
                    why: e.to_string(),
                })
        })
        .transpose()
}

impl Access {
    pub fn new(cfg: &AccessConfig) -> Result<Self, AccessError> {
        let mut rules = Vec::new();
        for c in &cfg.rules {
            let n = c.name.as_str();
            match (c.action, &c.rate) {
                (ActionConfig::RateLimit, None) => {
                    return Err(AccessError::Rule {
                        rule: n.to_owned(),
                        why: "a rate_limit rule needs `rate = { burst = N, per_second = R }`"
                            .into(),
                    });
                }
                (ActionConfig::RateLimit, Some(r))
                    if r.burst == 0 || r.per_second <= 0.0 || !r.per_second.is_finite() =>
                {
                    return Err(AccessError::Rule {
                        rule: n.to_owned(),
                        why: "rate.burst must be at least 1 and rate.per_second above 0".into(),
                    });
                }
                (ActionConfig::Allow | ActionConfig::Deny | ActionConfig::Approve, Some(_)) => {
                    return Err(AccessError::Rule {
                        rule: n.to_owned(),
                        why: "`rate` belongs to rate_limit rules only".into(),
                    });
                }
                _ => {}
            }
            if c.timeout_secs.is_some() && c.action != ActionConfig::Approve {
                return Err(AccessError::Rule {
                    rule: n.to_owned(),
                    why: "`timeout_secs` belongs to approve rules only".into(),
                });
            }
            if c.timeout_secs == Some(0) {
                return Err(AccessError::Rule {
                    rule: n.to_owned(),
                    why: "timeout_secs must be at least 1".into(),
                });
            }
            let m = &c.when;
            rules.push(Rule {
                name: c.name.clone(),
                action: c.action,
                timeout_secs: c.timeout_secs.unwrap_or(DEFAULT_APPROVAL_TIMEOUT_SECS),
                message: c.message.clone(),
                rate: c.rate.clone(),
                exe: glob(n, "exe", &m.exe)?,
                uid: m.uid,
                unit: glob(n, "unit", &m.unit)?,
                container: glob(n, "container", &m.container)?,
                ci_provider: m.ci_provider.clone(),
                ci_repository: glob(n, "ci_repository", &m.ci_repository)?,
                token_verified: m.token_verified,
                iss: m.iss.clone(),
                sub: glob(n, "sub", &m.sub)?,
                group: m.group.clone(),
                method: glob(n, "method", &m.method)?,
                tool: glob(n, "tool", &m.tool)?,
                resource: glob(n, "resource", &m.resource)?,
                destination: glob(n, "destination", &m.destination)?,
            });
        }
        Ok(Access {
            default: cfg.default,
            rules,
            buckets: Mutex::new(bucket_table(BUCKET_CAPACITY)),
        })
    }

    /// The same rules with room for only `capacity` buckets, to watch eviction in tests.
    #[cfg(test)]
    fn with_bucket_capacity(self, capacity: usize) -> Self {
        Access {
            buckets: Mutex::new(bucket_table(capacity)),
            ..self
        }
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The decision for a call: the first rule that matches, or the default.
    pub fn decide(&self, call: &Call<'_>) -> Decision {
        for (i, rule) in self.rules.iter().enumerate() {
            if !matches(rule, call) {
                continue;
            }
            let action = match rule.action {
                ActionConfig::Allow => DecisionAction::Allow,
                ActionConfig::Deny => DecisionAction::Deny,
                ActionConfig::Approve => DecisionAction::Held,
                ActionConfig::RateLimit => {
                    let rate = rule.rate.as_ref().expect("checked when compiled");
                    if self.take(i, rate, call) {
                        DecisionAction::Allow
                    } else {
                        DecisionAction::RateLimited
                    }
                }
            };
            return Decision {
                action,
                rule: Some(rule.name.clone()),
                message: match action {
                    DecisionAction::Allow => None,
                    _ => rule.message.clone(),
                },
                timeout_secs: (action == DecisionAction::Held).then_some(rule.timeout_secs),
            };
        }
        Decision {
            action: match self.default {
                DefaultAction::Allow => DecisionAction::Allow,
                DefaultAction::Deny => DecisionAction::Deny,
            },
            rule: None,
            message: None,
            timeout_secs: None,
        }
    }

    /// Takes a token from the rule's bucket for this caller.
    fn take(&self, i: usize, rate: &RateConfig, call: &Call<'_>) -> bool {
        let key = match rate.per {
            Per::Sub => call.caller.subject().unwrap_or("").to_owned(),
            Per::Process => format!(
                "{}@{}",
                call.caller.process.pid,
                call.caller.process.start_time.as_deref().unwrap_or("")
            ),
            Per::Rule => String::new(),
        };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("bucket lock");
        // Found: it becomes the most recently used. New: it starts full, and when the table
        // is full the least recently used bucket makes room (O(1) either way).
        let b = buckets.get_or_insert_mut((i, key), || Bucket {
            tokens: f64::from(rate.burst),
            at: now,
        });
        let refill = now.duration_since(b.at).as_secs_f64() * rate.per_second;
        b.tokens = (b.tokens + refill).min(f64::from(rate.burst));
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// An empty bucket table for at most `capacity` buckets (at least one). `sparse`: it grows as
/// callers come instead of taking room for all of them up front.
fn bucket_table(capacity: usize) -> LruCache<BucketKey, Bucket> {
    LruCache::sparse(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN))
}

fn matches(r: &Rule, call: &Call<'_>) -> bool {
    let c = &call.caller;
    let glob_ok = |g: &Option<GlobMatcher>, v: Option<&str>| {
        g.as_ref().is_none_or(|g| v.is_some_and(|v| g.is_match(v)))
    };
    glob_ok(&r.exe, c.exe())
        && r.uid.is_none_or(|u| u == c.uid())
        && glob_ok(&r.unit, c.unit())
        && glob_ok(&r.container, c.container_id())
        && r.ci_provider
            .as_deref()
            .is_none_or(|p| c.process.ci.as_ref().and_then(|ci| ci.provider.as_deref()) == Some(p))
        && glob_ok(&r.ci_repository, c.ci_repository())
        && r.token_verified.is_none_or(|v| v == c.token_verified())
        && r.iss.as_deref().is_none_or(|i| c.issuer() == Some(i))
        && glob_ok(&r.sub, c.subject())
        && r.group.as_deref().is_none_or(|g| c.groups().contains(&g))
        && glob_ok(&r.method, call.method)
        && glob_ok(&r.tool, call.name)
        && glob_ok(&r.resource, call.uri)
        && glob_ok(&r.destination, Some(call.destination))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{Process, Token};

    fn access(text: &str) -> Access {
        Access::new(&toml::from_str::<AccessConfig>(text).unwrap()).unwrap()
    }

    fn token(sub: &str, verified: bool) -> Token {
        Token {
            sub: Some(sub.into()),
            verified,
            claims: [("groups".to_owned(), serde_json::json!(["deployers"]))].into(),
            ..Default::default()
        }
    }

    fn call<'a>(p: &'a Process, t: Option<&'a Token>, tool: &'a str) -> Call<'a> {
        Call {
            caller: Caller {
                process: p,
                token: t,
            },
            method: Some("tools/call"),
            name: Some(tool),
            uri: None,
            destination: "10.0.0.5:8811",
        }
    }

    #[test]
    fn first_match_decides_and_the_default_catches_the_rest() {
        let a = access(
            r#"
            default = "deny"
            [[rules]]
            name = "no-prod-deploys"
            action = "deny"
            message = "deploys to prod need a human"
            match = { tool = "deploy_prod*" }
            [[rules]]
            name = "deployers"
            action = "allow"
            match = { group = "deployers", token_verified = true, destination = "*:8811" }
            "#,
        );
        let p = Process {
            exe: Some("/usr/bin/python3".into()),
            ..Default::default()
        };
        let ok = token("svc-ci", true);
        let d = a.decide(&call(&p, Some(&ok), "deploy_prod_eu"));
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (DecisionAction::Deny, Some("no-prod-deploys"))
        );
        assert_eq!(d.message.as_deref(), Some("deploys to prod need a human"));
        let d = a.decide(&call(&p, Some(&ok), "deploy_staging"));
        assert_eq!(
            (d.action, d.rule.as_deref()),
            (DecisionAction::Allow, Some("deployers"))
        );
        // An unverified token's groups do not count.
        let forged = token("svc-ci", false);
        let d = a.decide(&call(&p, Some(&forged), "deploy_staging"));
        assert_eq!((d.action, d.rule), (DecisionAction::Deny, None));
    }

    #[test]
    fn process_conditions() {
        let a = access(
            r#"
            [[rules]]
            name = "no-curl"
            action = "deny"
            match = { exe = "*/curl", uid = 1000 }
            "#,
        );
        let curl = Process {
            exe: Some("/usr/bin/curl".into()),
            uid: 1000,
            ..Default::default()
        };
        assert_eq!(
            a.decide(&call(&curl, None, "x")).action,
            DecisionAction::Deny
        );
        let root_curl = Process {
            uid: 0,
            ..curl.clone()
        };
        assert_eq!(
            a.decide(&call(&root_curl, None, "x")).action,
            DecisionAction::Allow
        );
        let unknown = Process {
            exe: None,
            uid: 1000,
            ..Default::default()
        };
        assert_eq!(
            a.decide(&call(&unknown, None, "x")).action,
            DecisionAction::Allow,
            "no exe, no match"
        );
    }

    #[test]
    fn rate_limits_per_subject() {
        let a = access(
            r#"
            [[rules]]
            name = "slow-down"
            action = "rate_limit"
            rate = { per = "sub", burst = 2, per_second = 0.001 }
            match = { tool = "search" }
            "#,
        );
        let p = Process::default();
        let (x, y) = (token("x", true), token("y", true));
        let take = |t: &Token| a.decide(&call(&p, Some(t), "search")).action;
        assert_eq!(take(&x), DecisionAction::Allow);
        assert_eq!(take(&x), DecisionAction::Allow);
        assert_eq!(take(&x), DecisionAction::RateLimited);
        assert_eq!(
            take(&y),
            DecisionAction::Allow,
            "another subject has its own bucket"
        );
    }

    /// One call per subject, for good (the refill is negligible over a test), in a table of
    /// `capacity` buckets.
    fn one_call_each(capacity: usize) -> Access {
        access(
            r#"
            [[rules]]
            name = "one-each"
            action = "rate_limit"
            rate = { per = "sub", burst = 1, per_second = 0.001 }
            match = { tool = "search" }
            "#,
        )
        .with_bucket_capacity(capacity)
    }

    fn take_as(a: &Access, sub: &str) -> DecisionAction {
        let p = Process::default();
        let t = token(sub, true);
        let d = a.decide(&call(&p, Some(&t), "search"));
        d.action
    }

    fn has_bucket(a: &Access, sub: &str) -> bool {
        let buckets = a.buckets.lock().unwrap();
        buckets.contains(&(0_usize, sub.to_owned()))
    }

    #[test]
    fn a_flood_of_fresh_callers_does_not_reset_a_busy_callers_bucket() {
        let a = one_call_each(4);
        assert_eq!(take_as(&a, "victim"), DecisionAction::Allow);
        assert_eq!(take_as(&a, "victim"), DecisionAction::RateLimited);
        // Fresh subjects, many times the table's size, between the victim's calls: the
        // victim's exhausted bucket is never the least recently used, so it stays exhausted
        // (a table emptied when full would hand it a fresh burst).
        for n in 0..1000 {
            assert_eq!(take_as(&a, &format!("flood-{n}")), DecisionAction::Allow);
            assert_eq!(
                take_as(&a, "victim"),
                DecisionAction::RateLimited,
                "reset after {n} fresh subjects"
            );
        }
        assert_eq!(a.buckets.lock().unwrap().len(), 4, "bounded");
    }

    #[test]
    fn a_full_bucket_table_drops_the_least_recently_used_bucket_only() {
        let a = one_call_each(4);
        for sub in ["x", "a", "b", "c"] {
            assert_eq!(take_as(&a, sub), DecisionAction::Allow);
        }
        assert_eq!(take_as(&a, "x"), DecisionAction::RateLimited); // a b c x
        assert_eq!(take_as(&a, "d"), DecisionAction::Allow); // b c x d
        assert!(!has_bucket(&a, "a"), "the least recently used bucket goes");
        for sub in ["b", "c", "x", "d"] {
            assert!(has_bucket(&a, sub), "{sub} keeps its bucket");
        }
        assert_eq!(take_as(&a, "x"), DecisionAction::RateLimited); // b c d x
        assert_eq!(take_as(&a, "b"), DecisionAction::RateLimited); // c d x b
        assert_eq!(
            take_as(&a, "a"),
            DecisionAction::Allow,
            "an evicted caller starts again, full"
        ); // d x b a
        assert!(!has_bucket(&a, "c"), "c was least recently used by then");
    }

    #[test]
    fn bad_rules_are_refused() {
        let bad = |t: &str| {
            Access::new(&toml::from_str::<AccessConfig>(t).unwrap())
                .err()
                .unwrap()
                .to_string()
        };
        assert!(bad("[[rules]]\nname = \"r\"\naction = \"rate_limit\"\n").contains("needs `rate"));
        assert!(
            bad("[[rules]]\nname = \"r\"\naction = \"deny\"\nmatch = { tool = \"[\" }\n")
                .contains("not a glob")
        );
    }
}
