#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use seam::config::Config;

/// Exit status for a configuration that does not validate; distinct from 1 so scripts
/// can tell "your file is wrong" from "seam failed".
const EXIT_BAD_CONFIG: u8 = 2;

/// seam: an encrypted service-mesh sidecar proxy.
#[derive(Parser)]
#[command(name = "seam", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate FILE without starting: prints `ok`, or the first problem and exits 2.
    Check {
        /// The YAML configuration file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
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
    }
}
