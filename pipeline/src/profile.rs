//! Tuning profiles: a raw serde struct (unknown keys refused) validated once into a typed
//! [`Profile`] whose every bound has been checked.
//!
//! Every queue, table and buffer in courier takes its bound from here, so memory use is a
//! function of the profile and not of traffic. Validation returns every error it finds,
//! each naming the key and the bound it broke.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::detect::{DetectConfig, BUSINESS_STATE_BYTES_LIMIT};
use crate::wire::{self, WireLimits};

/// The built-in default profile (`tuning/default.toml`), compiled into the binary.
pub const DEFAULT_PROFILE_TOML: &str = include_str!("../../tuning/default.toml");

/// One problem found while loading a profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ProfileIssue {
    /// The dotted key, e.g. `limits.frame_bytes_max`.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Why a profile could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// The text is not valid TOML or has an unknown key or a wrong type.
    #[error("profile does not parse: {0}")]
    Parse(String),
    /// Keys parse but break their bounds; every broken key is listed. A key set by an
    /// environment override names its variable.
    #[error("profile is invalid:\n{}", .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ProfileIssue>),
    /// `COURIER_<SECTION>__<KEY>` variables that name no profile key or hold a value of
    /// the wrong type; every bad variable is listed.
    #[error("environment overrides are invalid:\n{}", .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Env(Vec<EnvIssue>),
}

/// One bad `COURIER_<SECTION>__<KEY>` environment variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct EnvIssue {
    /// The variable's name.
    pub var: String,
    /// What is wrong with it.
    pub problem: String,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// UDP address to listen on.
    pub listen: String,
    /// Number of shards; 0 means one per available CPU.
    pub shards: u32,
    /// TCP address of the Prometheus metrics endpoint; "" disables it.
    pub metrics_listen: String,
}

/// `[detect]`: bounds and thresholds of the abnormal-sending detector (see
/// [`crate::detect`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDetect {
    /// Most businesses one shard's detector holds.
    pub businesses_max: u32,
    /// Most bytes of one business's detector state; at most 65536.
    pub business_state_bytes_max: u32,
    /// HyperLogLog precision (registers per hourly sketch = 2^p).
    pub hll_precision: u8,
    /// Distinct recipients per 24 h counted exactly before the sketches take over.
    pub exact_recipients_max: u32,
    /// Bytes of the past-recipient filter, power of two.
    pub past_filter_bytes: u32,
    /// Most messages to one recipient per window.
    pub same_recipient_max: u32,
    /// Same-recipient window, ms.
    pub same_recipient_window_ms: u32,
    /// Slots of the same-recipient table, power of two (8 bytes each).
    pub same_recipient_table_entries: Option<u32>,
    /// Before issue 14: counters per row of the same-recipient count-min sketch. Still
    /// read, as `same_recipient_table_entries = width / 2` (the same bytes), so that an
    /// operator's profile keeps loading; giving both is an error.
    pub same_recipient_sketch_width: Option<u32>,
    /// Fewest distinct recipients per second that can be a surge.
    pub surge_distinct_per_sec_min: u32,
    /// A surge is this many times the business's own baseline.
    pub surge_baseline_factor: u32,
    /// Least percentage of never-contacted recipients in a surge.
    pub surge_new_share_pct: u32,
    /// EWMA weight of the latest minute in the baseline, percent.
    pub baseline_alpha_pct: u32,
    /// Reports per million delivered from which the rating is yellow.
    pub rating_yellow_ppm: u32,
    /// Reports per million delivered from which the rating is red.
    pub rating_red_ppm: u32,
    /// Fewest reports before the rating can leave green.
    pub rating_reports_min: u32,
    /// Red pauses the business instead of lowering its tier.
    pub red_pauses: bool,
    /// Most recipient events in one cross-shard delta.
    pub delta_events_max: u32,
    /// Most integrity signals queued for polling.
    pub signals_max: u32,
}

/// A profile as written in TOML. Sections whose values need no conversion
/// (`[limits]`, `[quic]`, `[io]`, `[log]`) deserialize straight into the types a
/// [`Profile`] holds; a `Profile` itself only comes out of [`Profile::validate`], so its
/// sections have always been checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    /// `[server]`
    pub server: RawServer,
    /// `[limits]`
    pub limits: Limits,
    /// `[quic]`
    pub quic: Quic,
    /// `[io]`
    pub io: Io,
    /// `[log]`
    pub log: LogSettings,
    /// `[delivery]`
    pub delivery: crate::node::DeliveryConfig,
    /// `[detect]`
    pub detect: RawDetect,
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest frame body, bytes.
    pub frame_bytes_max: u32,
    /// Most messages in one SUBMIT.
    pub batch_messages_max: u32,
    /// Largest message payload, bytes.
    pub payload_bytes_max: u32,
    /// Most connections one shard holds.
    pub connections_per_shard_max: u32,
    /// Most connections one source IP address holds on a shard; further handshakes
    /// from it are refused.
    pub connections_per_address_max: u32,
    /// Most authenticated connections one credential holds on a shard; a HELLO beyond
    /// it closes its connection with `too_many_connections`.
    pub connections_per_business_max: u32,
    /// Most concurrent bidirectional streams a client may open per connection.
    pub streams_per_connection_max: u32,
    /// Most SUBMITs of one stream waiting for their ACK before the stream stops being read.
    pub batches_in_flight_per_stream_max: u32,
    /// Milliseconds a connection may take, after its handshake, to send a valid HELLO.
    pub hello_timeout_ms: u32,
    /// Most client message ids the idempotency table remembers, all shards together
    /// (about 35 bytes each when full; see [`crate::idempotency`]).
    pub idempotency_ids_max: u32,
}

impl Limits {
    /// The bounds the frame decoder enforces.
    pub fn wire(&self) -> WireLimits {
        WireLimits {
            frame_bytes_max: self.frame_bytes_max,
            batch_messages_max: self.batch_messages_max,
        }
    }
}

/// `[quic]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quic {
    /// Milliseconds without traffic before a connection is closed.
    pub idle_timeout_ms: u32,
    /// Flow-control window per stream, bytes.
    pub stream_receive_window_bytes: u32,
    /// Flow-control window per connection, bytes.
    pub connection_receive_window_bytes: u32,
    /// Bytes a connection may have in flight towards the peer.
    pub send_window_bytes: u32,
    /// UDP payload size used from the start, bytes (at least 1200).
    pub initial_mtu: u16,
    /// Largest UDP payload MTU discovery may try, bytes.
    pub mtu_upper_bound: u16,
    /// When a new connection must first prove its address with a Retry round trip.
    pub retry: crate::server::RetryMode,
    /// With `retry = "under_load"`: handshaking connections on a shard from which new
    /// ones are sent a Retry.
    pub retry_half_open_min: u32,
}

/// `[io]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Io {
    /// io_uring submission queue entries (power of two).
    pub ring_entries: u32,
    /// Provided receive buffers per shard (power of two).
    pub recv_buffers: u32,
    /// Bytes per receive buffer; 65536 lets GRO coalesce.
    pub recv_buffer_bytes: u32,
    /// sendmsg operations in flight per shard.
    pub send_slots: u32,
    /// SO_RCVBUF and SO_SNDBUF requested per socket, bytes.
    pub socket_buffer_bytes: u32,
    /// Coalesce received datagrams (UDP GRO).
    pub gro: bool,
    /// Send batches of datagrams in one call (UDP GSO).
    pub gso: bool,
    /// Pin each shard thread to its own CPU.
    pub pin_threads: bool,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// A segment rolls once it holds this many bytes.
    pub segment_bytes_max: u64,
    /// A segment rolls once it is this old, seconds.
    pub segment_age_max_secs: u64,
    /// Segments whose newest record is older than this are dropped with their keys, seconds.
    pub retention_secs: u64,
    /// Most records one fdatasync covers.
    pub group_commit_records_max: u32,
    /// Most record bytes one fdatasync covers.
    pub group_commit_bytes_max: u64,
}

/// A validated profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Listen address.
    pub listen: SocketAddr,
    /// Shards; 0 = one per CPU (resolved by the shell).
    pub shards: u32,
    /// Where `GET /metrics` is served (TCP); `None` when disabled.
    pub metrics_listen: Option<SocketAddr>,
    /// Ingest limits.
    pub limits: Limits,
    /// QUIC settings.
    pub quic: Quic,
    /// IO settings.
    pub io: Io,
    /// Log settings.
    pub log: LogSettings,
    /// Detector bounds and thresholds.
    pub detect: DetectConfig,
    /// Delivery bounds.
    pub delivery: crate::node::DeliveryConfig,
}

/// Environment variables whose name starts with this and holds `__` override profile keys.
pub const ENV_PREFIX: &str = "COURIER_";

/// One profile key set from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvOverride {
    /// The variable, e.g. `COURIER_SERVER__SHARDS`.
    pub var: String,
    /// The dotted key it set, e.g. `server.shards`.
    pub key: String,
    /// The value as written in the environment (profile values are not secret).
    pub value: String,
}

/// Applies `COURIER_<SECTION>__<KEY>=VALUE` variables of `env` to a parsed profile
/// document, before it is deserialized and validated.
///
/// The name after the prefix is split at its first `__`: the section and the key, both
/// upper-case in the name and lower-case in the profile (`COURIER_LOG__RETENTION_SECS`
/// sets `log.retention_secs`). The value is read as a TOML scalar (an integer such as
/// `4` or `1_048_576`, a float, `true`/`false`, a quoted string), else taken as a plain
/// string; it must have the type the key has in the built-in default profile. Variables
/// without `__` (`COURIER_LOG`, `COURIER_MASTER_KEY_FILE`, ...) are not overrides and are
/// ignored. Every variable that names no profile key, is not upper-case or holds a value
/// of the wrong type is an error; all of them are listed. Returns the overrides applied,
/// sorted by variable name.
///
/// Sans-IO: the caller passes the environment (`std::env::vars()` in the binary).
pub fn apply_env_overrides<I, K, V>(
    doc: &mut toml::Table,
    env: I,
) -> Result<Vec<EnvOverride>, ProfileError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let schema: toml::Table =
        toml::from_str(DEFAULT_PROFILE_TOML).expect("built-in default profile parses");
    let mut issues = Vec::new();
    let mut applied = Vec::new();
    for (name, value) in env {
        let (name, value) = (name.as_ref(), value.as_ref());
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let fail = |problem: String| EnvIssue {
            var: name.to_string(),
            problem,
        };
        let (section_lc, key_lc) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let dotted = format!("{section_lc}.{key_lc}");
        let expected = schema
            .get(&section_lc)
            .and_then(|s| s.as_table())
            .and_then(|t| t.get(&key_lc));
        let Some(expected) = expected else {
            let known = match schema.get(&section_lc).and_then(|s| s.as_table()) {
                Some(t) => format!(
                    "keys of [{section_lc}]: {}",
                    t.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
                None => format!(
                    "sections: {}",
                    schema.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            };
            issues.push(fail(format!(
                "names no profile key ({dotted}); the form is COURIER_<SECTION>__<KEY>, known {known}"
            )));
            continue;
        };
        if section != section.to_ascii_uppercase() || key != key.to_ascii_uppercase() {
            issues.push(fail(format!(
                "write it upper-case: {ENV_PREFIX}{}__{} (sets {dotted})",
                section.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            )));
            continue;
        }
        let parsed = match expected {
            // A string key takes the text as it is (an address needs no quotes).
            toml::Value::String(_) => toml::Value::String(value.to_string()),
            _ => scalar(value),
        };
        if parsed.type_str() != expected.type_str() {
            issues.push(fail(format!(
                "{dotted} takes {} {}, not {value:?}",
                article(expected.type_str()),
                expected.type_str()
            )));
            continue;
        }
        let table = doc
            .entry(section_lc)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(table) = table.as_table_mut() else {
            issues.push(fail(format!("the profile's {section} is not a section")));
            continue;
        };
        table.insert(key_lc, parsed);
        applied.push(EnvOverride {
            var: name.to_string(),
            key: dotted,
            value: value.to_string(),
        });
    }
    if !issues.is_empty() {
        issues.sort_by(|a, b| a.var.cmp(&b.var));
        return Err(ProfileError::Env(issues));
    }
    applied.sort_by(|a, b| a.var.cmp(&b.var));
    Ok(applied)
}

/// A value from the environment read as a TOML scalar, else as a plain string.
fn scalar(text: &str) -> toml::Value {
    let wrapped = format!("v = {text}");
    if let Ok(mut t) = toml::from_str::<toml::Table>(&wrapped) {
        if t.len() == 1 {
            if let Some(v) = t.remove("v") {
                if !matches!(v, toml::Value::Table(_) | toml::Value::Array(_)) {
                    return v;
                }
            }
        }
    }
    toml::Value::String(text.to_string())
}

fn article(type_name: &str) -> &'static str {
    if type_name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// The largest number of shards: connection IDs carry the shard index in one byte.
pub const SHARDS_MAX: u32 = 256;

struct Checker {
    issues: Vec<ProfileIssue>,
}

impl Checker {
    fn range<T: PartialOrd + std::fmt::Display + Copy>(&mut self, key: &str, v: T, lo: T, hi: T) {
        if v < lo || v > hi {
            self.fail(key, format!("{v} is outside {lo}..={hi}"));
        }
    }
    fn pow2(&mut self, key: &str, v: u32) {
        if !v.is_power_of_two() {
            self.fail(key, format!("{v} is not a power of two"));
        }
    }
    fn fail(&mut self, key: &str, problem: String) {
        self.issues.push(ProfileIssue {
            key: key.to_string(),
            problem,
        });
    }
}

/// `detect.same_recipient_table_entries`, or the older `same_recipient_sketch_width`
/// converted to the same bytes (a count-min sketch of width `w` held `4 w` bytes; the
/// table holds 8 per slot): an operator's profile from before issue 14 still loads.
/// Checked: a power of two in 32..=8192 (8 slots make one bucket; 32 is what the old
/// width's least value, 64, converts to; 8192 slots are 64 KiB, the whole per-business
/// bound).
fn same_recipient_table_entries(c: &mut Checker, d: &RawDetect) -> u32 {
    const KEY: &str = "detect.same_recipient_table_entries";
    let entries = match (
        d.same_recipient_table_entries,
        d.same_recipient_sketch_width,
    ) {
        (Some(_), Some(_)) => {
            c.fail(
                "detect.same_recipient_sketch_width",
                "give same_recipient_table_entries only (the width is its older form)".into(),
            );
            return 0;
        }
        (Some(n), None) => n,
        (None, Some(width)) => {
            // Its old bounds.
            c.range("detect.same_recipient_sketch_width", width, 64, 8192);
            c.pow2("detect.same_recipient_sketch_width", width);
            width / 2
        }
        (None, None) => {
            c.fail(KEY, "missing".into());
            return 0;
        }
    };
    c.range(KEY, entries, 32, 8192);
    c.pow2(KEY, entries);
    entries
}

impl Profile {
    /// The built-in default profile.
    pub fn default_profile() -> Profile {
        Profile::from_toml(DEFAULT_PROFILE_TOML).expect("built-in default profile is valid")
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Profile, ProfileError> {
        let raw: RawProfile =
            toml::from_str(text).map_err(|e| ProfileError::Parse(e.to_string()))?;
        Profile::validate(raw)
    }

    /// Parses TOML text, applies the `COURIER_<SECTION>__<KEY>` overrides found in `env`
    /// (see [`apply_env_overrides`]) and validates the result, so that a value from the
    /// environment meets exactly the checks a value from the file meets. A broken bound
    /// of an overridden key names the variable. Returns the overrides applied.
    pub fn from_toml_with_env<I, K, V>(
        text: &str,
        env: I,
    ) -> Result<(Profile, Vec<EnvOverride>), ProfileError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| ProfileError::Parse(e.to_string()))?;
        let applied = apply_env_overrides(&mut doc, env)?;
        let raw = RawProfile::deserialize(doc).map_err(|e| {
            // A value of the right TOML type can still miss its Rust type (300 for a u8);
            // the error names the key, and this names the variable that set it.
            let mut msg = e.to_string().trim_end().to_string();
            let named: Vec<String> = applied
                .iter()
                .filter(|o| msg.contains(&format!("`{}`", o.key)))
                .map(|o| format!("{} was set by {}={}", o.key, o.var, o.value))
                .collect();
            if !named.is_empty() {
                msg.push_str(&format!(" ({})", named.join("; ")));
            } else if !applied.is_empty() {
                let vars: Vec<&str> = applied.iter().map(|o| o.var.as_str()).collect();
                msg.push_str(&format!(" (environment overrides: {})", vars.join(", ")));
            }
            ProfileError::Parse(msg)
        })?;
        match Profile::validate(raw) {
            Ok(p) => Ok((p, applied)),
            Err(ProfileError::Invalid(mut issues)) => {
                for issue in &mut issues {
                    if let Some(o) = applied.iter().find(|o| o.key == issue.key) {
                        issue
                            .problem
                            .push_str(&format!(" (set by {}={})", o.var, o.value));
                    }
                }
                Err(ProfileError::Invalid(issues))
            }
            Err(e) => Err(e),
        }
    }

    /// Checks every bound; lists every broken key.
    pub fn validate(raw: RawProfile) -> Result<Profile, ProfileError> {
        let mut c = Checker { issues: Vec::new() };
        let listen = match raw.server.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                c.fail(
                    "server.listen",
                    format!("{:?} is not an IP:port address", raw.server.listen),
                );
                None
            }
        };
        c.range("server.shards", raw.server.shards, 0, SHARDS_MAX);
        // Any address that parses is allowed (an operator may expose it on purpose); the
        // default is loopback.
        let metrics_listen = match raw.server.metrics_listen.as_str() {
            "" => None,
            text => match text.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    c.fail(
                        "server.metrics_listen",
                        format!("{text:?} is not an IP:port address (\"\" disables metrics)"),
                    );
                    None
                }
            },
        };

        let l = &raw.limits;
        c.range("limits.frame_bytes_max", l.frame_bytes_max, 1024, 64 << 20);
        c.range("limits.batch_messages_max", l.batch_messages_max, 1, 65_536);
        c.range("limits.payload_bytes_max", l.payload_bytes_max, 1, 16 << 20);
        let one_message = (wire::BATCH_HEADER_BYTES
            + wire::MESSAGE_OVERHEAD_BYTES
            + wire::RECIPIENT_BYTES_MAX) as u64
            + u64::from(l.payload_bytes_max);
        if u64::from(l.frame_bytes_max) < one_message {
            c.fail(
                "limits.frame_bytes_max",
                format!(
                    "{} cannot hold one message of limits.payload_bytes_max ({} bytes needed)",
                    l.frame_bytes_max, one_message
                ),
            );
        }
        // An ACK for a full batch must fit in a frame the client accepts.
        let ack_bytes =
            (wire::BATCH_HEADER_BYTES + l.batch_messages_max as usize * wire::STATUS_BYTES) as u64;
        if u64::from(l.frame_bytes_max) < ack_bytes {
            c.fail(
                "limits.batch_messages_max",
                format!(
                    "an ACK of {} statuses ({ack_bytes} bytes) exceeds limits.frame_bytes_max",
                    l.batch_messages_max
                ),
            );
        }
        c.range(
            "limits.connections_per_shard_max",
            l.connections_per_shard_max,
            1,
            1 << 20,
        );
        c.range(
            "limits.connections_per_address_max",
            l.connections_per_address_max,
            1,
            1 << 20,
        );
        c.range(
            "limits.connections_per_business_max",
            l.connections_per_business_max,
            1,
            1 << 20,
        );
        c.range(
            "limits.streams_per_connection_max",
            l.streams_per_connection_max,
            1,
            1024,
        );
        c.range(
            "limits.batches_in_flight_per_stream_max",
            l.batches_in_flight_per_stream_max,
            1,
            1024,
        );
        c.range("limits.hello_timeout_ms", l.hello_timeout_ms, 10, 600_000);
        c.range(
            "limits.idempotency_ids_max",
            l.idempotency_ids_max,
            crate::idempotency::ENTRIES_MIN as u32,
            crate::idempotency::ENTRIES_MAX as u32,
        );

        let q = &raw.quic;
        c.range("quic.idle_timeout_ms", q.idle_timeout_ms, 100, 3_600_000);
        c.range(
            "quic.retry_half_open_min",
            q.retry_half_open_min,
            1,
            1 << 20,
        );
        c.range(
            "quic.stream_receive_window_bytes",
            q.stream_receive_window_bytes,
            16 << 10,
            1 << 30,
        );
        c.range(
            "quic.connection_receive_window_bytes",
            q.connection_receive_window_bytes,
            16 << 10,
            1 << 30,
        );
        if q.connection_receive_window_bytes < q.stream_receive_window_bytes {
            c.fail(
                "quic.connection_receive_window_bytes",
                "must be at least quic.stream_receive_window_bytes".into(),
            );
        }
        c.range(
            "quic.send_window_bytes",
            q.send_window_bytes,
            16 << 10,
            1 << 30,
        );
        c.range("quic.initial_mtu", q.initial_mtu, 1200, 65_527);
        c.range("quic.mtu_upper_bound", q.mtu_upper_bound, 1200, 65_527);
        if q.mtu_upper_bound < q.initial_mtu {
            c.fail(
                "quic.mtu_upper_bound",
                "must be at least quic.initial_mtu".into(),
            );
        }

        let io = &raw.io;
        c.range("io.ring_entries", io.ring_entries, 64, 32_768);
        c.pow2("io.ring_entries", io.ring_entries);
        c.range("io.recv_buffers", io.recv_buffers, 4, 32_768);
        c.pow2("io.recv_buffers", io.recv_buffers);
        c.range("io.recv_buffer_bytes", io.recv_buffer_bytes, 2048, 1 << 20);
        if io.recv_buffer_bytes < u32::from(q.mtu_upper_bound) + 512 {
            c.fail(
                "io.recv_buffer_bytes",
                "must hold one datagram of quic.mtu_upper_bound plus 512 bytes of headers".into(),
            );
        }
        c.range("io.send_slots", io.send_slots, 1, 4096);
        if io.send_slots >= io.ring_entries {
            c.fail(
                "io.send_slots",
                "must be below io.ring_entries so receives always find room".into(),
            );
        }
        c.range(
            "io.socket_buffer_bytes",
            io.socket_buffer_bytes,
            64 << 10,
            1 << 30,
        );

        let lg = &raw.log;
        // A record of the largest payload, sealed, with its frame.
        let record_bytes_max = crate::log::format::RECORD_OVERHEAD_BYTES_MAX as u64
            + u64::from(l.payload_bytes_max)
            + u64::from(crate::log::policy::SEAL_OVERHEAD_BYTES_MAX);
        c.range(
            "log.segment_bytes_max",
            lg.segment_bytes_max,
            1 << 20,
            4 << 30,
        );
        if lg.segment_bytes_max < 2 * record_bytes_max {
            c.fail(
                "log.segment_bytes_max",
                format!(
                    "{} cannot hold two records of limits.payload_bytes_max ({record_bytes_max} bytes each)",
                    lg.segment_bytes_max
                ),
            );
        }
        c.range(
            "log.retention_secs",
            lg.retention_secs,
            60,
            10 * 366 * 86_400,
        );
        c.range(
            "log.segment_age_max_secs",
            lg.segment_age_max_secs,
            1,
            lg.retention_secs.max(1),
        );
        c.range(
            "log.group_commit_records_max",
            lg.group_commit_records_max,
            1,
            1 << 20,
        );
        if lg.group_commit_records_max < l.batch_messages_max {
            c.fail(
                "log.group_commit_records_max",
                format!(
                    "{} is below limits.batch_messages_max ({}): one SUBMIT must fit in a group commit",
                    lg.group_commit_records_max, l.batch_messages_max
                ),
            );
        }
        c.range(
            "log.group_commit_bytes_max",
            lg.group_commit_bytes_max,
            64 << 10,
            1 << 30,
        );
        // A full SUBMIT as records: its frame bytes plus the log's per-record overhead.
        let batch_log_bytes = u64::from(l.frame_bytes_max)
            + u64::from(l.batch_messages_max)
                * (crate::log::format::RECORD_OVERHEAD_BYTES as u64
                    + u64::from(crate::log::policy::SEAL_OVERHEAD_BYTES_MAX));
        if lg.group_commit_bytes_max < batch_log_bytes {
            c.fail(
                "log.group_commit_bytes_max",
                format!(
                    "{} cannot hold one full SUBMIT as log records ({batch_log_bytes} bytes)",
                    lg.group_commit_bytes_max
                ),
            );
        }

        let d = &raw.detect;
        c.range("detect.businesses_max", d.businesses_max, 1, 1 << 20);
        c.range(
            "detect.business_state_bytes_max",
            d.business_state_bytes_max,
            4096,
            BUSINESS_STATE_BYTES_LIMIT as u32,
        );
        c.range("detect.hll_precision", d.hll_precision, 8, 12);
        c.range(
            "detect.exact_recipients_max",
            d.exact_recipients_max,
            16,
            8192,
        );
        c.range("detect.past_filter_bytes", d.past_filter_bytes, 1024, 32768);
        c.pow2("detect.past_filter_bytes", d.past_filter_bytes);
        c.range("detect.same_recipient_max", d.same_recipient_max, 1, 250);
        c.range(
            "detect.same_recipient_window_ms",
            d.same_recipient_window_ms,
            100,
            3_600_000,
        );
        let same_recipient_table_entries = same_recipient_table_entries(&mut c, d);
        c.range(
            "detect.surge_distinct_per_sec_min",
            d.surge_distinct_per_sec_min,
            1,
            1_000_000,
        );
        c.range(
            "detect.surge_baseline_factor",
            d.surge_baseline_factor,
            1,
            1000,
        );
        c.range("detect.surge_new_share_pct", d.surge_new_share_pct, 0, 100);
        c.range("detect.baseline_alpha_pct", d.baseline_alpha_pct, 1, 100);
        c.range(
            "detect.rating_yellow_ppm",
            d.rating_yellow_ppm,
            1,
            1_000_000,
        );
        c.range("detect.rating_red_ppm", d.rating_red_ppm, 1, 1_000_000);
        if d.rating_red_ppm <= d.rating_yellow_ppm {
            c.fail(
                "detect.rating_red_ppm",
                "must be above detect.rating_yellow_ppm".into(),
            );
        }
        c.range(
            "detect.rating_reports_min",
            d.rating_reports_min,
            1,
            1_000_000,
        );
        c.range("detect.delta_events_max", d.delta_events_max, 1, 1 << 24);
        c.range("detect.signals_max", d.signals_max, 1, 1 << 20);
        let detect = DetectConfig {
            businesses_max: d.businesses_max,
            hll_precision: d.hll_precision,
            exact_recipients_max: d.exact_recipients_max,
            past_filter_bytes: d.past_filter_bytes,
            same_recipient_max: d.same_recipient_max,
            same_recipient_window_ms: d.same_recipient_window_ms,
            same_recipient_table_entries,
            surge_distinct_per_sec_min: d.surge_distinct_per_sec_min,
            surge_baseline_factor: d.surge_baseline_factor,
            surge_new_share_pct: d.surge_new_share_pct,
            baseline_alpha_pct: d.baseline_alpha_pct,
            rating_yellow_ppm: d.rating_yellow_ppm,
            rating_red_ppm: d.rating_red_ppm,
            rating_reports_min: d.rating_reports_min,
            red_pauses: d.red_pauses,
            delta_events_max: d.delta_events_max,
            signals_max: d.signals_max,
        };
        if (8..=12).contains(&d.hll_precision)
            && d.past_filter_bytes.is_power_of_two()
            && same_recipient_table_entries.is_power_of_two()
            && same_recipient_table_entries >= 8
        {
            let need = detect.business_state_bytes_max();
            if need > d.business_state_bytes_max as usize {
                c.fail(
                    "detect.business_state_bytes_max",
                    format!(
                        "{} is below the {need} bytes that hll_precision, \
                         exact_recipients_max, past_filter_bytes and \
                         same_recipient_table_entries need per business",
                        d.business_state_bytes_max
                    ),
                );
            }
        }

        c.issues.extend(raw.delivery.issues());
        let mut delivery = raw.delivery;
        delivery.clamp_to_retention(raw.log.retention_secs);

        if !c.issues.is_empty() {
            return Err(ProfileError::Invalid(c.issues));
        }
        Ok(Profile {
            listen: listen.expect("checked above"),
            shards: raw.server.shards,
            metrics_listen,
            limits: raw.limits,
            quic: raw.quic,
            io: raw.io,
            log: raw.log,
            detect,
            delivery,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_is_valid() {
        let p = Profile::default_profile();
        assert!(p.limits.frame_bytes_max >= p.limits.payload_bytes_max);
    }

    #[test]
    fn unknown_key_is_refused() {
        let text = DEFAULT_PROFILE_TOML.replace("[limits]", "[limits]\nframe_bytes_mx = 5");
        match Profile::from_toml(&text) {
            Err(ProfileError::Parse(e)) => assert!(e.contains("frame_bytes_mx"), "{e}"),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn every_broken_key_is_named() {
        let text = DEFAULT_PROFILE_TOML
            .replace("ring_entries = 1024", "ring_entries = 1000")
            .replace("listen = \"127.0.0.1:7443\"", "listen = \"nowhere\"");
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&text) else {
            panic!("expected invalid");
        };
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert!(keys.contains(&"io.ring_entries"), "{keys:?}");
        assert!(keys.contains(&"server.listen"), "{keys:?}");
    }

    #[test]
    fn metrics_listen_parses_or_is_disabled() {
        let p = Profile::default_profile();
        assert_eq!(p.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        let off = DEFAULT_PROFILE_TOML.replace(
            "metrics_listen = \"127.0.0.1:9464\"",
            "metrics_listen = \"\"",
        );
        assert_eq!(Profile::from_toml(&off).unwrap().metrics_listen, None);
        let bad = DEFAULT_PROFILE_TOML.replace(
            "metrics_listen = \"127.0.0.1:9464\"",
            "metrics_listen = \"localhost\"",
        );
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&bad) else {
            panic!("expected invalid");
        };
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "server.metrics_listen");
        assert!(issues[0].problem.contains("localhost"), "{issues:?}");
    }

    #[test]
    fn log_keys_are_validated_by_name() {
        let text = DEFAULT_PROFILE_TOML
            .replace(
                "segment_age_max_secs = 86400",
                "segment_age_max_secs = 9999999",
            )
            .replace(
                "group_commit_records_max = 4096",
                "group_commit_records_max = 2",
            );
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&text) else {
            panic!("expected invalid");
        };
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert!(keys.contains(&"log.segment_age_max_secs"), "{keys:?}");
        assert!(keys.contains(&"log.group_commit_records_max"), "{keys:?}");
        let p = Profile::default_profile();
        assert_eq!(p.log.retention_secs, 30 * 86_400);
        assert_eq!(p.log.segment_age_max_secs, p.log.retention_secs / 30);
    }

    #[test]
    fn detect_state_over_budget_names_the_key() {
        let text = DEFAULT_PROFILE_TOML.replace("hll_precision = 11", "hll_precision = 12");
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&text) else {
            panic!("expected invalid");
        };
        assert!(
            issues
                .iter()
                .any(|i| i.key == "detect.business_state_bytes_max"),
            "{issues:?}"
        );
    }

    /// Issue 14 replaced the same-recipient count-min sketch with a table: a profile
    /// written before still loads (the width as the same bytes of table), one that gives
    /// both keys does not.
    #[test]
    fn the_old_same_recipient_sketch_width_still_loads() {
        let old = DEFAULT_PROFILE_TOML.replace(
            "same_recipient_table_entries = 512",
            "same_recipient_sketch_width = 1024",
        );
        assert_ne!(old, DEFAULT_PROFILE_TOML);
        let p = Profile::from_toml(&old).unwrap();
        assert_eq!(p.detect.same_recipient_table_entries, 512);
        assert_eq!(p.detect, Profile::default_profile().detect);
        let both = DEFAULT_PROFILE_TOML.replace(
            "same_recipient_table_entries = 512",
            "same_recipient_table_entries = 512\nsame_recipient_sketch_width = 1024",
        );
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&both) else {
            panic!("expected invalid");
        };
        assert!(
            issues
                .iter()
                .any(|i| i.key == "detect.same_recipient_sketch_width"),
            "{issues:?}"
        );
        let odd = DEFAULT_PROFILE_TOML.replace(
            "same_recipient_table_entries = 512",
            "same_recipient_table_entries = 500",
        );
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&odd) else {
            panic!("expected invalid");
        };
        assert!(
            issues
                .iter()
                .any(|i| i.key == "detect.same_recipient_table_entries"),
            "{issues:?}"
        );
    }

    #[test]
    fn default_detect_section_matches_the_code_defaults() {
        let p = Profile::default_profile();
        assert_eq!(p.detect, DetectConfig::default());
    }
}
