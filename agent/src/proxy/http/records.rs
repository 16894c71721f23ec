//! Building the records of an HTTP exchange: what every request on a connection shares
//! (`Conn`), and the `mcp` and `http` events with everything masked before it is bounded.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::Value;

use super::super::OnAuditFailure;
use super::super::correlate::Correlator;
use crate::audit::AuditLog;
use crate::audit::record::{
    Bytes as ByteCounts, Connection, Direction, Event, HttpEvent, HttpInfo, McpEvent, Process,
    Token, now_rfc3339,
};
use crate::mcp::{self, Message};
use crate::policy::approvals::Approvals;
use crate::policy::live::{Active, Live};
use crate::policy::masking::Scope;

/// What every HTTP connection of the proxy shares.
#[derive(Clone)]
pub struct ConnParts {
    pub audit: AuditLog,
    pub on_failure: OnAuditFailure,
    pub stats: Arc<super::super::Stats>,
    pub capture_limit: usize,
    pub tracker: tokio_util::task::TaskTracker,
    pub correlator: Arc<Correlator>,
    pub verifier: Arc<crate::identity::Verifier>,
    pub policy: Arc<Live>,
    pub approvals: Arc<Approvals>,
    /// A client's HTTP/1.1 gateway connection is closed after this long unused (None: kept
    /// for as long as the client's).
    pub upstream_idle: Option<std::time::Duration>,
    /// How long a client may take to send a request's head (`HEADER_READ_TIMEOUT`; shorter
    /// in tests).
    pub header_timeout: std::time::Duration,
}

/// A request's token record and its raw value, kept in memory for this exchange only so that
/// it can be scrubbed from what is recorded.
#[derive(Clone, Copy)]
pub struct Cred<'a> {
    pub token: Option<&'a Token>,
    pub raw: Option<&'a str>,
}

/// What every request on one connection shares.
pub struct Conn {
    pub parts: ConnParts,
    /// Shared with the connection's own record, which must see the same redactions.
    pub process: Arc<std::sync::RwLock<Process>>,
    pub connection: Connection,
    /// Prefix of this connection's exchange ids.
    pub id: String,
    pub requests: AtomicU64,
}

impl Conn {
    pub fn new(
        parts: ConnParts,
        process: Arc<std::sync::RwLock<Process>>,
        connection: Connection,
        id: String,
    ) -> Self {
        Conn {
            parts,
            process,
            connection,
            id,
            requests: AtomicU64::new(0),
        }
    }

    pub fn process(&self) -> Process {
        self.process.read().expect("process lock").clone()
    }

    pub fn capture_limit(&self) -> usize {
        self.parts.capture_limit
    }

    /// Takes a request's raw token out of the recorded command line (a caller that passed
    /// it in argv, like `curl -H "Authorization: Bearer …"`), whatever its shape.
    pub fn redact_token(&self, raw: &str, fingerprint: &str) {
        let present = self
            .process
            .read()
            .expect("process lock")
            .cmdline
            .as_ref()
            .is_some_and(|args| args.iter().any(|a| a.contains(raw)));
        if present {
            let mut p = self.process.write().expect("process lock");
            if let Some(args) = p.cmdline.as_mut()
                && crate::process::scrub::secret(args, raw, &token_label(fingerprint))
            {
                p.cmdline_redacted = true;
            }
        }
    }

    /// Appends a record; false (counted as a loss, and logged) when the trail cannot take it.
    pub async fn record(&self, event: Event) -> bool {
        self.record_all(vec![event]).await
    }

    /// Appends the records of one step of an exchange (a batch's messages, what a response
    /// carried) as one write, so that the step waits for one sync, not one per record; false
    /// (each counted as a loss, and logged) when the trail cannot take them.
    pub async fn record_all(&self, events: Vec<Event>) -> bool {
        if events.is_empty() {
            return true;
        }
        let n = events.len() as u64;
        match self.parts.audit.append_all(events).await {
            Ok(_) => true,
            Err(e) => {
                self.parts
                    .stats
                    .audit_losses
                    .fetch_add(n, Ordering::Relaxed);
                tracing::error!(error = %e, conn = %self.id, records = n, "could not record an MCP exchange: it is missing from the trail");
                false
            }
        }
    }

    pub fn mcp_event(
        &self,
        exchange: String,
        direction: Direction,
        http: &HttpInfo,
        token: Option<&Token>,
    ) -> McpEvent {
        McpEvent {
            token: token.cloned(),
            ..McpEvent::new(
                exchange,
                direction,
                self.process(),
                self.connection.clone(),
                http.clone(),
            )
        }
    }

    pub fn message_event(
        &self,
        exchange: String,
        direction: Direction,
        http: &HttpInfo,
        cred: Cred<'_>,
        m: Message,
        batch: bool,
    ) -> McpEvent {
        let active = self.parts.policy.current();
        let client_info = mcp::client_info(&m).map(|v| mcp::bounded(v, 4096));
        let (m, rules) = mask_message(&active, cred, self.capture_limit(), m);
        McpEvent {
            client_info,
            message: Some(m.kind),
            jsonrpc_id: m.id,
            method: m.method,
            name: m.name,
            uri: m.uri,
            params: m.params,
            result: m.result,
            error: m.error,
            masked: rules.into_iter().collect(),
            batch,
            ..self.mcp_event(exchange, direction, http, cred.token)
        }
    }

    pub fn http_event(
        &self,
        http: &HttpInfo,
        token: Option<&Token>,
        bytes: ByteCounts,
        t0: Instant,
        error: Option<String>,
    ) -> Event {
        Event::Http(Box::new(HttpEvent {
            time: now_rfc3339(),
            process: self.process(),
            connection: self.connection.clone(),
            http: http.clone(),
            token: token.cloned(),
            bytes,
            elapsed_us: t0.elapsed().as_micros() as u64,
            error,
        }))
    }
}

fn token_label(fingerprint: &str) -> String {
    format!(
        "[REDACTED:token {}]",
        &fingerprint[..12.min(fingerprint.len())]
    )
}

/// Masks a message for the record: the policy's rules, then (whatever the policy says) the
/// gateway's brokered credential and the caller's own token; then bounds each value. Masked
/// before it is bounded, so what is recorded never holds what a rule matched. Returns the
/// message as recorded and the rules that fired. The proxy and `mcptrail policy test` both
/// show messages through this.
pub fn mask_message(
    active: &Active,
    cred: Cred<'_>,
    limit: usize,
    mut m: Message,
) -> (Message, BTreeSet<String>) {
    let mut rules = BTreeSet::new();
    let mut mask = |v: Option<Value>, scope: Scope| {
        v.map(|mut v| {
            rules.extend(active.masker.mask_value(&mut v, scope).rules);
            if active.broker.scrub(&mut v) {
                rules.insert("brokered".to_owned());
            }
            if let (Some(raw), Some(t)) = (cred.raw, cred.token)
                && crate::policy::masking::scrub_literal(&mut v, raw, &token_label(&t.fingerprint))
            {
                rules.insert("token".to_owned());
            }
            mcp::bounded(v, limit)
        })
    };
    m.params = mask(m.params.take(), Scope::Params);
    m.result = mask(m.result.take(), Scope::Result);
    m.error = mask(m.error.take(), Scope::Error);
    // The names are recorded (and indexed) on their own: a rule that matched one in `params`
    // must not see it leak through its own field.
    active
        .masker
        .mask_recorded_strings(m.name.iter_mut().chain(m.uri.iter_mut()), &mut rules);
    (m, rules)
}

/// The request's HTTP details as recorded: the URL and the header values the record keeps
/// masked by every rule (they come from the caller as much as the body does).
pub fn mask_http(active: &Active, http: &mut HttpInfo) -> BTreeSet<String> {
    let mut fired = BTreeSet::new();
    let fields = [
        Some(&mut http.path),
        http.session_id.as_mut(),
        http.protocol_version.as_mut(),
        http.mcp_method.as_mut(),
        http.mcp_name.as_mut(),
        http.content_type.as_mut(),
    ];
    active
        .masker
        .mask_recorded_strings(fields.into_iter().flatten(), &mut fired);
    fired
}

/// The caller's details as recorded: its command line and CI variables masked by every rule
/// (a secret passed as an argument is as much the caller's data as one in a message).
pub fn mask_process(active: &Active, process: &mut Process) -> BTreeSet<String> {
    let mut fired = BTreeSet::new();
    if let Some(args) = process.cmdline.as_mut()
        && active
            .masker
            .mask_recorded_strings(args.iter_mut(), &mut fired)
    {
        process.cmdline_redacted = true;
    }
    if let Some(ci) = process.ci.as_mut() {
        active
            .masker
            .mask_recorded_strings(ci.vars.values_mut(), &mut fired);
    }
    fired
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Ci;
    use crate::policy::Policy;

    fn active() -> Arc<Active> {
        Live::new(Policy::embedded_default().unwrap(), [3; 32])
            .unwrap()
            .current()
    }

    #[test]
    fn secrets_in_argv_and_ci_variables_are_masked() {
        let a = active();
        let mut p = Process {
            cmdline: Some(vec![
                "deploy".into(),
                "--key=AKIAIOSFODNN7EXAMPLE".into(),
                "4111 1111 1111 1111".into(),
                "bob@example.com".into(),
            ]),
            ci: Some(Ci {
                vars: [("BATCH_NOTE".to_owned(), "card 4111111111111111".to_owned())].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let fired = mask_process(&a, &mut p);
        let args = p.cmdline.as_ref().unwrap();
        assert_eq!(args[0], "deploy");
        for (arg, secret) in
            args[1..]
                .iter()
                .zip(["AKIAIOSFODNN7EXAMPLE", "1111 1111 1111", "bob@"])
        {
            assert!(!arg.contains(secret), "{arg}");
        }
        assert!(p.cmdline_redacted);
        assert!(!p.ci.unwrap().vars["BATCH_NOTE"].contains("4111111111111111"));
        assert!(
            fired.contains("payment_card") && fired.contains("email"),
            "{fired:?}"
        );
    }

    #[test]
    fn the_recorded_url_and_headers_are_masked() {
        let a = active();
        let mut http = HttpInfo {
            path: "/mcp?user=bob@example.com&key=AKIAIOSFODNN7EXAMPLE".into(),
            mcp_name: Some("AKIAIOSFODNN7EXAMPLE".into()),
            ..Default::default()
        };
        let fired = mask_http(&a, &mut http);
        assert!(
            !http.path.contains("bob@example.com") && !http.path.contains("AKIA"),
            "{}",
            http.path
        );
        assert!(!http.mcp_name.unwrap().contains("AKIA"));
        assert!(fired.contains("email"));
    }
}
