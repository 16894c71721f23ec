//! MCP calls through mcptrail against the direct path, in the same run: added latency at fixed
//! rates (open loop, so a slow response delays nothing that comes after it: no coordinated
//! omission), saturation throughput, SSE time to first event, durable records per second,
//! fsync latency, and the agent's resident memory idle and with 1,000 connections.
//!
//! Run as root with `cargo xtask bench` (`--quick`: a smoke run under 2 minutes). The backend
//! is a small JSON-RPC server in this process (hyper) answering `tools/call` with a payload
//! of the asked size, so that the server is never the bottleneck being measured. The client
//! moves this process into each set-up's cgroup in turn; connections made there are
//! redirected by that set-up's agent (release build, MCPTRAIL_BIN).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use mcptrail_tests::{Agent, TestCgroup, require_root};
use tokio::net::TcpStream;

/// Bytes of result text the backend answers with (set per phase).
static PAYLOAD: AtomicUsize = AtomicUsize::new(1024);

/// A runtime with `workers` threads: the client, the backend and the agent share two cores.
fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn quick() -> bool {
    std::env::args().any(|a| a == "--quick")
}

/// The backend: answers every POST with a JSON-RPC result carrying PAYLOAD bytes of text; with
/// `Accept: text/event-stream` (and no JSON), as an SSE stream whose first event (progress)
/// comes at once and whose result comes 20 ms later.
fn backend() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = runtime(1);
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(answer);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    addr
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let sse = req
        .headers()
        .get("accept")
        .is_some_and(|a| a.to_str().unwrap_or("") == "text/event-stream");
    let body = req.into_body().collect().await?.to_bytes();
    let id = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .unwrap_or(serde_json::Value::Null);
    let text = "x".repeat(PAYLOAD.load(Ordering::Relaxed));
    let result = serde_json::json!({"jsonrpc": "2.0", "id": id,
        "result": {"content": [{"type": "text", "text": text}], "isError": false}});
    if sse {
        // One response body: hyper sends the first event at once only with a streaming body,
        // so the 20 ms gap is the server's think time before it answers at all here; the
        // client measures its first byte.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let progress = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": 1, "progress": 0.5}});
        let stream =
            format!("event: message\ndata: {progress}\n\nevent: message\ndata: {result}\n\n");
        return Ok(Response::builder()
            .header("content-type", "text/event-stream")
            .body(Full::new(Bytes::from(stream)))
            .unwrap());
    }
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(result.to_string())))
        .unwrap())
}

fn call_body(id: u64, size: usize) -> Bytes {
    let arg = "a".repeat(size);
    Bytes::from(
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": arg}}})
        .to_string(),
    )
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

async fn one_call(sender: &mut Sender, id: u64, size: usize, sse: bool) -> Duration {
    let t = Instant::now();
    let req = Request::post("/mcp")
        .header("host", "bench")
        .header("content-type", "application/json")
        .header(
            "accept",
            if sse {
                "text/event-stream"
            } else {
                "application/json, text/event-stream"
            },
        )
        .body(Full::new(call_body(id, size)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if frame.is_data() && first.is_none() {
            first = Some(t.elapsed());
        }
    }
    if sse {
        first.unwrap_or_else(|| t.elapsed())
    } else {
        t.elapsed()
    }
}

/// Open loop: call i is due at start + i/rate; its latency counts from then, so time spent
/// waiting for a free connection is latency too.
fn fixed_rate(addr: SocketAddr, rate: u64, secs: u64, size: usize) -> Vec<u64> {
    let rt = runtime(1);
    rt.block_on(async move {
        let conns = 64;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..conns {
            tx.send(connect(addr).await).unwrap();
        }
        let pool = Arc::new(tokio::sync::Mutex::new(rx));
        // Warm up the connections (and the agent's caches).
        for i in 0..conns as u64 {
            let mut s = pool.lock().await.recv().await.unwrap();
            one_call(&mut s, i, size, false).await;
            tx.send(s).unwrap();
        }
        let total = rate * secs;
        let start = tokio::time::Instant::now() + Duration::from_millis(20);
        let mut tasks = Vec::with_capacity(total as usize);
        for i in 0..total {
            let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
            let (pool, tx) = (pool.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(due).await;
                let mut s = pool.lock().await.recv().await.unwrap();
                one_call(&mut s, i, size, false).await;
                let latency = tokio::time::Instant::now() - due;
                tx.send(s).unwrap();
                latency.as_micros() as u64
            }));
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out.sort_unstable();
        out
    })
}

/// Closed loop: `conns` connections calling back to back for `secs`: calls per second.
fn saturation(addr: SocketAddr, conns: usize, secs: u64, size: usize) -> f64 {
    let rt = runtime(1);
    rt.block_on(async move {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for c in 0..conns {
            tasks.push(tokio::spawn(async move {
                let mut s = connect(addr).await;
                let mut n = 0u64;
                while Instant::now() < end {
                    one_call(&mut s, c as u64 * 1_000_000 + n, size, false).await;
                    n += 1;
                }
                n
            }));
        }
        let t = Instant::now();
        let mut total = 0;
        for task in tasks {
            total += task.await.unwrap();
        }
        total as f64 / t.elapsed().as_secs_f64()
    })
}

/// Time to the first byte of an SSE response, median of `n`, in microseconds.
fn sse_first_event(addr: SocketAddr, n: usize) -> u64 {
    let rt = runtime(1);
    rt.block_on(async move {
        let mut s = connect(addr).await;
        let mut t: Vec<u64> = Vec::new();
        for i in 0..n {
            t.push(one_call(&mut s, i as u64, 1024, true).await.as_micros() as u64);
        }
        t.sort_unstable();
        t[t.len() / 2]
    })
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn enter(cgroup: &Path) {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .unwrap_or_else(|e| panic!("moving into {}: {e}", cgroup.display()));
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn profile(out: &str) {
    let addr = backend();
    let work = tempfile::tempdir().unwrap();
    let cg = TestCgroup::new("mcp-profile");
    let agent = Agent::start_with(
        &work.path().join("p"),
        &cg,
        &[addr.to_string()],
        &["--durability", "buffered"],
        false,
    );
    enter(&cg.path);
    let mut perf = std::process::Command::new("perf")
        .args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "999",
            "-g",
            "-o",
            out,
            "-p",
        ])
        .arg(agent.pid().to_string())
        .args(["--", "sleep", "8"])
        .spawn()
        .expect("perf (Debian's linux-perf) is needed for --profile");
    let r = saturation(addr, 32, 9, 1024);
    let _ = perf.wait();
    enter(cg.path.parent().unwrap());
    println!(
        "profiled saturation: {r:.0} calls/s; `perf report -i {out} --no-children` shows where the agent's time goes"
    );
    drop(agent);
}

/// Median fsync latency of a small write in `dir`, in microseconds.
fn fsync_us(dir: &Path) -> u64 {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut t = Vec::new();
    for _ in 0..200 {
        f.write_all(&[0u8; 256]).unwrap();
        let s = Instant::now();
        f.sync_data().unwrap();
        t.push(s.elapsed().as_micros() as u64);
    }
    let _ = std::fs::remove_file(path);
    t.sort_unstable();
    t[t.len() / 2]
}

/// Records per second appended by `writers` concurrent tasks for `secs`.
fn records_per_sec(dir: &Path, sync: bool, writers: usize, secs: u64) -> f64 {
    use mcptrail::audit::Store;
    use mcptrail::audit::record::{Event, RefusedEvent, now_rfc3339};
    use mcptrail::audit::store::Durability;
    let mut store = Store::open(dir).unwrap();
    store.set_durability(if sync {
        Durability::Sync
    } else {
        Durability::Buffered(Duration::from_millis(10))
    });
    let (log, writer) = store.spawn_writer();
    let rt = runtime(2);
    let rate = rt.block_on(async move {
        let end = Instant::now() + Duration::from_secs(secs);
        let t = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < end {
                    log.append(Event::Refused(RefusedEvent {
                        time: now_rfc3339(),
                        client: format!("127.0.0.1:{w}"),
                        proxy: "127.0.0.1:15811".into(),
                        reason: "benchmark record of a typical small size".into(),
                    }))
                    .await
                    .unwrap();
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for task in tasks {
            total += task.await.unwrap();
        }
        total as f64 / t.elapsed().as_secs_f64()
    });
    drop(rt);
    writer.join().unwrap();
    rate
}

/// `--profile FILE`: only the saturation case of the buffered, masking set-up, with `perf
/// record` (cpu-clock, call graphs) on the agent meanwhile; then `perf report` reads FILE.
fn profile_arg() -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--profile")
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    require_root();
    let quick = quick();
    if let Some(out) = profile_arg() {
        return profile(&out);
    }
    let secs = if quick { 2 } else { 5 };
    let rates: &[u64] = if quick { &[1000] } else { &[500, 1000, 2000] };
    let sizes: &[usize] = if quick { &[1024] } else { &[1024, 16 * 1024] };
    let addr = backend();
    let work = tempfile::tempdir().unwrap();
    let nomask = work.path().join("nomask.toml");
    std::fs::write(&nomask, "version = 1\nname = \"no-masking\"\n").unwrap();

    let direct_cg = TestCgroup::new("mcp-direct");
    let buffered_cg = TestCgroup::new("mcp-buffered");
    let sync_cg = TestCgroup::new("mcp-sync");
    let plain_cg = TestCgroup::new("mcp-nomask");
    let target = [addr.to_string()];
    let buffered = Agent::start_with(
        &work.path().join("b"),
        &buffered_cg,
        &target,
        &["--durability", "buffered"],
        false,
    );
    let sync = Agent::start_with(
        &work.path().join("s"),
        &sync_cg,
        &target,
        &["--durability", "sync"],
        false,
    );
    let plain = Agent::start_with(
        &work.path().join("n"),
        &plain_cg,
        &target,
        &[
            "--durability",
            "buffered",
            "--policy",
            nomask.to_str().unwrap(),
        ],
        false,
    );
    let idle_rss = rss_kib(buffered.pid());
    let setups: [(&str, &TestCgroup); 4] = [
        ("direct", &direct_cg),
        ("agent, buffered, masking", &buffered_cg),
        ("agent, sync, masking", &sync_cg),
        ("agent, buffered, no masking", &plain_cg),
    ];

    println!(
        "mcptrail MCP benchmark ({}): backend answers tools/call in-process; open-loop fixed rates, {secs} s each",
        if quick { "quick" } else { "full" }
    );
    println!();
    println!(
        "Added latency at fixed rates (microseconds; added = set-up minus direct, same percentile):"
    );
    println!(
        "{:<30} {:>7} {:>6} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "set-up", "payload", "rate", "p50", "p99", "p99.9", "+p50", "+p99"
    );
    for &size in sizes {
        PAYLOAD.store(size, Ordering::Relaxed);
        for &rate in rates {
            let mut direct = (0, 0, 0);
            for (name, cg) in setups {
                enter(&cg.path);
                let lat = fixed_rate(addr, rate, secs, size);
                let (p50, p99, p999) = (pct(&lat, 0.5), pct(&lat, 0.99), pct(&lat, 0.999));
                if name == "direct" {
                    direct = (p50, p99, p999);
                }
                println!(
                    "{name:<30} {:>6}K {rate:>6} {p50:>8} {p99:>8} {p999:>8} {:>10} {:>10}",
                    size / 1024,
                    p50 as i64 - direct.0 as i64,
                    p99 as i64 - direct.1 as i64
                );
            }
        }
    }
    println!();
    println!("Saturation (32 connections back to back, {secs} s, 1 KiB):");
    PAYLOAD.store(1024, Ordering::Relaxed);
    let mut direct_rate = 0.0;
    for (name, cg) in setups {
        enter(&cg.path);
        let r = saturation(addr, 32, secs, 1024);
        if name == "direct" {
            direct_rate = r;
        }
        println!(
            "{name:<30} {r:>9.0} calls/s  {:>5.2}x direct",
            r / direct_rate
        );
    }
    println!();
    println!("SSE time to first byte (median of 50, server thinks 20 ms):");
    for (name, cg) in setups {
        enter(&cg.path);
        println!("{name:<30} {:>8} us", sse_first_event(addr, 50));
    }

    // 1,000 connections held open through the agent.
    enter(&buffered_cg.path);
    let rt = runtime(1);
    let held: Vec<Sender> = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..1000u64 {
            let mut s = connect(addr).await;
            one_call(&mut s, i, 128, false).await;
            v.push(s);
        }
        v
    });
    std::thread::sleep(Duration::from_millis(500));
    let busy_rss = rss_kib(buffered.pid());
    drop(held);
    drop(rt);
    enter(direct_cg.path.parent().unwrap());

    println!();
    println!(
        "Agent resident memory (buffered, release): idle {} MiB, with 1,000 open connections {} MiB",
        idle_rss / 1024,
        busy_rss / 1024
    );
    println!();
    let fsync = fsync_us(work.path());
    println!("fsync latency of this disk (median of 200 small writes): {fsync} us");
    let rsecs = if quick { 2 } else { 5 };
    for (sync, label) in [(true, "sync (group commit)"), (false, "buffered (10 ms)")] {
        let dir = work.path().join(format!("store-{sync}"));
        std::fs::create_dir_all(&dir).unwrap();
        let r = records_per_sec(&dir, sync, 64, rsecs);
        println!("durable records/s, {label}, 64 concurrent writers: {r:.0}");
    }
    drop((buffered, sync, plain));
}
