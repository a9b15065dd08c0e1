//! `/health`: each check is computed from state kept in memory, so a probe never does
//! I/O. The one check that needs I/O (is the upstream app up?) runs in the background
//! on `admin.upstream_probe_interval` and leaves its result here.
//!
//! Rules (documented in config/orders.yaml next to the keys they use):
//! - `unhealthy` (HTTP 503): not ready or draining; the upstream app refuses
//!   connections (this seam cannot serve any inbound request); the certificate expired.
//! - `degraded` (HTTP 200): the certificate expires within `admin.cert_warning`; a session
//!   cache is at >= 90% of `session.max_sessions`; the data path's last attempt to
//!   reach a configured peer failed; the upstream app was not probed yet.
//! - `healthy` (HTTP 200) otherwise.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::Admin;

/// Session cache use at or above this share of `max_sessions` degrades health.
pub const CAPACITY_WARNING: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Healthy,
    Degraded,
    Unhealthy,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub status: Status,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub status: Status,
    pub checks: BTreeMap<&'static str, Check>,
}

/// The last result of the background upstream probe.
#[derive(Debug, Default)]
pub struct UpstreamProbe {
    last: Mutex<Option<Result<(), String>>>,
}

impl UpstreamProbe {
    fn set(&self, result: Result<(), String>) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
    }

    fn get(&self) -> Option<Result<(), String>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Connects to the upstream app every `interval` until `stop`; a TCP connect is what
/// the data path needs first, and it costs the app nothing to answer.
pub async fn probe_upstream(
    admin: std::sync::Arc<Admin>,
    target: (String, u16),
    interval: Duration,
    connect_timeout: Duration,
    stop: CancellationToken,
) {
    let mut was_up = None;
    loop {
        let result = match tokio::time::timeout(
            connect_timeout,
            TcpStream::connect((target.0.as_str(), target.1)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {connect_timeout:?}")),
        };
        let up = result.is_ok();
        if was_up != Some(up) {
            match &result {
                Ok(()) => {
                    tracing::info!(event = "upstream_up", upstream = %admin.upstream, "upstream app reachable")
                }
                Err(e) => {
                    tracing::warn!(event = "upstream_down", upstream = %admin.upstream, error = %e, "upstream app unreachable; inbound requests will fail until it is back")
                }
            }
            was_up = Some(up);
        }
        admin.upstream_probe.set(result);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

fn check(status: Status, detail: impl Into<String>) -> Check {
    Check {
        status,
        detail: detail.into(),
    }
}

impl Admin {
    /// Evaluates every check from cached state.
    pub fn health(&self) -> Report {
        let mut checks = BTreeMap::new();
        checks.insert(
            "ready",
            if self.draining.load(std::sync::atomic::Ordering::Acquire) {
                check(Status::Unhealthy, "draining: shutdown in progress")
            } else if self.is_ready() {
                check(Status::Healthy, "listeners bound, certificates loaded")
            } else {
                check(Status::Unhealthy, "starting")
            },
        );
        checks.insert(
            "upstream",
            match self.upstream_probe.get() {
                None => check(
                    Status::Degraded,
                    format!("{} not probed yet", self.upstream),
                ),
                Some(Ok(())) => check(
                    Status::Healthy,
                    format!("{} accepts connections", self.upstream),
                ),
                Some(Err(e)) => check(
                    Status::Unhealthy,
                    format!(
                        "{} unreachable: {e}; start the app or fix `upstream`",
                        self.upstream
                    ),
                ),
            },
        );
        checks.insert("certificate", self.cert_check(SystemTime::now()));
        checks.insert("session_capacity", self.capacity_check());
        checks.insert("peers", self.peers_check());
        let status = checks
            .values()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Healthy);
        Report { status, checks }
    }

    fn cert_check(&self, now: SystemTime) -> Check {
        let not_after = humantime::format_rfc3339_seconds(self.cert_not_after);
        match self.cert_not_after.duration_since(now) {
            Err(_) => check(
                Status::Unhealthy,
                format!("certificate expired at {not_after}; reissue it and restart seam"),
            ),
            Ok(left) if left <= self.config.admin.cert_warning => check(
                Status::Degraded,
                format!(
                    "certificate expires at {not_after} (in {}); reissue it soon",
                    humantime::format_duration(Duration::from_secs(left.as_secs()))
                ),
            ),
            Ok(_) => check(Status::Healthy, format!("valid until {not_after}")),
        }
    }

    fn capacity_check(&self) -> Check {
        let max = self.client_sessions.max_sessions().max(1);
        let used = self.client_sessions.len().max(self.server_sessions.len());
        let share = used as f64 / max as f64;
        let detail = format!(
            "{used} of {max} sessions in the fuller cache ({:.0}%)",
            share * 100.0
        );
        if share >= CAPACITY_WARNING {
            check(
                Status::Degraded,
                format!("{detail}; raise session.max_sessions or find who opens so many"),
            )
        } else {
            check(Status::Healthy, detail)
        }
    }

    fn peers_check(&self) -> Check {
        let down: Vec<String> = self
            .stats
            .peers()
            .into_iter()
            .filter(|(_, p)| p.reachable == Some(false))
            .map(|(name, _)| name)
            .collect();
        if down.is_empty() {
            check(
                Status::Healthy,
                "no failed attempt to reach a configured peer",
            )
        } else {
            check(
                Status::Degraded,
                format!("last attempt failed for: {}", down.join(", ")),
            )
        }
    }
}
