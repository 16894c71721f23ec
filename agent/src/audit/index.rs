//! Secondary indexes of the trail, so that `tail` and `export` filters need not scan it:
//! by time, process id, executable, tool or prompt name, MCP session and token subject. Each index is a
//! column family whose keys are `value || seq` (values are empty); pure functions here say
//! which keys a record has, so the writer, retention and readers agree.
#![forbid(unsafe_code)]

use super::record::{Event, Record};

pub const CF_IDX_TIME: &str = "idx_time";
pub const CF_IDX_PID: &str = "idx_pid";
pub const CF_IDX_EXE: &str = "idx_exe";
pub const CF_IDX_TOOL: &str = "idx_tool";
pub const CF_IDX_SESSION: &str = "idx_session";
/// The `sub` a request's service token states (verified or not; the record says which).
/// Added after the others; records written before it carry no token, so it is complete.
pub const CF_IDX_SUB: &str = "idx_sub";
pub const ALL: [&str; 6] = [
    CF_IDX_TIME,
    CF_IDX_PID,
    CF_IDX_EXE,
    CF_IDX_TOOL,
    CF_IDX_SESSION,
    CF_IDX_SUB,
];

/// Key in `meta`: the first sequence number the indexes cover (older trails were written
/// before them; readers scan that part).
pub const META_INDEXED_FROM: &[u8] = b"indexed_from";

/// Nanoseconds since the epoch as bytes that sort in time order (sign bit flipped).
pub fn time_prefix(nanos: i64) -> [u8; 8] {
    ((nanos as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn pid_prefix(pid: u32) -> [u8; 4] {
    pid.to_be_bytes()
}

/// Text values end with a NUL so that `abc` is not a prefix match of `abcd`.
pub fn text_prefix(text: &str) -> Vec<u8> {
    let mut k = text.as_bytes().to_vec();
    k.push(0);
    k
}

/// `prefix || seq`: an index key.
pub fn key_with_seq(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence number at the end of an index key.
pub fn seq_of(key: &[u8]) -> Option<u64> {
    let tail = key.len().checked_sub(8)?;
    Some(u64::from_be_bytes(key[tail..].try_into().ok()?))
}

/// Every index entry of a record, as (column family, key).
pub fn entries(record: &Record) -> Vec<(&'static str, Vec<u8>)> {
    prefixes(&record.event)
        .into_iter()
        .map(|(cf, prefix)| (cf, key_with_seq(&prefix, record.seq)))
        .collect()
}

/// The index entries an event will have, as (column family, key without the sequence number):
/// computed where the event is made, before its sequence number is known.
pub fn prefixes(event: &Event) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(event.time())
        && let Some(nanos) = t.timestamp_nanos_opt()
    {
        out.push((CF_IDX_TIME, time_prefix(nanos).to_vec()));
    }
    if let Some(p) = super::query::process(event) {
        out.push((CF_IDX_PID, pid_prefix(p.pid).to_vec()));
        if let Some(exe) = &p.exe {
            out.push((CF_IDX_EXE, text_prefix(exe)));
        }
    }
    if let Some(sub) = super::query::token(event).and_then(|t| t.sub.as_ref()) {
        out.push((CF_IDX_SUB, text_prefix(sub)));
    }
    if let Event::Mcp(m) = event {
        if let Some(name) = &m.name {
            out.push((CF_IDX_TOOL, text_prefix(name)));
        }
        if let Some(session) = &m.http.session_id {
            out.push((CF_IDX_SESSION, text_prefix(session)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::*;

    #[test]
    fn time_keys_sort_in_time_order_around_the_epoch() {
        assert!(time_prefix(-5) < time_prefix(0));
        assert!(time_prefix(0) < time_prefix(1_795_687_200_000_000_000));
    }

    #[test]
    fn a_record_has_the_entries_it_can_have() {
        let r = Record {
            v: 1,
            seq: 77,
            host: "h".into(),
            prev_hash: String::new(),
            event: Event::Http(Box::new(HttpEvent {
                time: "2026-11-26T10:00:00Z".into(),
                process: Process {
                    pid: 9,
                    exe: Some("/usr/bin/curl".into()),
                    ..Default::default()
                },
                connection: Connection::default(),
                http: HttpInfo::default(),
                token: Some(Token {
                    sub: Some("svc-a".into()),
                    ..Default::default()
                }),
                bytes: Bytes::default(),
                elapsed_us: 0,
                error: None,
            })),
        };
        let e = entries(&r);
        let cfs: Vec<&str> = e.iter().map(|(cf, _)| *cf).collect();
        assert_eq!(cfs, [CF_IDX_TIME, CF_IDX_PID, CF_IDX_EXE, CF_IDX_SUB]);
        assert!(e[3].1.starts_with(&text_prefix("svc-a")));
        assert!(e.iter().all(|(_, k)| seq_of(k) == Some(77)));
        assert!(e[1].1.starts_with(&pid_prefix(9)));
        assert!(e[2].1.starts_with(&text_prefix("/usr/bin/curl")));
        assert!(!text_prefix("abc").starts_with(&text_prefix("ab")[..]));
    }
}
