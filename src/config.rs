//! YAML configuration: schema, defaults and validation (DESIGN §6).
//!
//! Loading is two steps. serde-saphyr first reads the file into private `Raw*` structs
//! whose values are wrapped in [`Spanned`], so every value remembers where it was written.
//! [`validate`] then checks each value and builds the public [`Config`]. Checking after
//! parsing (instead of inside `Deserialize` impls) lets one error name the file, line and
//! column of the value that is wrong, say why, and say how to fix it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_saphyr::{Location, MessageFormatter, Spanned};

/// The most worker threads `runtime.worker_threads` accepts; more than this on one
/// sidecar is almost certainly a typo, and each thread costs a stack.
const MAX_WORKER_THREADS: u64 = 256;

// Evaluated at compile time, so the unwraps cannot fail at run time.
const DEFAULT_PER_SECOND: NonZeroU32 = NonZeroU32::new(10_000).unwrap();
const DEFAULT_BURST: NonZeroU32 = NonZeroU32::new(2_000).unwrap();

const TLS_EXAMPLE: &str =
    "tls: { ca: certs/ca.crt, cert: certs/orders/tls.crt, key: certs/orders/tls.key }";

/// The effective configuration of one seam, validated and with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// This seam's service name; also the last segment of its SPIFFE id.
    pub service: String,
    /// SPIFFE trust domain shared by the whole mesh, e.g. `mesh.local`.
    pub trust_domain: String,
    pub listen: ListenConfig,
    pub upstream: UpstreamConfig,
    pub tls: TlsConfig,
    pub session: SessionConfig,
    pub rate_limit: RateLimitConfig,
    /// Peer service name -> the inbound endpoints of that service's seams.
    pub peers: BTreeMap<String, Vec<SocketAddr>>,
    pub timeouts: TimeoutConfig,
    pub runtime: RuntimeConfig,
    pub admin: AdminConfig,
    pub limits: LimitsConfig,
    pub interop: InteropConfig,
}

/// Addresses this seam binds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenConfig {
    /// Plain HTTP from the local app to the mesh.
    pub outbound: SocketAddr,
    /// mTLS from other seams.
    pub inbound: SocketAddr,
    /// Health, stats, metrics and sessions.
    pub admin: SocketAddr,
    /// Extra outbound ports fixed to one peer service each: every request on such a port
    /// goes to that service whatever its Host says, for clients that cannot set Host.
    pub pinned: Vec<PinnedRoute>,
}

/// One `listen.pinned` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PinnedRoute {
    pub listen: SocketAddr,
    pub service: String,
}

/// Talking to callers that are not seams.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct InteropConfig {
    /// Serve plain HTTP requests (no seam session) on the inbound port from callers whose
    /// mesh certificate verifies, e.g. another mesh's mTLS proxy during a migration. The
    /// caller is still identified by its certificate and rate limited. Off by default: the
    /// session layer is then the only way in.
    pub plain_mtls: bool,
}

/// The local app that inbound requests are handed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamConfig {
    /// Always `http://host:port`: seam talks plain HTTP to the app next to it.
    #[serde(serialize_with = "serialize_display")]
    pub url: Uri,
    pub protocol: UpstreamProtocol,
}

/// How seam speaks HTTP to the local app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (no upgrade), as gRPC servers expect.
    H2c,
}

/// Certificate files in the Kubernetes TLS secret layout; absolute after loading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Limits of the per-peer session cache (DESIGN §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionConfig {
    #[serde(serialize_with = "serialize_duration")]
    pub idle_ttl: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub max_lifetime: Duration,
    pub max_sessions: u64,
    /// Messages sealed under one session before the client rekeys.
    pub max_messages: u64,
}

/// Inbound admission control, keyed by the authenticated caller (DESIGN §4).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct RateLimitConfig {
    /// Applies to every caller without an entry in `services`.
    pub default: Quota,
    pub services: BTreeMap<String, Quota>,
}

/// Requests one caller may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    Limited {
        per_second: NonZeroU32,
        burst: NonZeroU32,
    },
    Unlimited,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimeoutConfig {
    /// TCP + TLS connect to a peer seam or the upstream.
    #[serde(serialize_with = "serialize_duration")]
    pub connect: Duration,
    /// One whole request, from the first byte read to the last byte written.
    #[serde(serialize_with = "serialize_duration")]
    pub request: Duration,
    /// How long shutdown waits for requests in flight.
    #[serde(serialize_with = "serialize_duration")]
    pub drain: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct RuntimeConfig {
    /// `None` lets tokio use one worker per core.
    pub worker_threads: Option<NonZeroUsize>,
}

/// The admin port's behaviour (DESIGN §5): health thresholds, access log, exposure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminConfig {
    /// Binding `listen.admin` to a non-loopback address must be asked for explicitly:
    /// the admin port can revoke sessions and change log levels without authentication.
    pub allow_remote: bool,
    /// `/health` turns degraded this long before the certificate expires.
    #[serde(serialize_with = "serialize_duration")]
    pub cert_warning: Duration,
    /// How often the background check connects to the upstream app.
    #[serde(serialize_with = "serialize_duration")]
    pub upstream_probe_interval: Duration,
    /// One log line per proxied request (method, authority, path, status, duration, caller).
    pub access_log: bool,
}

/// Connection-level admission limits (DESIGN §4): what one peer or client may hold or
/// send before seam refuses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitsConfig {
    /// Inbound TLS handshakes one source IP may start per second (also the burst).
    pub handshakes_per_ip: NonZeroU32,
    /// Open connections per listener; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection; more are refused (REFUSED_STREAM).
    pub max_streams: u32,
    /// Bytes of request head (HTTP/1.1 buffer, HTTP/2 header list); more get 431.
    pub max_header_bytes: usize,
    /// Time an HTTP/1.1 client has to send a whole request head (slowloris guard).
    #[serde(serialize_with = "serialize_duration")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes moving this long is closed.
    #[serde(serialize_with = "serialize_duration")]
    pub idle_timeout: Duration,
    /// Largest request body the app may send through the mesh; `None` for no limit.
    pub max_body_bytes: Option<u64>,
    /// Failed messages (bad frames, unknown sessions, failed decryption) one inbound
    /// connection may cause before seam closes it.
    pub peer_failures: u32,
}

/// Why a configuration could not be loaded. Each variant renders as one line that
/// starts with `FILE:LINE:COLUMN:` when the position is known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file itself could not be read.
    #[error("{}: cannot read the config file: {}", path.display(), io_reason(source))]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The text is not YAML, or does not have the shape of the schema.
    #[error("{origin}{}: {message}", position(*line, *column))]
    Parse {
        origin: String,
        line: Option<u64>,
        column: Option<u64>,
        message: String,
    },
    /// A value has the right shape but is not acceptable.
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        origin: String,
        line: u64,
        column: u64,
        message: String,
    },
}

// ---------------------------------------------------------------------------------------
// The schema as written in YAML. Every value keeps its location for `validate`.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
// Required keys are `Option` too: serde would report a missing key at whatever key it read
// last, while `validate` can point at the mapping that lacks it.
struct RawConfig {
    service: Option<Spanned<String>>,
    trust_domain: Option<Spanned<String>>,
    listen: Option<RawListen>,
    upstream: Option<Spanned<String>>,
    upstream_protocol: Option<UpstreamProtocol>,
    tls: Option<Spanned<RawTls>>,
    session: Option<RawSession>,
    rate_limit: Option<RawRateLimit>,
    peers: Option<RawPeers>,
    timeouts: Option<RawTimeouts>,
    runtime: Option<RawRuntime>,
    admin: Option<RawAdmin>,
    limits: Option<RawLimits>,
    interop: Option<RawInterop>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    outbound: Option<Spanned<String>>,
    inbound: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
    pinned: Option<Entries<Spanned<String>, Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterop {
    plain_mtls: Option<bool>,
}

/// Peer name -> endpoints, each with its location.
type RawPeers = Entries<Spanned<String>, Spanned<Vec<Spanned<String>>>>;

/// `tls` is a mapping of files, but people try `tls: off`; keeping the scalar lets
/// validation explain that TLS is not optional instead of a bare type error.
enum RawTls {
    Files(Box<RawTlsFiles>),
    Scalar(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTlsFiles {
    ca: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    idle_ttl: Option<Spanned<String>>,
    max_lifetime: Option<Spanned<String>>,
    max_sessions: Option<Spanned<u64>>,
    max_messages: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    default: Option<Spanned<RawQuota>>,
    services: Option<Entries<Spanned<String>, Spanned<RawQuota>>>,
}

/// Either `{ per_second, burst }` or the word `unlimited`.
enum RawQuota {
    Limited(RawLimited),
    Word(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimited {
    per_second: Option<Spanned<u32>>,
    burst: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<Spanned<String>>,
    request: Option<Spanned<String>>,
    drain: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    worker_threads: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    allow_remote: Option<bool>,
    cert_warning: Option<Spanned<String>>,
    upstream_probe_interval: Option<Spanned<String>>,
    access_log: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    handshakes_per_ip: Option<Spanned<u32>>,
    max_connections: Option<Spanned<u64>>,
    max_streams: Option<Spanned<u32>>,
    max_header_bytes: Option<Spanned<u64>>,
    header_read_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_body_bytes: Option<Spanned<u64>>,
    peer_failures: Option<Spanned<u32>>,
}

/// A mapping kept as a list in document order, so validation reports the first bad
/// entry as written and keys can keep their own locations.
struct Entries<K, V>(Vec<(K, V)>);

/// What validation needs besides the raw values: where messages point and where
/// relative paths start.
struct Checker<'a> {
    origin: &'a str,
    base_dir: &'a Path,
}

impl ConfigError {
    /// The 1-based line of the offending value, when known.
    pub fn line(&self) -> Option<u64> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { line, .. } => *line,
            ConfigError::Invalid { line, .. } => Some(*line),
        }
    }

    /// The 1-based column of the offending value, when known.
    pub fn column(&self) -> Option<u64> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { column, .. } => *column,
            ConfigError::Invalid { column, .. } => Some(*column),
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            outbound: SocketAddr::from(([127, 0, 0, 1], 15001)),
            inbound: SocketAddr::from(([0, 0, 0, 0], 15443)),
            admin: SocketAddr::from(([127, 0, 0, 1], 15000)),
            pinned: Vec::new(),
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            idle_ttl: Duration::from_secs(5 * 60),
            max_lifetime: Duration::from_secs(60 * 60),
            max_sessions: 10_000,
            max_messages: 1_000_000,
        }
    }
}

impl Default for Quota {
    fn default() -> Self {
        Quota::Limited {
            per_second: DEFAULT_PER_SECOND,
            burst: DEFAULT_BURST,
        }
    }
}

/// hyper refuses an HTTP/1.1 read buffer smaller than this.
const MIN_HEADER_BYTES: u64 = 8 * 1024;
/// HTTP/2 header list sizes are u32 on the wire.
const MAX_HEADER_BYTES: u64 = u32::MAX as u64;

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            handshakes_per_ip: NonZeroU32::new(50).unwrap_or(NonZeroU32::MIN),
            max_connections: 10_000,
            max_streams: 256,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5 * 60),
            max_body_bytes: None,
            peer_failures: 10,
        }
    }
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(30),
            drain: Duration::from_secs(10),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            allow_remote: false,
            cert_warning: Duration::from_secs(7 * 24 * 60 * 60),
            upstream_probe_interval: Duration::from_secs(5),
            access_log: false,
        }
    }
}

/// Written the way the YAML spells it, so `/config` output reads like the input.
impl Serialize for Quota {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Quota::Unlimited => serializer.serialize_str("unlimited"),
            Quota::Limited { per_second, burst } => {
                let mut s = serializer.serialize_struct("Quota", 2)?;
                s.serialize_field("per_second", per_second)?;
                s.serialize_field("burst", burst)?;
                s.end()
            }
        }
    }
}

impl Config {
    /// Reads, parses and validates FILE. Relative paths in `tls` resolve against the
    /// directory of FILE, so a config and its certificates can move together.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base_dir = path.parent().unwrap_or(Path::new(""));
        Config::from_yaml_str(&text, &path.display().to_string(), base_dir)
    }

    /// Same as [`Config::load`], from text; `origin` is the name used in messages and
    /// `base_dir` resolves relative paths.
    pub fn from_yaml_str(text: &str, origin: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let options = serde_saphyr::options! {
            strict_booleans: true,
            // Snippets are multi-line; the messages here must stay on one line.
            with_snippet: false,
        };
        let raw: Spanned<RawConfig> = serde_saphyr::from_str_with_options(text, options)
            .map_err(|err| parse_error(origin, &err))?;
        validate(&raw, &Checker { origin, base_dir })
    }
}

impl<'de> Deserialize<'de> for RawTls {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TlsVisitor;
        impl<'de> Visitor<'de> for TlsVisitor {
            type Value = RawTls;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping { ca: FILE, cert: FILE, key: FILE }")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawTls, A::Error> {
                let files = RawTlsFiles::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawTls::Files(Box::new(files)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTls, E> {
                Ok(RawTls::Scalar(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawTls, E> {
                Ok(RawTls::Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawTls, E> {
                Ok(RawTls::Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawTls, E> {
                Ok(RawTls::Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawTls, E> {
                Ok(RawTls::Scalar(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<RawTls, E> {
                Ok(RawTls::Scalar(String::new()))
            }
            fn visit_none<E: de::Error>(self) -> Result<RawTls, E> {
                Ok(RawTls::Scalar(String::new()))
            }
        }
        deserializer.deserialize_any(TlsVisitor)
    }
}

impl<'de> Deserialize<'de> for RawQuota {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct QuotaVisitor;
        impl<'de> Visitor<'de> for QuotaVisitor {
            type Value = RawQuota;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`unlimited` or a mapping { per_second: N, burst: N }")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawQuota, A::Error> {
                let limited = RawLimited::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawQuota::Limited(limited))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawQuota, E> {
                Ok(RawQuota::Word(v.to_owned()))
            }
        }
        deserializer.deserialize_any(QuotaVisitor)
    }
}

impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for Entries<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<K, V>(PhantomData<(K, V)>);
        impl<'de, K: Deserialize<'de>, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<K, V> {
            type Value = Entries<K, V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
            // `peers:` with nothing after it is YAML null; treat it as "no entries".
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Entries(Vec::new()))
            }
        }
        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}

// ---------------------------------------------------------------------------------------
// Validation: raw -> Config, first problem wins.

impl Checker<'_> {
    fn error(&self, at: Location, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            line: at.line(),
            column: at.column(),
            message: message.into(),
        }
    }

    /// A key the schema requires; `mapping` is where the mapping that lacks it starts.
    fn required<'v, T>(
        &self,
        value: Option<&'v Spanned<T>>,
        mapping: Location,
        key: &str,
        example: &str,
    ) -> Result<&'v Spanned<T>, ConfigError> {
        value.ok_or_else(|| {
            self.error(
                mapping,
                format!("missing required key {key}; add it, e.g. `{example}`"),
            )
        })
    }

    fn service_name(&self, key: &str, name: &Spanned<String>) -> Result<String, ConfigError> {
        if crate::identity::is_service_name(&name.value) {
            return Ok(name.value.clone());
        }
        Err(self.error(
            name.referenced,
            format!(
                "{key} '{}' is not a valid service name; use 1 to 63 characters from a-z, 0-9 \
                 and '-', starting and ending with a letter or digit (it becomes a DNS label \
                 and part of the SPIFFE id), or <service-account>.<namespace> for a \
                 Kubernetes-style id spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
                name.value
            ),
        ))
    }

    fn address(&self, key: &str, text: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        text.value.parse().map_err(|_| {
            self.error(
                text.referenced,
                format!(
                    "{key} '{}' is not an IP address with a port; write it like \
                     127.0.0.1:15001 or [::1]:15001 (host names are not resolved)",
                    text.value
                ),
            )
        })
    }

    fn duration(
        &self,
        key: &str,
        text: Option<&Spanned<String>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(text) = text else {
            return Ok(default);
        };
        let duration = parse_duration(&text.value).ok_or_else(|| {
            self.error(
                text.referenced,
                format!(
                    "{key} '{}' is not a duration; write a whole number followed by a unit, \
                     with no space, like 250ms, 30s, 5m or 1h",
                    text.value
                ),
            )
        })?;
        if duration.is_zero() {
            return Err(self.error(
                text.referenced,
                format!("{key} is 0; it must be longer than zero, e.g. 30s"),
            ));
        }
        Ok(duration)
    }

    fn tls_file(
        &self,
        key: &str,
        file: &Spanned<String>,
        hint: &str,
    ) -> Result<PathBuf, ConfigError> {
        if file.value.is_empty() {
            return Err(self.error(file.referenced, format!("{key} is empty; give a file path")));
        }
        let joined = self.base_dir.join(&file.value);
        // `absolute` only fails for an empty path or an unreadable working directory;
        // the relative path is then still the best thing to show and to open.
        let path = std::path::absolute(&joined).unwrap_or(joined);
        let opened = File::open(&path).and_then(|f| f.metadata());
        match opened {
            Ok(meta) if meta.is_file() => Ok(path),
            Ok(_) => Err(self.error(
                file.referenced,
                format!("{key}: {} is not a regular file; {hint}", path.display()),
            )),
            Err(err) => Err(self.error(
                file.referenced,
                format!(
                    "{key}: cannot read {}: {}; {hint}",
                    path.display(),
                    io_reason(&err)
                ),
            )),
        }
    }

    fn quota(&self, key: &str, quota: &Spanned<RawQuota>) -> Result<Quota, ConfigError> {
        match &quota.value {
            RawQuota::Word(word) if word == "unlimited" => Ok(Quota::Unlimited),
            RawQuota::Word(word) => Err(self.error(
                quota.referenced,
                format!(
                    "{key} is '{word}'; write `unlimited` or {{ per_second: N, burst: N }} \
                     with N at least 1"
                ),
            )),
            RawQuota::Limited(limited) => {
                let per_second = format!("{key}.per_second");
                let burst = format!("{key}.burst");
                let at = quota.referenced;
                Ok(Quota::Limited {
                    per_second: self.positive(
                        &per_second,
                        self.required(
                            limited.per_second.as_ref(),
                            at,
                            &per_second,
                            "per_second: 100",
                        )?,
                    )?,
                    burst: self.positive(
                        &burst,
                        self.required(limited.burst.as_ref(), at, &burst, "burst: 20")?,
                    )?,
                })
            }
        }
    }

    fn positive(&self, key: &str, n: &Spanned<u32>) -> Result<NonZeroU32, ConfigError> {
        NonZeroU32::new(n.value).ok_or_else(|| {
            self.error(
                n.referenced,
                format!(
                    "{key} is 0, which would reject every request; give at least 1, or write \
                     `unlimited` instead of the mapping to turn limiting off"
                ),
            )
        })
    }

    fn at_least_one(
        &self,
        key: &str,
        n: Option<&Spanned<u64>>,
        default: u64,
    ) -> Result<u64, ConfigError> {
        match n {
            None => Ok(default),
            Some(n) if n.value >= 1 => Ok(n.value),
            Some(n) => Err(self.error(n.referenced, format!("{key} is 0; it must be at least 1"))),
        }
    }
}

fn validate(raw: &Spanned<RawConfig>, check: &Checker) -> Result<Config, ConfigError> {
    let top = raw.referenced;
    let raw = &raw.value;
    let service = check.required(raw.service.as_ref(), top, "service", "service: orders")?;
    let service = check.service_name("service", service)?;
    let trust_domain = check.required(
        raw.trust_domain.as_ref(),
        top,
        "trust_domain",
        "trust_domain: mesh.local",
    )?;
    let trust_domain = validate_trust_domain(trust_domain, check)?;
    let listen = validate_listen(raw.listen.as_ref(), check)?;
    let upstream = check.required(
        raw.upstream.as_ref(),
        top,
        "upstream",
        "upstream: http://127.0.0.1:8080",
    )?;
    let upstream = UpstreamConfig {
        url: validate_upstream(upstream, check)?,
        protocol: raw.upstream_protocol.unwrap_or_default(),
    };
    let tls = check.required(raw.tls.as_ref(), top, "tls", TLS_EXAMPLE)?;
    let tls = validate_tls(tls, &service, &trust_domain, check)?;
    let session = validate_session(raw.session.as_ref(), check)?;
    let rate_limit = validate_rate_limit(raw.rate_limit.as_ref(), check)?;
    let peers = validate_peers(raw.peers.as_ref(), &service, check)?;
    let timeouts = validate_timeouts(raw.timeouts.as_ref(), check)?;
    let runtime = validate_runtime(raw.runtime.as_ref(), check)?;
    let admin = validate_admin(raw, &listen, check)?;
    let limits = validate_limits(raw.limits.as_ref(), check)?;
    let listen = validate_pinned(raw.listen.as_ref(), listen, &peers, check)?;
    let interop = InteropConfig {
        plain_mtls: raw
            .interop
            .as_ref()
            .and_then(|i| i.plain_mtls)
            .unwrap_or(false),
    };
    Ok(Config {
        service,
        trust_domain,
        listen,
        upstream,
        tls,
        session,
        rate_limit,
        peers,
        timeouts,
        runtime,
        admin,
        limits,
        interop,
    })
}

/// `listen.pinned`: address -> a service under `peers`, on a port of its own.
fn validate_pinned(
    raw: Option<&RawListen>,
    mut listen: ListenConfig,
    peers: &BTreeMap<String, Vec<SocketAddr>>,
    check: &Checker,
) -> Result<ListenConfig, ConfigError> {
    let entries = raw
        .and_then(|r| r.pinned.as_ref())
        .map_or(&[][..], |e| &e.0);
    for (addr, service) in entries {
        let at = check.address("listen.pinned", addr)?;
        let name = check.service_name("listen.pinned service", service)?;
        if !peers.contains_key(&name) {
            return Err(check.error(
                service.referenced,
                format!(
                    "listen.pinned {at} sends to '{name}', which is not under peers; add \
                     peers.{name} or pin the port to a listed peer"
                ),
            ));
        }
        let taken = [
            ("listen.outbound", listen.outbound),
            ("listen.inbound", listen.inbound),
            ("listen.admin", listen.admin),
        ]
        .into_iter()
        .chain(listen.pinned.iter().map(|p| ("listen.pinned", p.listen)))
        .find(|(_, other)| clashes(at, *other));
        if let Some((other, _)) = taken {
            return Err(check.error(
                addr.referenced,
                format!("listen.pinned {at} clashes with {other}; give each listener its own port"),
            ));
        }
        listen.pinned.push(PinnedRoute {
            listen: at,
            service: name,
        });
    }
    Ok(listen)
}

fn validate_admin(
    raw: &RawConfig,
    listen: &ListenConfig,
    check: &Checker,
) -> Result<AdminConfig, ConfigError> {
    let defaults = AdminConfig::default();
    let admin = match &raw.admin {
        None => defaults,
        Some(a) => AdminConfig {
            allow_remote: a.allow_remote.unwrap_or(defaults.allow_remote),
            cert_warning: check.duration(
                "admin.cert_warning",
                a.cert_warning.as_ref(),
                defaults.cert_warning,
            )?,
            upstream_probe_interval: check.duration(
                "admin.upstream_probe_interval",
                a.upstream_probe_interval.as_ref(),
                defaults.upstream_probe_interval,
            )?,
            access_log: a.access_log.unwrap_or(defaults.access_log),
        },
    };
    if !listen.admin.ip().is_loopback() && !admin.allow_remote {
        // The default is loopback, so a non-loopback address was written by hand.
        let at = raw
            .listen
            .as_ref()
            .and_then(|l| l.admin.as_ref())
            .map_or(Location::UNKNOWN, |a| a.referenced);
        return Err(check.error(
            at,
            format!(
                "listen.admin {} is not a loopback address; the admin port has no \
                 authentication (it can revoke sessions), so either bind it to 127.0.0.1 or \
                 set `admin: {{ allow_remote: true }}` and restrict access with a firewall",
                listen.admin
            ),
        ));
    }
    Ok(admin)
}

fn validate_trust_domain(name: &Spanned<String>, check: &Checker) -> Result<String, ConfigError> {
    let value = &name.value;
    if value.len() <= 253 && value.split('.').all(is_dns_label) {
        return Ok(value.clone());
    }
    Err(check.error(
        name.referenced,
        format!(
            "trust_domain '{value}' is not a DNS name; use dot-separated labels of a-z, 0-9 \
             and '-', like mesh.local"
        ),
    ))
}

fn validate_listen(raw: Option<&RawListen>, check: &Checker) -> Result<ListenConfig, ConfigError> {
    let mut listen = ListenConfig::default();
    let Some(raw) = raw else {
        return Ok(listen);
    };
    let fields = [
        ("listen.outbound", &raw.outbound, &mut listen.outbound),
        ("listen.inbound", &raw.inbound, &mut listen.inbound),
        ("listen.admin", &raw.admin, &mut listen.admin),
    ];
    let mut seen: Vec<(&str, SocketAddr)> = Vec::new();
    for (key, text, slot) in fields {
        if let Some(text) = text {
            *slot = check.address(key, text)?;
        }
        if let Some((other, _)) = seen.iter().find(|(_, addr)| clashes(*addr, *slot)) {
            // Only a written value can be wrong here: the defaults never clash.
            let at = text.as_ref().map_or(Location::UNKNOWN, |t| t.referenced);
            return Err(check.error(
                at,
                format!("{key} {slot} clashes with {other}; give each listener its own port"),
            ));
        }
        seen.push((key, *slot));
    }
    Ok(listen)
}

/// Two listeners clash when they would fight over one port. Port 0 asks the OS for a
/// fresh port, which never clashes.
fn clashes(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn validate_upstream(text: &Spanned<String>, check: &Checker) -> Result<Uri, ConfigError> {
    let fail = |why: &str| {
        check.error(
            text.referenced,
            format!(
                "upstream '{}' {why}; write the local app's address as http://HOST:PORT, \
                 like http://127.0.0.1:8080",
                text.value
            ),
        )
    };
    let uri: Uri = text.value.parse().map_err(|_| fail("is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(fail(
                "uses https, but seam talks plain HTTP to the app next to it (traffic between \
                 seams is what gets encrypted)",
            ));
        }
        _ => return Err(fail("is not an http:// URL")),
    }
    let Some(authority) = uri.authority() else {
        return Err(fail("has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(fail("contains user info"));
    }
    if authority.host().is_empty() {
        return Err(fail("has no host"));
    }
    if authority.port_u16().is_none() {
        return Err(fail("has no port"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(fail(
            "has a path or query, but requests keep their own path",
        ));
    }
    Ok(uri)
}

fn validate_tls(
    raw: &Spanned<RawTls>,
    service: &str,
    trust_domain: &str,
    check: &Checker,
) -> Result<TlsConfig, ConfigError> {
    let files = match &raw.value {
        RawTls::Files(files) => files,
        RawTls::Scalar(value) => {
            let shown = if value.is_empty() {
                "empty"
            } else {
                value.as_str()
            };
            return Err(check.error(
                raw.referenced,
                format!(
                    "tls is {shown}, but TLS cannot be turned off: seam always uses mutual TLS \
                     between seams; give `{TLS_EXAMPLE}`"
                ),
            ));
        }
    };
    // The files normally come from `seam certs init`, which writes DIR/ca.crt and
    // DIR/<service>/tls.{crt,key}; point at the directory the config already implies.
    let at = raw.referenced;
    let ca = check.required(files.ca.as_ref(), at, "tls.ca", "ca: certs/ca.crt")?;
    let cert = check.required(
        files.cert.as_ref(),
        at,
        "tls.cert",
        "cert: certs/orders/tls.crt",
    )?;
    let key = check.required(
        files.key.as_ref(),
        at,
        "tls.key",
        "key: certs/orders/tls.key",
    )?;
    let dir = Path::new(&ca.value)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| check.base_dir.join(d))
        .map(|d| std::path::absolute(&d).unwrap_or(d));
    let dir = dir.as_deref().map_or("DIR".into(), Path::to_string_lossy);
    let hint = format!(
        "create it with `seam certs init --dir {dir} --trust-domain {trust_domain} --service {service}`"
    );
    Ok(TlsConfig {
        ca: check.tls_file("tls.ca", ca, &hint)?,
        cert: check.tls_file("tls.cert", cert, &hint)?,
        key: check.tls_file("tls.key", key, &hint)?,
    })
}

fn validate_session(
    raw: Option<&RawSession>,
    check: &Checker,
) -> Result<SessionConfig, ConfigError> {
    let defaults = SessionConfig::default();
    let Some(raw) = raw else {
        return Ok(defaults);
    };
    let idle_ttl = check.duration("session.idle_ttl", raw.idle_ttl.as_ref(), defaults.idle_ttl)?;
    let max_lifetime = check.duration(
        "session.max_lifetime",
        raw.max_lifetime.as_ref(),
        defaults.max_lifetime,
    )?;
    if idle_ttl > max_lifetime {
        let at = raw.idle_ttl.as_ref().or(raw.max_lifetime.as_ref());
        return Err(check.error(
            at.map_or(Location::UNKNOWN, |s| s.referenced),
            format!(
                "session.idle_ttl is {} but session.max_lifetime is {}; idle_ttl must not \
                 exceed max_lifetime: lower idle_ttl or raise max_lifetime",
                humantime::format_duration(idle_ttl),
                humantime::format_duration(max_lifetime),
            ),
        ));
    }
    Ok(SessionConfig {
        idle_ttl,
        max_lifetime,
        max_sessions: check.at_least_one(
            "session.max_sessions",
            raw.max_sessions.as_ref(),
            defaults.max_sessions,
        )?,
        max_messages: check.at_least_one(
            "session.max_messages",
            raw.max_messages.as_ref(),
            defaults.max_messages,
        )?,
    })
}

fn validate_rate_limit(
    raw: Option<&RawRateLimit>,
    check: &Checker,
) -> Result<RateLimitConfig, ConfigError> {
    let mut rate_limit = RateLimitConfig::default();
    let Some(raw) = raw else {
        return Ok(rate_limit);
    };
    if let Some(default) = &raw.default {
        rate_limit.default = check.quota("rate_limit.default", default)?;
    }
    for (name, quota) in raw.services.iter().flat_map(|s| &s.0) {
        let name = check.service_name("rate_limit.services key", name)?;
        let quota = check.quota(&format!("rate_limit.services.{name}"), quota)?;
        rate_limit.services.insert(name, quota);
    }
    Ok(rate_limit)
}

fn validate_peers(
    raw: Option<&RawPeers>,
    service: &str,
    check: &Checker,
) -> Result<BTreeMap<String, Vec<SocketAddr>>, ConfigError> {
    let mut peers = BTreeMap::new();
    for (name, endpoints) in raw.iter().flat_map(|p| &p.0) {
        let peer = check.service_name("peer", name)?;
        if peer == service {
            return Err(check.error(
                name.referenced,
                format!(
                    "peers lists '{peer}', which is this seam's own service; a seam reaches its \
                     own app through upstream, so remove '{peer}' from peers"
                ),
            ));
        }
        if endpoints.value.is_empty() {
            return Err(check.error(
                endpoints.referenced,
                format!(
                    "peers.{peer} has no endpoints; list the inbound address of at least one \
                     of its seams, like [127.0.0.1:25443]"
                ),
            ));
        }
        let key = format!("peers.{peer} endpoint");
        let addrs = endpoints
            .value
            .iter()
            .map(|e| check.address(&key, e))
            .collect::<Result<Vec<_>, _>>()?;
        peers.insert(peer, addrs);
    }
    Ok(peers)
}

fn validate_timeouts(
    raw: Option<&RawTimeouts>,
    check: &Checker,
) -> Result<TimeoutConfig, ConfigError> {
    let defaults = TimeoutConfig::default();
    let Some(raw) = raw else {
        return Ok(defaults);
    };
    Ok(TimeoutConfig {
        connect: check.duration("timeouts.connect", raw.connect.as_ref(), defaults.connect)?,
        request: check.duration("timeouts.request", raw.request.as_ref(), defaults.request)?,
        drain: check.duration("timeouts.drain", raw.drain.as_ref(), defaults.drain)?,
    })
}

fn validate_runtime(
    raw: Option<&RawRuntime>,
    check: &Checker,
) -> Result<RuntimeConfig, ConfigError> {
    let Some(threads) = raw.and_then(|r| r.worker_threads.as_ref()) else {
        return Ok(RuntimeConfig::default());
    };
    let worker_threads = usize::try_from(threads.value)
        .ok()
        .filter(|_| threads.value <= MAX_WORKER_THREADS)
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| {
            check.error(
                threads.referenced,
                format!(
                    "runtime.worker_threads is {}; give 1 to {MAX_WORKER_THREADS}, or leave it \
                     out to use one thread per core",
                    threads.value
                ),
            )
        })?;
    Ok(RuntimeConfig {
        worker_threads: Some(worker_threads),
    })
}

fn validate_limits(raw: Option<&RawLimits>, check: &Checker) -> Result<LimitsConfig, ConfigError> {
    let defaults = LimitsConfig::default();
    let Some(raw) = raw else {
        return Ok(defaults);
    };
    let handshakes_per_ip = match &raw.handshakes_per_ip {
        None => defaults.handshakes_per_ip,
        Some(n) => NonZeroU32::new(n.value).ok_or_else(|| {
            check.error(
                n.referenced,
                "limits.handshakes_per_ip is 0, which would refuse every peer; give at least 1 \
                 (handshakes per second from one IP address)",
            )
        })?,
    };
    let max_connections = check.at_least_one(
        "limits.max_connections",
        raw.max_connections.as_ref(),
        defaults.max_connections as u64,
    )?;
    let max_connections = usize::try_from(max_connections).map_err(|_| {
        let at = raw
            .max_connections
            .as_ref()
            .map_or(Location::UNKNOWN, |n| n.referenced);
        check.error(
            at,
            "limits.max_connections is too large for this machine; lower it",
        )
    })?;
    let max_streams = match &raw.max_streams {
        None => defaults.max_streams,
        Some(n) if n.value >= 1 => n.value,
        Some(n) => {
            return Err(check.error(
                n.referenced,
                "limits.max_streams is 0, which would refuse every HTTP/2 request; give at \
                 least 1",
            ));
        }
    };
    let max_header_bytes = match &raw.max_header_bytes {
        None => defaults.max_header_bytes,
        Some(n) if (MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&n.value) => {
            usize::try_from(n.value).unwrap_or(usize::MAX)
        }
        Some(n) => {
            return Err(check.error(
                n.referenced,
                format!(
                    "limits.max_header_bytes is {}; give {MIN_HEADER_BYTES} to \
                     {MAX_HEADER_BYTES} (HTTP/1.1 needs at least {MIN_HEADER_BYTES} bytes of \
                     buffer)",
                    n.value
                ),
            ));
        }
    };
    let max_body_bytes = match &raw.max_body_bytes {
        None => defaults.max_body_bytes,
        Some(n) if n.value >= 1 => Some(n.value),
        Some(n) => {
            return Err(check.error(
                n.referenced,
                "limits.max_body_bytes is 0, which would refuse every request with a body; \
                 give at least 1, or leave it out for no limit",
            ));
        }
    };
    let peer_failures = match &raw.peer_failures {
        None => defaults.peer_failures,
        Some(n) if n.value >= 1 => n.value,
        Some(n) => {
            return Err(check.error(
                n.referenced,
                "limits.peer_failures is 0, which would close every connection; give at least 1",
            ));
        }
    };
    Ok(LimitsConfig {
        handshakes_per_ip,
        max_connections,
        max_streams,
        max_header_bytes,
        header_read_timeout: check.duration(
            "limits.header_read_timeout",
            raw.header_read_timeout.as_ref(),
            defaults.header_read_timeout,
        )?,
        idle_timeout: check.duration(
            "limits.idle_timeout",
            raw.idle_timeout.as_ref(),
            defaults.idle_timeout,
        )?,
        max_body_bytes,
        peer_failures,
    })
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// `[a-z0-9]([a-z0-9-]*[a-z0-9])?`, at most 63 characters (RFC 1123 label, lower case
/// only because SPIFFE ids compare case-sensitively).
fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= 63
                && alnum(first)
                && alnum(last)
                && bytes.iter().all(|b| alnum(b) || *b == b'-')
        }
        _ => false,
    }
}

/// humantime syntax without spaces: `5 minutes` reads well but `5m` is the documented
/// form, and refusing spaces keeps one spelling per value across configs.
fn parse_duration(text: &str) -> Option<Duration> {
    if text.is_empty() || text.chars().any(char::is_whitespace) {
        return None;
    }
    humantime::parse_duration(text).ok()
}

/// An io::Error as a reason phrase: "No such file or directory", without "(os error 2)".
fn io_reason(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

fn position(line: Option<u64>, column: Option<u64>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(":{line}:{column}"),
        (Some(line), None) => format!(":{line}"),
        _ => String::new(),
    }
}

fn serialize_duration<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*d))
}

fn serialize_display<T: fmt::Display, S: Serializer>(
    v: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(v)
}

/// Turns a serde-saphyr error into one line with the position and a fix.
fn parse_error(origin: &str, err: &serde_saphyr::Error) -> ConfigError {
    use serde_saphyr::Error as E;

    let location = err.location().filter(|l| *l != Location::UNKNOWN);
    // Aliases and snippets wrap the error that says what went wrong.
    let mut inner = err;
    while let E::WithSnippet { error, .. } | E::AliasError { error, .. } = inner {
        inner = error;
    }
    let message = match inner {
        E::SerdeUnknownField {
            field, expected, ..
        } => {
            let suggestion = closest(field, expected)
                .map(|s| format!("did you mean '{s}'? "))
                .unwrap_or_default();
            format!(
                "unknown key '{field}'; expected one of: {}; {suggestion}remove it or fix its spelling",
                expected.join(", ")
            )
        }
        E::SerdeMissingField { field, .. } => format!("missing required key {field}; add it"),
        E::Eof { .. } => "unexpected end of file; a config needs at least service, \
                          trust_domain, upstream and tls"
            .to_owned(),
        E::ExternalMessage { .. } | E::IndentationError { .. } => format!(
            "invalid YAML: {}",
            one_line(&serde_saphyr::UserMessageFormatter.format_message(inner))
        ),
        E::SerdeUnknownVariant {
            variant, expected, ..
        } => {
            format!(
                "unknown value '{variant}'; expected one of: {}",
                expected.join(", ")
            )
        }
        E::DuplicateMappingKey { key, .. } => match key {
            Some(key) => format!("key '{key}' appears twice in this mapping; keep one"),
            None => "a key appears twice in this mapping; keep one".to_owned(),
        },
        E::InvalidBooleanStrict { .. } => {
            "not a boolean: only `true` and `false` are accepted (not yes/no/on/off)".to_owned()
        }
        E::InvalidScalar { ty, .. } => format!("expected {}", describe_type(ty)),
        E::SerdeInvalidType {
            unexpected,
            expected,
            ..
        } => {
            format!("expected {expected}, found {unexpected}")
        }
        E::SerdeInvalidValue {
            unexpected,
            expected,
            ..
        } => {
            format!("invalid value {unexpected}, expected {expected}")
        }
        E::NullIntoString { .. } => "this value is empty; give a value".to_owned(),
        other => one_line(&serde_saphyr::UserMessageFormatter.format_message(other)),
    };
    ConfigError::Parse {
        origin: origin.to_owned(),
        line: location.map(|l| l.line()),
        column: location.map(|l| l.column()),
        message,
    }
}

/// Messages may echo input; keep them on one printable line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Rust type names as a reader of the YAML would say them.
fn describe_type(ty: &str) -> String {
    match ty {
        "u32" => format!("a whole number from 0 to {}, like 100", u32::MAX),
        "u8" | "u16" | "u64" | "u128" | "usize" => {
            "a whole number of 0 or more, like 100".to_owned()
        }
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number, like 100".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "bool" => "`true` or `false`".to_owned(),
        other => format!("a value of type {other}"),
    }
}

/// The expected key nearest to a misspelt one, if it is close enough to be a typo.
fn closest<'a>(typo: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(typo, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for good in ["a", "orders", "billing-v2", "0", "a1-b2", &"a".repeat(63)] {
            assert!(is_dns_label(good), "{good:?} should be a label");
        }
        for bad in ["", "-a", "a-", "Orders", "a_b", "a.b", "ä", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad:?} should not be a label");
        }
    }

    #[test]
    fn durations_are_compact_humantime() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        for bad in ["", "5", "5 minutes", " 5m", "5m ", "five", "-1s"] {
            assert_eq!(parse_duration(bad), None, "{bad:?} should be rejected");
        }
    }

    #[test]
    fn typo_suggestions() {
        let keys = [
            "service",
            "trust_domain",
            "listen",
            "upstream",
            "upstream_protocol",
        ];
        assert_eq!(closest("listn", &keys), Some("listen"));
        assert_eq!(closest("trust-domain", &keys), Some("trust_domain"));
        assert_eq!(closest("upstream_proto", &keys), Some("upstream_protocol"));
        assert_eq!(closest("zzz", &keys), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn listener_clashes() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert!(clashes(a("127.0.0.1:1"), a("127.0.0.1:1")));
        assert!(clashes(a("0.0.0.0:1"), a("127.0.0.1:1")));
        assert!(!clashes(a("127.0.0.1:1"), a("127.0.0.2:1")));
        assert!(!clashes(a("127.0.0.1:0"), a("127.0.0.1:0")));
        assert!(!clashes(a("127.0.0.1:1"), a("127.0.0.1:2")));
    }

    #[test]
    fn io_reason_drops_the_errno() {
        let err = io::Error::from_raw_os_error(2);
        assert_eq!(io_reason(&err), "No such file or directory");
    }

    #[test]
    fn defaults_match_design() {
        let listen = ListenConfig::default();
        assert_eq!(listen.admin.to_string(), "127.0.0.1:15000");
        assert_eq!(listen.outbound.to_string(), "127.0.0.1:15001");
        assert_eq!(listen.inbound.to_string(), "0.0.0.0:15443");
        assert_eq!(
            RateLimitConfig::default().default,
            Quota::Limited {
                per_second: NonZeroU32::new(10_000).expect("non-zero"),
                burst: NonZeroU32::new(2_000).expect("non-zero"),
            }
        );
        assert_eq!(UpstreamProtocol::default(), UpstreamProtocol::Http1);
        assert_eq!(RuntimeConfig::default().worker_threads, None);
    }

    #[test]
    fn parse_errors_are_one_line_with_position() {
        let err = Config::from_yaml_str("service: [\n", "t.yaml", Path::new("."))
            .expect_err("unclosed sequence");
        let message = err.to_string();
        assert!(message.starts_with("t.yaml:"), "{message}");
        assert!(err.line().is_some(), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn tls_scalar_is_explained_before_files_are_opened() {
        let text =
            "service: orders\ntrust_domain: mesh.local\nupstream: http://127.0.0.1:1\ntls: off\n";
        let err =
            Config::from_yaml_str(text, "t.yaml", Path::new("/nonexistent")).expect_err("tls off");
        assert_eq!(err.line(), Some(4));
        assert!(
            err.to_string().contains("TLS cannot be turned off"),
            "{err}"
        );
    }
}
