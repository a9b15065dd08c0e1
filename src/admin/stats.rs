//! Counters the data path bumps and the admin port reports. All lock-free atomics:
//! the hot path never waits on an admin request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::StatusCode;
use serde::Serialize;

use crate::admission::Breach;
use crate::proxy::Failure;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the local app into the mesh.
    Outbound,
    /// From the mesh to the local app.
    Inbound,
}

#[derive(Debug, Default)]
struct DirectionCounters {
    /// By status class: 1xx..5xx.
    by_class: [AtomicU64; 5],
}

#[derive(Debug)]
pub struct Stats {
    started: Instant,
    outbound: DirectionCounters,
    inbound: DirectionCounters,
    failures: [AtomicU64; Failure::ALL.len()],
    retries: AtomicU64,
    breaches: [AtomicU64; Breach::ALL.len()],
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DirectionSnapshot {
    pub total: u64,
    #[serde(rename = "1xx")]
    pub c1xx: u64,
    #[serde(rename = "2xx")]
    pub c2xx: u64,
    #[serde(rename = "3xx")]
    pub c3xx: u64,
    #[serde(rename = "4xx")]
    pub c4xx: u64,
    #[serde(rename = "5xx")]
    pub c5xx: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            outbound: DirectionCounters::default(),
            inbound: DirectionCounters::default(),
            failures: Default::default(),
            retries: AtomicU64::new(0),
            breaches: Default::default(),
        }
    }
}

impl Stats {
    pub fn record_status(&self, direction: Direction, status: StatusCode) {
        let counters = match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        };
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        counters.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_failure(&self, failure: Failure) {
        self.failures[failure.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_breach(&self, breach: Breach) {
        self.breaches[breach.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Times a limit of `limits:` (or the caller rate limit) was hit.
    pub fn breaches(&self, breach: Breach) -> u64 {
        self.breaches[breach.index()].load(Ordering::Relaxed)
    }

    /// `{ "handshake-rate": 0, ... }` for every limit.
    pub fn breach_map(&self) -> serde_json::Map<String, serde_json::Value> {
        Breach::ALL
            .iter()
            .map(|b| (b.code().to_owned(), self.breaches(*b).into()))
            .collect()
    }

    pub fn failures(&self, failure: Failure) -> u64 {
        self.failures[failure.index()].load(Ordering::Relaxed)
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn requests(&self, direction: Direction) -> DirectionSnapshot {
        let c = match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        };
        let v: Vec<u64> = c
            .by_class
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        DirectionSnapshot {
            total: v.iter().sum(),
            c1xx: v[0],
            c2xx: v[1],
            c3xx: v[2],
            c4xx: v[3],
            c5xx: v[4],
        }
    }

    /// `{ "unknown-service": 2, ... }` for every failure kind.
    pub fn failure_map(&self) -> serde_json::Map<String, serde_json::Value> {
        Failure::ALL
            .iter()
            .map(|f| (f.code().to_owned(), self.failures(*f).into()))
            .collect()
    }
}
