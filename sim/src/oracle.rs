//! The invariants of the whole path, checked against what the clients were told and what
//! the disks hold. [`Oracle::check`] runs after every recovery and at the end of a run;
//! a violation names the seed, the step and what broke, and is returned, not panicked, so
//! a test can also assert that a planted bug is caught.
//!
//! What it checks:
//! - every message answered `accepted` (or `duplicate`) is in the log at that position
//!   after any crash and recovery: same business, client id and recipient, and its sealed
//!   payload opens, with the recipient's key, to what the client sent;
//! - no log position is given to two messages, and no message is stored twice (a resend,
//!   across restarts included, answers `duplicate` at the first position);
//! - no (recipient key, nonce) pair repeats over every record ever read, across restarts;
//! - every batch a client sent is answered, or its connection closed (at the end);
//! - delivery (at the end): every message a business with events has stored has exactly
//!   one final status (delivered, failed, expired), heard in order (`sent` before it,
//!   `read` only after `delivered`, no status twice); every DELIVER the edge took is a
//!   message the log holds, as stored; every reply the relay accepted from the edge
//!   reached its business, as sent, exactly once, and no other business;
//! - the detector's model: an exempt business never hears a detection verdict; a
//!   business's stored messages per second stay within its rate (one second of burst on
//!   top) within one run of the node (a restart restores the detector from its last
//!   checkpoint, so its buckets may be fuller than they were at the crash), and its
//!   distinct recipients within its tier.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use courier_pipeline::log::{OwnedRecord, RecordKind};
use courier_pipeline::seal::keys::RecipientKey;
use courier_pipeline::seal::{open, RecipientKeys, SEAL_NONCE_BYTES};
use courier_pipeline::wire::delivery::StatusKind;
use courier_pipeline::wire::{LogPosition, Reason};
use courier_pipeline::ShardId;

use crate::client::{message_id, payload_for, recipient_for, Outcome, Phase};
use crate::storage::read_all;
use crate::world::Sim;

/// An invariant that broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The run's seed.
    pub seed: u64,
    /// The step at which it was found.
    pub step: u64,
    /// What broke (ids and positions only).
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} (replay with COURIER_SIM_SEED={}), step {}: {}",
            self.seed, self.seed, self.step, self.what
        )
    }
}

/// What the oracle remembers between checks.
#[derive(Debug, Default)]
pub struct Oracle {
    /// (business, recipient, nonce) of every sealed record read so far → its position.
    nonces: BTreeMap<(u32, Vec<u8>, [u8; SEAL_NONCE_BYTES]), LogPosition>,
    /// Records checked so far (for reports).
    pub records_checked: u64,
    /// Checks run.
    pub checks: u64,
}

/// One record read back, with its position.
struct Stored {
    position: LogPosition,
    record: OwnedRecord,
}

impl Oracle {
    /// Checks the durable invariants against every disk (the node may be up or down).
    pub fn check(&mut self, sim: &Sim) -> Result<(), Violation> {
        self.checks += 1;
        let fail = |what: String| Violation {
            seed: sim.config().seed,
            step: sim.stats().steps,
            what,
        };
        let stored = read_disks(sim).map_err(&fail)?;
        self.records_checked = stored.len() as u64;
        check_stored_once(&stored).map_err(&fail)?;
        self.check_nonces(&stored).map_err(&fail)?;
        check_answers(sim, &stored).map_err(&fail)?;
        check_detector_model(sim, &stored).map_err(&fail)
    }

    /// [`Oracle::check`], and what only holds once the clients settled: every batch
    /// answered or its connection closed.
    pub fn check_end(&mut self, sim: &Sim) -> Result<(), Violation> {
        self.check(sim)?;
        let stored = read_disks(sim).expect("read just now");
        check_delivery(sim, &stored).map_err(|what| Violation {
            seed: sim.config().seed,
            step: sim.stats().steps,
            what,
        })?;
        for (c, client) in sim.clients().iter().enumerate() {
            if client.unanswered() > 0 && client.phase() != Phase::Closed {
                return Err(Violation {
                    seed: sim.config().seed,
                    step: sim.stats().steps,
                    what: format!(
                        "client {c}: {} batches unanswered on a live connection",
                        client.unanswered()
                    ),
                });
            }
        }
        Ok(())
    }

    fn check_nonces(&mut self, stored: &BTreeMap<LogPosition, Stored>) -> Result<(), String> {
        for s in stored.values() {
            let h = &s.record.header;
            if h.kind != RecordKind::Message {
                continue;
            }
            let mut nonce = [0u8; SEAL_NONCE_BYTES];
            nonce.copy_from_slice(&s.record.payload[..SEAL_NONCE_BYTES]);
            let to = h.recipient.expect("a message has a recipient");
            let key = (h.business_id, to.as_bytes().to_vec(), nonce);
            if let Some(&p) = self.nonces.get(&key) {
                if p != s.position {
                    return Err(format!(
                        "nonce reused under one recipient key of business {}: positions {:?} and {:?}",
                        h.business_id, p, s.position
                    ));
                }
            } else {
                self.nonces.insert(key, s.position);
            }
        }
        Ok(())
    }
}

/// Every record on every disk, by position.
fn read_disks(sim: &Sim) -> Result<BTreeMap<LogPosition, Stored>, String> {
    let setup = sim.node().setup();
    let payload_max = courier_pipeline::log::LogConfig::new(
        &setup.profile.log,
        setup.profile.limits.payload_bytes_max,
    )
    .payload_bytes_max;
    let mut out = BTreeMap::new();
    for s in ShardId::all(setup.shards) {
        let records = read_all(sim.node().storage(s.index()), &setup.master, payload_max)
            .map_err(|e| format!("shard {s}: the log does not read back: {e}"))?;
        for (index, record) in records {
            let position = LogPosition::new(s, index);
            out.insert(position, Stored { position, record });
        }
    }
    Ok(out)
}

/// No (business, client id) at two positions.
fn check_stored_once(stored: &BTreeMap<LogPosition, Stored>) -> Result<(), String> {
    let mut by_id: BTreeMap<(u32, u64), LogPosition> = BTreeMap::new();
    for s in stored
        .values()
        .filter(|s| s.record.header.kind == RecordKind::Message)
    {
        let key = (s.record.header.business_id, s.record.header.client_id);
        if let Some(first) = by_id.insert(key, s.position) {
            return Err(format!(
                "message {:#x} of business {} stored twice: at {:?} and {:?}",
                key.1, key.0, first, s.position
            ));
        }
    }
    Ok(())
}

/// What the clients were told matches the disks.
fn check_answers(sim: &Sim, stored: &BTreeMap<LogPosition, Stored>) -> Result<(), String> {
    let keys = &sim.node().setup().keys;
    let mut given: BTreeMap<LogPosition, (usize, u64)> = BTreeMap::new();
    let mut key = RecipientKey::zeroed();
    let mut plain = Vec::new();
    for (c, client) in sim.clients().iter().enumerate() {
        let ledger = client.ledger();
        if let Some(&(n, first, later)) = ledger.conflicts.first() {
            return Err(format!(
                "client {c} message {n}: stored at {first:?}, later answered {later:?} (stored twice?)"
            ));
        }
        let Some(business) = client.business_id() else {
            continue;
        };
        let plan = client.plan();
        for (&n, outcome) in &ledger.outcomes {
            let (Outcome::Accepted(p) | Outcome::Duplicate(p)) = *outcome else {
                continue;
            };
            if let Some(other) = given.insert(p, (c, n)) {
                return Err(format!(
                    "position {p:?} given to client {c} message {n} and client {} message {}",
                    other.0, other.1
                ));
            }
            let id = message_id(c, n);
            let Some(s) = stored.get(&p) else {
                return Err(format!(
                    "client {c} message {n} ({id:#x}) was acknowledged at {p:?} but the log does not hold it"
                ));
            };
            let h = &s.record.header;
            let to = recipient_for(c, n, plan.recipients);
            if h.kind != RecordKind::Message
                || h.business_id != business
                || h.client_id != id
                || h.recipient != Some(to)
            {
                return Err(format!(
                    "position {p:?} holds message {:#x} of business {}, not client {c}'s {id:#x}",
                    h.client_id, h.business_id
                ));
            }
            keys.recipient_key(business, &to, &mut key)
                .map_err(|e| format!("no key for business {business}: {e}"))?;
            let opened = open(&key, business, &to, id, &s.record.payload, &mut plain)
                .map_err(|e| format!("the sealed payload at {p:?} does not open: {e}"))?;
            if opened != payload_for(id, plan.payload_bytes).as_slice() {
                return Err(format!("the payload at {p:?} is not the one sent"));
            }
        }
    }
    Ok(())
}

/// The detector's model: exemption, rate and tier hold for what was stored.
fn check_detector_model(sim: &Sim, stored: &BTreeMap<LogPosition, Stored>) -> Result<(), String> {
    let registry = &sim.node().setup().registry;
    for (c, client) in sim.clients().iter().enumerate() {
        let Some(b) = client.business_id().and_then(|id| registry.get(id)) else {
            continue;
        };
        let judged = client.ledger().outcomes.values().any(|o| {
            matches!(
                o,
                Outcome::Rejected(Reason::SenderPaused | Reason::MessagingLimitReached)
            )
        });
        if b.exempt && judged {
            return Err(format!(
                "client {c}: exempt business {} heard a detection verdict",
                b.id
            ));
        }
    }
    let mut times: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut recipients: BTreeMap<u32, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for s in stored.values() {
        let h = &s.record.header;
        let Some(to) = h.recipient.filter(|_| h.kind == RecordKind::Message) else {
            continue;
        };
        times.entry(h.business_id).or_default().push(h.time_ms);
        recipients
            .entry(h.business_id)
            .or_default()
            .insert(to.as_bytes().to_vec());
    }
    for (id, mut t) in times {
        let Some(b) = registry.get(id) else { continue };
        if b.exempt {
            continue;
        }
        t.sort_unstable();
        // One second of burst on top of one second of rate, in any window of a second
        // within one run.
        let boots = sim.node().boot_times_ms();
        let run_of = |ms: u64| boots.partition_point(|&b| b <= ms);
        let bound = 2 * u64::from(b.mps);
        let window = Duration::from_secs(1).as_millis() as u64;
        let mut lo = 0;
        for hi in 0..t.len() {
            while t[hi] - t[lo] >= window || run_of(t[lo]) != run_of(t[hi]) {
                lo += 1;
            }
            if (hi - lo + 1) as u64 > bound {
                return Err(format!(
                    "business {id}: {} messages stored within a second, over its rate of {}/s",
                    hi - lo + 1,
                    b.mps
                ));
            }
        }
        let limit = b.tier.recipients_per_day();
        let exact = u64::from(sim.config().profile.detect.exact_recipients_max);
        let distinct = recipients.get(&id).map_or(0, |r| r.len() as u64);
        if let Some(limit) = limit.filter(|&l| l <= exact) {
            if distinct > limit {
                return Err(format!(
                    "business {id}: {distinct} distinct recipients stored, over its tier of {limit}"
                ));
            }
        }
    }
    Ok(())
}

/// Statuses and replies, against what the disks hold and the edge did.
fn check_delivery(sim: &Sim, stored: &BTreeMap<LogPosition, Stored>) -> Result<(), String> {
    let businesses: BTreeSet<u32> = sim
        .clients()
        .iter()
        .filter_map(|c| c.business_id())
        .collect();
    for b in businesses {
        for (id, heard) in sim.business_statuses(b) {
            let kinds: Vec<StatusKind> = heard.iter().map(|(_, k)| *k).collect();
            let stored_here = stored.values().any(|s| {
                let h = &s.record.header;
                h.kind == RecordKind::Message && h.business_id == b && h.client_id == id
            });
            if !stored_here {
                return Err(format!("business {b} heard statuses {kinds:?} of message {id:#x}, which the log does not hold"));
            }
            status_order(&kinds)
                .map_err(|e| format!("business {b}, message {id:#x}: {e}: {heard:?}"))?;
        }
    }
    for (c, client) in sim.clients().iter().enumerate() {
        if !client.plan().events {
            continue;
        }
        let merged = sim.business_statuses(client.business_id().expect("welcomed"));
        for (&n, o) in &client.ledger().outcomes {
            let final_heard = merged.get(&message_id(c, n)).is_some_and(|h| {
                h.iter()
                    .any(|(_, k)| k.is_final() && *k != StatusKind::Read)
            });
            if matches!(o, Outcome::Accepted(_) | Outcome::Duplicate(_)) && !final_heard {
                return Err(format!(
                    "client {c} message {n}: stored, no final status heard"
                ));
            }
        }
    }
    for edge in sim.clients().iter().filter_map(|c| c.devices()) {
        for (p, d) in &edge.ledger.messages {
            let s = stored
                .get(p)
                .ok_or_else(|| format!("DELIVER of {p:?}, which the log does not hold"))?;
            let h = &s.record.header;
            if h.kind != RecordKind::Message
                || h.business_id != d.business_id
                || h.client_id != d.client_id
                || h.recipient != Some(d.recipient)
                || s.record.payload != d.payload
            {
                return Err(format!("DELIVER of {p:?} is not the message stored there"));
            }
        }
        for (event, reply) in &edge.ledger.replies_accepted {
            let mut heard = 0;
            for client in sim.clients() {
                let Some((sender, payload)) = client.ledger().inbound.get(event) else {
                    continue;
                };
                if client.business_id() != Some(reply.business_id) {
                    return Err(format!(
                        "reply {event:?} reached business {:?}, not {}",
                        client.business_id(),
                        reply.business_id
                    ));
                }
                if *sender != reply.sender || *payload != reply.payload {
                    return Err(format!("reply {event:?} arrived changed"));
                }
                heard += 1;
            }
            let subscribers = sim
                .clients()
                .iter()
                .filter(|c| c.plan().events && c.business_id() == Some(reply.business_id))
                .count();
            if subscribers > 0 && heard == 0 {
                return Err(format!(
                    "reply {event:?} accepted from the edge never reached business {}",
                    reply.business_id
                ));
            }
        }
    }
    let accepted: BTreeSet<LogPosition> = sim
        .clients()
        .iter()
        .filter_map(|c| c.devices())
        .flat_map(|d| d.ledger.replies_accepted.keys().copied())
        .collect();
    for (c, client) in sim.clients().iter().enumerate() {
        if let Some((e, (_, payload))) = client
            .ledger()
            .inbound
            .iter()
            .find(|(e, _)| !accepted.contains(e))
        {
            let elsewhere: Vec<LogPosition> = sim
                .clients()
                .iter()
                .filter_map(|c| c.devices())
                .flat_map(|d| d.ledger.replies_accepted.iter())
                .filter(|(_, r)| r.payload == *payload)
                .map(|(p, _)| *p)
                .collect();
            return Err(format!(
                "client {c} heard reply {e:?}, which the edge never had accepted (the same reply accepted at {elsewhere:?})"
            ));
        }
    }
    Ok(())
}

/// The statuses of one message, in the order heard, are a valid history.
fn status_order(kinds: &[StatusKind]) -> Result<(), &'static str> {
    let mut seen = BTreeSet::new();
    let mut final_seen = None;
    for &k in kinds {
        if !seen.insert(k) {
            return Err("a status heard twice");
        }
        match (k, final_seen) {
            (StatusKind::Sent, None) => {}
            (StatusKind::Sent, Some(_)) => return Err("sent after a final status"),
            (StatusKind::Read, Some(StatusKind::Delivered)) => {}
            (StatusKind::Read, _) => return Err("read without delivered before it"),
            (_, Some(_)) => return Err("two final statuses"),
            (k, None) => final_seen = Some(k),
        }
    }
    Ok(())
}
