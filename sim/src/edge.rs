//! The simulated delivery edge's devices: who is online, what each DELIVER's outcome is,
//! which users reply. Every draw comes from the edge's own seeded RNG, so a run replays.
//!
//! ```text
//!  DELIVER (message, recipient) ──> a copy already delivered? ──> delivered again
//!     recipient not on the platform (a fixed share of numbers) ──> failed(not_on_platform)
//!     recipient offline ──> retry_later; at its online time ──> ONLINE(recipient)
//!     else ──> delivered (and read, a share of them); a share of users reply ──> INBOUND
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_pipeline::wire::delivery::{Deliver, FailReason, Outcome, OutcomeEntry};
use courier_pipeline::wire::{LogPosition, Recipient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the simulated devices behave.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgePlan {
    /// Share of recipients offline when first reached.
    pub offline_share: f64,
    /// How long an offline recipient stays offline, at most (uniform).
    pub offline_max: Duration,
    /// Share of numbers that have no account on the platform (their messages fail).
    pub not_on_platform_share: f64,
    /// Share of delivered messages also read.
    pub read_share: f64,
    /// Share of delivered messages whose recipient replies.
    pub reply_share: f64,
    /// DELIVERs the edge takes ahead (its credit window).
    pub credit: u32,
}

impl Default for EdgePlan {
    fn default() -> EdgePlan {
        EdgePlan {
            offline_share: 0.2,
            offline_max: Duration::from_secs(3),
            not_on_platform_share: 0.05,
            read_share: 0.3,
            reply_share: 0.1,
            credit: 256,
        }
    }
}

/// One user's reply, as the edge will hand it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The business replied to.
    pub business_id: u32,
    /// The user.
    pub sender: Recipient,
    /// The content.
    pub payload: Bytes,
}

/// The payload of the reply to message `message` (a function of it, so checks can
/// recompute it).
pub fn reply_payload(message: LogPosition) -> Bytes {
    Bytes::from(format!("reply to {:x}", message.0))
}

/// What the edge did, for the oracle.
#[derive(Debug, Default, Clone)]
pub struct EdgeLedger {
    /// Every DELIVER received (copies counted).
    pub delivers: u64,
    /// Copies of a DELIVER already answered.
    pub copies: u64,
    /// The DELIVERs received, by message: business, client id, recipient, payload.
    pub messages: BTreeMap<LogPosition, Deliver>,
    /// Final outcomes reported, by message.
    pub finals: BTreeMap<LogPosition, Outcome>,
    /// Replies the relay accepted: at which event position.
    pub replies_accepted: BTreeMap<LogPosition, Reply>,
    /// Replies answered otherwise (rejected), kept for the report.
    pub replies_refused: u64,
}

/// The devices and their users.
#[derive(Debug)]
pub struct Devices {
    plan: EdgePlan,
    rng: StdRng,
    /// Offline recipients and when they come online.
    offline_until: BTreeMap<Recipient, Instant>,
    /// Recipients seen (their online state was drawn).
    seen: BTreeSet<Recipient>,
    /// Outcomes to report, in order.
    pub outcomes: Vec<OutcomeEntry>,
    /// Recipients that came online, to announce.
    pub online: Vec<Recipient>,
    /// Replies to hand over.
    pub replies: VecDeque<Reply>,
    /// What the edge did.
    pub ledger: EdgeLedger,
}

impl Devices {
    /// Devices behaving by `plan`, drawing from `seed`.
    pub fn new(plan: EdgePlan, seed: u64) -> Devices {
        Devices {
            plan,
            rng: StdRng::seed_from_u64(seed),
            offline_until: BTreeMap::new(),
            seen: BTreeSet::new(),
            outcomes: Vec::new(),
            online: Vec::new(),
            replies: VecDeque::new(),
            ledger: EdgeLedger::default(),
        }
    }

    /// The plan.
    pub fn plan(&self) -> &EdgePlan {
        &self.plan
    }

    /// Whether the number has an account (a fixed function of the number).
    fn on_platform(&self, r: &Recipient) -> bool {
        let h = r.as_bytes().iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        (h % 10_000) as f64 >= self.plan.not_on_platform_share * 10_000.0
    }

    /// A DELIVER arrived at `now`.
    pub fn deliver(&mut self, now: Instant, d: Deliver) {
        self.ledger.delivers += 1;
        let m = d.message;
        if let Some(&o) = self.ledger.finals.get(&m) {
            self.ledger.copies += 1;
            // A copy (the relay did not hear the outcome): say it again.
            let again = if o == Outcome::Read {
                Outcome::Delivered
            } else {
                o
            };
            self.outcomes.push(OutcomeEntry {
                message: m,
                outcome: again,
            });
            return;
        }
        let r = d.recipient;
        if self.seen.insert(r) && self.rng.random_bool(self.plan.offline_share) {
            let max = self.plan.offline_max.as_micros() as u64;
            let until = now + Duration::from_micros(self.rng.random_range(0..=max));
            self.offline_until.insert(r, until);
        }
        self.ledger.messages.insert(m, d.clone());
        let outcome = if !self.on_platform(&r) {
            Outcome::Failed(FailReason::NotOnPlatform)
        } else if self.offline_until.contains_key(&r) {
            Outcome::RetryLater
        } else {
            Outcome::Delivered
        };
        if outcome != Outcome::RetryLater {
            self.ledger.finals.insert(m, outcome);
        }
        self.outcomes.push(OutcomeEntry {
            message: m,
            outcome,
        });
        if outcome == Outcome::Delivered {
            if self.rng.random_bool(self.plan.read_share) {
                self.ledger.finals.insert(m, Outcome::Read);
                self.outcomes.push(OutcomeEntry {
                    message: m,
                    outcome: Outcome::Read,
                });
            }
            if self.rng.random_bool(self.plan.reply_share) {
                self.replies.push_back(Reply {
                    business_id: d.business_id,
                    sender: r,
                    payload: reply_payload(m),
                });
            }
        }
    }

    /// Recipients whose offline time is over by `now` come online.
    pub fn tick(&mut self, now: Instant) {
        let due: Vec<Recipient> = self
            .offline_until
            .iter()
            .filter(|(_, &t)| t <= now)
            .map(|(&r, _)| r)
            .collect();
        for r in due {
            self.offline_until.remove(&r);
            self.online.push(r);
        }
    }

    /// When the next recipient comes online.
    pub fn next_online(&self) -> Option<Instant> {
        self.offline_until.values().min().copied()
    }
}
