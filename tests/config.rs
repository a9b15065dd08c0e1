//! The configuration module from the outside: the example files, one test per kind of
//! bad input (message and line), and `seam config check`.

use std::fs;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use seam::config::{Config, ConfigError, LimitsConfig, PinnedRoute, Quota, UpstreamProtocol};
use tempfile::TempDir;

/// A small valid config; the bad-input tests change one line of it, so the line numbers
/// in their assertions refer to this text.
const BASE: &str = "\
service: orders
trust_domain: mesh.local
listen: { outbound: 127.0.0.1:15001, inbound: 0.0.0.0:15443, admin: 127.0.0.1:15000 }
upstream: http://127.0.0.1:8080
tls:
  ca: certs/ca.crt
  cert: certs/orders/tls.crt
  key: certs/orders/tls.key
session:
  idle_ttl: 5m
  max_lifetime: 1h
  max_sessions: 100
rate_limit:
  default: { per_second: 100, burst: 20 }
  services: { reports: unlimited }
peers:
  billing: [127.0.0.1:25443]
timeouts: { connect: 1s, request: 30s }
runtime: { worker_threads: 2 }
";

/// A directory holding copies of the example configs and placeholder certificate files
/// at the paths they name (only existence is checked here, not content).
fn mesh_dir() -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for name in ["orders.yaml", "billing.yaml"] {
        fs::copy(examples.join(name), dir.path().join(name)).expect("copy example config");
    }
    for service in ["orders", "billing"] {
        let service_dir = dir.path().join("certs").join(service);
        fs::create_dir_all(&service_dir).expect("mkdir certs");
        fs::write(service_dir.join("tls.crt"), b"placeholder cert").expect("write cert");
        fs::write(service_dir.join("tls.key"), b"placeholder key").expect("write key");
    }
    fs::write(dir.path().join("certs/ca.crt"), b"placeholder ca").expect("write ca");
    dir
}

/// Writes `text` as `seam.yaml` next to the placeholder certificates and loads it.
fn load_text(text: &str) -> (TempDir, PathBuf, Result<Config, ConfigError>) {
    let dir = mesh_dir();
    let path = dir.path().join("seam.yaml");
    fs::write(&path, text).expect("write config");
    let result = Config::load(&path);
    (dir, path, result)
}

/// Loads BASE with `from` replaced by `to` and returns the error it must give.
fn error_for(from: &str, to: &str) -> (PathBuf, ConfigError) {
    assert!(BASE.contains(from), "test bug: BASE has no {from:?}");
    let (_dir, path, result) = load_text(&BASE.replacen(from, to, 1));
    match result {
        Ok(config) => panic!("expected an error for {to:?}, got {config:?}"),
        Err(err) => (path, err),
    }
}

/// The error is on `line`, its message starts with `FILE:LINE:COL:` and has every word.
fn assert_error(path: &Path, err: &ConfigError, line: u64, words: &[&str]) {
    let message = err.to_string();
    assert_eq!(err.line(), Some(line), "wrong line in: {message}");
    let column = err.column().expect("a column with the line");
    let prefix = format!("{}:{line}:{column}: ", path.display());
    assert!(
        message.starts_with(&prefix),
        "{message:?} should start with {prefix:?}"
    );
    for word in words {
        assert!(
            message.contains(word),
            "{message:?} should mention {word:?}"
        );
    }
    assert!(!message.contains('\n'), "one line expected: {message:?}");
}

fn limited(per_second: u32, burst: u32) -> Quota {
    Quota::Limited {
        per_second: NonZeroU32::new(per_second).expect("non-zero"),
        burst: NonZeroU32::new(burst).expect("non-zero"),
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("socket address")
}

#[test]
fn orders_example_loads_with_its_values() {
    let dir = mesh_dir();
    let config = Config::load(&dir.path().join("orders.yaml")).expect("orders.yaml is valid");

    assert_eq!(config.service, "orders");
    assert_eq!(config.trust_domain, "mesh.local");
    assert_eq!(config.listen.outbound, addr("127.0.0.1:15001"));
    assert_eq!(config.listen.inbound, addr("0.0.0.0:15443"));
    assert_eq!(config.listen.admin, addr("127.0.0.1:15000"));
    assert_eq!(config.upstream.url, "http://127.0.0.1:8080");
    assert_eq!(config.upstream.protocol, UpstreamProtocol::Http1);
    assert_eq!(config.tls.ca, dir.path().join("certs/ca.crt"));
    assert_eq!(config.tls.cert, dir.path().join("certs/orders/tls.crt"));
    assert_eq!(config.tls.key, dir.path().join("certs/orders/tls.key"));
    assert_eq!(config.session.idle_ttl, Duration::from_secs(300));
    assert_eq!(config.session.max_lifetime, Duration::from_secs(3600));
    assert_eq!(config.session.max_sessions, 10_000);
    assert_eq!(config.session.max_messages, 1_000_000);
    assert_eq!(config.rate_limit.default, limited(10_000, 2_000));
    assert_eq!(
        config.rate_limit.services.get("billing"),
        Some(&limited(500, 100))
    );
    assert_eq!(
        config.peers.get("billing"),
        Some(&vec![addr("127.0.0.1:25443")])
    );
    assert_eq!(config.peers.len(), 1);
    assert_eq!(config.timeouts.connect, Duration::from_secs(1));
    assert_eq!(config.timeouts.request, Duration::from_secs(30));
    assert_eq!(config.timeouts.drain, Duration::from_secs(10));
    assert_eq!(config.runtime.worker_threads, NonZeroUsize::new(2));
}

#[test]
fn billing_example_loads_with_its_values() {
    let dir = mesh_dir();
    let config = Config::load(&dir.path().join("billing.yaml")).expect("billing.yaml is valid");

    assert_eq!(config.service, "billing");
    assert_eq!(config.listen.outbound, addr("127.0.0.1:25001"));
    assert_eq!(config.listen.inbound, addr("0.0.0.0:25443"));
    assert_eq!(config.listen.admin, addr("127.0.0.1:25000"));
    assert_eq!(config.upstream.url, "http://127.0.0.1:9090");
    assert_eq!(config.tls.cert, dir.path().join("certs/billing/tls.crt"));
    assert_eq!(config.tls.key, dir.path().join("certs/billing/tls.key"));
    assert_eq!(
        config.rate_limit.services.get("orders"),
        Some(&limited(1000, 200))
    );
    assert_eq!(
        config.rate_limit.services.get("reports"),
        Some(&Quota::Unlimited)
    );
    assert_eq!(
        config.peers.get("orders"),
        Some(&vec![addr("127.0.0.1:15443")])
    );
    assert_eq!(config.runtime.worker_threads, None);
    assert!(config.listen.pinned.is_empty());
    assert!(
        !config.interop.plain_mtls,
        "plain mTLS callers are refused by default"
    );
}

#[test]
fn examples_point_at_each_other_without_clashing_ports() {
    let dir = mesh_dir();
    let orders = Config::load(&dir.path().join("orders.yaml")).expect("orders.yaml");
    let billing = Config::load(&dir.path().join("billing.yaml")).expect("billing.yaml");

    assert_eq!(
        orders.peers["billing"][0].port(),
        billing.listen.inbound.port()
    );
    assert_eq!(
        billing.peers["orders"][0].port(),
        orders.listen.inbound.port()
    );
    let ports = |c: &Config| {
        vec![
            c.listen.outbound.port(),
            c.listen.inbound.port(),
            c.listen.admin.port(),
            c.upstream.url.port_u16().expect("upstream port"),
        ]
    };
    let mut all = ports(&orders);
    all.extend(ports(&billing));
    let count = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), count, "ports clash: {all:?}");
}

#[test]
fn optional_sections_take_their_defaults() {
    let minimal = "service: orders\ntrust_domain: mesh.local\nupstream: http://127.0.0.1:8080\n\
                   tls: { ca: certs/ca.crt, cert: certs/orders/tls.crt, key: certs/orders/tls.key }\n";
    let (_dir, _path, result) = load_text(minimal);
    let config = result.expect("minimal config is valid");

    assert_eq!(config.listen.admin, addr("127.0.0.1:15000"));
    assert_eq!(config.listen.outbound, addr("127.0.0.1:15001"));
    assert_eq!(config.listen.inbound, addr("0.0.0.0:15443"));
    assert_eq!(config.upstream.protocol, UpstreamProtocol::Http1);
    assert_eq!(config.session.idle_ttl, Duration::from_secs(300));
    assert_eq!(config.session.max_lifetime, Duration::from_secs(3600));
    assert_eq!(config.session.max_sessions, 10_000);
    assert_eq!(config.session.max_messages, 1_000_000);
    assert_eq!(config.rate_limit.default, limited(10_000, 2_000));
    assert!(config.rate_limit.services.is_empty());
    assert!(config.peers.is_empty());
    assert_eq!(config.timeouts.connect, Duration::from_secs(1));
    assert_eq!(config.timeouts.request, Duration::from_secs(30));
    assert_eq!(config.timeouts.drain, Duration::from_secs(10));
    assert_eq!(config.runtime.worker_threads, None);
}

#[test]
fn h2c_upstream_protocol_is_accepted() {
    let text = BASE.replacen(
        "upstream: http://127.0.0.1:8080\n",
        "upstream: http://127.0.0.1:8080\nupstream_protocol: h2c\n",
        1,
    );
    let (_dir, _path, result) = load_text(&text);
    assert_eq!(
        result.expect("valid").upstream.protocol,
        UpstreamProtocol::H2c
    );
}

#[test]
fn from_yaml_str_resolves_tls_paths_against_base_dir() {
    let dir = mesh_dir();
    let config = Config::from_yaml_str(BASE, "inline", dir.path()).expect("valid");
    assert!(config.tls.ca.is_absolute());
    assert_eq!(config.tls.ca, dir.path().join("certs/ca.crt"));

    let err = Config::from_yaml_str(BASE, "inline", &dir.path().join("elsewhere"))
        .expect_err("certs are not under elsewhere/");
    assert!(
        err.to_string()
            .starts_with("inline:6:7: tls.ca: cannot read"),
        "{err}"
    );
}

#[test]
fn effective_config_serializes_as_written() {
    let (_dir, _path, result) = load_text(BASE);
    let json = serde_json::to_value(result.expect("valid")).expect("serialize");
    assert_eq!(json["session"]["idle_ttl"], "5m");
    assert_eq!(json["upstream"]["url"], "http://127.0.0.1:8080/");
    assert_eq!(json["upstream"]["protocol"], "http1");
    assert_eq!(json["rate_limit"]["services"]["reports"], "unlimited");
    assert_eq!(json["rate_limit"]["default"]["per_second"], 100);
    assert_eq!(json["peers"]["billing"][0], "127.0.0.1:25443");
}

#[test]
fn syntax_error() {
    let (path, err) = error_for("  max_lifetime: 1h", " max_lifetime: 1h");
    assert_error(&path, &err, 11, &["invalid YAML", "block mapping"]);
    let (path, err) = error_for("service: orders", "service: \"orders");
    assert_error(&path, &err, 2, &["invalid YAML", "quoted scalar"]);
}

#[test]
fn unknown_top_level_key_suggests_the_right_one() {
    let (path, err) = error_for("listen:", "listn:");
    assert_error(
        &path,
        &err,
        3,
        &[
            "unknown key 'listn'",
            "expected one of",
            "did you mean 'listen'",
        ],
    );
    assert_eq!(err.column(), Some(1));
}

#[test]
fn unknown_nested_key() {
    let (path, err) = error_for("  max_sessions: 100", "  max_session: 100");
    assert_error(
        &path,
        &err,
        12,
        &["unknown key 'max_session'", "max_sessions"],
    );
}

#[test]
fn wrong_type() {
    let (path, err) = error_for("max_sessions: 100", "max_sessions: lots");
    assert_error(&path, &err, 12, &["expected a whole number"]);
    assert_eq!(err.column(), Some(17));
}

#[test]
fn bad_duration_names_the_accepted_forms() {
    let (path, err) = error_for("idle_ttl: 5m", "idle_ttl: 5 minutes");
    assert_error(
        &path,
        &err,
        10,
        &[
            "session.idle_ttl",
            "'5 minutes' is not a duration",
            "30s",
            "5m",
        ],
    );
    let (path, err) = error_for("request: 30s", "request: 30");
    assert_error(&path, &err, 18, &["timeouts.request", "not a duration"]);
}

#[test]
fn zero_duration() {
    let (path, err) = error_for("connect: 1s", "connect: 0s");
    assert_error(
        &path,
        &err,
        18,
        &["timeouts.connect is 0", "longer than zero"],
    );
}

#[test]
fn missing_tls_file_says_how_to_create_it() {
    let (path, err) = error_for("certs/orders/tls.crt", "certs/orders/missing.crt");
    let expected_file = path.with_file_name("certs/orders/missing.crt");
    assert_error(
        &path,
        &err,
        7,
        &[
            "tls.cert: cannot read",
            &expected_file.display().to_string(),
            "No such file or directory",
            "seam certs init",
            "--trust-domain mesh.local --service orders",
        ],
    );
    assert_eq!(err.column(), Some(9));
}

#[test]
fn tls_cannot_be_turned_off() {
    let files =
        "tls:\n  ca: certs/ca.crt\n  cert: certs/orders/tls.crt\n  key: certs/orders/tls.key\n";
    for off in ["no", "false", "off", "\"\""] {
        let (path, err) = error_for(files, &format!("tls: {off}\n"));
        assert_error(
            &path,
            &err,
            5,
            &[
                "TLS cannot be turned off",
                "mutual TLS",
                "ca:",
                "cert:",
                "key:",
            ],
        );
        assert_eq!(err.column(), Some(6), "{err}");
    }
}

#[test]
fn idle_ttl_longer_than_max_lifetime() {
    let (path, err) = error_for("idle_ttl: 5m", "idle_ttl: 2h");
    assert_error(
        &path,
        &err,
        10,
        &[
            "session.idle_ttl is 2h but session.max_lifetime is 1h",
            "lower idle_ttl or raise max_lifetime",
        ],
    );
}

#[test]
fn zero_quota() {
    let (path, err) = error_for(
        "{ per_second: 100, burst: 20 }",
        "{ per_second: 0, burst: 20 }",
    );
    assert_error(
        &path,
        &err,
        14,
        &["rate_limit.default.per_second is 0", "at least 1"],
    );
    assert_eq!(err.column(), Some(26));

    let (path, err) = error_for(
        "{ reports: unlimited }",
        "{ reports: { per_second: 5, burst: 0 } }",
    );
    assert_error(&path, &err, 15, &["rate_limit.services.reports.burst is 0"]);
}

#[test]
fn quota_word_other_than_unlimited() {
    let (path, err) = error_for("{ reports: unlimited }", "{ reports: infinite }");
    assert_error(
        &path,
        &err,
        15,
        &["'infinite'", "`unlimited`", "per_second"],
    );
}

#[test]
fn bad_service_name() {
    let (path, err) = error_for("service: orders", "service: Orders_1");
    assert_error(&path, &err, 1, &["service 'Orders_1'", "a-z, 0-9 and '-'"]);
    assert_eq!(err.column(), Some(10));
}

#[test]
fn bad_trust_domain() {
    let (path, err) = error_for("trust_domain: mesh.local", "trust_domain: mesh..local");
    assert_error(
        &path,
        &err,
        2,
        &["trust_domain 'mesh..local' is not a DNS name"],
    );
}

#[test]
fn bad_address() {
    let (path, err) = error_for("inbound: 0.0.0.0:15443", "inbound: localhost:15443");
    assert_error(
        &path,
        &err,
        3,
        &["listen.inbound 'localhost:15443' is not an IP address with a port"],
    );
    let (path, err) = error_for("[127.0.0.1:25443]", "[127.0.0.1]");
    assert_error(&path, &err, 17, &["peers.billing endpoint '127.0.0.1'"]);
}

#[test]
fn clashing_listeners() {
    let (path, err) = error_for("admin: 127.0.0.1:15000", "admin: 127.0.0.1:15001");
    assert_error(
        &path,
        &err,
        3,
        &["listen.admin", "clashes with listen.outbound"],
    );
}

#[test]
fn bad_upstream() {
    let (path, err) = error_for("upstream: http://", "upstream: https://");
    assert_error(&path, &err, 4, &["uses https", "http://HOST:PORT"]);
    let (path, err) = error_for(
        "upstream: http://127.0.0.1:8080",
        "upstream: 127.0.0.1:8080",
    );
    assert_error(&path, &err, 4, &["http://HOST:PORT"]);
}

#[test]
fn unknown_upstream_protocol() {
    let (path, err) = error_for(
        "upstream: http://127.0.0.1:8080\n",
        "upstream: http://127.0.0.1:8080\nupstream_protocol: h3\n",
    );
    assert_error(&path, &err, 5, &["unknown value 'h3'", "http1, h2c"]);
}

#[test]
fn missing_required_key() {
    let (path, err) = error_for("service: orders\n", "");
    assert_error(
        &path,
        &err,
        1,
        &["missing required key service", "service: orders"],
    );

    let (path, err) = error_for("  key: certs/orders/tls.key\n", "");
    assert_error(&path, &err, 6, &["missing required key tls.key"]);
}

#[test]
fn duplicate_key() {
    let (path, err) = error_for("trust_domain: mesh.local", "service: billing");
    assert_error(&path, &err, 2, &["'service' appears twice"]);
}

#[test]
fn peer_must_not_be_the_service_itself() {
    let (path, err) = error_for("  billing: [", "  orders: [");
    assert_error(&path, &err, 17, &["'orders'", "own service"]);
    assert_eq!(err.column(), Some(3));
}

#[test]
fn peer_without_endpoints() {
    let (path, err) = error_for("[127.0.0.1:25443]", "[]");
    assert_error(&path, &err, 17, &["peers.billing has no endpoints"]);
}

#[test]
fn worker_threads_out_of_range() {
    for bad in ["0", "257"] {
        let (path, err) = error_for("worker_threads: 2", &format!("worker_threads: {bad}"));
        assert_error(&path, &err, 19, &["runtime.worker_threads", "1 to 256"]);
    }
}

#[test]
fn yaml_1_1_booleans_are_not_numbers_or_names() {
    // The schema has no boolean key, so `strict_booleans` shows up as `yes` staying a
    // plain word: it is rejected where a number is expected and kept as text elsewhere.
    let (path, err) = error_for("worker_threads: 2", "worker_threads: yes");
    assert_error(&path, &err, 19, &["expected a whole number"]);
    let (_dir, _path, result) = load_text(&BASE.replacen("service: orders", "service: yes", 1));
    assert_eq!(result.expect("`yes` is a valid name").service, "yes");
}

#[test]
fn unreadable_config_file_has_no_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.yaml");
    let err = Config::load(&path).expect_err("no such file");
    assert_eq!(err.line(), None);
    let message = err.to_string();
    assert!(
        message.starts_with(&path.display().to_string()),
        "{message}"
    );
    assert!(message.contains("No such file or directory"), "{message}");
}

#[test]
fn cli_check_accepts_a_good_file() {
    let dir = mesh_dir();
    let output = Command::new(env!("CARGO_BIN_EXE_seam"))
        .args(["config", "check"])
        .arg(dir.path().join("orders.yaml"))
        .output()
        .expect("run seam");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "ok\n");
    assert!(output.stderr.is_empty(), "{output:?}");
}

#[test]
fn cli_check_rejects_a_bad_file_with_its_position() {
    let dir = mesh_dir();
    let path = dir.path().join("bad.yaml");
    fs::write(&path, BASE.replacen("idle_ttl: 5m", "idle_ttl: 2h", 1)).expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_seam"))
        .args(["config", "check"])
        .arg(&path)
        .output()
        .expect("run seam");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!("{}:10:13: session.idle_ttl is 2h", path.display());
    assert!(stderr.starts_with(&expected), "{stderr:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
}

#[test]
fn admin_section_defaults_and_values() {
    let (_dir, _path, result) = load_text(BASE);
    let admin = result.expect("valid").admin;
    assert!(!admin.allow_remote && !admin.access_log);
    assert_eq!(admin.cert_warning, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(admin.upstream_probe_interval, Duration::from_secs(5));

    let text = format!(
        "{BASE}admin: {{ allow_remote: true, cert_warning: 30d, upstream_probe_interval: 250ms, access_log: true }}\n"
    )
    .replace("admin: 127.0.0.1:15000", "admin: 0.0.0.0:15000");
    let (_dir, _path, result) = load_text(&text);
    let config = result.expect("remote admin allowed explicitly");
    assert_eq!(config.listen.admin, addr("0.0.0.0:15000"));
    assert!(config.admin.allow_remote && config.admin.access_log);
    assert_eq!(
        config.admin.cert_warning,
        Duration::from_secs(30 * 24 * 3600)
    );
    assert_eq!(
        config.admin.upstream_probe_interval,
        Duration::from_millis(250)
    );
}

#[test]
fn remote_admin_needs_allow_remote() {
    let (path, err) = error_for("admin: 127.0.0.1:15000", "admin: 10.0.0.5:15000");
    assert_error(
        &path,
        &err,
        3,
        &[
            "listen.admin 10.0.0.5:15000",
            "loopback",
            "allow_remote: true",
        ],
    );
}

#[test]
fn admin_durations_are_checked() {
    let text = format!("{BASE}admin: {{ cert_warning: soon }}\n");
    let (_dir, path, result) = load_text(&text);
    let err = result.expect_err("bad duration");
    assert_error(&path, &err, 20, &["admin.cert_warning 'soon'", "30s"]);
}

#[test]
fn limits_take_their_defaults_and_the_example_values() {
    let (_dir, _path, result) = load_text(BASE);
    let limits = result.expect("BASE is valid").limits;
    assert_eq!(limits, LimitsConfig::default());
    assert_eq!(limits.handshakes_per_ip.get(), 50);
    assert_eq!(limits.max_connections, 10_000);
    assert_eq!(limits.max_streams, 256);
    assert_eq!(limits.max_header_bytes, 64 * 1024);
    assert_eq!(limits.header_read_timeout, Duration::from_secs(10));
    assert_eq!(limits.idle_timeout, Duration::from_secs(300));
    assert_eq!(limits.max_body_bytes, None);
    assert_eq!(limits.peer_failures, 10);

    let dir = mesh_dir();
    let config = Config::load(&dir.path().join("orders.yaml")).expect("orders.yaml is valid");
    assert_eq!(config.limits.max_body_bytes, Some(10 * 1024 * 1024));
    assert_eq!(config.limits.header_read_timeout, Duration::from_secs(10));
}

#[test]
fn limits_are_validated_with_their_position() {
    let cases = [
        ("handshakes_per_ip: 0", "limits.handshakes_per_ip is 0"),
        ("max_connections: 0", "limits.max_connections is 0"),
        ("max_streams: 0", "limits.max_streams is 0"),
        (
            "max_header_bytes: 100",
            "limits.max_header_bytes is 100; give 8192",
        ),
        ("header_read_timeout: 0s", "limits.header_read_timeout is 0"),
        (
            "idle_timeout: soon",
            "limits.idle_timeout 'soon' is not a duration",
        ),
        ("max_body_bytes: 0", "limits.max_body_bytes is 0"),
        ("peer_failures: 0", "limits.peer_failures is 0"),
    ];
    for (line, words) in cases {
        let text = format!("{BASE}limits:\n  {line}\n");
        let (_dir, path, result) = load_text(&text);
        let err = result.expect_err(line);
        assert_error(&path, &err, 21, &[words]);
        assert_eq!(
            err.column(),
            Some(line.find(' ').unwrap() as u64 + 4),
            "{err}"
        );
    }
    let (_dir, path, result) = load_text(&format!("{BASE}limits:\n  max_conections: 5\n"));
    let err = result.expect_err("typo");
    assert_error(
        &path,
        &err,
        21,
        &["unknown key 'max_conections'", "max_connections"],
    );
}

#[test]
fn pinned_ports_and_plain_mtls_are_read() {
    let text = BASE.replace(
        "listen: { outbound: 127.0.0.1:15001, inbound: 0.0.0.0:15443, admin: 127.0.0.1:15000 }",
        "listen: { outbound: 127.0.0.1:15001, inbound: 0.0.0.0:15443, admin: 127.0.0.1:15000, \
         pinned: { \"127.0.0.1:15101\": billing, \"127.0.0.1:15102\": billing } }",
    ) + "interop: { plain_mtls: true }\n";
    let (_dir, _path, result) = load_text(&text);
    let config = result.expect("valid");
    assert_eq!(
        config.listen.pinned,
        vec![
            PinnedRoute {
                listen: addr("127.0.0.1:15101"),
                service: "billing".into(),
            },
            PinnedRoute {
                listen: addr("127.0.0.1:15102"),
                service: "billing".into(),
            },
        ]
    );
    assert!(config.interop.plain_mtls);
}

#[test]
fn pinned_port_must_name_a_peer_and_a_free_port() {
    let listen = "admin: 127.0.0.1:15000 }";
    let (path, err) = error_for(
        listen,
        "admin: 127.0.0.1:15000, pinned: { \"127.0.0.1:15101\": reports } }",
    );
    assert_error(
        &path,
        &err,
        3,
        &[
            "listen.pinned 127.0.0.1:15101",
            "'reports'",
            "not under peers",
        ],
    );
    let (path, err) = error_for(
        listen,
        "admin: 127.0.0.1:15000, pinned: { \"127.0.0.1:15000\": billing } }",
    );
    assert_error(&path, &err, 3, &["clashes with listen.admin"]);
    let (path, err) = error_for(
        listen,
        "admin: 127.0.0.1:15000, pinned: { \"127.0.0.1:15101\": Billing } }",
    );
    assert_error(&path, &err, 3, &["'Billing' is not a valid service name"]);
}

#[test]
fn kubernetes_style_service_names_are_accepted() {
    let text = BASE
        .replace("service: orders", "service: orders.shop")
        .replace(
            "billing: [127.0.0.1:25443]",
            "billing.shop: [127.0.0.1:25443]",
        );
    let (_dir, _path, result) = load_text(&text);
    let config = result.expect("valid");
    assert_eq!(config.service, "orders.shop");
    assert!(config.peers.contains_key("billing.shop"));
    let (path, err) = error_for("service: orders", "service: orders.shop.eu");
    assert_error(&path, &err, 1, &["<service-account>.<namespace>"]);
}
