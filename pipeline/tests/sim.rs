//! Seeded simulations of clients and sharded servers over a faulty network.
//!
//! Each test names its seed; a failure message names it too, so any failure replays
//! exactly with the same test.

use std::sync::Arc;
use std::time::Duration;

use courier_pipeline::profile::Profile;
use courier_pipeline::registry::{Registry, Tier};
use courier_pipeline::sim::{
    AckPolicy, ClientPlan, NetConfig, Phase, Sim, SimConfig, SimTls, SERVER_NAME,
};
use courier_pipeline::wire::Status;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// A self-signed certificate for [`SERVER_NAME`] with an Ed25519 key from a fixed seed:
/// the same bytes every run, and fixed-size signatures, so handshakes have fixed sizes.
fn tls() -> SimTls {
    let kp = aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
    let pkcs8 = kp.to_pkcs8().unwrap().as_ref().to_vec();
    let key = rcgen::KeyPair::try_from(pkcs8.as_slice()).unwrap();
    let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    SimTls::new(
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)),
    )
}

/// A registry with one business; returns it and the business's token.
fn registry() -> (Arc<Registry>, String) {
    let mut reg = Registry::default();
    let (_, token) = reg.add("Acme", Tier::Unlimited, 1000, &[1; 32]).unwrap();
    (Arc::new(reg), token)
}

struct LossRun {
    digest: [u8; 32],
    batches: u64,
    positions: usize,
}

fn loss_run(seed: u64) -> LossRun {
    let (reg, token) = registry();
    let mut cfg = SimConfig::new(seed, 2, Profile::default_profile());
    cfg.net = NetConfig::lossy(0.05);
    cfg.acks = AckPolicy::delayed(Duration::from_millis(2), Duration::from_millis(3));
    let mut sim = Sim::new(cfg, &tls(), reg);
    let mut plan = ClientPlan::new(token);
    plan.streams = 4;
    plan.batches_per_stream = 313;
    plan.depth = 4;
    plan.batch_messages = 16;
    plan.payload_bytes = 24;
    for _ in 0..4 {
        sim.add_client(plan.clone());
    }
    let settled = sim.run_until_settled(Duration::from_secs(300));
    assert!(settled, "seed {seed}: not settled: {sim:?}");
    let mut batches = 0;
    for c in sim.clients() {
        assert!(
            c.done(),
            "seed {seed}: client {} not done: {c:?}",
            c.index()
        );
        for &id in c.work_streams() {
            let st = c.stream(id);
            assert_eq!(st.acked, plan.batches_per_stream, "seed {seed}");
            assert!(!st.failed(), "seed {seed}: stream {id} failed");
            assert_eq!(st.in_flight(), 0);
        }
        assert_eq!(c.not_accepted(), 0, "seed {seed}: every status is accepted");
        batches += c.batches_acked();
    }
    let positions = sim.check_positions_unique();
    assert_eq!(positions as u64, batches * plan.batch_messages as u64);
    // The server handed each batch out once and the stage chain acked each once.
    assert_eq!(sim.stats().batches_handed, batches);
    assert_eq!(sim.stats().acks_given, batches);
    for s in 0..2 {
        assert_eq!(sim.server(s).stats().acks_orphaned, 0, "seed {seed}");
        assert_eq!(sim.server(s).stats().stream_errors, 0, "seed {seed}");
    }
    assert!(sim.net_stats().lost > 0, "the network lost datagrams");
    eprintln!(
        "seed {seed}: {batches} batches in {:?} virtual, {:?} steps, net {:?}",
        sim.elapsed(),
        sim.stats().steps,
        sim.net_stats()
    );
    LossRun {
        digest: sim.digest(),
        batches,
        positions,
    }
}

#[test]
fn loss_jitter_reordering_every_batch_acked_once_and_replays() {
    let a = loss_run(0x5eed_0001);
    assert!(a.batches >= 5000);
    let b = loss_run(0x5eed_0001);
    assert_eq!(a.digest, b.digest, "the same seed replays the same trace");
    assert_eq!((a.batches, a.positions), (b.batches, b.positions));
    let c = loss_run(0x5eed_0002);
    assert_ne!(a.digest, c.digest, "another seed takes another path");
}

/// Guards bug: the server built its quinn-proto `Endpoint` without a server config, so the
/// endpoint answered every Initial with a stateless reset and no connection was accepted.
#[test]
fn handshake_completes_and_a_plan_finishes_on_a_clean_network() {
    let (reg, token) = registry();
    let mut sim = Sim::new(
        SimConfig::new(1, 1, Profile::default_profile()),
        &tls(),
        reg,
    );
    let c = sim.add_client(ClientPlan::new(token));
    assert!(sim.run_until_settled(Duration::from_secs(10)));
    let client = sim.client(c);
    assert!(client.done(), "{client:?}");
    assert_eq!(client.phase(), Phase::Welcomed);
    assert_eq!(sim.server(0).stats().connections_accepted, 1);
    assert_eq!(sim.server(0).stats().hellos_accepted, 1);
    let w = client.welcome().expect("WELCOME");
    assert_eq!(w.batch_messages_max, 1024);
    assert_eq!(client.accepted().len(), 2 * 8 * 16);
    assert!(client
        .accepted()
        .values()
        .all(|p| p.shard() == 0 && p.index() < 256));
    let _ = Status::Accepted;
}
