//! Selecting records: the filters of `tail` and `export`. Pure: a filter looks at one record.
#![forbid(unsafe_code)]

use chrono::{DateTime, Utc};
use globset::{Glob, GlobMatcher};

use super::record::{Event, Process, Record, Token};
use super::{AuditError, Reader, index};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("`{0}` is not a time: give RFC 3339, like 2026-11-26T10:00:00Z")]
    Time(String),
    #[error("`{pattern}` is not a glob pattern: {why}")]
    Glob { pattern: String, why: String },
}

/// Parses an RFC 3339 time for `--since`/`--until`.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, QueryError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| QueryError::Time(s.to_owned()))
}

pub fn parse_glob(pattern: &str) -> Result<GlobMatcher, QueryError> {
    Glob::new(pattern)
        .map(|g| g.compile_matcher())
        .map_err(|e| QueryError::Glob {
            pattern: pattern.to_owned(),
            why: e.to_string(),
        })
}

/// All conditions must hold; an absent one always does.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub pid: Option<u32>,
    pub exe: Option<GlobMatcher>,
    pub method: Option<String>,
    pub tool: Option<GlobMatcher>,
    pub kind: Option<String>,
    /// The `sub` of the request's service token, exactly.
    pub sub: Option<String>,
    /// The access decision (`allow`, `deny`, `rate_limited`) on a message the client sent.
    pub decision: Option<String>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.since.is_none()
            && self.until.is_none()
            && self.pid.is_none()
            && self.exe.is_none()
            && self.method.is_none()
            && self.tool.is_none()
            && self.kind.is_none()
            && self.sub.is_none()
            && self.decision.is_none()
    }

    pub fn matches(&self, record: &Record) -> bool {
        let event = &record.event;
        if let Some(kind) = &self.kind
            && event.kind() != kind
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Ok(t) = parse_time(event.time()) else {
                return false;
            };
            if self.since.is_some_and(|s| t < s) || self.until.is_some_and(|u| t > u) {
                return false;
            }
        }
        if self.pid.is_some() || self.exe.is_some() {
            let Some(p) = process(event) else {
                return false;
            };
            if self.pid.is_some_and(|pid| p.pid != pid) {
                return false;
            }
            if let Some(exe) = &self.exe
                && !p.exe.as_deref().is_some_and(|e| exe.is_match(e))
            {
                return false;
            }
        }
        if let Some(sub) = &self.sub
            && token(event).and_then(|t| t.sub.as_deref()) != Some(sub.as_str())
        {
            return false;
        }
        if let Some(d) = &self.decision {
            let Event::Mcp(m) = event else {
                return false;
            };
            if m.decision.as_ref().map(|x| x.action.as_str()) != Some(d.as_str()) {
                return false;
            }
        }
        if self.method.is_some() || self.tool.is_some() {
            let Event::Mcp(m) = event else {
                return false;
            };
            if let Some(method) = &self.method
                && m.method.as_deref() != Some(method.as_str())
            {
                return false;
            }
            if let Some(tool) = &self.tool
                && !m.name.as_deref().is_some_and(|n| tool.is_match(n))
            {
                return false;
            }
        }
        true
    }
}

/// The smallest key greater than every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 9]
}

/// A glob without wildcards, as the text it matches.
fn literal(glob: &GlobMatcher) -> Option<&str> {
    let pattern = glob.glob().glob();
    (!pattern.contains(['*', '?', '[', '{', '\\'])).then_some(pattern)
}

/// The sequence numbers that may match `filter`, from the trail's indexes; `None` when no
/// index narrows the filter down (the caller scans). Records older than the indexes are
/// always candidates. Every candidate must still pass `filter.matches`.
pub fn candidates(reader: &Reader, filter: &Filter) -> Result<Option<Vec<u64>>, AuditError> {
    let Some(indexed_from) = reader.indexed_from()? else {
        return Ok(None);
    };
    let mut lists: Vec<Vec<u64>> = Vec::new();
    if let Some(pid) = filter.pid {
        let p = index::pid_prefix(pid);
        lists.push(reader.index_seqs(index::CF_IDX_PID, &p, &prefix_end(&p))?);
    }
    if let Some(tool) = filter.tool.as_ref().and_then(literal) {
        let p = index::text_prefix(tool);
        lists.push(reader.index_seqs(index::CF_IDX_TOOL, &p, &prefix_end(&p))?);
    }
    if let Some(sub) = &filter.sub {
        let p = index::text_prefix(sub);
        lists.push(reader.index_seqs(index::CF_IDX_SUB, &p, &prefix_end(&p))?);
    }
    if let Some(exe) = filter.exe.as_ref().and_then(literal) {
        let p = index::text_prefix(exe);
        lists.push(reader.index_seqs(index::CF_IDX_EXE, &p, &prefix_end(&p))?);
    }
    if filter.since.is_some() || filter.until.is_some() {
        let nanos = |t: &DateTime<Utc>| t.timestamp_nanos_opt().unwrap_or(i64::MAX);
        let start = filter.since.as_ref().map_or(i64::MIN, nanos);
        let end = filter
            .until
            .as_ref()
            .map_or(i64::MAX, |t| nanos(t).saturating_add(1));
        lists.push(reader.index_seqs(
            index::CF_IDX_TIME,
            &index::time_prefix(start),
            &index::time_prefix(end),
        )?);
    }
    let Some(mut found) = lists.pop() else {
        return Ok(None);
    };
    found.sort_unstable();
    for mut other in lists {
        other.sort_unstable();
        found.retain(|s| other.binary_search(s).is_ok());
    }
    // Records written before the indexes existed.
    let mut old: Vec<u64> = (1..indexed_from).collect();
    old.append(&mut found);
    old.dedup();
    Ok(Some(old))
}

/// The service token a record's request carried, if any.
pub fn token(event: &Event) -> Option<&Token> {
    match event {
        Event::Mcp(m) => m.token.as_ref(),
        Event::Http(h) => h.token.as_ref(),
        _ => None,
    }
}

/// The calling process a record names, if any.
pub fn process(event: &Event) -> Option<&Process> {
    match event {
        Event::Connection(c) => Some(&c.process),
        Event::Mcp(m) => Some(&m.process),
        Event::Http(h) => Some(&h.process),
        Event::TlsFailure(t) => Some(&t.process),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::*;

    fn mcp(pid: u32, exe: &str, method: &str, name: Option<&str>, time: &str) -> Record {
        Record {
            v: 1,
            seq: 1,
            host: "h".into(),
            prev_hash: String::new(),
            event: Event::Mcp(Box::new(McpEvent {
                time: time.into(),
                message: Some(crate::mcp::Kind::Request),
                token: Some(Token {
                    sub: Some("svc-a".into()),
                    ..Default::default()
                }),
                method: Some(method.into()),
                name: name.map(Into::into),
                ..McpEvent::new(
                    "x".into(),
                    Direction::ClientToServer,
                    Process {
                        pid,
                        exe: Some(exe.into()),
                        ..Default::default()
                    },
                    Connection::default(),
                    HttpInfo::default(),
                )
            })),
        }
    }

    #[test]
    fn every_condition_must_hold() {
        let r = mcp(
            7,
            "/usr/bin/python3.11",
            "tools/call",
            Some("deploy_prod"),
            "2026-11-26T10:00:00Z",
        );
        assert!(Filter::default().matches(&r));
        let f = Filter {
            pid: Some(7),
            exe: Some(parse_glob("*/python3*").unwrap()),
            method: Some("tools/call".into()),
            tool: Some(parse_glob("deploy_*").unwrap()),
            since: Some(parse_time("2026-11-26T09:00:00Z").unwrap()),
            until: Some(parse_time("2026-11-26T11:00:00+01:00").unwrap()),
            kind: Some("mcp".into()),
            sub: Some("svc-a".into()),
            decision: None,
        };
        assert!(f.matches(&r));
        let denied = Filter {
            decision: Some("deny".into()),
            ..Filter::default()
        };
        assert!(!denied.matches(&r), "no decision recorded: not a denial");
        let other_sub = Filter {
            sub: Some("svc-b".into()),
            ..Filter::default()
        };
        assert!(!other_sub.matches(&r));
        for miss in [
            Filter {
                pid: Some(8),
                ..Default::default()
            },
            Filter {
                exe: Some(parse_glob("*/curl").unwrap()),
                ..Default::default()
            },
            Filter {
                method: Some("tools/list".into()),
                ..Default::default()
            },
            Filter {
                tool: Some(parse_glob("read_*").unwrap()),
                ..Default::default()
            },
            Filter {
                since: Some(parse_time("2026-11-26T10:00:01Z").unwrap()),
                ..Default::default()
            },
            Filter {
                until: Some(parse_time("2026-11-26T09:59:59Z").unwrap()),
                ..Default::default()
            },
            Filter {
                kind: Some("http".into()),
                ..Default::default()
            },
        ] {
            assert!(!miss.matches(&r), "{miss:?}");
        }
    }

    #[test]
    fn records_without_the_field_do_not_match_it() {
        let stop = Record {
            v: 1,
            seq: 2,
            host: "h".into(),
            prev_hash: String::new(),
            event: Event::AgentStop(AgentStop {
                time: "2026-11-26T10:00:00Z".into(),
                reason: "x".into(),
                counters: Default::default(),
            }),
        };
        assert!(
            !Filter {
                pid: Some(1),
                ..Default::default()
            }
            .matches(&stop)
        );
        assert!(
            !Filter {
                tool: Some(parse_glob("*").unwrap()),
                ..Default::default()
            }
            .matches(&stop)
        );
    }

    #[test]
    fn indexes_narrow_a_filter_to_the_records_that_match() {
        use crate::audit::store::Store;
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let calls: Vec<Event> = [(7, "deploy_prod"), (8, "read_docs"), (7, "read_docs")]
            .into_iter()
            .map(|(pid, tool)| {
                mcp(
                    pid,
                    "/usr/bin/python3.11",
                    "tools/call",
                    Some(tool),
                    "2026-11-26T10:00:00Z",
                )
                .event
            })
            .collect();
        store.append_group(calls).unwrap();
        drop(store);
        let reader = Reader::open(dir.path()).unwrap();
        // The writer splices each event's JSON after the record's header fields: the bytes
        // must be what serde makes of the whole record, which is what readers parse.
        let mut raw = 0;
        reader
            .raw_range(1, u64::MAX, |e| {
                let rec: Record = serde_json::from_slice(&e.bytes).unwrap();
                assert_eq!(serde_json::to_vec(&rec).unwrap(), e.bytes);
                raw += 1;
                true
            })
            .unwrap();
        assert_eq!(raw, 3);
        let by = |f: Filter| candidates(&reader, &f).unwrap();
        assert_eq!(by(Filter::default()), None, "nothing to narrow: scan");
        assert_eq!(
            by(Filter {
                pid: Some(7),
                ..Default::default()
            }),
            Some(vec![1, 3])
        );
        assert_eq!(
            by(Filter {
                pid: Some(7),
                tool: Some(parse_glob("read_docs").unwrap()),
                ..Default::default()
            }),
            Some(vec![3])
        );
        assert_eq!(
            by(Filter {
                pid: Some(9),
                ..Default::default()
            }),
            Some(vec![])
        );
        assert_eq!(
            by(Filter {
                since: Some(parse_time("2026-11-26T10:00:01Z").unwrap()),
                ..Default::default()
            }),
            Some(vec![])
        );
        assert_eq!(
            by(Filter {
                until: Some(parse_time("2026-11-26T10:00:00Z").unwrap()),
                ..Default::default()
            }),
            Some(vec![1, 2, 3])
        );
        // A wildcard cannot use the index: the other conditions still do.
        assert_eq!(
            by(Filter {
                pid: Some(8),
                tool: Some(parse_glob("read_*").unwrap()),
                ..Default::default()
            }),
            Some(vec![2])
        );
    }

    #[test]
    fn bad_input_says_what_to_give() {
        assert!(
            parse_time("yesterday")
                .unwrap_err()
                .to_string()
                .contains("RFC 3339")
        );
        assert!(parse_glob("a[").is_err());
    }
}
