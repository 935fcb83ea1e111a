//! Retention and delivery in the real shard core (issue 19): a message still waiting for
//! delivery when retention drops its segment is `expired` at its business, and that
//! status is durable before the segment goes, wherever the power fails around the drop.
//!
//! The profile keeps records a minute (the shortest retention) in segments of 2 s, with a
//! time to live far beyond it, so that only retention can end the messages; there is no
//! delivery edge, so every message is still waiting when its segment expires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_pipeline::profile::Profile;
use courier_pipeline::registry::{Registry, Tier};
use courier_pipeline::wire::delivery::StatusKind;
use courier_sim::{ClientPlan, NetConfig, Sim, SimConfig, SimTls};

const RETENTION_SECS: u64 = 60;

fn profile() -> Profile {
    let mut p = Profile::from_toml(include_str!("../../tuning/small.toml")).expect("small.toml");
    p.quic.idle_timeout_ms = 3_000;
    p.log.retention_secs = RETENTION_SECS;
    p.log.segment_age_max_secs = 2;
    // Set after validation, which caps them at the retention: only retention ends them.
    p.delivery.ttl_default_secs = 3_600;
    p.delivery.ttl_max_secs = 3_600;
    p.delivery.event_ack_timeout_ms = 1_000;
    p
}

fn registry() -> (Arc<Registry>, String) {
    let mut reg = Registry::default();
    let (id, token) = reg
        .add("sender", Tier::Unlimited, 1_000_000, &[1; 32])
        .unwrap();
    reg.set_exempt(id, true);
    (Arc::new(reg), token)
}

/// One run: messages stored in the first second, the power cut after `crash_ops`
/// storage operations from 55 s on (`None`: no crash), then a reboot and the settling.
fn run(crash_ops: Option<usize>) {
    let mut cfg = SimConfig::new(19, 1, profile());
    cfg.net = NetConfig::clean();
    let (reg, token) = registry();
    let mut sim = Sim::new(Instant::now(), cfg, &SimTls::fixed(), reg);
    let mut plan = ClientPlan::new(token.into_bytes());
    plan.events = true;
    plan.streams = 1;
    plan.batches_per_stream = 3;
    plan.depth = 1;
    plan.batch_messages = 4;
    plan.payload_bytes = 50;
    plan.recipients = 12;
    plan.resend = true;
    plan.reconnect = true;
    let c = sim.add_client(plan);
    assert!(sim.run_until_cond(Duration::from_secs(5), |s| s.clients()[c].done()));
    let stored: Vec<u64> = {
        let l = sim.clients()[c].ledger();
        l.outcomes
            .keys()
            .filter_map(|&n| l.stored_at(n).map(|p| p.index()))
            .collect()
    };
    assert_eq!(stored.len(), 12, "every message stored");
    sim.run_until(sim.at(Duration::from_secs(55)));
    assert!(
        stored
            .iter()
            .all(|&i| sim.node().core(0).log().segment_of(i).is_some()),
        "nothing goes before the retention"
    );
    if let Some(ops) = crash_ops {
        sim.arm_crash(ops);
    }
    let deadline = sim.at(Duration::from_secs(RETENTION_SECS + 10));
    sim.run_until_cond(deadline.saturating_duration_since(sim.now()), |s| {
        !s.node().is_up()
    });
    if !sim.node().is_up() {
        sim.run_for(Duration::from_millis(100));
        sim.boot().expect("the node recovers");
    }
    let settled = sim.run_until_cond(Duration::from_secs(30), |s| {
        s.statuses_settled() && s.now() >= deadline
    });
    assert!(
        settled,
        "crash after {crash_ops:?} ops: a message lost its status to the retention drop"
    );
    let heard = sim.business_statuses(sim.clients()[c].business_id().unwrap());
    assert_eq!(heard.len(), 12, "crash after {crash_ops:?} ops");
    for (id, statuses) in &heard {
        assert!(
            statuses.iter().all(|(_, k)| *k == StatusKind::Expired),
            "crash after {crash_ops:?} ops: message {id}: {statuses:?}"
        );
    }
    let log = sim.node().core(0).log();
    assert!(
        stored.iter().all(|&i| log.segment_of(i).is_none()),
        "crash after {crash_ops:?} ops: a message outlived the retention"
    );
}

#[test]
fn a_waiting_message_is_expired_before_its_segment_goes() {
    run(None);
}

/// The power fails at every storage operation around the drop (the status records'
/// keyring, segment, write; the drop's keyring and deletion): no message ends without
/// its status. (Before issue 19 the drop's deletion was queued ahead of the statuses'
/// write, so a crash between them lost the statuses with the messages.)
#[test]
fn a_crash_around_the_drop_loses_no_expired_status() {
    for ops in 0..12 {
        run(Some(ops));
    }
}
