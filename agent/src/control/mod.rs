//! The agent's control socket: `STATE_DIR/control.sock`, a Unix socket only root can reach
//! (mode 0600 in a 0700 folder). One JSON request per line, one JSON answer per line.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

pub const SOCKET_NAME: &str = "control.sock";
/// Longest request line accepted; requests are tiny.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "no agent is running with state directory {0} (its control socket is missing or refuses connections): start one with `mcptrail run`, or pass the agent's --state-dir"
    )]
    NotRunning(PathBuf),
    #[error("cannot set up the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent's answer was not understood: {0}")]
    Protocol(String),
    #[error("{0}")]
    Refused(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// The calls held for approval.
    Approvals,
    Approve {
        id: u64,
        #[serde(default)]
        reason: Option<String>,
    },
    Deny {
        id: u64,
        #[serde(default)]
        reason: Option<String>,
    },
}

/// Who is on the other end of the socket, as the kernel says (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub pid: Option<i32>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Binds the control socket (replacing a stale one) and serves it until `stop` fires.
pub fn serve<H>(state_dir: &Path, handler: H, stop: CancellationToken) -> Result<(), ControlError>
where
    H: Fn(Request, Peer) -> Result<serde_json::Value, String> + Send + Sync + 'static,
{
    let path = socket_path(state_dir);
    let bind_err = |source| ControlError::Bind {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let listener = UnixListener::bind(&path).map_err(bind_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                // Read before anything else: the credentials of the process that connected.
                let Ok(cred) = stream.peer_cred() else {
                    return;
                };
                let peer = Peer {
                    uid: cred.uid(),
                    pid: cred.pid(),
                };
                let (read, mut write) = stream.into_split();
                // Bounded: a peer that sends no newline cannot make us buffer without end.
                let mut lines = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(
                    read,
                    MAX_REQUEST as u64,
                ))
                .lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply = match serde_json::from_str::<Request>(&line) {
                        Ok(req) => match handler(req, peer) {
                            Ok(result) => Reply {
                                ok: true,
                                result: Some(result),
                                error: None,
                            },
                            Err(error) => Reply {
                                ok: false,
                                result: None,
                                error: Some(error),
                            },
                        },
                        Err(e) => Reply {
                            ok: false,
                            result: None,
                            error: Some(format!("bad request: {e}")),
                        },
                    };
                    let mut out = serde_json::to_vec(&reply).expect("replies serialise");
                    out.push(b'\n');
                    if write.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
        let _ = std::fs::remove_file(socket_path_of(&listener));
    });
    Ok(())
}

fn socket_path_of(listener: &UnixListener) -> PathBuf {
    listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .unwrap_or_default()
}

/// Sends one request to the agent behind `state_dir` and returns its result.
pub fn request(state_dir: &Path, req: &Request) -> Result<serde_json::Value, ControlError> {
    let path = socket_path(state_dir);
    let mut stream = std::os::unix::net::UnixStream::connect(&path)
        .map_err(|_| ControlError::NotRunning(state_dir.to_path_buf()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(req).expect("requests serialise");
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    let reply: Reply =
        serde_json::from_str(&answer).map_err(|e| ControlError::Protocol(e.to_string()))?;
    match (reply.ok, reply.result, reply.error) {
        (true, Some(result), _) => Ok(result),
        (_, _, Some(error)) => Err(ControlError::Refused(error)),
        _ => Err(ControlError::Protocol("empty reply".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_requests_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        serve(
            dir.path(),
            |req, peer| match req {
                Request::Status => Ok(serde_json::json!({"pid": 42, "peer_uid": peer.uid})),
                _ => Err("not here".into()),
            },
            stop.clone(),
        )
        .unwrap();
        let mode = std::fs::metadata(socket_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let d = dir.path().to_path_buf();
        let got = tokio::task::spawn_blocking(move || request(&d, &Request::Status))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got["pid"], 42);
        assert_eq!(got["peer_uid"], nix::unistd::getuid().as_raw());
        let d = dir.path().to_path_buf();
        let err = tokio::task::spawn_blocking(move || request(&d, &Request::Approvals))
            .await
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("not here"), "{err}");

        let d = dir.path().to_path_buf();
        let raw = tokio::task::spawn_blocking(move || {
            let mut s = std::os::unix::net::UnixStream::connect(socket_path(&d)).unwrap();
            s.write_all(b"{\"cmd\":\"explode\"}\n").unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            line
        })
        .await
        .unwrap();
        assert!(raw.contains("bad request"), "{raw}");
        stop.cancel();
    }

    #[test]
    fn no_agent_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = request(dir.path(), &Request::Status).unwrap_err();
        assert!(err.to_string().contains("mcptrail run"), "{err}");
    }
}
