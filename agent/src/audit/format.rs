//! One-line rendering of records for `mcptrail tail`.
#![forbid(unsafe_code)]

use super::reader::StoredRecord;
use super::record::{DecisionAction, Event, Process, Status, Token};

/// `#SEQ TIME KIND details`, with the time cut to milliseconds for reading.
pub fn line(r: &StoredRecord) -> String {
    let rec = &r.record;
    let time = short_time(rec.event.time());
    let details = match &rec.event {
        Event::Connection(c) => {
            let p = &c.process;
            let exe = p.exe.as_deref().unwrap_or("?");
            let outcome = match (&c.outcome.status, &c.outcome.detail) {
                (Status::Closed, _) => "closed".to_owned(),
                (s, Some(d)) => format!("{}: {d}", status_word(*s)),
                (s, None) => status_word(*s).to_owned(),
            };
            format!(
                "{comm}[{pid}] uid={uid} {exe} -> {dst} req={req} resp={resp} {ms}ms {outcome}",
                comm = p.comm,
                pid = p.pid,
                uid = p.uid,
                dst = c.connection.original_dst,
                req = human_bytes(c.bytes.req),
                resp = human_bytes(c.bytes.resp),
                ms = c.timing.duration_us / 1000,
            )
        }
        Event::Refused(e) => format!("{} -> {}: {}", e.client, e.proxy, e.reason),
        Event::AgentStart(e) => format!(
            "mcptrail {} pid={} listen={} targets={} cgroup={} policy={}",
            e.version,
            e.pid,
            e.listen,
            e.targets.join(","),
            e.cgroup,
            e.policy.name
        ),
        Event::AgentStop(e) => format!("reason={}", e.reason),
        Event::Mcp(e) => {
            let what = match (&e.method, &e.name, &e.uri) {
                (Some(m), Some(n), _) => format!("{m} {n}"),
                (Some(m), None, Some(u)) => format!("{m} {u}"),
                (Some(m), None, None) => m.clone(),
                (None, _, _) => match e.message {
                    Some(crate::mcp::Kind::Error) => "error".to_owned(),
                    Some(_) => "result".to_owned(),
                    None => "malformed".to_owned(),
                },
            };
            let mut id = e
                .jsonrpc_id
                .as_ref()
                .map(|i| format!(" id={i}"))
                .unwrap_or_default();
            if let (Some(call), Some(round)) = (&e.logical_call, e.round) {
                id.push_str(&format!(" retry={round} of={call}"));
            }
            if e.client_closed {
                id.push_str(" closed-by-client");
            }
            if let Some(d) = e
                .decision
                .as_ref()
                .filter(|d| d.action != DecisionAction::Allow)
            {
                id.push_str(&format!(
                    " {}:{}",
                    d.action.as_str(),
                    d.rule.as_deref().unwrap_or("default")
                ));
            }
            let arrow = match e.direction {
                crate::audit::record::Direction::ClientToServer => "->",
                crate::audit::record::Direction::ServerToClient => "<-",
            };
            format!(
                "{}[{}]{} {arrow} {} {what}{id} exchange={}{}",
                e.process.comm,
                e.process.pid,
                who(&e.process, e.token.as_ref()),
                e.connection.original_dst,
                e.exchange,
                e.malformed
                    .as_ref()
                    .map(|m| format!(" malformed: {m}"))
                    .unwrap_or_default()
            )
        }
        Event::Http(e) => format!(
            "{}[{}]{} -> {} {} {} status={} req={} resp={}{}",
            e.process.comm,
            e.process.pid,
            who(&e.process, e.token.as_ref()),
            e.connection.original_dst,
            e.http.method,
            e.http.path,
            e.http.status.map_or("-".to_owned(), |s| s.to_string()),
            human_bytes(e.bytes.req),
            human_bytes(e.bytes.resp),
            e.error
                .as_ref()
                .map(|x| format!(" error: {x}"))
                .unwrap_or_default()
        ),
        Event::TlsFailure(e) => format!(
            "{}[{}] uid={} {} -> {} {}{}: {}",
            e.process.comm,
            e.process.pid,
            e.process.uid,
            e.process.exe.as_deref().unwrap_or("?"),
            e.connection.original_dst,
            e.side,
            e.connection
                .tls
                .as_ref()
                .and_then(|t| t.sni.as_deref())
                .map(|s| format!(" sni={s}"))
                .unwrap_or_default(),
            e.reason
        ),
        Event::Approval(e) => format!(
            "#{} {} rule={} pid={} {} exchange={}{}{}",
            e.id,
            e.outcome,
            e.held.rule,
            e.held.pid,
            e.held
                .name
                .as_deref()
                .or(e.held.method.as_deref())
                .unwrap_or("?"),
            e.held.exchange,
            e.approver
                .as_ref()
                .map(|a| format!(
                    " by={}",
                    a.user.clone().unwrap_or_else(|| format!("uid {}", a.uid))
                ))
                .unwrap_or_default(),
            e.reason
                .as_ref()
                .map(|r| format!(" reason={r:?}"))
                .unwrap_or_default()
        ),
        Event::PolicyChanged(e) => format!(
            "trigger={} in_force={} sha256={}{}",
            e.trigger,
            e.policy_name(),
            &e.in_force.sha256[..12.min(e.in_force.sha256.len())],
            e.error
                .as_ref()
                .map(|x| format!(" NOT LOADED: {x}"))
                .unwrap_or_default()
        ),
        Event::TargetsChanged(e) => format!(
            "trigger={} added={} removed={} entries={}",
            e.trigger,
            e.added,
            e.removed,
            e.entries.join(",")
        ),
    };
    format!("#{} {} {} {}", rec.seq, time, rec.event.kind(), details)
}

/// ` sub=… ci=…`: the token subject (`?reason` when it did not verify) and the CI job.
fn who(p: &Process, token: Option<&Token>) -> String {
    let mut out = String::new();
    if let Some(t) = token {
        let sub = t.sub.as_deref().unwrap_or("-");
        match t.reason {
            None if t.verified => out.push_str(&format!(" sub={sub}")),
            Some(r) => out.push_str(&format!(" sub={sub}?{}", r.as_str())),
            None => out.push_str(&format!(" sub={sub}?")),
        }
    }
    if let Some(ci) = &p.ci {
        let provider = ci.provider.as_deref().unwrap_or("ci");
        let job = ci.run.as_deref().or(ci.job.as_deref()).unwrap_or("-");
        out.push_str(&format!(" ci={provider}:{job}"));
    }
    out
}

/// The line with its kind coloured for a terminal: what needs a look (refusals, errors,
/// malformed or mismatched messages) in red, MCP traffic in cyan, the agent's own records dim.
pub fn colored_line(r: &StoredRecord) -> String {
    use anstyle::{AnsiColor, Style};
    let plain = line(r);
    let kind = r.record.event.kind();
    let alarm = match &r.record.event {
        Event::Refused(_) | Event::TlsFailure(_) => true,
        Event::Mcp(m) => {
            m.malformed.is_some()
                || m.header_mismatch.is_some()
                || m.message == Some(crate::mcp::Kind::Error)
                || m.decision
                    .as_ref()
                    .is_some_and(|d| d.action != DecisionAction::Allow)
        }
        Event::Connection(c) => c.outcome.status != Status::Closed,
        Event::Http(h) => h.error.is_some() || h.http.status.is_some_and(|s| s >= 500),
        _ => false,
    };
    let style = if alarm {
        Style::new().fg_color(Some(AnsiColor::Red.into())).bold()
    } else {
        match kind {
            "mcp" => Style::new().fg_color(Some(AnsiColor::Cyan.into())),
            "agent_start" | "agent_stop" | "targets_changed" => Style::new().dimmed(),
            _ => Style::new(),
        }
    };
    // Colour the kind word only: the rest stays easy to copy.
    let marker = format!(" {kind} ");
    match plain.find(&marker) {
        Some(at) => format!(
            "{}{style} {kind} {style:#}{}",
            &plain[..at],
            &plain[at + marker.len()..]
        ),
        None => plain,
    }
}

fn status_word(s: Status) -> &'static str {
    match s {
        Status::Closed => "closed",
        Status::UpstreamConnectFailed => "upstream_connect_failed",
        Status::RelayError => "relay_error",
        Status::AgentShutdown => "agent_shutdown",
        Status::Refused => "refused",
    }
}

/// `2026-11-26T10:00:00.123456789Z` becomes `2026-11-26T10:00:00.123Z`.
fn short_time(t: &str) -> String {
    match (t.find('.'), t.strip_suffix('Z')) {
        (Some(dot), Some(_)) if t.len() >= dot + 4 => format!("{}Z", &t[..dot + 4]),
        _ => t.to_owned(),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::GENESIS;
    use crate::audit::record::*;

    fn stored(event: Event) -> StoredRecord {
        StoredRecord {
            record: Record {
                v: 1,
                seq: 42,
                host: "h".into(),
                prev_hash: hex::encode(GENESIS),
                event,
            },
            hash: GENESIS,
        }
    }

    #[test]
    fn connection_line_names_the_process_and_destination() {
        let line = line(&stored(Event::Connection(Box::new(ConnectionEvent {
            time: "2026-11-26T10:00:00.123456789Z".into(),
            process: Process {
                pid: 1234,
                tid: 1234,
                comm: "curl".into(),
                exe: Some("/usr/bin/curl".into()),
                ..Default::default()
            },
            connection: Connection {
                client: "127.0.0.1:40000".into(),
                original_dst: "10.0.0.5:8811".into(),
                proxy: "127.0.0.1:15811".into(),
                target: None,
                tls: None,
            },
            timing: Timing {
                start: String::new(),
                end: String::new(),
                duration_us: 12_500,
            },
            bytes: Bytes {
                req: 78,
                resp: 2048,
            },
            outcome: Outcome {
                status: Status::Closed,
                detail: None,
            },
            protocol: Some("http1".into()),
        }))));
        assert_eq!(
            line,
            "#42 2026-11-26T10:00:00.123Z connection curl[1234] uid=0 /usr/bin/curl -> 10.0.0.5:8811 req=78B resp=2.0KiB 12ms closed"
        );
    }

    #[test]
    fn failures_show_their_detail() {
        let line = line(&stored(Event::Refused(RefusedEvent {
            time: "2026-11-26T10:00:00Z".into(),
            client: "127.0.0.1:1".into(),
            proxy: "127.0.0.1:2".into(),
            reason: "no redirect origin".into(),
        })));
        assert_eq!(
            line,
            "#42 2026-11-26T10:00:00Z refused 127.0.0.1:1 -> 127.0.0.1:2: no redirect origin"
        );
    }

    #[test]
    fn refusals_are_red_and_the_text_is_unchanged() {
        let r = stored(Event::Refused(RefusedEvent {
            time: "2026-11-26T10:00:00Z".into(),
            client: "127.0.0.1:1".into(),
            proxy: "127.0.0.1:2".into(),
            reason: "no redirect origin".into(),
        }));
        let colored = colored_line(&r);
        assert!(
            colored.contains("\u{1b}[1m\u{1b}[31m refused \u{1b}[0m"),
            "{colored:?}"
        );
        let stripped = colored
            .replace("\u{1b}[1m\u{1b}[31m", "")
            .replace("\u{1b}[0m", "");
        assert_eq!(stripped, line(&r));
    }

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0MiB");
    }
}
