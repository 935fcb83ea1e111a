//! `courier send FILE`: the CLI around `courier_client::send` (target, token, trust,
//! exit status).

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub(crate) struct SendArgs {
    /// The messages, JSON Lines: one object per line with `recipient` (E.164, e.g.
    /// "+4915112345678"), exactly one of `payload` (UTF-8 text) or `payload_b64`
    /// (base64), and optionally `id` (the client message id, u64; default: the line
    /// number). Blank lines are skipped.
    file: PathBuf,
    /// Server address, HOST:PORT (not needed with --check).
    #[arg(long, required_unless_present = "check")]
    target: Option<String>,
    /// Bearer token of the sending business (prefer COURIER_TOKEN: the process list is
    /// readable by other users).
    #[arg(long, env = "COURIER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The server's certificate (DER, as the server wrote it: DATA_DIR/tls/cert.der) to
    /// pin. Without it certificate checks are skipped, which is allowed for loopback
    /// targets only.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Allow a target that is not a loopback address (requires --ca).
    #[arg(long)]
    allow_remote: bool,
    /// State file of acked client ids, appended as ACKs arrive; ids in it are skipped.
    /// Default: FILE.acked.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Messages per SUBMIT at most (the server's batch bound applies too).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Submit streams (at most the server's streams_per_connection_max).
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Batches in flight per stream.
    #[arg(long = "in-flight", default_value_t = 4)]
    in_flight: usize,
    /// Rounds per batch while messages come back throttled (each after the server's
    /// retry-after, at most 60 s).
    #[arg(long, default_value_t = 10)]
    attempts: u32,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Only validate FILE (no server): report bad lines and how many ids the state file
    /// already holds.
    #[arg(long)]
    check: bool,
    /// What to wait for: `acked` (durable at the relay; the default) or `delivered`
    /// (also listen to the business's statuses and wait until every acked message of
    /// FILE is delivered, failed or expired; the summary counts them).
    #[arg(long, value_enum, default_value_t = WaitFor::Acked)]
    wait: WaitFor,
    /// With --wait delivered: the file of final statuses heard (`ID STATUS` lines),
    /// appended before each is acknowledged; ids in it are not waited for again.
    /// Default: FILE.statuses.
    #[arg(long)]
    statuses: Option<PathBuf>,
    /// With --wait delivered: where users' replies heard meanwhile are appended (JSON
    /// Lines: event, at_ms, sender, payload_b64). Default: FILE.replies.
    #[arg(long)]
    replies: Option<PathBuf>,
    /// With --wait delivered: seconds to wait after the last ACK for the last final
    /// statuses.
    #[arg(long, default_value_t = 300)]
    wait_timeout: u64,
}

/// What `courier send` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum WaitFor {
    /// Every message acked (durable at the relay).
    Acked,
    /// Every acked message delivered, failed or expired.
    Delivered,
}

impl std::fmt::Debug for SendArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendArgs")
            .field("file", &self.file)
            .field("target", &self.target)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// Runs `courier send`; returns the exit status (see `courier_client::send::exit_code`).
pub(crate) fn run(args: SendArgs) -> u8 {
    use courier_client::send::{self, exit_code};
    let state = args
        .state
        .clone()
        .unwrap_or_else(|| send::default_state_path(&args.file));
    if args.check {
        return match send::check(&args.file, &state) {
            Ok(v) => {
                println!(
                    "{}: {} message(s), all lines valid; {} already acked per {}",
                    args.file.display(),
                    v.messages,
                    v.skipped,
                    state.display()
                );
                exit_code::OK
            }
            Err(e) => {
                eprintln!("courier send: {e}");
                e.exit_code()
            }
        };
    }
    let options = match send_options(&args, state) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("courier send: {e:#}");
            return exit_code::BAD_INPUT;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("courier send: starting the tokio runtime: {e}");
            return exit_code::NOT_ALL_ACCEPTED;
        }
    };
    match runtime.block_on(send::send(&options)) {
        Ok(summary) => {
            let _ = summary.print(&mut std::io::stdout().lock());
            summary.exit_code()
        }
        Err(e) => {
            eprintln!("courier send: {e}");
            e.exit_code()
        }
    }
}

pub(crate) fn send_options(
    args: &SendArgs,
    state: PathBuf,
) -> Result<courier_client::send::SendOptions> {
    let target = args.target.as_deref().context("--target is required")?;
    let server = std::net::ToSocketAddrs::to_socket_addrs(target)
        .with_context(|| format!("resolving --target {target}"))?
        .next()
        .with_context(|| format!("--target {target} resolves to no address"))?;
    let token = args
        .token
        .clone()
        .context("give a token with --token or COURIER_TOKEN")?;
    let trust =
        courier_client::tls::trust_for_target(server, args.ca.as_deref(), args.allow_remote)?;
    Ok(courier_client::send::SendOptions {
        file: args.file.clone(),
        state,
        client: courier_client::ClientConfig {
            server,
            server_name: "localhost".to_string(),
            token,
            trust,
            streams: args.streams,
            batches_in_flight_per_stream: args.in_flight,
        },
        batch_messages_max: args.batch,
        attempts: args.attempts,
        quiet: args.quiet,
        delivery: (args.wait == WaitFor::Delivered).then(|| courier_client::send::DeliveryWait {
            statuses: args
                .statuses
                .clone()
                .unwrap_or_else(|| courier_client::send::default_statuses_path(&args.file)),
            replies: args
                .replies
                .clone()
                .unwrap_or_else(|| courier_client::send::default_replies_path(&args.file)),
            timeout: std::time::Duration::from_secs(args.wait_timeout),
        }),
    })
}
