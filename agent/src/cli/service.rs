//! Telling systemd (`Type=notify`) how the agent is doing: READY once the programs are attached
//! and the listeners are up, WATCHDOG=1 while the runtime answers, STOPPING=1 at a stop.
//! Without `NOTIFY_SOCKET` (not started by systemd) each call does nothing.
#![forbid(unsafe_code)]

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "telling systemd the agent's state failed");
    }
}

pub fn ready() {
    notify(&[NotifyState::Ready]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// With `WatchdogSec=` set, pings systemd at half the period from a runtime task: a runtime
/// that stops scheduling (a deadlock, a starved worker) misses the ping, and systemd restarts
/// the agent.
pub fn watchdog(stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled().filter(|d| !d.is_zero())? / 2;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = tick.tick() => notify(&[NotifyState::Watchdog]),
                _ = stop.cancelled() => return,
            }
        }
    }))
}
