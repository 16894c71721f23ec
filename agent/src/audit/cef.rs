//! ArcSight Common Event Format lines for SIEMs: `CEF:0|vendor|product|version|class|name|
//! severity|key=value ...`, escaped as the format requires.
#![forbid(unsafe_code)]

use super::format;
use super::query::process;
use super::reader::StoredRecord;
use super::record::Event;

fn header(s: &str) -> String {
    s.replace('\\', "\\\\").replace('|', "\\|")
}

fn value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('=', "\\=")
        .replace('\r', "\\r")
        .replace('\n', "\\n")
}

/// One record as one CEF line.
pub fn line(r: &StoredRecord) -> String {
    let rec = &r.record;
    let event = &rec.event;
    let (name, severity) = match event {
        Event::Mcp(m) if m.malformed.is_some() || m.header_mismatch.is_some() => {
            ("MCP message needing attention".to_owned(), 6)
        }
        Event::Mcp(m) => (
            match (&m.method, &m.name) {
                (Some(method), Some(n)) => format!("{method} {n}"),
                (Some(method), None) => method.clone(),
                (None, _) => "MCP answer".to_owned(),
            },
            3,
        ),
        Event::Refused(_) => ("connection refused (not redirected)".to_owned(), 7),
        Event::TlsFailure(t) => (format!("TLS handshake failed ({})", t.side), 6),
        Event::Http(h) => (format!("HTTP {} {}", h.http.method, h.http.path), 2),
        Event::Connection(_) => ("connection".to_owned(), 2),
        other => (other.kind().to_owned(), 1),
    };
    let mut ext: Vec<(&str, String)> = vec![
        ("externalId", rec.seq.to_string()),
        ("dvchost", rec.host.clone()),
    ];
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(event.time()) {
        ext.push(("rt", t.timestamp_millis().to_string()));
    }
    if let Some(p) = process(event) {
        ext.push(("spid", p.pid.to_string()));
        ext.push(("sproc", p.comm.clone()));
        ext.push(("suid", p.uid.to_string()));
        if let Some(exe) = &p.exe {
            ext.push(("filePath", exe.clone()));
        }
    }
    if let Event::Mcp(m) = event {
        if let Some(method) = &m.method {
            ext.push(("act", method.clone()));
        }
        ext.push(("cs1Label", "exchange".into()));
        ext.push(("cs1", m.exchange.clone()));
        if let Some(n) = m.name.as_ref().or(m.uri.as_ref()) {
            ext.push(("cs2Label", "target".into()));
            ext.push(("cs2", n.clone()));
        }
        ext.push((
            "requestClientApplication",
            m.connection.original_dst.clone(),
        ));
    }
    ext.push(("cs6Label", "chainHash".into()));
    ext.push(("cs6", hex::encode(r.hash)));
    ext.push(("msg", format::line(r)));
    let ext: Vec<String> = ext
        .into_iter()
        .map(|(k, v)| format!("{k}={}", value(&v)))
        .collect();
    format!(
        "CEF:0|mcptrail|mcptrail|{}|{}|{}|{severity}|{}",
        header(env!("CARGO_PKG_VERSION")),
        header(event.kind()),
        header(&name),
        ext.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::*;

    #[test]
    fn escapes_what_cef_requires() {
        assert_eq!(header("a|b\\c"), "a\\|b\\\\c");
        assert_eq!(value("k=v\nx\\"), "k\\=v\\nx\\\\");
    }

    #[test]
    fn a_refusal_is_a_high_severity_line() {
        let r = StoredRecord {
            record: Record {
                v: 1,
                seq: 9,
                host: "runner|1".into(),
                prev_hash: String::new(),
                event: Event::Refused(RefusedEvent {
                    time: "2026-11-26T10:00:00Z".into(),
                    client: "127.0.0.1:1".into(),
                    proxy: "127.0.0.1:2".into(),
                    reason: "no origin".into(),
                }),
            },
            hash: [0xab; 32],
        };
        let line = line(&r);
        assert!(line.starts_with("CEF:0|mcptrail|mcptrail|"), "{line}");
        assert!(
            line.contains("|refused|connection refused (not redirected)|7|"),
            "{line}"
        );
        assert!(line.contains("externalId=9 dvchost=runner|1"), "{line}");
        assert!(line.contains("rt=1795687200000"), "{line}");
        assert!(line.contains(&format!("cs6={}", "ab".repeat(32))), "{line}");
    }
}
