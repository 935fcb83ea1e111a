//! The whole message path under faults: seeded runs of the real shard cores with
//! resending, reconnecting clients over a faulty network, disks that tear writes at a
//! crash, fail an fsync or fill up, and crashes at any step; the oracle checks every
//! invariant after every recovery and at the end.
//!
//! - `fixed_seeds` runs a fixed set of seeds in `cargo test`;
//! - `COURIER_SIM_SEED=N cargo test -p courier-sim --test whole_path replay -- --nocapture`
//!   replays one seed (a failure prints its seed and step);
//! - `COURIER_SIM_SEEDS=A..B cargo test --release -p courier-sim --test whole_path long_mode
//!   -- --ignored --nocapture` runs seeds A to B (the long mode: hours for millions);
//! - the planted-bug tests switch a deliberate bug on in the real state machine and
//!   assert that the simulation catches it within its seeds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_pipeline::node::PlantedBugs;
use courier_pipeline::profile::Profile;
use courier_pipeline::registry::{Registry, Tier};
use courier_sim::{
    ClientPlan, EdgePlan, NetConfig, Oracle, Sim, SimConfig, SimTls, StorageConfig, Violation,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Seeds `cargo test` runs.
const FIXED_SEEDS: std::ops::Range<u64> = 0..24;
/// Seeds a planted bug must be caught within.
const BUG_SEEDS: std::ops::Range<u64> = 0..24;
/// Virtual time a run may take to settle after its last fault.
const SETTLE_LIMIT: Duration = Duration::from_secs(600);

/// What one run did, for the summary line and the replay check.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Report {
    digest: [u8; 32],
    crashes: u64,
    accepted: u64,
    resent: u64,
    records: u64,
    steps: u64,
}

/// A fault a scenario injects.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Power loss at this virtual time.
    CrashAt(Duration),
    /// Power loss after this many more storage operations, armed at this time.
    CrashAfterOps(Duration, usize),
    /// Every fsync of one shard fails from this time on (until the next crash).
    FailSyncs(Duration, usize),
    /// One shard's disk fills up this many bytes from now (until the next crash).
    DiskFull(Duration, usize, u64),
}

impl Fault {
    fn at(self) -> Duration {
        match self {
            Fault::CrashAt(t)
            | Fault::CrashAfterOps(t, _)
            | Fault::FailSyncs(t, _)
            | Fault::DiskFull(t, _, _) => t,
        }
    }
}

/// The businesses: an exempt bulk sender, a customer with detection on, a small one;
/// and the platform's delivery edge (the fourth token).
fn registry() -> (Arc<Registry>, Vec<String>) {
    let mut reg = Registry::default();
    let (bulk, t0) = reg
        .add("bulk", Tier::Unlimited, 1_000_000, &[1; 32])
        .unwrap();
    reg.set_exempt(bulk, true);
    let (_, t1) = reg.add("customer", Tier::T2k, 400, &[2; 32]).unwrap();
    let (_, t2) = reg.add("small", Tier::T250, 100, &[3; 32]).unwrap();
    let (edge, t3) = reg.add("edge", Tier::Unlimited, 1, &[4; 32]).unwrap();
    reg.set_platform(edge, true);
    (Arc::new(reg), vec![t0, t1, t2, t3])
}

/// Businesses among the tokens (the last one is the edge's).
const BUSINESS_TOKENS: usize = 3;

/// The profile: the small one, with a short idle timeout so that clients of a crashed
/// node notice within seconds, and small segments so that runs roll.
fn profile() -> Profile {
    let mut p = Profile::from_toml(include_str!("../../tuning/small.toml")).expect("small.toml");
    p.quic.idle_timeout_ms = 3_000;
    p.log.segment_bytes_max = 64 << 10;
    // Short delivery timers, so a run with crashes settles in virtual seconds.
    p.delivery.outcome_timeout_ms = 2_000;
    p.delivery.event_ack_timeout_ms = 1_000;
    p.delivery.retry_backoff_min_ms = 100;
    p.delivery.retry_backoff_max_ms = 2_000;
    // The simulated edge holds no device keys: it takes DELIVERs sealed by the relay
    // (the relay-side end-to-end stage is tested in pipeline's node::devices and through
    // the real binaries in tests/it/delivery_*.rs).
    p.delivery.e2e.enabled = false;
    p
}

/// The scenario of `seed`: shards, clients, network, disk, faults.
fn scenario(seed: u64) -> (SimConfig, Vec<ClientPlan>, Vec<Fault>) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5ce1_a210);
    let shards = rng.random_range(1..=3);
    let mut cfg = SimConfig::new(seed, shards, profile());
    cfg.net = match rng.random_range(0..3) {
        0 => NetConfig::clean(),
        _ => NetConfig::lossy(rng.random_range(0.0..0.05)),
    };
    cfg.storage = StorageConfig {
        latency: Duration::from_micros(rng.random_range(200..3_000)),
        jitter: Duration::from_micros(rng.random_range(0..3_000)),
    };
    let (_, tokens) = registry();
    let edge = rng.random_bool(0.8);
    let mut clients: Vec<ClientPlan> = (0..rng.random_range(2..=4))
        .map(|i| {
            let mut plan = ClientPlan::new(tokens[i % BUSINESS_TOKENS].clone());
            plan.events = edge && rng.random_bool(0.8);
            plan.streams = rng.random_range(1..=3);
            plan.batches_per_stream = rng.random_range(5..=25);
            plan.depth = rng.random_range(1..=4);
            plan.batch_messages = rng.random_range(1..=24);
            plan.payload_bytes = rng.random_range(1..=300);
            // At most about 25 messages per number: the same-recipient limit (5 per 10 s
            // in the small profile) lets such a plan finish within a few minutes.
            let per_number_max = 25;
            plan.recipients = rng
                .random_range(1..=60)
                .max(plan.messages_total().div_ceil(per_number_max) as usize);
            plan.resend = true;
            plan.reconnect = true;
            plan.duplicate_every = [0, 7, 13][rng.random_range(0..3)];
            plan
        })
        .collect();
    if edge {
        let devices = EdgePlan {
            offline_share: rng.random_range(0.0..0.5),
            offline_max: Duration::from_millis(rng.random_range(10..3_000)),
            not_on_platform_share: rng.random_range(0.0..0.1),
            read_share: rng.random_range(0.0..0.5),
            reply_share: rng.random_range(0.0..0.3),
            credit: rng.random_range(1..=256),
        };
        clients.push(ClientPlan::edge(tokens[BUSINESS_TOKENS].clone(), devices));
    }
    let mut faults = Vec::new();
    for _ in 0..rng.random_range(1..=3) {
        let at = Duration::from_micros(rng.random_range(10_000..1_500_000));
        let fault = match rng.random_range(0..10) {
            0..=4 => Fault::CrashAt(at),
            5..=7 => Fault::CrashAfterOps(at, rng.random_range(1..40)),
            8 => Fault::FailSyncs(at, rng.random_range(0..shards)),
            _ => Fault::DiskFull(at, rng.random_range(0..shards), rng.random_range(0..20_000)),
        };
        if matches!(fault, Fault::FailSyncs(..) | Fault::DiskFull(..)) {
            // A failed log takes nothing more, statuses included, until the operator has
            // fixed the disk and restarted the node.
            let fixed = at + Duration::from_micros(rng.random_range(100_000..2_000_000));
            faults.push(Fault::CrashAt(fixed));
        }
        faults.push(fault);
    }
    faults.sort_by_key(|f| f.at());
    (cfg, clients, faults)
}

/// Runs `seed` with `bugs` planted; the oracle checks after every recovery and at the end.
fn run(seed: u64, bugs: PlantedBugs) -> Result<Report, Violation> {
    let (mut cfg, plans, faults) = scenario(seed);
    let debug = std::env::var_os("COURIER_SIM_DEBUG").is_some();
    if debug {
        eprintln!("seed {seed}: {cfg:?}\nplans {plans:#?}\nfaults {faults:?}");
    }
    cfg.bugs = bugs;
    let (reg, _) = registry();
    let mut sim = Sim::new(Instant::now(), cfg, &SimTls::fixed(), reg);
    for plan in plans {
        sim.add_client(plan);
    }
    let mut oracle = Oracle::default();
    for fault in faults {
        let at = sim.at(fault.at());
        sim.run_until_cond(at.saturating_duration_since(sim.now()), |s| {
            !s.node().is_up()
        });
        if !sim.node().is_up() {
            restart(&mut sim, &mut oracle)?;
        }
        match fault {
            Fault::CrashAt(_) => {
                sim.crash_node();
                restart(&mut sim, &mut oracle)?;
            }
            Fault::CrashAfterOps(_, ops) => sim.arm_crash(ops),
            Fault::FailSyncs(_, shard) => sim.node_mut().storage_mut(shard).fail_syncs = true,
            Fault::DiskFull(_, shard, room) => {
                let disk = sim.node_mut().storage_mut(shard);
                let used: u64 = disk
                    .file_ids()
                    .iter()
                    .map(|&id| disk.file(id).map_or(0, |f| f.len() as u64))
                    .sum();
                disk.capacity_bytes = Some(used + room);
            }
        }
    }
    // An armed crash may strike while settling; recover and settle again (bounded: one
    // arm per fault).
    for _ in 0..4 {
        sim.run_until_cond(SETTLE_LIMIT, |s| {
            !s.node().is_up()
                || (s.clients().iter().all(|c| c.done())
                    && s.statuses_settled()
                    && s.replies_settled())
        });
        if sim.node().is_up() {
            break;
        }
        restart(&mut sim, &mut oracle)?;
    }
    if debug {
        eprintln!("stats {:?} net {:?}", sim.stats(), sim.net_stats());
        if sim.node().is_up() {
            for sh in 0..sim.config().shards {
                let core = sim.node().core(sh);
                eprintln!(
                    "shard {sh}: waiting {} log {}..{} delivery {:?} outbox {:?} server {:?}",
                    core.records_waiting(),
                    core.log().durable_end(),
                    core.log().next_index(),
                    core.delivery_counts(),
                    core.outbox_counts(),
                    core.server().stats()
                );
            }
        }
        for c in sim.clients() {
            eprintln!(
                "{c:?} heard {} events, {} copies",
                c.ledger().heard.len(),
                c.ledger().event_copies
            );
            if let Some(d) = c.devices() {
                eprintln!(
                    "  edge: {} delivers, {} copies, {} messages, {} finals, {} replies accepted, {} refused",
                    d.ledger.delivers,
                    d.ledger.copies,
                    d.ledger.messages.len(),
                    d.ledger.finals.len(),
                    d.ledger.replies_accepted.len(),
                    d.ledger.replies_refused
                );
            }
        }
    }
    if debug {
        // The messages of events clients without a final status, and what was heard.
        for (c, client) in sim.clients().iter().enumerate() {
            let Some(b) = client.business_id().filter(|_| client.plan().events) else {
                continue;
            };
            let merged = sim.business_statuses(b);
            for (&n, o) in &client.ledger().outcomes {
                let id = courier_sim::message_id(c, n);
                let h = merged.get(&id);
                let fin = h.is_some_and(|h| h.iter().any(|(_, k)| k.is_final()));
                if !fin && client.ledger().stored_at(n).is_some() {
                    let edge = sim
                        .clients()
                        .iter()
                        .filter_map(|x| x.devices())
                        .flat_map(|d| d.ledger.messages.iter())
                        .find(|(_, d)| d.client_id == id)
                        .map(|(p, _)| *p);
                    eprintln!("  unfinished: client {c} n {n} {o:?} heard {h:?} edge {edge:?}");
                    let setup = sim.node().setup();
                    for sh in 0..setup.shards {
                        let recs = courier_sim::storage::read_all(
                            sim.node().storage(sh),
                            &setup.master,
                            1 << 20,
                        )
                        .unwrap();
                        for (i, r) in recs {
                            if r.header.reference == o_pos(o) {
                                eprintln!("    record {sh}/{i}: {:?}", r.header);
                            }
                        }
                    }
                }
            }
        }
    }
    let end = oracle.check_end(&sim);
    if debug {
        if let Err(v) = &end {
            eprintln!("violation: {v}; boots at {:?}", sim.node().boot_times_ms());
        }
    }
    end?;
    if !sim.statuses_settled() {
        return Err(Violation {
            seed,
            step: sim.stats().steps,
            what: format!("statuses did not settle within {SETTLE_LIMIT:?}"),
        });
    }
    if let Some(c) = sim.clients().iter().position(|c| !c.done()) {
        return Err(Violation {
            seed,
            step: sim.stats().steps,
            what: format!(
                "client {c} did not finish within {SETTLE_LIMIT:?}: {:?}",
                sim.client(c)
            ),
        });
    }
    let ledger_sum = |f: &dyn Fn(&courier_sim::Ledger) -> u64| -> u64 {
        sim.clients().iter().map(|c| f(c.ledger())).sum()
    };
    Ok(Report {
        digest: sim.digest(),
        crashes: sim.stats().crashes,
        accepted: ledger_sum(&|l| l.answers[0]),
        resent: ledger_sum(&|l| l.resent),
        records: oracle.records_checked,
        steps: sim.stats().steps,
    })
}

/// After a crash: the node boots (recovery truncates torn tails) and the oracle checks
/// the disks against what every client was told.
fn restart(sim: &mut Sim, oracle: &mut Oracle) -> Result<(), Violation> {
    sim.run_for(Duration::from_millis(100));
    let boot = sim.boot();
    boot.map_err(|e| Violation {
        seed: sim.config().seed,
        step: sim.stats().steps,
        what: format!("the node does not recover: {e}"),
    })?;
    oracle.check(sim)
}

fn o_pos(o: &courier_sim::Outcome) -> u64 {
    match o {
        courier_sim::Outcome::Accepted(p) | courier_sim::Outcome::Duplicate(p) => p.0,
        _ => 0,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn run_or_panic(seed: u64) -> Report {
    match run(seed, PlantedBugs::default()) {
        Ok(r) => {
            eprintln!(
                "seed {seed}: {} crashes, {} accepted, {} resent, {} records, {} steps, digest {}",
                r.crashes,
                r.accepted,
                r.resent,
                r.records,
                r.steps,
                &hex(&r.digest)[..16]
            );
            r
        }
        Err(v) => panic!("{v}"),
    }
}

#[test]
fn fixed_seeds() {
    let mut crashes = 0;
    let mut resent = 0;
    for seed in FIXED_SEEDS {
        let r = run_or_panic(seed);
        crashes += r.crashes;
        resent += r.resent;
    }
    assert!(crashes >= FIXED_SEEDS.end / 2, "the seeds crash the node");
    assert!(resent > 0, "the seeds make clients resend");
}

#[test]
fn a_seed_replays_exactly() {
    let a = run_or_panic(5);
    let b = run_or_panic(5);
    assert_eq!(a, b, "one seed, one trace");
    let c = run_or_panic(6);
    assert_ne!(a.digest, c.digest, "another seed takes another path");
}

#[test]
fn replay() {
    let Ok(seed) = std::env::var("COURIER_SIM_SEED") else {
        return;
    };
    run_or_panic(seed.parse().expect("COURIER_SIM_SEED is a number"));
}

#[test]
#[ignore = "the long mode: COURIER_SIM_SEEDS=A..B, for hours"]
fn long_mode() {
    let range = std::env::var("COURIER_SIM_SEEDS").unwrap_or_else(|_| "0..10000".into());
    let (a, b) = range.split_once("..").expect("COURIER_SIM_SEEDS=A..B");
    let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
    for seed in a..b {
        run_or_panic(seed);
    }
}

/// Runs the bug seeds with `bugs`; returns the first violation found.
fn first_violation(bugs: PlantedBugs) -> Option<Violation> {
    BUG_SEEDS.map(|seed| run(seed, bugs)).find_map(Result::err)
}

#[test]
fn acking_before_the_sync_is_caught() {
    let v = first_violation(PlantedBugs {
        ack_before_sync: true,
        ..PlantedBugs::default()
    })
    .expect("the simulation catches a shard that acks before its fdatasync");
    eprintln!("caught: {v}");
    assert!(v.what.contains("the log does not hold it"), "{v}");
}

#[test]
fn forgetting_settled_ids_is_caught() {
    let v = first_violation(PlantedBugs {
        release_instead_of_settle: true,
        ..PlantedBugs::default()
    })
    .expect("the simulation catches a shard that stores a resend twice");
    eprintln!("caught: {v}");
    assert!(v.what.contains("stored twice"), "{v}");
}

/// A sender of 96 small messages (2 streams x 6 batches of 8, 2 in flight a stream, to
/// 40 recipients) that listens for its events and resends what is throttled.
fn small_sender(token: String) -> ClientPlan {
    let mut plan = ClientPlan::new(token);
    plan.events = true;
    plan.streams = 2;
    plan.batches_per_stream = 6;
    plan.depth = 2;
    plan.batch_messages = 8;
    plan.payload_bytes = 100;
    plan.recipients = 40;
    plan.resend = true;
    plan
}

/// An edge whose devices are all online and deliver at once (no reads, no replies),
/// taking `credit` DELIVERs ahead.
fn steady_edge(token: String, credit: u32) -> ClientPlan {
    ClientPlan::edge(
        token,
        EdgePlan {
            offline_share: 0.0,
            offline_max: Duration::from_millis(10),
            not_on_platform_share: 0.0,
            read_share: 0.0,
            reply_share: 0.0,
            credit,
        },
    )
}

/// An edge that grants a window far below `in_flight_max` x shards (here 16 messages; `in_flight_max` is 4,096)
/// starves no shard: offers that find the connection out of credit wait at its shard in
/// arrival order and are written as credit comes, instead of bouncing back to their
/// owners to be offered again 50 ms later (when the shard holding the edge connection,
/// whose offers arrive first, took every returned credit and another shard could hand
/// over nothing for seconds). Every shard hands messages over, none bounces, and every
/// stored message is delivered.
#[test]
fn a_small_edge_window_starves_no_shard() {
    let shards = 3;
    let mut cfg = SimConfig::new(7, shards, profile());
    cfg.net = NetConfig::clean();
    let (reg, tokens) = registry();
    let mut sim = Sim::new(Instant::now(), cfg, &SimTls::fixed(), reg);
    // Connections from several addresses, so that they land on different shards.
    for i in 0..6 {
        sim.add_client(small_sender(tokens[i % BUSINESS_TOKENS].clone()));
    }
    sim.add_client(steady_edge(tokens[BUSINESS_TOKENS].clone(), 16));
    sim.run_until_cond(SETTLE_LIMIT, |s| {
        s.clients().iter().all(|c| c.done()) && s.statuses_settled()
    });
    assert!(
        sim.clients().iter().all(|c| c.done()) && sim.statuses_settled(),
        "every message ends with its status"
    );
    Oracle::default()
        .check_end(&sim)
        .unwrap_or_else(|v| panic!("{v}"));
    let counts: Vec<_> = (0..shards)
        .map(|s| {
            let (c, _pending) = sim
                .node()
                .core(s)
                .delivery_counts()
                .expect("delivery is on");
            c
        })
        .collect();
    let handing = counts.iter().filter(|c| c.handoffs > 0).count();
    assert!(
        handing >= 2,
        "messages of at least two shards go through one edge connection: {counts:?}"
    );
    for (s, c) in counts.iter().enumerate() {
        assert_eq!(c.bounced, 0, "shard {s} had offers bounced: {counts:?}");
        assert_eq!(c.delivered, c.handoffs, "shard {s}: {c:?}");
    }
}

/// Senders faster than the edge, with delivery's bounds small (16 waiting messages a
/// shard, an edge taking 4 at a time): a batch that finds the bounds full while the edge
/// is taking messages is held until outcomes free room, not answered `throttled` (which
/// made every sender resend it, decoding and answering it twice on the cores that
/// deliver). Nothing is throttled, every message is delivered, and the oracle's
/// invariants hold. Without an edge the same senders are throttled at once.
#[test]
fn a_full_delivery_holds_batches_while_the_edge_drains() {
    use std::sync::atomic::Ordering::Relaxed;
    let run = |with_edge: bool| {
        let shards = 2;
        let mut p = profile();
        p.delivery.pending_max = 16;
        let mut cfg = SimConfig::new(11, shards, p);
        cfg.net = NetConfig::clean();
        let (reg, tokens) = registry();
        let mut sim = Sim::new(Instant::now(), cfg, &SimTls::fixed(), reg);
        for i in 0..4 {
            sim.add_client(small_sender(tokens[i % BUSINESS_TOKENS].clone()));
        }
        if with_edge {
            sim.add_client(steady_edge(tokens[BUSINESS_TOKENS].clone(), 4));
            let settled = sim.run_until_cond(SETTLE_LIMIT, |s| {
                s.clients().iter().all(|c| c.done()) && s.statuses_settled()
            });
            assert!(settled, "every message ends with its status");
            Oracle::default()
                .check_end(&sim)
                .unwrap_or_else(|v| panic!("{v}"));
        } else {
            sim.run_for(Duration::from_secs(5));
        }
        let sum = |f: &dyn Fn(&courier_pipeline::node::ShardStats) -> u64| {
            (0..shards).map(|s| f(sim.node().stats(s))).sum::<u64>()
        };
        let held = sum(&|st| st.delivery_held.load(Relaxed));
        let full = sum(&|st| st.delivery_full.load(Relaxed));
        let delivered: u64 = (0..shards)
            .map(|s| {
                sim.node()
                    .core(s)
                    .delivery_counts()
                    .expect("on")
                    .0
                    .delivered
            })
            .sum();
        (held, full, delivered)
    };
    let (held, full, delivered) = run(true);
    assert!(held > 0, "the bounds filled and batches were held: {held}");
    assert_eq!(full, 0, "nothing throttled while the edge drains");
    assert_eq!(delivered, 4 * 2 * 6 * 8, "every message delivered");
    let (held, full, delivered) = run(false);
    assert_eq!(
        (held, delivered),
        (0, 0),
        "no edge: nothing held, nothing delivered"
    );
    assert!(full > 0, "no edge: a full delivery throttles at once");
}

/// A business that reads none of its statuses, with a small bound on the events a shard
/// keeps for it (16): the statuses its messages owe are reserved for when a SUBMIT is
/// admitted, so its later SUBMITs are throttled (and resent) instead of its oldest
/// statuses being dropped, which left messages without a final status for good. Once a
/// connection of the business listens, it hears a final status for every stored message
/// and the sender finishes. Run before the reservation existed, events were dropped here.
#[test]
fn a_business_reading_no_statuses_is_throttled_and_loses_none() {
    deaf_business(0.0);
}

/// [`a_business_reading_no_statuses_is_throttled_and_loses_none`] with every delivered
/// message also read: a `read` is not reserved for at admission (it may never come), so
/// the reads take the business past its bound, and the shard keeps them (they are
/// bounded by the messages remembered after delivery and those admitted) instead of
/// dropping its oldest events: every stored message's final status and its `read` reach
/// the business. Run when the bound dropped the oldest event, 8 were dropped within the
/// first 5 s here.
#[test]
fn reads_past_a_deaf_business_bound_drop_no_status() {
    deaf_business(1.0);
}

fn deaf_business(read_share: f64) {
    use std::sync::atomic::Ordering::Relaxed;
    let shards = 2;
    let mut p = profile();
    p.delivery.events_per_business_max = 16;
    let mut cfg = SimConfig::new(13, shards, p);
    cfg.net = NetConfig::clean();
    let (reg, tokens) = registry();
    let mut sim = Sim::new(Instant::now(), cfg, &SimTls::fixed(), reg);
    let mut deaf = small_sender(tokens[0].clone());
    deaf.events = false;
    let deaf = sim.add_client(deaf);
    let mut edge = steady_edge(tokens[BUSINESS_TOKENS].clone(), 64);
    if let Some(e) = edge.edge.as_mut() {
        e.read_share = read_share;
    }
    sim.add_client(edge);
    sim.run_for(Duration::from_secs(5));
    let sum = |sim: &Sim, f: &dyn Fn(&courier_pipeline::node::ShardStats) -> u64| {
        (0..shards).map(|s| f(sim.node().stats(s))).sum::<u64>()
    };
    assert_eq!(sum(&sim, &|st| st.events_dropped.load(Relaxed)), 0);
    let full = sum(&sim, &|st| st.delivery_full.load(Relaxed));
    assert!(full > 0, "the deaf business was throttled");
    assert!(!sim.clients()[deaf].done(), "not everything fit yet");
    // A connection that listens (and sends nothing) drains the statuses owed.
    let mut ear = small_sender(tokens[0].clone());
    ear.batches_per_stream = 0;
    sim.add_client(ear);
    let heard_all = |sim: &Sim| {
        let c = &sim.clients()[deaf];
        let b = c.business_id().expect("welcomed");
        let heard = sim.business_statuses(b);
        c.ledger().outcomes.keys().all(|&n| {
            if c.ledger().stored_at(n).is_none() {
                return true;
            }
            let h = heard.get(&courier_sim::client::message_id(deaf, n));
            h.is_some_and(|h| {
                h.iter().any(|(_, k)| k.is_final())
                    && (read_share < 1.0
                        || h.iter()
                            .any(|(_, k)| *k == courier_pipeline::wire::delivery::StatusKind::Read))
            })
        })
    };
    let settled = sim.run_until_cond(SETTLE_LIMIT, |s| s.clients()[deaf].done() && heard_all(s));
    assert!(
        settled,
        "the sender finished and every stored message has its final status (and its read)"
    );
    assert_eq!(sum(&sim, &|st| st.events_dropped.load(Relaxed)), 0);
    let stored = {
        let c = &sim.clients()[deaf];
        c.ledger()
            .outcomes
            .keys()
            .filter(|&&n| c.ledger().stored_at(n).is_some())
            .count()
    };
    assert_eq!(stored, 2 * 6 * 8, "every message stored once in the end");
}
