//! Held calls waiting for a person: an access rule with `action = "approve"` holds a request
//! until an operator approves or denies it over the control socket (`mcptrail approve ID`,
//! `mcptrail deny ID`), or its timeout passes (then it is denied). The approver is who the
//! kernel says is on the other end of the socket (SO_PEERCRED).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApprovalError {
    #[error(
        "no pending approval {0}: it was decided already, timed out, or never existed (`mcptrail approvals` lists what waits)"
    )]
    Unknown(u64),
}

/// Who decided, from the control socket's peer credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approver {
    pub uid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub pid: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub approved: bool,
    pub approver: Approver,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What `mcptrail approvals` shows about a held call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub id: u64,
    /// RFC 3339.
    pub since: String,
    pub timeout_secs: u64,
    pub rule: String,
    pub exchange: String,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub destination: String,
    /// Every call the request holds, when it holds more than one (a batch): the operator
    /// decides on all of them at once, so all of them are shown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<HeldItem>,
}

/// One held call of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldItem {
    pub exchange: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub rule: String,
}

#[derive(Default)]
pub struct Approvals {
    next: AtomicU64,
    pending: Mutex<BTreeMap<u64, (Held, oneshot::Sender<Verdict>)>>,
}

impl Approvals {
    /// Holds a call; the receiver gets the verdict. The id is filled in here.
    pub fn hold(&self, mut held: Held) -> (u64, oneshot::Receiver<Verdict>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        held.id = id;
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("approvals lock")
            .insert(id, (held, tx));
        (id, rx)
    }

    /// Forgets a held call (it timed out, or its client went away).
    pub fn forget(&self, id: u64) {
        self.pending.lock().expect("approvals lock").remove(&id);
    }

    pub fn list(&self) -> Vec<Held> {
        self.pending
            .lock()
            .expect("approvals lock")
            .values()
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// Decides a held call.
    pub fn decide(&self, id: u64, verdict: Verdict) -> Result<Held, ApprovalError> {
        let (held, tx) = self
            .pending
            .lock()
            .expect("approvals lock")
            .remove(&id)
            .ok_or(ApprovalError::Unknown(id))?;
        // The waiter may have just timed out; then the decision comes too late and says so.
        tx.send(verdict).map_err(|_| ApprovalError::Unknown(id))?;
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held() -> Held {
        Held {
            id: 0,
            since: "2026-11-26T10:00:00Z".into(),
            timeout_secs: 300,
            rule: "deploys".into(),
            exchange: "x.0.0.0".into(),
            pid: 42,
            exe: Some("/usr/bin/python3".into()),
            sub: Some("svc-ci".into()),
            ci: None,
            method: Some("tools/call".into()),
            name: Some("deploy_prod".into()),
            destination: "10.0.0.5:8811".into(),
            calls: Vec::new(),
        }
    }

    fn root() -> Approver {
        Approver {
            uid: 0,
            user: Some("root".into()),
            pid: Some(1),
        }
    }

    #[tokio::test]
    async fn approve_deny_and_unknown() {
        let a = Approvals::default();
        let (id, rx) = a.hold(held());
        assert_eq!(a.list()[0].id, id);
        a.decide(
            id,
            Verdict {
                approved: true,
                approver: root(),
                reason: Some("ok".into()),
            },
        )
        .unwrap();
        assert!(rx.await.unwrap().approved);
        assert!(a.list().is_empty());
        assert_eq!(
            a.decide(
                id,
                Verdict {
                    approved: false,
                    approver: root(),
                    reason: None
                }
            ),
            Err(ApprovalError::Unknown(id))
        );
        let (id2, rx2) = a.hold(held());
        assert_ne!(id, id2);
        drop(rx2); // the waiter gave up
        assert!(
            a.decide(
                id2,
                Verdict {
                    approved: true,
                    approver: root(),
                    reason: None
                }
            )
            .is_err()
        );
    }
}
