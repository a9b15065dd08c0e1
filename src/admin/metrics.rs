//! `/metrics` in the OpenMetrics/Prometheus text format, via prometheus-client.
//!
//! Counters live where the data path already keeps them (the atomics of [`Stats`] and
//! the session caches); a [`Collector`] reads them at scrape time so `/stats` and
//! `/metrics` can never disagree. Label values come from fixed sets (direction, status
//! class, failure kinds, end reasons) or from configured peers only: nothing a remote
//! party sends can create a new series.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::Admin;
use super::health::Status;
use super::stats::Direction;
use crate::proxy::Failure;

/// The classic Prometheus text format (see [`to_prometheus_text`]).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders every metric of `admin` as Prometheus text.
pub fn render(admin: Arc<Admin>) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AdminCollector(admin)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(to_prometheus_text(&out))
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has samples
/// `x_total`. In the classic text format (what `promtool check metrics` and older
/// scrapers read) the family must carry the sample name, or its HELP and TYPE do not
/// apply to it; `# UNIT` and `# EOF` do not exist there. Those are the only differences
/// for the metric types used here (no exemplars, no `_created`).
fn to_prometheus_text(open_metrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in open_metrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((tag, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{tag}{name}{suffix} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

struct AdminCollector(Arc<Admin>);

impl fmt::Debug for AdminCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminCollector")
    }
}

/// One metric family: a descriptor and its labelled samples.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: &[(Vec<(&str, &str)>, M)],
) -> fmt::Result {
    let Some((_, first)) = samples.first() else {
        return Ok(());
    };
    let mut family = encoder.encode_descriptor(name, help, unit, first.metric_type())?;
    // A lone unlabelled sample is written as `name value`, not `name{} value`.
    if let [(labels, metric)] = samples
        && labels.is_empty()
    {
        return metric.encode(family);
    }
    for (labels, metric) in samples {
        metric.encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

impl Collector for AdminCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let admin = &self.0;
        let stats = &admin.stats;
        let dirs = [
            ("outbound", Direction::Outbound),
            ("inbound", Direction::Inbound),
        ];

        let uptime = stats.uptime().as_secs_f64();
        family(
            &mut e,
            "seam_uptime",
            "Time since this seam started",
            Some(&Unit::Seconds),
            &[(vec![], ConstGauge::new(uptime))],
        )?;

        let mut requests = Vec::new();
        for (dir, d) in dirs {
            let s = stats.requests(d);
            for (class, n) in [
                ("1xx", s.c1xx),
                ("2xx", s.c2xx),
                ("3xx", s.c3xx),
                ("4xx", s.c4xx),
                ("5xx", s.c5xx),
            ] {
                requests.push((vec![("direction", dir), ("class", class)], counter(n)));
            }
        }
        family(
            &mut e,
            "seam_requests",
            "Requests answered, by direction and status class",
            None,
            &requests,
        )?;

        let mut hist = e.encode_descriptor(
            "seam_request_duration",
            "Time from request head to response head",
            Some(&Unit::Seconds),
            stats.duration_histogram(Direction::Outbound).metric_type(),
        )?;
        for (dir, d) in dirs {
            stats
                .duration_histogram(d)
                .encode(hist.encode_family(&[("direction", dir)])?)?;
        }

        let failures: Vec<_> = Failure::ALL
            .iter()
            .map(|f| (vec![("kind", f.code())], counter(stats.failures(*f))))
            .collect();
        family(
            &mut e,
            "seam_failures",
            "Requests seam answered itself, by failure kind",
            None,
            &failures,
        )?;
        family(
            &mut e,
            "seam_retries",
            "Requests sent again after the peer lost the session",
            None,
            &[(vec![], counter(stats.retries()))],
        )?;

        let client = admin.client_sessions.stats().snapshot();
        let server = admin.server_sessions.stats().snapshot();
        let roles = [("client", client), ("server", server)];
        family(
            &mut e,
            "seam_sessions_active",
            "Sessions held in the cache",
            None,
            &[
                (
                    vec![("role", "client")],
                    ConstGauge::new(admin.client_sessions.len() as i64),
                ),
                (
                    vec![("role", "server")],
                    ConstGauge::new(admin.server_sessions.len() as i64),
                ),
            ],
        )?;
        family(
            &mut e,
            "seam_sessions_created",
            "Sessions made",
            None,
            &roles
                .iter()
                .map(|(r, s)| (vec![("role", *r)], counter(s.created)))
                .collect::<Vec<_>>(),
        )?;
        let mut ended = Vec::new();
        for (r, s) in &roles {
            for (reason, n) in [
                ("expired", s.expired),
                ("evicted", s.evicted),
                ("revoked", s.revoked),
                ("replaced", s.replaced),
            ] {
                ended.push((vec![("role", *r), ("reason", reason)], counter(n)));
            }
        }
        family(
            &mut e,
            "seam_sessions_ended",
            "Sessions ended, by reason",
            None,
            &ended,
        )?;
        family(
            &mut e,
            "seam_handshakes",
            "Session handshakes completed",
            None,
            &roles
                .iter()
                .map(|(r, s)| (vec![("role", *r)], counter(s.handshakes_ok)))
                .collect::<Vec<_>>(),
        )?;
        let hs_failures: Vec<_> = stats
            .handshake_failures()
            .into_iter()
            .map(|(k, n)| (vec![("reason", k)], counter(n)))
            .collect();
        family(
            &mut e,
            "seam_handshake_failures",
            "Session handshakes that failed, by reason",
            None,
            &hs_failures,
        )?;
        let open_failures: Vec<_> = stats
            .open_failures()
            .into_iter()
            .map(|(k, n)| (vec![("kind", k)], counter(n)))
            .collect();
        family(
            &mut e,
            "seam_open_failures",
            "Sealed messages rejected, by kind",
            None,
            &open_failures,
        )?;

        let (c_rx, c_tx) = admin.client_sessions.bytes();
        let (s_rx, s_tx) = admin.server_sessions.bytes();
        family(
            &mut e,
            "seam_session_payload",
            "Payload carried in sealed frames",
            Some(&Unit::Bytes),
            &[
                (vec![("role", "client"), ("way", "received")], counter(c_rx)),
                (vec![("role", "client"), ("way", "sent")], counter(c_tx)),
                (vec![("role", "server"), ("way", "received")], counter(s_rx)),
                (vec![("role", "server"), ("way", "sent")], counter(s_tx)),
            ],
        )?;

        let peers = stats.peers();
        let mut peer_requests = Vec::new();
        let mut peer_errors = Vec::new();
        let mut peer_rtt = Vec::new();
        for (name, p) in &peers {
            peer_requests.push((vec![("peer", name.as_str())], counter(p.requests)));
            peer_errors.push((vec![("peer", name.as_str())], counter(p.errors)));
            if let Some(rtt) = p.rtt_ewma_seconds {
                peer_rtt.push((vec![("peer", name.as_str())], ConstGauge::new(rtt)));
            }
        }
        family(
            &mut e,
            "seam_peer_requests",
            "Requests sent to a configured peer",
            None,
            &peer_requests,
        )?;
        family(
            &mut e,
            "seam_peer_errors",
            "Failed attempts to reach a configured peer",
            None,
            &peer_errors,
        )?;
        family(
            &mut e,
            "seam_peer_rtt_ewma",
            "Round trip to a configured peer (request sent to response head), moving average",
            Some(&Unit::Seconds),
            &peer_rtt,
        )?;

        let health = admin.health();
        let mut status = Vec::new();
        for (label, s) in [
            ("healthy", Status::Healthy),
            ("degraded", Status::Degraded),
            ("unhealthy", Status::Unhealthy),
        ] {
            status.push((
                vec![("status", label)],
                ConstGauge::new(i64::from(health.status == s)),
            ));
        }
        family(
            &mut e,
            "seam_health",
            "1 for the current /health status",
            None,
            &status,
        )?;
        let not_after = admin
            .cert_not_after
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        family(
            &mut e,
            "seam_certificate_expiry_timestamp",
            "When this seam's certificate expires (Unix time)",
            Some(&Unit::Seconds),
            &[(vec![], ConstGauge::new(not_after))],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::to_prometheus_text;

    #[test]
    fn counters_carry_total_in_help_and_type() {
        let om = "# HELP a_seconds Time.\n# TYPE a_seconds gauge\n# UNIT a_seconds seconds\na_seconds 1.5\n\
                  # HELP b Things.\n# TYPE b counter\nb_total{x=\"1\"} 2\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_seconds Time.\n# TYPE a_seconds gauge\na_seconds 1.5\n\
             # HELP b_total Things.\n# TYPE b_total counter\nb_total{x=\"1\"} 2\n"
        );
    }
}
