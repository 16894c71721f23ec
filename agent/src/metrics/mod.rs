//! Prometheus metrics: what the data plane counts and times as it goes (here, process-wide),
//! and what is read only when Prometheus scrapes (kernel counters, connections that bypass the
//! agent, export lag: [`Scrape`]). `endpoint.rs` serves them on `/metrics`.
//!
//! Names are `mcptrail_*` with their unit in the name; counters end in `_total`. Every label
//! takes its values from a short fixed list (an unknown MCP method is `other`), so a hostile
//! client cannot grow the series without bound.
#![forbid(unsafe_code)]

pub mod endpoint;

use std::sync::LazyLock;

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen for Prometheus on {addr}: {source}; pick another `[metrics] listen` (--metrics-listen), or \"\" to turn the endpoint off"
    )]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("encoding the metrics: {0}")]
    Encode(#[from] prometheus::Error),
}

/// The methods the MCP specification defines: each is its own label value.
const KNOWN_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "completion/complete",
    "logging/setLevel",
    "sampling/createMessage",
    "elicitation/create",
    "roots/list",
    "tasks/get",
    "tasks/list",
    "tasks/result",
    "tasks/cancel",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/message",
    "notifications/roots/list_changed",
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "notifications/resources/list_changed",
    "notifications/resources/updated",
    "notifications/elicitation/complete",
    "notifications/tasks/status",
];

/// A method as a label: its own name when the specification defines it, else `other`.
pub fn method_label(method: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

/// Latency buckets from 50 µs to 5 s: the proxy's own share is microseconds, an fsync
/// milliseconds, a held call seconds.
const SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// The metrics the agent updates as it works.
pub struct Metrics {
    registry: Registry,
    pub calls: IntCounterVec,
    pub records_written: IntCounterVec,
    pub records_failed: IntCounterVec,
    pub append_seconds: Histogram,
    pub group_write_seconds: Histogram,
    pub fsync_seconds: Histogram,
    pub request_added_seconds: Histogram,
    pub response_added_seconds: Histogram,
    pub tls_failures: IntCounterVec,
    pub trail_head: IntGauge,
    pub export_sent: IntCounter,
    pub export_rejected: IntCounter,
    pub export_retries: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("a valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec()))
        .expect("a valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("registered once");
    h
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new(
                "mcptrail_build_info",
                "The agent's version (the value is always 1)",
            ),
            &["version"],
        )
        .expect("a valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build)).expect("registered once");
        let trail_head = IntGauge::new(
            "mcptrail_trail_head_seq",
            "Sequence number of the newest record in the trail",
        )
        .expect("a valid metric");
        registry
            .register(Box::new(trail_head.clone()))
            .expect("registered once");
        Metrics {
            calls: counter_vec(
                &registry,
                "mcptrail_calls_total",
                "MCP requests and notifications from clients, by method and the access decision",
                &["method", "decision"],
            ),
            records_written: counter_vec(
                &registry,
                "mcptrail_records_written_total",
                "Records appended to the trail, by kind",
                &["kind"],
            ),
            records_failed: counter_vec(
                &registry,
                "mcptrail_records_failed_total",
                "Records the trail refused (a full disk, an I/O error), by kind",
                &["kind"],
            ),
            append_seconds: histogram(
                &registry,
                "mcptrail_record_append_seconds",
                "From asking for a record to its being written (durable under sync durability)",
            ),
            group_write_seconds: histogram(
                &registry,
                "mcptrail_trail_group_write_seconds",
                "One group commit of records to RocksDB, fsync included when it syncs",
            ),
            fsync_seconds: histogram(
                &registry,
                "mcptrail_trail_fsync_seconds",
                "Writes that synced the write-ahead log: sync group commits and buffered-mode syncs",
            ),
            request_added_seconds: histogram(
                &registry,
                "mcptrail_request_added_seconds",
                "The agent's share of a call on the way in: request head read to forwarded to the gateway (records, policy)",
            ),
            response_added_seconds: histogram(
                &registry,
                "mcptrail_response_added_seconds",
                "The agent's share on the way out: the gateway's response head to the response head handed to the client",
            ),
            tls_failures: counter_vec(
                &registry,
                "mcptrail_tls_failures_total",
                "TLS handshakes that failed, by side (client or upstream) and reason",
                &["side", "reason"],
            ),
            trail_head,
            export_sent: counter(
                &registry,
                "mcptrail_export_records_total",
                "Records and checkpoints an OTLP collector accepted",
            ),
            export_rejected: counter(
                &registry,
                "mcptrail_export_rejected_total",
                "Log records a collector rejected in a partial success (sent again until taken)",
            ),
            export_retries: counter_vec(
                &registry,
                "mcptrail_export_retries_total",
                "Batches sent again: `retryable` (429, 502, 503, 504, no answer) or `failed` (any other refusal)",
                &["kind"],
            ),
            registry,
        }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// What is read when Prometheus scrapes, from the running agent.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// The kernel programs' counters by name (`redirected`, `skipped_mark`, ...).
    pub kernel: Vec<(String, u64)>,
    /// The proxy's counters by name (`accepted`, `origin_misses`, ...).
    pub proxy: Vec<(String, u64)>,
    pub approvals_pending: u64,
    /// Established connections to a target that did not go through the agent.
    pub bypassing: u64,
    pub targets: u64,
    /// Per export cursor: records behind the trail's head, and seconds since it last moved
    /// while records wait (0 when it is caught up).
    pub export_lag: Vec<ExportLag>,
}

#[derive(Debug, Clone)]
pub struct ExportLag {
    pub cursor: String,
    pub records: u64,
    pub seconds: u64,
}

/// The proxy counters' metric names and help; the open-connection count is a gauge.
fn proxy_metric(name: &str) -> Option<(&'static str, &'static str, bool)> {
    Some(match name {
        "accepted" => (
            "mcptrail_connections_accepted_total",
            "Connections the proxy accepted",
            false,
        ),
        "origin_misses" => (
            "mcptrail_origin_misses_total",
            "Connections refused because the kernel had no origin for them (they did not come through the redirect)",
            false,
        ),
        "self_calls_refused" => (
            "mcptrail_self_calls_refused_total",
            "Connections refused by the userspace loop guard",
            false,
        ),
        "upstream_failures" => (
            "mcptrail_upstream_failures_total",
            "Connections to a gateway that failed",
            false,
        ),
        "open_connections" => (
            "mcptrail_connections_open",
            "Connections open through the proxy now",
            true,
        ),
        "parked_connections" => (
            "mcptrail_connections_parked",
            "Of the open connections, the idle HTTP/1.1 ones parked without buffers until their client sends again",
            true,
        ),
        "connection_parks" => (
            "mcptrail_connection_parks_total",
            "Times an idle HTTP/1.1 client connection was parked",
            false,
        ),
        "audit_losses" => (
            "mcptrail_audit_losses_total",
            "Records lost because the trail could not be written",
            false,
        ),
        "blocked_by_audit_failure" => (
            "mcptrail_blocked_by_audit_failure_total",
            "Calls and connections refused because the trail could not be written",
            false,
        ),
        "refused_unreadable" => (
            "mcptrail_refused_unreadable_total",
            "Connections and requests refused because the proxy could not read them",
            false,
        ),
        "tls_failures" => return None,
        _ => return None,
    })
}

/// Everything in the Prometheus text format (0.0.4): the process's metrics and `scrape`.
pub fn render(scrape: &Scrape) -> Result<String, MetricsError> {
    let now = Registry::new();
    let kernel = IntCounterVec::new(
        Opts::new(
            "mcptrail_kernel_events_total",
            "What the kernel programs did with connect() calls, by event (redirected, each loop guard, origin evictions, other network namespaces)",
        ),
        &["event"],
    )?;
    for (name, value) in &scrape.kernel {
        kernel.with_label_values(&[name.as_str()]).inc_by(*value);
    }
    now.register(Box::new(kernel))?;
    for (name, value) in &scrape.proxy {
        let Some((metric, help, gauge)) = proxy_metric(name) else {
            continue;
        };
        if gauge {
            let g = IntGauge::new(metric, help)?;
            g.set(*value as i64);
            now.register(Box::new(g))?;
        } else {
            let c = IntCounter::new(metric, help)?;
            c.inc_by(*value);
            now.register(Box::new(c))?;
        }
    }
    for (name, help, value) in [
        (
            "mcptrail_approvals_pending",
            "Calls held for an operator's approval now",
            scrape.approvals_pending,
        ),
        (
            "mcptrail_bypassing_connections",
            "Established connections to a target that do not go through the agent (opened before it started, or around it)",
            scrape.bypassing,
        ),
        (
            "mcptrail_targets",
            "Redirect entries installed in the kernel",
            scrape.targets,
        ),
    ] {
        let g = IntGauge::new(name, help)?;
        g.set(value as i64);
        now.register(Box::new(g))?;
    }
    let lag_records = IntGaugeVec::new(
        Opts::new(
            "mcptrail_export_lag_records",
            "Records in the trail after an export cursor",
        ),
        &["cursor"],
    )?;
    let lag_seconds = IntGaugeVec::new(
        Opts::new(
            "mcptrail_export_lag_seconds",
            "Seconds since an export cursor last moved while records wait behind it (0 when caught up)",
        ),
        &["cursor"],
    )?;
    for lag in &scrape.export_lag {
        lag_records
            .with_label_values(&[lag.cursor.as_str()])
            .set(lag.records as i64);
        lag_seconds
            .with_label_values(&[lag.cursor.as_str()])
            .set(lag.seconds as i64);
    }
    now.register(Box::new(lag_records))?;
    now.register(Box::new(lag_seconds))?;

    let mut families = get().registry.gather();
    families.extend(now.gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8(out).expect("the text format is UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_specification_share_one_label() {
        assert_eq!(method_label("tools/call"), "tools/call");
        assert_eq!(
            method_label("notifications/initialized"),
            "notifications/initialized"
        );
        assert_eq!(method_label("x/🙂/{}"), "other");
        assert_eq!(method_label(&"a".repeat(10_000)), "other");
    }

    #[test]
    fn the_text_names_every_metric_with_its_type() {
        get()
            .calls
            .with_label_values(&["tools/call", "allow"])
            .inc();
        get().append_seconds.observe(0.001);
        let text = render(&Scrape {
            kernel: vec![("redirected".into(), 7), ("skipped_mark".into(), 2)],
            proxy: vec![("accepted".into(), 3), ("open_connections".into(), 1)],
            approvals_pending: 2,
            bypassing: 1,
            targets: 1,
            export_lag: vec![ExportLag {
                cursor: "siem".into(),
                records: 5,
                seconds: 9,
            }],
        })
        .unwrap();
        for line in [
            "# TYPE mcptrail_calls_total counter",
            "# TYPE mcptrail_record_append_seconds histogram",
            "mcptrail_kernel_events_total{event=\"redirected\"} 7",
            "mcptrail_connections_accepted_total 3",
            "# TYPE mcptrail_connections_open gauge",
            "mcptrail_approvals_pending 2",
            "mcptrail_bypassing_connections 1",
            "mcptrail_export_lag_records{cursor=\"siem\"} 5",
            "mcptrail_export_lag_seconds{cursor=\"siem\"} 9",
            "mcptrail_build_info{version=\"",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(
            text.contains("mcptrail_calls_total{decision=\"allow\",method=\"tools/call\"}"),
            "{text}"
        );
    }
}
