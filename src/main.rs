#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use seam::Sidecar;
use seam::config::Config;
use seam::demo::{self, DemoMesh};
use seam::identity::{CertsInit, Identity, init_certs};
use seam::logging::{self, LogFormat};

/// Exit status for a configuration that does not validate; distinct from 1 so scripts
/// can tell "your file is wrong" from "seam failed".
const EXIT_BAD_CONFIG: u8 = 2;
const SECS_PER_DAY: u64 = 24 * 60 * 60;

/// seam: an encrypted service-mesh sidecar proxy.
#[derive(Debug, Parser)]
#[command(name = "seam", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one sidecar from a YAML configuration file until SIGTERM or Ctrl-C.
    Run {
        /// The YAML configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Log line format; levels come from RUST_LOG (default info).
        #[arg(long, value_enum, default_value_t = LogFormat::Pretty)]
        log_format: LogFormat,
    },
    /// Start an embedded demo mesh in this process: a CA, two seams (orders, billing)
    /// and two small apps, all on 127.0.0.1 with free ports. Sends requests from orders
    /// to billing through both seams, prints what it measured, then keeps serving until
    /// Ctrl-C. Exits 1 if any demo request failed.
    Demo {
        /// Send N requests, print the report and exit instead of serving on
        /// (without it: 100 requests, then serve until Ctrl-C).
        #[arg(long, value_name = "N")]
        requests: Option<usize>,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Development certificates for the mesh.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Print a summary of a running seam (health, sessions, rates, top peers). Exits 1
    /// when its admin port cannot be reached or it reports unhealthy.
    Status {
        /// The seam's admin address (listen.admin).
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: SocketAddr,
    },
    /// Print a running seam's sessions as a table. Exits 1 when its admin port cannot be
    /// reached.
    Sessions {
        /// The seam's admin address (listen.admin).
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: SocketAddr,
    },
}

/// The default `listen.admin`.
const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Validate FILE without starting: prints `ok`, or the first problem and exits 2.
    Check {
        /// The YAML configuration file.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Create a new development CA and a certificate per service (Kubernetes TLS secret layout:
    /// DIR/ca.crt, DIR/ca.key, DIR/<service>/{tls.crt,tls.key,ca.crt}).
    Init {
        /// Directory to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain of the SPIFFE IDs, e.g. mesh.local.
        #[arg(long)]
        trust_domain: String,
        /// A service to issue a certificate for; repeat for each service.
        #[arg(long = "service", required = true)]
        services: Vec<String>,
        /// Replace existing files, CA included.
        #[arg(long)]
        force: bool,
        /// Validity of the service certificates in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=36500))]
        days: u64,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { config, log_format } => run(&config, log_format),
        Command::Demo { requests } => demo(requests),
        Command::Config {
            cmd: ConfigCmd::Check { file },
        } => match Config::load(&file) {
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{err}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Status { admin } => admin_cli(async move {
            let (report, healthy) = seam::admin::client::status(admin).await?;
            print!("{report}");
            Ok(healthy)
        }),
        Command::Sessions { admin } => admin_cli(async move {
            print!("{}", seam::admin::client::sessions_table(admin).await?);
            Ok(true)
        }),
        Command::Certs { cmd } => match certs(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("seam: {message}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Runs an admin-API command on a small runtime: exit 0 when it reports success.
fn admin_cli(
    work: impl std::future::Future<Output = Result<bool, seam::admin::client::ClientError>>,
) -> ExitCode {
    let Some(runtime) = runtime(Some(1)) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(work) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("seam: {err}");
            ExitCode::FAILURE
        }
    }
}

fn certs(cmd: CertsCmd) -> Result<(), String> {
    match cmd {
        CertsCmd::Init {
            dir,
            trust_domain,
            services,
            force,
            days,
        } => {
            let written = init_certs(&CertsInit {
                dir,
                trust_domain,
                services,
                force,
                validity: Duration::from_secs(days * SECS_PER_DAY),
            })
            .map_err(|e| e.to_string())?;
            for path in written {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}

fn run(path: &std::path::Path, log_format: LogFormat) -> ExitCode {
    // Without logging seam still proxies; say so instead of refusing to start.
    let log_control = logging::init(log_format, "info")
        .inspect_err(|err| eprintln!("seam: {err}"))
        .ok();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let identity = match Identity::load(
        &config.tls.ca,
        &config.tls.cert,
        &config.tls.key,
        &config.trust_domain,
        &config.service,
    ) {
        Ok(i) => i,
        Err(err) => {
            eprintln!("seam: {err}");
            return ExitCode::FAILURE;
        }
    };
    let Some(runtime) = runtime(config.runtime.worker_threads.map(|n| n.get())) else {
        return ExitCode::FAILURE;
    };
    let code = runtime.block_on(async move {
        let sidecar = match Sidecar::start(config, identity).await {
            Ok(s) => s,
            Err(err) => {
                eprintln!("seam: {err}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(control) = log_control {
            sidecar.set_log_control(control);
        }
        if let Err(err) = shutdown_signal().await {
            eprintln!("seam: cannot listen for signals: {err}");
            return ExitCode::FAILURE;
        }
        sidecar.shutdown().await;
        ExitCode::SUCCESS
    });
    // Connection tasks still parked on timers are abandoned rather than waited for:
    // the drain above already decided what finishes.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

fn demo(requests: Option<usize>) -> ExitCode {
    // warn: the report on stdout is the point; routine info lines would bury it.
    if let Err(err) = logging::init(LogFormat::Pretty, "warn") {
        eprintln!("seam: {err}");
    }
    let Some(runtime) = runtime(None) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let mesh = match DemoMesh::start().await {
            Ok(m) => m,
            Err(err) => {
                eprintln!("seam demo: {err}");
                return ExitCode::FAILURE;
            }
        };
        let n = requests.unwrap_or(demo::DEFAULT_REQUESTS);
        // One signal future for the whole run, so a Ctrl-C that arrives between the
        // batch and the serving phase is not lost.
        let stop = shutdown_signal();
        tokio::pin!(stop);
        let report = tokio::select! {
            report = mesh.exercise(n) => report,
            signalled = &mut stop => {
                mesh.shutdown().await;
                return signal_exit(signalled);
            }
        };
        print!("{report}");
        let mut code = if report.failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
        if requests.is_none() {
            println!();
            print!("{}", mesh.usage());
            if let Err(err) = stop.await {
                eprintln!("seam: cannot listen for signals: {err}");
                code = ExitCode::FAILURE;
            }
        }
        mesh.shutdown().await;
        code
    })
}

fn signal_exit(signalled: std::io::Result<()>) -> ExitCode {
    match signalled {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("seam: cannot listen for signals: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
    Ok(())
}

/// A tokio runtime with `threads` workers (None: one per core), or None after saying
/// why it could not start. One worker means a current-thread runtime: no work
/// stealing and no cross-thread wake-ups, which is what a sidecar pinned to one core
/// wants.
fn runtime(threads: Option<usize>) -> Option<tokio::runtime::Runtime> {
    let built = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    built
        .inspect_err(|err| eprintln!("seam: cannot start the async runtime: {err}"))
        .ok()
}
