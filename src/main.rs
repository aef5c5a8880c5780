//! The `user360` binary: parses the command line, loads settings, sets up logging, and
//! calls [`user360::server::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use user360::config::{FlagOverrides, Settings};

/// mimalloc instead of the system allocator: the grid allocates many small, short-lived
/// values per message from several threads, where glibc malloc spent a third of the import
/// and ingest time and contended on its arena locks (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the sys crate exports no constant).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for a second before handing it back to the OS (mimalloc's default
/// is 10 ms). Under a steady load (an import, an ingest burst) the shards free and reuse
/// buffers continuously; returning them at once made the kernel unmap and zero-fill the
/// same pages again and again, which took a third of the import's CPU time
/// (docs/performance.md). An idle server still gives the memory back. `MIMALLOC_PURGE_DELAY`
/// in the environment wins.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called once at start of main, before any other thread exists (the
        // option table is not synchronised); the option id and its value range (ms, -1
        // for never) are those of the bundled mimalloc.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
    }
}

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
    /// Exports profiles from a running server (CSV or JSONL) to a file or stdout.
    Export {
        /// Server base URL, e.g. http://127.0.0.1:8080
        #[arg(long, env = "USER360_SERVER")]
        server: String,
        /// Admin token.
        #[arg(long, env = "USER360_TOKEN")]
        token: String,
        /// Only the members of this segment.
        #[arg(long)]
        segment: Option<String>,
        /// csv or jsonl (default: from the output file's extension, else jsonl as over HTTP).
        #[arg(long)]
        format: Option<String>,
        /// A comma list of id, identity columns and traits.<path>.
        #[arg(long)]
        fields: Option<String>,
        /// Output file (default: stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Imports profiles from a CSV or JSONL file into a running server.
    ///
    /// Prints the server's answer as JSON on stdout and a summary with the rejected rows
    /// (by line) on stderr. Exit status: 0 when every row was imported, 3 when some rows
    /// were rejected (the others are imported), 1 when the import failed as a whole.
    Import {
        /// The file (.csv or .jsonl, or give --format).
        file: PathBuf,
        /// Server base URL, e.g. http://127.0.0.1:8080
        #[arg(long, env = "USER360_SERVER")]
        server: String,
        /// Admin token.
        #[arg(long, env = "USER360_TOKEN")]
        token: String,
        /// csv or jsonl (default: from the file's extension).
        #[arg(long)]
        format: Option<String>,
    },
    /// Backups: take one from a running server, check one, or restore one into a data dir.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
}

#[derive(Subcommand)]
enum SnapshotAction {
    /// Asks a running server for a snapshot and downloads it as a backup file.
    Create {
        /// Server base URL, e.g. http://127.0.0.1:8080
        #[arg(long, env = "USER360_SERVER")]
        server: String,
        /// Admin token.
        #[arg(long, env = "USER360_TOKEN")]
        token: String,
        /// Output file (default: user360-snapshot-<id>.u360bak).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Checks a backup file (header, every checksum) and describes it.
    Inspect {
        /// The backup file.
        file: PathBuf,
    },
    /// Replaces a data dir (of a stopped server) with a backup; the old one is moved aside.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// The data dir to restore into.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// Rejected rows `user360 import` prints on stderr.
const REJECTED_SHOWN: usize = 20;

/// Exit status of `user360 import` when some rows were rejected (the others imported).
const EXIT_ROWS_REJECTED: i32 = 3;

fn main() -> anyhow::Result<()> {
    tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("USER360_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // TLS for webhooks and the CLI's HTTPS: rustls with the ring provider (no C crypto
    // build); without a provider installed, building an HTTP client panics.
    user360::init_tls();
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
        Command::Export {
            server,
            token,
            segment,
            format,
            fields,
            output,
        } => {
            let format = format.unwrap_or_else(|| {
                match output
                    .as_deref()
                    .and_then(|p| p.extension())
                    .and_then(|e| e.to_str())
                {
                    Some("csv") => "csv".to_owned(),
                    _ => "jsonl".to_owned(),
                }
            });
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let rows = rt.block_on(user360::cli::transfer::export(
                &server,
                &token,
                &format,
                segment.as_deref(),
                fields.as_deref(),
                output.as_deref(),
            ))?;
            eprintln!("exported {rows} profiles");
            Ok(())
        }
        Command::Import {
            file,
            server,
            token,
            format,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let answer = rt.block_on(user360::cli::transfer::import(
                &server,
                &token,
                &file,
                format.as_deref(),
            ))?;
            // The answer as JSON on stdout (for scripts), a summary on stderr (for people).
            println!("{answer}");
            let imported = answer["imported"].as_u64().unwrap_or(0);
            let rejected = answer["rejected_total"].as_u64().unwrap_or(0);
            eprintln!("imported {imported} rows; {rejected} rejected");
            let listed = answer["rejected"].as_array().cloned().unwrap_or_default();
            for r in listed.iter().take(REJECTED_SHOWN) {
                eprintln!(
                    "  line {}: {}: {}",
                    r["line"],
                    r["code"].as_str().unwrap_or("?"),
                    r["message"].as_str().unwrap_or("")
                );
            }
            if rejected > REJECTED_SHOWN as u64 {
                eprintln!(
                    "  ... and {} more (the JSON answer on stdout lists the first {})",
                    rejected - REJECTED_SHOWN as u64,
                    listed.len()
                );
            }
            if rejected > 0 {
                std::process::exit(EXIT_ROWS_REJECTED);
            }
            Ok(())
        }
        Command::Snapshot { action } => match action {
            SnapshotAction::Create {
                server,
                token,
                output,
            } => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let path = rt.block_on(user360::cli::snapshot::create(&server, &token, output))?;
                println!("{}", path.display());
                Ok(())
            }
            SnapshotAction::Inspect { file } => {
                println!("{}", user360::cli::snapshot::inspect(&file)?);
                Ok(())
            }
            SnapshotAction::Restore { file, data_dir } => {
                println!("{}", user360::cli::snapshot::restore(&file, &data_dir)?);
                Ok(())
            }
        },
    }
}
