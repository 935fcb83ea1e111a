//! courier-loadgen: the load engine behind the `courier-loadgen` binary and `courier demo`.
//!
//! ```text
//! Plan (scenario TOML or flags) ──validate──> senders × connections (Client::connect, not timed)
//!   └─ engine::drive: per connection, open loop at a fixed rate (latency from each
//!      message's intended send time) or closed loop at full speed; a ticker samples
//!      counters once a second (progress, timeline)
//!   └─ LoadReport: counts by status and reason, HDR percentiles, timeline, per-sender
//!      detection scores, duplicates, spam reports, CPU of generator and server
//!        ├─ print_table / JSON (serde) / compare
//!        └─ plot::write_svg (feature `plot`, on by default)
//! ```
//!
//! A delivery run (`RunConfig::delivery`, `--deliver`) adds a simulated delivery edge
//! ([`deliver`]: DELIVERs answered by [`devices`], ONLINE, replies) and makes every
//! sender connection listen to its statuses; [`tracking`] checks the three views of
//! each accepted message against each other and reports the delivery figures.
//!
//! Modules: [`traffic`] (recipients, sizes, schedules), [`scenario`] (TOML → [`Plan`]),
//! [`engine`] (the loops, over a [`engine::Transport`]), [`report`] (JSON, table,
//! comparison), [`cpu`] (`/proc` readings), [`workers`] (threads that each own a share of
//! the connections), [`deliver`], [`devices`], [`tracking`], `plot` (SVG; feature `plot`).
//!
//! It talks to servers through `courier_client` only, and depends on no server code:
//! `courier demo` runs it against an in-process server, `courier-loadgen` against any.
//! Recipients are synthetic and payloads filler: the driver never sees real personal
//! data, and prints none either way.
#![forbid(unsafe_code)]

pub mod cpu;
pub mod deliver;
pub mod devices;
pub mod engine;
#[cfg(feature = "plot")]
pub mod plot;
pub mod report;
pub mod scenario;
pub mod tracking;
pub mod traffic;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use engine::{AcceptedRecord, RunOptions, StopSignal, Transport};
pub use report::{LoadReport, Percentiles};
pub use scenario::{Label, Plan, SenderPlan, TokenSource};
pub use workers::Workers;

use courier_client::ServerTrust;
use courier_client::{Client, ClientConfig, ClientError, EventReceiver, OutgoingMessage};
use deliver::{DeliveryPlan, DeliveryRun};
use engine::SenderRun;
use traffic::{RecipientSpec, SizeSpec};

/// How long the driver waits for outstanding ACKs after sending stops.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Highest latency the histogram tracks; longer ones are recorded as this.
pub const LATENCY_US_MAX: u64 = 60_000_000;
/// Most connections one run opens.
pub const CONNECTIONS_MAX: usize = 4096;
/// Bits of a client id that hold the per-connection counter; the connection index sits
/// above them.
pub const CLIENT_ID_COUNTER_BITS: u32 = 40;

const _: () = assert!((CONNECTIONS_MAX as u64) < (1 << (64 - CLIENT_ID_COUNTER_BITS)));

/// A closed-loop run with one token (loadgen v1, `courier demo`).
#[derive(Clone)]
pub struct LoadConfig {
    /// The server's UDP address.
    pub target: SocketAddr,
    /// The bearer token every connection authenticates with.
    pub token: String,
    /// How to trust the server's certificate.
    pub trust: ServerTrust,
    /// Connections, each with its own client.
    pub connections: usize,
    /// Messages per batch.
    pub batch: usize,
    /// Payload bytes per message.
    pub size: usize,
    /// How long to keep sending.
    pub duration: Duration,
    /// Submit streams per connection.
    pub streams_per_connection: usize,
    /// Batches in flight per stream.
    pub batches_in_flight_per_stream: usize,
}

impl std::fmt::Debug for LoadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadConfig")
            .field("target", &self.target)
            .field(
                "token",
                &format_args!("<{} bytes redacted>", self.token.len()),
            )
            .field("trust", &self.trust)
            .field("connections", &self.connections)
            .field("batch", &self.batch)
            .field("size", &self.size)
            .field("duration", &self.duration)
            .field("streams_per_connection", &self.streams_per_connection)
            .field(
                "batches_in_flight_per_stream",
                &self.batches_in_flight_per_stream,
            )
            .finish()
    }
}

/// A run of a whole plan: where, with which tokens, how.
#[derive(Clone)]
pub struct RunConfig {
    /// The server's UDP address.
    pub target: SocketAddr,
    /// Tokens that senders name by index (`business = N`).
    pub tokens: Vec<String>,
    /// A platform credential's token: spam REPORTs go over a connection of its own.
    pub platform_token: Option<String>,
    /// How to trust the server's certificate.
    pub trust: ServerTrust,
    /// Submit streams per connection.
    pub streams_per_connection: usize,
    /// Batches in flight per stream.
    pub batches_in_flight_per_stream: usize,
    /// Who sends what.
    pub plan: Plan,
    /// Everything else.
    pub options: RunOptions,
    /// A simulated delivery edge beside the senders (`--deliver`); the senders then
    /// listen to their statuses and replies.
    pub delivery: Option<DeliveryPlan>,
}

impl std::fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunConfig")
            .field("target", &self.target)
            .field("tokens", &format_args!("<{} redacted>", self.tokens.len()))
            .field(
                "platform_token",
                &self.platform_token.as_ref().map(|_| "<redacted>"),
            )
            .field("trust", &self.trust)
            .field("streams_per_connection", &self.streams_per_connection)
            .field(
                "batches_in_flight_per_stream",
                &self.batches_in_flight_per_stream,
            )
            .field("plan", &self.plan)
            .field("options", &self.options)
            .field("delivery", &self.delivery)
            .finish()
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The load configuration cannot work; names the field.
    #[error("invalid load configuration: {0}")]
    Config(String),
    /// A connection could not be set up (refused token, handshake, timeout).
    #[error("connection {index} could not connect")]
    Connect {
        /// Which connection, from 0, over all senders.
        index: usize,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// The configured batch does not fit the bounds the server stated in WELCOME;
    /// lower `batch` or `size`.
    #[error("the configured batch does not fit the server's bounds")]
    BatchOutOfBounds(#[source] ClientError),
    /// The simulated edge could not connect (a token that is not a platform
    /// credential's is refused the DELIVERY feature).
    #[error("the delivery edge could not connect")]
    Edge(#[source] ClientError),
}

fn check(cfg: &LoadConfig) -> Result<(), LoadError> {
    if cfg.connections == 0 || cfg.connections > CONNECTIONS_MAX {
        return Err(LoadError::Config("connections must be in 1..=4096".into()));
    }
    if cfg.batch == 0 {
        return Err(LoadError::Config("batch must be at least 1".into()));
    }
    if cfg.duration.is_zero() {
        return Err(LoadError::Config("duration must be positive".into()));
    }
    Ok(())
}

/// Runs loadgen v1's closed loop (one token, full speed) and reports.
pub async fn run(cfg: &LoadConfig) -> Result<LoadReport, LoadError> {
    check(cfg)?;
    let plan = Plan {
        duration_secs: cfg.duration.as_secs_f64(),
        senders: vec![SenderPlan {
            name: "sender-0".into(),
            label: Label::Normal,
            token: TokenSource::Index(0),
            rate: 0.0,
            rate_from: 0.0,
            start_secs: 0.0,
            stop_secs: cfg.duration.as_secs_f64(),
            connections: cfg.connections,
            batch: cfg.batch,
            size: SizeSpec::Fixed(cfg.size),
            recipients: RecipientSpec::Uniform {
                population: traffic::POPULATION_MAX,
            },
            reports_per_sec: 0.0,
            retry_rounds: 0,
        }],
    };
    run_plan(&RunConfig {
        target: cfg.target,
        tokens: vec![cfg.token.clone()],
        platform_token: None,
        trust: cfg.trust.clone(),
        streams_per_connection: cfg.streams_per_connection,
        batches_in_flight_per_stream: cfg.batches_in_flight_per_stream,
        plan,
        options: RunOptions {
            in_flight: cfg.streams_per_connection * cfg.batches_in_flight_per_stream,
            ..RunOptions::default()
        },
        delivery: None,
    })
    .await
}

/// Runs the plan against [`engine::NullTransport`]s (no server, no network): what is
/// left is the generator's own cost.
pub async fn run_plan_dry(plan: &Plan, options: &RunOptions) -> Result<LoadReport, LoadError> {
    plan.check().map_err(LoadError::Config)?;
    let senders = plan
        .senders
        .iter()
        .map(|s| SenderRun {
            plan: s.clone(),
            conns: (0..s.connections)
                .map(|_| Arc::new(engine::NullTransport::default()) as Arc<dyn Transport>)
                .collect(),
        })
        .collect();
    Ok(engine::drive(engine::plan_duration(plan), senders, options).await)
}

/// Connects one sender connection; with `listen`, with the EVENTS feature, so that its
/// business's statuses and replies come out of the receiver.
async fn connect(
    cfg: &ClientConfig,
    listen: bool,
) -> Result<(Client, Option<EventReceiver>), ClientError> {
    if listen {
        let (c, e) = Client::connect_with_events(cfg, deliver::EVENT_FRAMES_BUFFERED).await?;
        Ok((c, Some(e)))
    } else {
        Ok((Client::connect(cfg).await?, None))
    }
}

/// Connects every sender's clients (and, for a delivery run, the simulated edge first),
/// runs the plan and reports; a delivery run then waits for the last statuses.
pub async fn run_plan(cfg: &RunConfig) -> Result<LoadReport, LoadError> {
    cfg.plan.check().map_err(LoadError::Config)?;
    let total: usize = cfg.plan.senders.iter().map(|s| s.connections).sum();
    if total > CONNECTIONS_MAX {
        return Err(LoadError::Config(format!(
            "at most {CONNECTIONS_MAX} connections in all"
        )));
    }
    let base = ClientConfig {
        server: cfg.target,
        server_name: "localhost".to_string(),
        token: String::new(),
        trust: cfg.trust.clone(),
        streams: cfg.streams_per_connection,
        batches_in_flight_per_stream: cfg.batches_in_flight_per_stream,
    };
    let mut delivery = match &cfg.delivery {
        Some(plan) => {
            plan.check().map_err(LoadError::Config)?;
            // The devices of a known population publish their keys before the run, as a
            // platform's devices did long before a business writes to them; new
            // recipients' devices are made when the relay first asks.
            let population = cfg
                .plan
                .senders
                .iter()
                .map(|s| match &s.recipients {
                    traffic::RecipientSpec::Uniform { population }
                    | traffic::RecipientSpec::Zipf { population, .. } => *population,
                    traffic::RecipientSpec::New => 0,
                })
                .max()
                .unwrap_or(0);
            let run = DeliveryRun::start(&base, plan, population)
                .await
                .map_err(LoadError::Edge)?;
            Some(run)
        }
        None => None,
    };
    let mut senders = Vec::new();
    let mut index = 0;
    for s in &cfg.plan.senders {
        let token = match &s.token {
            TokenSource::Literal(t) => t.clone(),
            TokenSource::Index(i) => cfg.tokens.get(*i).cloned().ok_or_else(|| {
                LoadError::Config(format!(
                    "sender {} uses business {i}, but only {} token(s) were given",
                    s.name,
                    cfg.tokens.len()
                ))
            })?,
        };
        let client_cfg = ClientConfig {
            token,
            ..base.clone()
        };
        let listen = delivery.is_some();
        let mut conns: Vec<Arc<dyn Transport>> = Vec::new();
        for _ in 0..s.connections {
            // A client's quinn driver and stream tasks run on the runtime it connects
            // on: the worker that `drive` gives this connection to.
            let connected = match cfg.options.worker_for(index) {
                Some(h) => {
                    let c = client_cfg.clone();
                    h.spawn(async move { connect(&c, listen).await })
                        .await
                        .unwrap_or(Err(ClientError::Closed))
                }
                None => connect(&client_cfg, listen).await,
            };
            let (client, events) =
                connected.map_err(|source| LoadError::Connect { index, source })?;
            index += 1;
            let client = Arc::new(client);
            if let (Some(d), Some(events)) = (delivery.as_mut(), events) {
                d.listen(client.clone(), events);
            }
            conns.push(client);
        }
        // The largest batch this sender can draw must fit the server's bounds.
        let largest = traffic::filler(s.size.max());
        let probe: Vec<OutgoingMessage> = (0..s.batch as u64)
            .map(|i| OutgoingMessage {
                client_id: i,
                recipient: traffic::new_recipient(0, i),
                payload: largest.clone(),
            })
            .collect();
        conns[0]
            .check(&probe)
            .map_err(LoadError::BatchOutOfBounds)?;
        senders.push(SenderRun {
            plan: s.clone(),
            conns,
        });
    }
    let mut clients: Vec<Arc<dyn Transport>> =
        senders.iter().flat_map(|s| s.conns.clone()).collect();
    let mut options = cfg.options.clone();
    if let Some(token) = &cfg.platform_token {
        let platform = Client::connect(&ClientConfig {
            token: token.clone(),
            streams: 1,
            batches_in_flight_per_stream: 1,
            ..base.clone()
        })
        .await
        .map_err(|source| LoadError::Connect { index, source })?;
        let platform: Arc<dyn Transport> = Arc::new(platform);
        clients.push(platform.clone());
        options.reporter = Some(platform);
    }
    options.tracker = delivery.as_ref().map(DeliveryRun::tracker);
    let mut report = engine::drive(engine::plan_duration(&cfg.plan), senders, &options).await;
    if let Some(d) = delivery {
        report.delivery = Some(d.finish(&options.stop).await);
    }
    let mut closing = tokio::task::JoinSet::new();
    for c in clients {
        closing.spawn(async move { c.close().await });
    }
    while closing.join_next().await.is_some() {}
    Ok(report)
}
