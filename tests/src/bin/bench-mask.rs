//! Masking throughput: the default pack over realistic MCP payloads, with mcptrail's
//! prefiltered engine and with the naive way (every rule's regex over every string), in the
//! same run, on one core. Reports MB/s (of JSON text) and the ratio. `cargo xtask bench`.
#![forbid(unsafe_code)]

use std::time::Instant;

use mcptrail::policy::Policy;
use mcptrail::policy::masking::{Masker, Scope};
use serde_json::{Value, json};

/// A small deterministic generator, so every run masks the same payloads.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() as usize) % items.len()]
    }
}

const PROSE: &[&str] = &[
    "The build failed on the integration step because the database migration timed out.",
    "Summarise the following pull request and list the files that changed, with a short risk note.",
    "fn main() { let total: u64 = items.iter().map(|i| i.price * i.qty).sum(); println!(\"{total}\"); }",
    "2026-11-26T10:00:00Z INFO worker-3 processed 1532 jobs in 12.4s (p99 41ms), queue depth 7",
    "SELECT id, name, created_at FROM orders WHERE status = 'open' ORDER BY created_at DESC LIMIT 50;",
    "Kubernetes pod api-7d9f8c6b5-x2x4z restarted 3 times: OOMKilled, limit 512Mi, request 256Mi.",
    "def handler(event, context):\n    return {'statusCode': 200, 'body': json.dumps(event)}\n",
    "Please review the diff below and point out any security issues, especially around input validation.",
];

/// What leaks into real payloads now and then.
const SECRETS: &[&str] = &[
    "card 4111 1111 1111 1111",
    "contact alice@example.com",
    "AKIAIOSFODNN7EXAMPLE",
    "token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
    "postgres://app:Sup3rS3cret@db.internal:5432/app",
    "password=hunter22",
];

fn payload(rng: &mut Lcg, kib: usize) -> Value {
    let mut texts = Vec::new();
    let mut size = 0;
    while size < kib * 1024 {
        let mut t = String::new();
        for _ in 0..4 {
            t.push_str(rng.pick(PROSE));
            t.push(' ');
        }
        // About one string in twenty carries something to mask.
        if rng.next().is_multiple_of(20) {
            t.push_str(rng.pick(SECRETS));
        }
        size += t.len();
        texts.push(json!({"type": "text", "text": t}));
    }
    json!({"content": texts, "isError": false, "_meta": {"tool": "summarize", "took_ms": 1234}})
}

fn throughput(m: &Masker, payloads: &[Value], bytes: usize, naive: bool) -> f64 {
    let rounds = 5;
    let mut rates = Vec::new();
    for _ in 0..rounds {
        let mut work: Vec<Value> = payloads.to_vec();
        let start = Instant::now();
        for v in &mut work {
            if naive {
                m.mask_value_naive(v, Scope::Result);
            } else {
                m.mask_value(v, Scope::Result);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        rates.push(bytes as f64 / secs / 1e6);
    }
    rates.sort_by(f64::total_cmp);
    rates[rounds / 2]
}

/// MiB of JSON per payload size: 32, or BENCH_MASK_MIB (a small value suits `valgrind
/// --tool=callgrind`, whose instruction counts do not move with the machine's load).
fn mib() -> usize {
    std::env::var("BENCH_MASK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

fn main() {
    let policy = Policy::embedded_default().expect("the embedded policy loads");
    let masker = policy.masker([7; 32]).expect("the default pack compiles");
    println!(
        "Masking throughput, default pack ({} rules), one core, median of 5 rounds:",
        masker.rule_count()
    );
    println!(
        "{:>10} {:>10} {:>14} {:>12} {:>7}",
        "payload", "messages", "engine (MB/s)", "naive (MB/s)", "ratio"
    );
    let mut rng = Lcg(42);
    // BENCH_MASK_KIB=1,16 runs only those payload sizes (for a profile of one).
    let sizes: Vec<usize> = std::env::var("BENCH_MASK_KIB")
        .ok()
        .map(|v| v.split(',').filter_map(|k| k.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 256]);
    for kib in sizes {
        let count = (mib() * 1024 / kib).max(8);
        let payloads: Vec<Value> = (0..count).map(|_| payload(&mut rng, kib)).collect();
        let bytes: usize = payloads.iter().map(|p| p.to_string().len()).sum();
        let fast = throughput(&masker, &payloads, bytes, false);
        // BENCH_MASK_NAIVE=0 leaves the naive way out (for a profile of the engine alone).
        let naive = if std::env::var("BENCH_MASK_NAIVE").as_deref() == Ok("0") {
            f64::NAN
        } else {
            throughput(&masker, &payloads, bytes, true)
        };
        println!(
            "{:>8}Ki {count:>10} {fast:>14.0} {naive:>12.0} {:>6.1}x",
            kib,
            fast / naive
        );
    }
}
