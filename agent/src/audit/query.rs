//! Selecting records: the filters of `tail` and `export`. Pure: a filter looks at one record.
#![forbid(unsafe_code)]

use chrono::{DateTime, Utc};
use globset::{Glob, GlobMatcher};

use super::record::{Event, Process, Record};

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

/// The calling process a record names, if any.
pub fn process(event: &Event) -> Option<&Process> {
    match event {
        Event::Connection(c) => Some(&c.process),
        Event::Mcp(m) => Some(&m.process),
        Event::Http(h) => Some(&h.process),
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
                exchange: "x".into(),
                direction: Direction::ClientToServer,
                message: Some(crate::mcp::Kind::Request),
                process: Process {
                    pid,
                    exe: Some(exe.into()),
                    ..Default::default()
                },
                connection: Connection::default(),
                http: HttpInfo::default(),
                jsonrpc_id: None,
                method: Some(method.into()),
                name: name.map(Into::into),
                uri: None,
                params: None,
                result: None,
                error: None,
                batch: false,
                header_mismatch: None,
                malformed: None,
                first_byte_us: None,
                elapsed_us: None,
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
        };
        assert!(f.matches(&r));
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
