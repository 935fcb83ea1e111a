//! Scenarios: who sends what, when, at which rate, described in TOML.
//!
//! ```toml
//! duration_secs = 10          # the run's length; every sender stops by then
//! [[sender]]
//! name = "shop"               # shown in the report
//! label = "normal"            # or "abusive": what the detector should conclude
//! business = 0                # index into the --token list (or token = "...")
//! rate = 2000                 # messages per second (per sender, over its connections);
//!                             #   0: closed loop at full speed
//! pattern = "constant"        # or "ramp" (from ramp_from to rate between start and stop)
//! start_secs = 0.0            # offsets from the run's start; for an abusive sender
//! stop_secs = 10.0            #   start_secs is its onset
//! connections = 1
//! batch = 32
//! size = 1024                 # or { min = 100, max = 2000 } or [[100, 3], [4000, 1]]
//! recipients = { kind = "uniform", population = 100000 }   # or zipf (s), or new
//! reports_per_sec = 0         # REPORT frames (spam reports) sent on a stream of their own
//! retry_rounds = 0            # resend throttled messages after their retry-after, up to
//!                             #   this many rounds in all (as `courier send --attempts`);
//!                             #   0: never (a throttled answer counts as flagged)
//! ```
//!
//! A raw, `deny_unknown_fields` TOML form is validated once into a [`Plan`] with every
//! bound checked and every error naming the sender and the key (STYLE.md's two steps).

use serde::Deserialize;

use crate::traffic::{RecipientSpec, SizeSpec, SENDERS_MAX};

/// Most connections of one sender.
pub const SENDER_CONNECTIONS_MAX: usize = 1024;
/// Highest rate of one sender, messages per second.
pub const SENDER_RATE_MAX: f64 = 10_000_000.0;
/// Longest run.
pub const DURATION_SECS_MAX: f64 = 24.0 * 3600.0;

/// What the detector should conclude about a sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// Well-behaved: any rejected or throttled answer is a false positive.
    Normal,
    /// Abusive from `start_secs` on: it should be rejected or throttled.
    Abusive,
}

/// How a sender's rate evolves between its start and stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// `rate` throughout.
    #[default]
    Constant,
    /// Linear from `ramp_from` to `rate`.
    Ramp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    duration_secs: f64,
    #[serde(rename = "sender")]
    senders: Vec<RawSender>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSender {
    name: Option<String>,
    label: Label,
    business: Option<usize>,
    token: Option<String>,
    rate: f64,
    #[serde(default)]
    pattern: Pattern,
    ramp_from: Option<f64>,
    #[serde(default)]
    start_secs: f64,
    stop_secs: Option<f64>,
    connections: Option<usize>,
    batch: Option<usize>,
    size: Option<SizeSpec>,
    recipients: Option<RecipientSpec>,
    #[serde(default)]
    reports_per_sec: f64,
    #[serde(default)]
    retry_rounds: u32,
}

/// Where a sender's token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The n-th token given on the command line (`--token`, repeated or comma separated).
    Index(usize),
    /// Written in the scenario.
    Literal(String),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Index(i) => write!(f, "Index({i})"),
            TokenSource::Literal(t) => write!(f, "Literal(<{} bytes redacted>)", t.len()),
        }
    }
}

/// One simulated sender, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SenderPlan {
    /// Shown in the report.
    pub name: String,
    /// What the detector should conclude.
    pub label: Label,
    /// Its token.
    pub token: TokenSource,
    /// Messages per second at `stop_secs` (and throughout for a constant pattern); 0
    /// means closed loop at full speed.
    pub rate: f64,
    /// Messages per second at `start_secs`.
    pub rate_from: f64,
    /// Onset, seconds after the run's start.
    pub start_secs: f64,
    /// Stop, seconds after the run's start.
    pub stop_secs: f64,
    /// Connections, each with its own client.
    pub connections: usize,
    /// Most messages per batch.
    pub batch: usize,
    /// Payload sizes.
    pub size: SizeSpec,
    /// Recipients.
    pub recipients: RecipientSpec,
    /// REPORT frames per second (one entry each), sent on a stream of their own.
    pub reports_per_sec: f64,
    /// Rounds in all for a batch whose messages come back throttled: each resend after
    /// the round's largest retry-after, as `Client::submit_with_retry` (issue 14's
    /// retrying senders). 0 or 1: sent once.
    pub retry_rounds: u32,
}

/// Most rounds `retry_rounds` may ask for.
pub const RETRY_ROUNDS_MAX: u32 = 100;

/// A validated run: its senders and its length.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The run's length.
    pub duration_secs: f64,
    /// Who sends.
    pub senders: Vec<SenderPlan>,
}

/// Defaults for what a scenario leaves out, from the command line.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Connections per sender.
    pub connections: usize,
    /// Messages per batch.
    pub batch: usize,
    /// Payload sizes.
    pub size: SizeSpec,
    /// Recipients.
    pub recipients: RecipientSpec,
}

impl Plan {
    /// Parses and validates a scenario; errors name the sender and key.
    pub fn from_toml(text: &str, d: &Defaults) -> Result<Plan, String> {
        let raw: RawScenario = toml::from_str(text).map_err(|e| e.to_string())?;
        if !(raw.duration_secs > 0.0 && raw.duration_secs <= DURATION_SECS_MAX) {
            return Err(format!("duration_secs must be in (0, {DURATION_SECS_MAX}]"));
        }
        if raw.senders.is_empty() || raw.senders.len() > SENDERS_MAX {
            return Err(format!(
                "a scenario needs 1..={SENDERS_MAX} [[sender]] tables"
            ));
        }
        let mut senders = Vec::new();
        for (i, s) in raw.senders.into_iter().enumerate() {
            let name = s.name.clone().unwrap_or_else(|| format!("sender-{i}"));
            let err = |m: String| format!("sender {i} ({name}): {m}");
            let token = match (s.business, s.token) {
                (Some(_), Some(_)) => return Err(err("give business or token, not both".into())),
                (None, Some(t)) => TokenSource::Literal(t),
                (b, None) => TokenSource::Index(b.unwrap_or(0)),
            };
            let stop_secs = s
                .stop_secs
                .unwrap_or(raw.duration_secs)
                .min(raw.duration_secs);
            let rate_from = match s.pattern {
                Pattern::Constant => s.rate,
                Pattern::Ramp => s.ramp_from.unwrap_or(0.0),
            };
            if s.pattern == Pattern::Constant && s.ramp_from.is_some() {
                return Err(err("ramp_from needs pattern = \"ramp\"".into()));
            }
            let plan = SenderPlan {
                name: name.clone(),
                label: s.label,
                token,
                rate: s.rate,
                rate_from,
                start_secs: s.start_secs,
                stop_secs,
                connections: s.connections.unwrap_or(d.connections),
                batch: s.batch.unwrap_or(d.batch),
                size: s.size.unwrap_or_else(|| d.size.clone()),
                recipients: s.recipients.unwrap_or_else(|| d.recipients.clone()),
                reports_per_sec: s.reports_per_sec,
                retry_rounds: s.retry_rounds,
            };
            plan.check().map_err(err)?;
            senders.push(plan);
        }
        Ok(Plan {
            duration_secs: raw.duration_secs,
            senders,
        })
    }

    /// Multiplies every time by `time` and every rate by `rate` (for short test runs).
    pub fn scaled(mut self, time: f64, rate: f64) -> Plan {
        self.duration_secs *= time;
        for s in &mut self.senders {
            s.start_secs *= time;
            s.stop_secs *= time;
            s.rate *= rate;
            s.rate_from *= rate;
            s.reports_per_sec *= rate;
        }
        self
    }

    /// Replaces the length (senders stop by then at the latest).
    pub fn with_duration(mut self, secs: f64) -> Plan {
        self.duration_secs = secs;
        for s in &mut self.senders {
            s.stop_secs = s.stop_secs.min(secs);
        }
        self
    }

    /// Checks the whole plan.
    pub fn check(&self) -> Result<(), String> {
        if !(self.duration_secs > 0.0 && self.duration_secs <= DURATION_SECS_MAX) {
            return Err(format!("duration must be in (0, {DURATION_SECS_MAX}] s"));
        }
        if self.senders.is_empty() || self.senders.len() > SENDERS_MAX {
            return Err(format!("1..={SENDERS_MAX} senders"));
        }
        for (i, s) in self.senders.iter().enumerate() {
            s.check()
                .map_err(|m| format!("sender {i} ({}): {m}", s.name))?;
        }
        Ok(())
    }
}

impl SenderPlan {
    /// Checks one sender's bounds.
    pub fn check(&self) -> Result<(), String> {
        let rate_ok = |r: f64| r.is_finite() && (0.0..=SENDER_RATE_MAX).contains(&r);
        if !rate_ok(self.rate) || !rate_ok(self.rate_from) || !rate_ok(self.reports_per_sec) {
            return Err(format!("rates must be in 0..={SENDER_RATE_MAX}"));
        }
        if !(self.start_secs >= 0.0 && self.start_secs <= self.stop_secs) {
            return Err("start_secs must be in 0..=stop_secs".into());
        }
        if self.connections == 0 || self.connections > SENDER_CONNECTIONS_MAX {
            return Err(format!(
                "connections must be in 1..={SENDER_CONNECTIONS_MAX}"
            ));
        }
        if self.batch == 0 {
            return Err("batch must be at least 1".into());
        }
        if self.retry_rounds > RETRY_ROUNDS_MAX {
            return Err(format!("retry_rounds must be in 0..={RETRY_ROUNDS_MAX}"));
        }
        self.size.check()?;
        self.recipients.check()
    }

    /// Whether the sender runs closed loop at full speed.
    pub fn closed_loop(&self) -> bool {
        self.rate == 0.0 && self.rate_from == 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            connections: 1,
            batch: 16,
            size: SizeSpec::Fixed(100),
            recipients: RecipientSpec::Uniform { population: 1000 },
        }
    }

    #[test]
    fn a_scenario_parses_with_defaults_and_scales() {
        let p = Plan::from_toml(
            r#"
            duration_secs = 10
            [[sender]]
            label = "normal"
            rate = 100
            [[sender]]
            name = "spammer"
            label = "abusive"
            business = 1
            rate = 1000
            pattern = "ramp"
            start_secs = 2
            size = { min = 10, max = 20 }
            recipients = { kind = "zipf", s = 1.1, population = 50 }
            "#,
            &defaults(),
        )
        .unwrap();
        assert_eq!(p.senders.len(), 2);
        assert_eq!(p.senders[0].token, TokenSource::Index(0));
        assert_eq!((p.senders[0].batch, p.senders[0].stop_secs), (16, 10.0));
        let s = &p.senders[1];
        assert_eq!(
            (s.label, s.rate_from, s.start_secs),
            (Label::Abusive, 0.0, 2.0)
        );
        let p = p.scaled(0.1, 2.0);
        assert_eq!(p.duration_secs, 1.0);
        assert_eq!((p.senders[1].start_secs, p.senders[1].rate), (0.2, 2000.0));
    }

    #[test]
    fn scenario_errors_name_the_sender_and_key() {
        let e = Plan::from_toml(
            "duration_secs = 1\n[[sender]]\nlabel = \"normal\"\nrate = 1\nconections = 2\n",
            &defaults(),
        )
        .unwrap_err();
        assert!(e.contains("conections"), "{e}");
        let e = Plan::from_toml(
            "duration_secs = 1\n[[sender]]\nname = \"x\"\nlabel = \"normal\"\nrate = 1\nconnections = 0\n",
            &defaults(),
        )
        .unwrap_err();
        assert!(
            e.contains("sender 0 (x)") && e.contains("connections"),
            "{e}"
        );
    }
}
