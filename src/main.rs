//! The `user360` binary: parses the command line, loads settings, sets up logging, and
//! calls [`user360::server::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use user360::config::{FlagOverrides, Settings};

/// User360: a real-time Customer Data Platform engine.
#[derive(Parser)]
#[command(name = "user360", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the server.
    Serve {
        /// A TOML settings file layered over the defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (port 0 picks a free port).
        #[arg(long)]
        listen: Option<String>,
        /// Data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("USER360_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
        } => {
            let settings = Settings::load(config.as_deref(), &FlagOverrides { listen, data_dir })
                .context("cannot load settings")?;
            let system = actix_rt::System::with_tokio_rt(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime")
            });
            system.block_on(user360::server::run(
                settings,
                user360::server::shutdown_signal(),
            ))
        }
    }
}
