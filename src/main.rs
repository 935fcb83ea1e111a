//! `courier`: the relay's command line. Each command lives in a module of its own
//! under `commands/`; this file parses the command line, sets up logging and dispatches.

mod commands;

use std::io::IsTerminal;

use anyhow::Result;
use clap::{Parser, Subcommand};
use commands::businesses::BusinessesCmd;
use commands::config::ConfigCmd;
use commands::demo::DemoArgs;
use commands::keys::KeysCmd;
use commands::log::LogCmd;
use commands::send::SendArgs;
use commands::serve::ServeArgs;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// courier: a high-throughput relay for business messaging over QUIC.
#[derive(Parser, Debug)]
#[command(name = "courier", version, about)]
struct Cli {
    /// Log line format on stderr: `text` for people, `json` (one object per line) for log
    /// collectors. The filter is COURIER_LOG (default `info`; `warn` for `demo`, whose
    /// report stands alone). Colours only on a terminal, and never with NO_COLOR set.
    #[arg(long, global = true, env = "COURIER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event and line (tracing-subscriber's JSON formatter).
    Json,
}

/// Sets up the log on stderr. The filter is `COURIER_LOG`, else `default_filter`.
/// Colours only on a terminal, and never with `NO_COLOR` set (no-color.org): a log file,
/// a pipe or a collector gets plain text.
fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COURIER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay: one pinned shard per core, listening on UDP (QUIC, ALPN courier/1).
    Serve(ServeArgs),
    /// Serve on the built-in default profile and drive it with built-in load for a few
    /// seconds on loopback, then print a summary.
    Demo(DemoArgs),
    /// Send a file of messages (JSON Lines) to a server: validated whole first, then
    /// pipelined; acked ids go to a state file so that a rerun sends only the rest.
    #[command(after_help = courier_client::send::EXIT_CODES_HELP)]
    Send(SendArgs),
    /// Manage the business registry.
    #[command(subcommand)]
    Businesses(BusinessesCmd),
    /// Check tuning profiles.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Manage the master key.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Check the log on disk (read only; never prints content or phone numbers).
    #[command(subcommand)]
    Log(LogCmd),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    // The demo prints a report on stdout; the in-process server's INFO lines (start-up,
    // key creation) would only interleave with it, so it logs warnings and errors only
    // unless COURIER_LOG says otherwise.
    let default_filter = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    init_logging(format, default_filter);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            match format {
                // What `fn main() -> Result` would print.
                LogFormat::Text => eprintln!("Error: {e:?}"),
                // A log collector gets the failure as one more JSON line.
                LogFormat::Json => tracing::error!(error = format!("{e:#}"), "courier failed"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(args) => commands::serve::run(args),
        Command::Demo(args) => commands::demo::run(args),
        Command::Send(args) => {
            let code = commands::send::run(args);
            // process::exit skips destructors: flush what was printed first.
            let _ = std::io::Write::flush(&mut std::io::stdout());
            std::process::exit(code.into())
        }
        Command::Businesses(cmd) => commands::businesses::run(cmd),
        Command::Config(cmd) => commands::config::run(cmd),
        Command::Keys(cmd) => commands::keys::run(cmd),
        Command::Log(cmd) => commands::log::run(cmd),
    }
}
