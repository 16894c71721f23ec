//! The record schema (version 1), stored as JSON.
//!
//! A stored record is an [`Event`] sealed by the writer with its sequence number, the host and
//! the previous record's hash. New fields are added as optional so that older records stay
//! readable; a change that cannot be made that way bumps [`SCHEMA_VERSION`].
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Schema version.
    pub v: u32,
    pub seq: u64,
    pub host: String,
    /// Hex SHA-256 of the previous record's chain link (all zeros for the first).
    pub prev_hash: String,
    #[serde(flatten)]
    pub event: Event,
}

/// What happened. `kind` in the JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A redirected connection, written when it closes.
    Connection(Box<ConnectionEvent>),
    /// A connection to the proxy that did not come through the redirect: refused.
    Refused(RefusedEvent),
    AgentStart(AgentStart),
    AgentStop(AgentStop),
    /// The kernel's target map changed while the agent ran (SIGHUP, or names re-resolved).
    TargetsChanged(TargetsChanged),
    /// The policy file was loaded again (SIGHUP or a change to the file), or failed to load.
    PolicyChanged(PolicyChanged),
    /// A call held for approval: requested, then approved, denied or timed out.
    Approval(ApprovalEvent),
    /// One MCP (JSON-RPC) message, in either direction. Boxed: it is the largest kind.
    Mcp(Box<McpEvent>),
    /// An HTTP request on a redirected connection that carried no MCP message.
    Http(Box<HttpEvent>),
    /// A TLS handshake that failed, with the client or with the gateway.
    TlsFailure(Box<TlsFailureEvent>),
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Connection(_) => "connection",
            Event::Refused(_) => "refused",
            Event::AgentStart(_) => "agent_start",
            Event::AgentStop(_) => "agent_stop",
            Event::TargetsChanged(_) => "targets_changed",
            Event::PolicyChanged(_) => "policy_changed",
            Event::Approval(_) => "approval",
            Event::Mcp(_) => "mcp",
            Event::Http(_) => "http",
            Event::TlsFailure(_) => "tls_failure",
        }
    }

    /// RFC 3339 time (UTC, nanoseconds) of the event.
    pub fn time(&self) -> &str {
        match self {
            Event::Connection(e) => &e.time,
            Event::Refused(e) => &e.time,
            Event::AgentStart(e) => &e.time,
            Event::AgentStop(e) => &e.time,
            Event::TargetsChanged(e) => &e.time,
            Event::PolicyChanged(e) => &e.time,
            Event::Approval(e) => &e.time,
            Event::Mcp(e) => &e.time,
            Event::Http(e) => &e.time,
            Event::TlsFailure(e) => &e.time,
        }
    }
}

/// The calling process, as the kernel saw it at connect() and as /proc told afterwards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Process {
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread that called connect().
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Command name captured by the kernel at connect().
    pub comm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<Vec<String>>,
    /// True when the command line was longer than the capture bound and was cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cmdline_truncated: bool,
    /// True when credentials (token-shaped values, or the token a request carried) were
    /// replaced in the recorded command line.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cmdline_redacted: bool,
    /// cgroup v2 id of the caller (inode number of its cgroup folder).
    pub cgroup_id: u64,
    /// Why /proc enrichment missed, when it did (for example the process had already exited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrichment_error: Option<String>,
    /// Name of `uid` on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Name of `gid` on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// When the process started (RFC 3339, clock-tick precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// The parent, its parent and so on, nearest first, up to the configured depth.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<Parent>,
    /// cgroup v2 path, from the root of the hierarchy (found from `cgroup_id` when the process
    /// had already exited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The systemd unit (service or scope) the cgroup belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    /// CI job context, from the allow-listed environment variables of the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci: Option<Ci>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Parent {
    pub pid: u32,
    pub comm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
}

/// A container the caller runs in, as its cgroup path names it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Container {
    /// `docker`, `containerd`, `cri-o` or `podman`.
    pub runtime: String,
    pub id: String,
    /// Kubernetes pod UID, when the container belongs to a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

/// The CI job a process runs for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ci {
    /// `github_actions`, `gitlab_ci`, `jenkins`, `buildkite`, `circleci`, `azure_pipelines`;
    /// absent when only extra allow-listed variables were found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Allow-listed variables that no provider field takes (operator-added names).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub vars: std::collections::BTreeMap<String, String>,
}

/// The service token a request carried: never the token itself, but what it says, whether
/// it verified, and a keyed fingerprint that correlates equal tokens across records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Token {
    /// The header it came in (lower case).
    pub header: String,
    /// `bearer`, `basic`, or absent for a header that carries the token bare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Hex HMAC-SHA256 of the token under this host's fingerprint key.
    pub fingerprint: String,
    pub verified: bool,
    /// Why it did not verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<TokenFailure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The claims below are what the token says; trust them only when `verified`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aud: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// The configured extra claims (for example `groups`, `scope`), as the token has them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub claims: std::collections::BTreeMap<String, serde_json::Value>,
}

/// An access decision and the rule that made it (none: the policy's default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub action: DecisionAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// What the client was told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For a held call: how long it may wait for an approver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionAction {
    Allow,
    Deny,
    RateLimited,
    /// Held for an operator's approval (the `approval` records say how it ended).
    Held,
}

impl DecisionAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionAction::Allow => "allow",
            DecisionAction::Deny => "deny",
            DecisionAction::RateLimited => "rate_limited",
            DecisionAction::Held => "held",
        }
    }
}

/// Why a token did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenFailure {
    /// Not a JWT (an opaque key, or Basic credentials).
    NotJwt,
    /// A JWT whose parts do not decode.
    Malformed,
    /// No issuer is configured, so nothing can verify it.
    NoKey,
    /// Its `iss` is none of the configured issuers.
    UnknownIssuer,
    /// Its `kid` is in none of the issuer's keys, even after a refresh.
    UnknownKid,
    /// The issuer's keys could not be loaded.
    KeysUnavailable,
    AlgorithmNotAllowed,
    BadSignature,
    Expired,
    NotYetValid,
    WrongAudience,
    /// A required claim (such as `exp`) is missing.
    MissingClaim,
}

impl TokenFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenFailure::NotJwt => "not_jwt",
            TokenFailure::Malformed => "malformed",
            TokenFailure::NoKey => "no_key",
            TokenFailure::UnknownIssuer => "unknown_issuer",
            TokenFailure::UnknownKid => "unknown_kid",
            TokenFailure::KeysUnavailable => "keys_unavailable",
            TokenFailure::AlgorithmNotAllowed => "algorithm_not_allowed",
            TokenFailure::BadSignature => "bad_signature",
            TokenFailure::Expired => "expired",
            TokenFailure::NotYetValid => "not_yet_valid",
            TokenFailure::WrongAudience => "wrong_audience",
            TokenFailure::MissingClaim => "missing_claim",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Connection {
    /// The client's address as the proxy saw it.
    pub client: String,
    /// Where the client meant to go (the gateway).
    pub original_dst: String,
    /// The proxy listener that took the connection.
    pub proxy: String,
    /// The configured target the destination matched (`*:8811`, `gw.internal:8811`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// For a TLS connection: how it was handled and what each side negotiated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

/// A TLS connection, as the proxy handled it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tls {
    /// `terminate` (the proxy reads the traffic) or `passthrough` (relayed untouched).
    pub mode: String,
    /// The version and cipher suite negotiated with the gateway (passthrough: what the
    /// gateway's ServerHello chose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    /// The server name the client asked for (SNI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The protocols the client offered (ALPN), and the one agreed, if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn_offered: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
    /// The gateway's certificate (terminate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamCert>,
}

/// The gateway's leaf certificate, as the proxy saw and checked it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpstreamCert {
    pub subject: String,
    pub issuer: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sans: Vec<String>,
    /// RFC 3339.
    pub not_after: String,
    /// Hex SHA-256 of the DER certificate.
    pub sha256: String,
    /// Verified against the system's roots and the configured extra ones.
    pub verified: bool,
    /// The session with the gateway was resumed: this is the certificate verified when the
    /// session began (rustls resumes only with the roots that verified it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
}

/// A TLS handshake that failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsFailureEvent {
    pub time: String,
    /// `client` (the caller did not complete the handshake with the proxy, for example
    /// because it does not trust the host CA) or `upstream` (the gateway's certificate or
    /// handshake was refused).
    pub side: String,
    /// The alert or the reason, and what to do about it.
    pub reason: String,
    pub process: Process,
    pub connection: Connection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Both sides finished normally.
    Closed,
    /// The original destination could not be reached; the client was disconnected.
    UpstreamConnectFailed,
    /// An I/O error cut the relay.
    RelayError,
    /// The agent stopped while the connection was open.
    AgentShutdown,
    /// The proxy refused the connection: its protocol could not be told in time, or it is
    /// one the proxy cannot check and the policy refuses those (`[gateway] opaque`).
    Refused,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    /// Client to gateway.
    pub req: u64,
    /// Gateway to client.
    pub resp: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// When the proxy accepted the connection (RFC 3339).
    pub start: String,
    /// When it closed.
    pub end: String,
    pub duration_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionEvent {
    pub time: String,
    pub process: Process,
    pub connection: Connection,
    pub timing: Timing,
    pub bytes: Bytes,
    pub outcome: Outcome,
    /// What the client spoke, as its first bytes told: `http1`, `tls`, `h2c` or `opaque`
    /// (absent when it sent nothing, or too little to tell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusedEvent {
    pub time: String,
    pub client: String,
    pub proxy: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRef {
    pub name: String,
    /// `embedded` or the file's path.
    pub source: String,
    /// Hex SHA-256 of the policy file's bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStart {
    pub time: String,
    pub version: String,
    pub pid: u32,
    pub targets: Vec<String>,
    /// The proxy's listeners, comma-separated.
    pub listen: String,
    pub cgroup: String,
    pub policy: PolicyRef,
    /// How the previous run of the agent on this trail ended; absent on a new trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_run: Option<PreviousRun>,
}

/// The end of the previous run, as the trail shows it. A run that did not end with an
/// `agent_stop` record crashed or was killed: between its last record and this start, the
/// hooks were gone and traffic went direct, unaudited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviousRun {
    pub ended_cleanly: bool,
    pub last_seq: u64,
    /// Time of the trail's last record before this start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_record_time: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStop {
    pub time: String,
    pub reason: String,
    /// Kernel counters at shutdown, by name.
    #[serde(default)]
    pub counters: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetsChanged {
    pub time: String,
    /// `SIGHUP` or `re-resolve`.
    pub trigger: String,
    /// The address:port entries now in force (`*:PORT` for wildcards).
    pub entries: Vec<String>,
    pub added: usize,
    pub removed: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyChanged {
    pub time: String,
    /// `SIGHUP` or `file-change`.
    pub trigger: String,
    /// The policy in force afterwards (the old one when the new file did not load).
    pub in_force: PolicyRef,
    pub loaded: bool,
    /// Why the file did not load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalEvent {
    pub time: String,
    /// The approval's id (`mcptrail approve ID`).
    pub id: u64,
    /// `requested`, `approved`, `denied` or `timed_out`.
    pub outcome: String,
    /// The held call: its exchange and what `mcptrail approvals` showed.
    pub held: crate::policy::approvals::Held,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<crate::policy::approvals::Approver>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long the call waited, for the decided ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

impl PolicyChanged {
    pub fn policy_name(&self) -> &str {
        &self.in_force.name
    }
}

/// The HTTP exchange an MCP message travelled in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpInfo {
    pub method: String,
    pub path: String,
    /// Response status, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// `Mcp-Session-Id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// `MCP-Protocol-Version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// `Mcp-Method` (2026-07-28): the method, mirrored in a header for gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp_method: Option<String>,
    /// `Mcp-Name` (2026-07-28): the tool or prompt name or resource URI, mirrored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp_name: Option<String>,
    /// Headers the agent set from its secrets (credential brokering); never their values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub brokered: Vec<String>,
    /// Response `Content-Type` (for example `text/event-stream`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The HTTP version the client spoke: `1.1`, `1.0` or `2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// HTTP/2: the stream's ordinal on its connection, as 1, 3, 5... in the order the proxy
    /// took the streams up (hyper does not show the frames' own ids; for a client that numbers
    /// its streams in order and has none refused or reset before they are taken up, the two
    /// agree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<u32>,
    /// The version the gateway was spoken to in, when not the client's (`1.1`: an HTTP/2
    /// client of a plaintext gateway that speaks only HTTP/1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_version: Option<String>,
    /// Response trailers, when the gateway sent any (values masked like headers).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub trailers: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McpEvent {
    pub time: String,
    /// Links a request to its outcome: both records carry the same id.
    pub exchange: String,
    pub direction: Direction,
    /// `request`, `notification`, `response` or `error`; absent for malformed messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<crate::mcp::Kind>,
    pub process: Process,
    pub connection: Connection,
    pub http: HttpInfo,
    /// The service token the HTTP request carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Token>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jsonrpc_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Tool or prompt name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Resource URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<serde_json::Value>,
    /// Who the client says it is (`_meta` client info, or `initialize`'s `clientInfo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_info: Option<serde_json::Value>,
    /// For a retry of an `input_required` round (2026-07-28): the exchange of the first
    /// request of the logical call, and which retry this is (1, 2, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_call: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// The outcome of a request whose response stream the client closed before an answer
    /// (for 2026-07-28, closing the stream cancels the request; for `subscriptions/listen`,
    /// it ends the subscription).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client_closed: bool,
    /// What the access rules decided about a message the client sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// A `wire = true` masking rule rewrote the body this message was forwarded in.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wire_masked: bool,
    /// Masking rules that rewrote values of this record (what was masked is not kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masked: Vec<String>,
    /// Part of a JSON-RPC batch.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub batch: bool,
    /// The `Mcp-Method`/`Mcp-Name` headers disagree with the body (relayed as they were; a
    /// gateway routing by header would act on something else than the body says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_mismatch: Option<String>,
    /// Why the bytes were not understood (they were relayed unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malformed: Option<String>,
    /// For outcomes: microseconds from the request's arrival to the response's first byte and
    /// to this message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_us: Option<u64>,
}

impl McpEvent {
    /// A record of an exchange with nothing said yet about its message: the fields the
    /// writer fills in as it learns them are empty.
    pub fn new(
        exchange: String,
        direction: Direction,
        process: Process,
        connection: Connection,
        http: HttpInfo,
    ) -> Self {
        McpEvent {
            time: now_rfc3339(),
            exchange,
            direction,
            message: None,
            process,
            connection,
            http,
            token: None,
            jsonrpc_id: None,
            method: None,
            name: None,
            uri: None,
            params: None,
            result: None,
            error: None,
            batch: false,
            masked: Vec::new(),
            wire_masked: false,
            decision: None,
            client_info: None,
            logical_call: None,
            round: None,
            client_closed: false,
            header_mismatch: None,
            malformed: None,
            first_byte_us: None,
            elapsed_us: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpEvent {
    pub time: String,
    pub process: Process,
    pub connection: Connection,
    pub http: HttpInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Token>,
    pub bytes: Bytes,
    pub elapsed_us: u64,
    /// Set when the exchange failed (for example the gateway reset the connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Now, as the record's RFC 3339 UTC time with nanoseconds.
pub fn now_rfc3339() -> String {
    rfc3339(chrono::Utc::now())
}

pub fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            v: SCHEMA_VERSION,
            seq: 7,
            host: "runner-1".into(),
            prev_hash: "00".repeat(32),
            event: Event::Refused(RefusedEvent {
                time: "2026-11-26T10:00:00.000000001Z".into(),
                client: "127.0.0.1:40000".into(),
                proxy: "127.0.0.1:15811".into(),
                reason: "no redirect origin".into(),
            }),
        }
    }

    #[test]
    fn kind_is_a_flat_tag() {
        let v: serde_json::Value = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["kind"], "refused");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["client"], "127.0.0.1:40000");
    }

    #[test]
    fn round_trips() {
        let r = sample();
        let bytes = serde_json::to_vec(&r).unwrap();
        assert_eq!(serde_json::from_slice::<Record>(&bytes).unwrap(), r);
    }

    #[test]
    fn optional_process_fields_may_be_absent() {
        let json = r#"{"pid":1,"tid":1,"uid":0,"gid":0,"comm":"x","cgroup_id":9}"#;
        let p: Process = serde_json::from_str(json).unwrap();
        assert_eq!(p.exe, None);
        assert!(!p.cmdline_truncated);
    }
}
