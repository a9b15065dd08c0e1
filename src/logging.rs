//! tracing setup: `RUST_LOG`-style filters, pretty or JSON lines, and a handle that
//! changes the filter at runtime (`PUT /log-level` on the admin port).

use std::sync::Mutex;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error(
        "'{directive}' is not a log filter: {reason}; give a level (error, warn, info, debug, \
         trace) or RUST_LOG-style directives like `info,seam=debug`"
    )]
    BadFilter { directive: String, reason: String },
    #[error("a global tracing subscriber is already installed; runtime log levels are unavailable")]
    AlreadyInstalled,
    #[error("the log filter could not be swapped: {0}; the previous level stays in force")]
    Reload(String),
}

/// Changes the log filter of the running process.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl LogControl {
    /// Replaces the filter with `directive` (`debug`, `info,seam=trace`, ...).
    pub fn set(&self, directive: &str) -> Result<(), LoggingError> {
        let directive = directive.trim();
        let filter = parse(directive)?;
        self.handle
            .reload(filter)
            .map_err(|e| LoggingError::Reload(e.to_string()))?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = directive.to_owned();
        tracing::info!(
            event = "log_level_changed",
            filter = directive,
            "log filter changed"
        );
        Ok(())
    }

    /// The filter in force, as it was given.
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn parse(directive: &str) -> Result<EnvFilter, LoggingError> {
    if directive.is_empty() {
        return Err(LoggingError::BadFilter {
            directive: directive.to_owned(),
            reason: "it is empty".to_owned(),
        });
    }
    EnvFilter::builder()
        .parse(directive)
        .map_err(|e| LoggingError::BadFilter {
            directive: directive.to_owned(),
            reason: e.to_string(),
        })
}

/// Installs the global subscriber writing to stderr. `default_level` applies when
/// `RUST_LOG` is unset (or invalid).
pub fn init(format: LogFormat, default_level: &str) -> Result<LogControl, LoggingError> {
    let directive = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| parse(v).is_ok())
        .unwrap_or_else(|| default_level.to_owned());
    init_with_writer(format, &directive, std::io::stderr)
}

/// Installs the global subscriber writing to `writer` (tests capture lines this way).
pub fn init_with_writer<W>(
    format: LogFormat,
    directive: &str,
    writer: W,
) -> Result<LogControl, LoggingError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let (filter, handle) = reload::Layer::new(parse(directive)?);
    type Base = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;
    let fmt: Box<dyn Layer<Base> + Send + Sync> = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .map_err(|_| LoggingError::AlreadyInstalled)?;
    Ok(LogControl {
        handle,
        current: Mutex::new(directive.to_owned()),
    })
}
