//! Seeded simulations of clients and sharded servers over a faulty network.
//!
//! Each test names its seed; a failure message names it too, so any failure replays
//! exactly with the same test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_pipeline::profile::Profile;
use courier_pipeline::registry::{Registry, Tier};
use courier_pipeline::wire::{self, code, Status};
use courier_sim::{
    ClientPlan, ClientStream, NetConfig, Phase, Sim, SimConfig, SimTls, StorageConfig,
};

fn tls() -> SimTls {
    SimTls::fixed()
}

/// The default profile with a small idempotency table (allocated whole at every boot).
fn profile() -> Profile {
    let mut p = Profile::default_profile();
    p.limits.idempotency_ids_max = 1 << 16;
    p.limits.idempotency_ids_per_business_max = 1 << 14;
    p
}

/// A disk whose commits take `latency` plus up to `jitter`.
fn disk(latency: Duration, jitter: Duration) -> StorageConfig {
    StorageConfig { latency, jitter }
}

/// Batches the shards took, summed.
fn batches_in(sim: &Sim) -> u64 {
    sim.server_totals().expect("the node runs").batches_in
}

/// A registry with one business, exempt from detection (these tests are about the wire);
/// returns it and the business's token.
fn registry() -> (Arc<Registry>, String) {
    let mut reg = Registry::default();
    let (id, token) = reg.add("Acme", Tier::Unlimited, 1000, &[1; 32]).unwrap();
    reg.set_exempt(id, true);
    (Arc::new(reg), token)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct LossRun {
    digest: [u8; 32],
    batches: u64,
    positions: usize,
}

fn loss_run(seed: u64) -> LossRun {
    let (reg, token) = registry();
    let mut cfg = SimConfig::new(seed, 2, profile());
    cfg.net = NetConfig::lossy(0.05);
    cfg.storage = disk(Duration::from_millis(2), Duration::from_millis(3));
    let mut sim = Sim::new(Instant::now(), cfg, &tls(), reg);
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
    // The server took each batch once and the stage chain acked each once.
    let totals = sim.server_totals().expect("the node runs");
    assert_eq!(totals.batches_in, batches);
    assert_eq!(totals.acks_out, batches);
    for s in 0..2 {
        assert_eq!(sim.server(s).stats().acks_orphaned, 0, "seed {seed}");
        assert_eq!(sim.server(s).stats().stream_errors, 0, "seed {seed}");
    }
    assert!(sim.net_stats().lost > 0, "the network lost datagrams");
    assert!(
        sim.net_stats().reordered > 0,
        "the network reordered datagrams"
    );
    eprintln!(
        "seed {seed}: {batches} batches in {:?} virtual, {:?} steps, net {:?}, digest {}",
        sim.elapsed(),
        sim.stats().steps,
        sim.net_stats(),
        hex(&sim.digest())
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
    let mut sim = Sim::new(Instant::now(), SimConfig::new(1, 1, profile()), &tls(), reg);
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

/// The stage chain answers batches out of order: a batch the detector throttles is acked
/// at once while an earlier one of the same stream waits for its group commit. The server
/// must still write the ACKs in SUBMIT order (the client checks every one).
#[test]
fn acks_keep_submit_order_when_the_chain_answers_out_of_order() {
    let mut reg = Registry::default();
    let (_, token) = reg.add("Limited", Tier::Unlimited, 20, &[2; 32]).unwrap();
    let mut cfg = SimConfig::new(7, 1, profile());
    cfg.storage = disk(Duration::from_millis(30), Duration::from_millis(10));
    let mut sim = Sim::new(Instant::now(), cfg, &tls(), Arc::new(reg));
    let mut plan = ClientPlan::new(token);
    plan.streams = 2;
    plan.batches_per_stream = 40;
    plan.depth = 8;
    plan.batch_messages = 8;
    plan.recipients = 640;
    let c = sim.add_client(plan);
    assert!(sim.run_until_settled(Duration::from_secs(60)));
    let client = sim.client(c);
    assert!(client.done(), "{client:?}");
    assert_eq!(client.batches_acked(), 80);
    let st = sim.server(0).stats();
    assert!(
        st.acks_reordered > 0,
        "some ACK waited for an earlier one: {st:?}"
    );
    assert!(!client.accepted().is_empty() && client.not_accepted() > 0);
    sim.check_positions_unique();
}

// ---- malformed input over QUIC -------------------------------------------------------

/// A frame header: `len:u32 | type:u8`.
fn header(len: u32, ty: u8) -> Vec<u8> {
    let mut v = len.to_le_bytes().to_vec();
    v.push(ty);
    v
}

/// A SUBMIT of one message to `recipient`, encoded by hand so the recipient can be invalid.
fn submit_to(batch_id: u64, recipient: &[u8]) -> Vec<u8> {
    let payload = b"hello";
    let mut body = Vec::new();
    body.extend_from_slice(&batch_id.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&7u64.to_le_bytes());
    body.push(recipient.len() as u8);
    body.extend_from_slice(recipient);
    body.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    body.extend_from_slice(payload);
    let mut v = header(body.len() as u32, wire::frame_type::SUBMIT);
    v.extend_from_slice(&body);
    v
}

fn well_behaved_plan(token: &str) -> ClientPlan {
    let mut plan = ClientPlan::new(token);
    plan.streams = 3;
    plan.batches_per_stream = 30;
    plan.depth = 3;
    plan
}

/// How the client must see a stream failed with `code`: while it was still sending, by
/// STOP_SENDING, followed by every ACK the server owed and FIN; after it finished its half
/// (`fin`), by RESET_STREAM.
fn assert_failed_with(st: &ClientStream, code: u32, fin: bool, seed: u64) {
    if fin {
        assert_eq!(
            st.reset,
            Some(code),
            "seed {seed}: RESET_STREAM code: {st:?}"
        );
    } else {
        assert_eq!(
            st.stopped,
            Some(code),
            "seed {seed}: STOP_SENDING code: {st:?}"
        );
        assert_eq!(
            st.reset, None,
            "seed {seed}: ACKs must not be reset away: {st:?}"
        );
        assert!(
            st.fin_received,
            "seed {seed}: the server finishes its half: {st:?}"
        );
    }
}

/// Client A (0) and client B (1) share one shard. Once A's work stream 0 has ACKs for
/// everything it sent, A writes `bad` on it (then FIN if `fin`). The stream must fail with
/// `code`; A keeps the ACKs it got before, A's other streams and B finish their plans.
fn bad_frame_on_work_stream(seed: u64, profile: Profile, bad: &[u8], fin: bool, code: u32) {
    let (reg, token) = registry();
    let mut cfg = SimConfig::new(seed, 1, profile);
    cfg.net = NetConfig::lossy(0.01);
    cfg.storage = disk(Duration::from_millis(1), Duration::from_millis(2));
    let mut sim = Sim::new(Instant::now(), cfg, &tls(), reg);
    let plan = well_behaved_plan(&token);
    let a = sim.add_client(plan.clone());
    let b = sim.add_client(plan.clone());
    let limit = Duration::from_secs(30);
    assert!(sim.run_until_cond(limit, |s| {
        s.client(a).work_streams().len() == plan.streams && s.client(a).work_stream(0).acked >= 5
    }));
    sim.client_pause(a, 0, true);
    assert!(sim.run_until_cond(limit, |s| s.client(a).work_stream(0).in_flight() == 0));
    let bad_stream = sim.client(a).work_streams()[0];
    let acked_before = sim.client(a).work_stream(0).acked;
    assert_eq!(acked_before, sim.client(a).work_stream(0).sent);
    let errors_before = sim.server(0).stats().stream_errors;
    sim.client_inject(a, bad_stream, bad, fin);
    assert!(sim.run_until_settled(limit), "seed {seed}: {sim:?}");

    let ca = sim.client(a);
    let st = ca.stream(bad_stream);
    assert_failed_with(st, code, fin, seed);
    assert_eq!(st.acked, acked_before, "the ACKs before the bad frame stay");
    assert_eq!(st.ack_batch_ids.len() as u64, acked_before);
    assert_eq!(ca.phase(), Phase::Welcomed, "the connection survives");
    for (i, &id) in ca.work_streams().iter().enumerate().skip(1) {
        let other = ca.stream(id);
        assert!(
            !other.failed(),
            "seed {seed}: stream {i} failed too: {other:?}"
        );
        assert_eq!(
            other.acked, plan.batches_per_stream,
            "seed {seed}: stream {i}"
        );
        assert!(other.fin_received);
    }
    assert!(
        sim.client(b).done(),
        "seed {seed}: the other connection finishes"
    );
    assert_eq!(sim.client(b).not_accepted(), 0);
    assert_eq!(sim.server(0).stats().stream_errors, errors_before + 1);
    assert_eq!(sim.server(0).stats().acks_orphaned, 0);
    sim.check_positions_unique();
}

#[test]
fn truncated_frame_fails_the_stream_only() {
    // A SUBMIT header announcing 100 bytes, 10 of them, then FIN.
    let mut bad = header(100, wire::frame_type::SUBMIT);
    bad.extend_from_slice(&[0; 10]);
    bad_frame_on_work_stream(11, profile(), &bad, true, code::TRUNCATED);
}

fn small_frame_profile() -> Profile {
    let mut p = profile();
    p.limits.frame_bytes_max = 1024;
    p.limits.payload_bytes_max = 512;
    p.limits.batch_messages_max = 64;
    p
}

#[test]
fn oversized_frame_header_fails_before_its_body_arrives() {
    // The header alone, never a body: a decoder that waited for (or buffered) the body would
    // leave the stream hanging and the run would not settle.
    let bad = header(1025, wire::frame_type::SUBMIT);
    bad_frame_on_work_stream(
        12,
        small_frame_profile(),
        &bad,
        false,
        code::FRAME_TOO_LARGE,
    );
    // A header announcing 4 GiB must not make the server reserve it.
    let bad = header(u32::MAX, wire::frame_type::SUBMIT);
    bad_frame_on_work_stream(
        13,
        small_frame_profile(),
        &bad,
        false,
        code::FRAME_TOO_LARGE,
    );
}

#[test]
fn unknown_frame_type_fails_the_stream_only() {
    let mut bad = header(4, 0x7f);
    bad.extend_from_slice(&[1, 2, 3, 4]);
    bad_frame_on_work_stream(14, profile(), &bad, false, code::UNKNOWN_FRAME_TYPE);
}

#[test]
fn invalid_recipient_fails_the_stream_only() {
    for (seed, recipient) in [(15, &b"+0123456789"[..]), (16, b"12345678"), (17, b"+12")] {
        let bad = submit_to(0xbad, recipient);
        bad_frame_on_work_stream(seed, profile(), &bad, false, code::INVALID_RECIPIENT);
    }
}

#[test]
fn second_hello_fails_the_stream_only() {
    let (_, token) = registry();
    let mut bad = Vec::new();
    let mut buf = bytes::BytesMut::new();
    wire::encode_hello(token.as_bytes(), &mut buf);
    bad.extend_from_slice(&buf);
    bad_frame_on_work_stream(18, profile(), &bad, false, code::UNEXPECTED_FRAME);
}

#[test]
fn submit_before_hello_fails_that_stream_and_the_connection_can_still_authenticate() {
    let (reg, token) = registry();
    let mut cfg = SimConfig::new(19, 1, profile());
    cfg.net = NetConfig::lossy(0.01);
    let mut sim = Sim::new(Instant::now(), cfg, &tls(), reg);
    let plan = well_behaved_plan(&token);
    let mut silent = plan.clone();
    silent.auto_hello = false;
    let a = sim.add_client(silent);
    let b = sim.add_client(plan.clone());
    let limit = Duration::from_secs(30);
    assert!(sim.run_until_cond(limit, |s| s.client(a).phase() == Phase::Connected));
    let bad = submit_to(0xbad, b"+15550001111");
    let id = sim.client_open_raw(a, &bad, false).expect("stream credit");
    assert!(sim.run_until_cond(limit, |s| s.client(a).stream(id).failed()));
    assert!(sim.run_until_cond(limit, |s| s.client(a).stream(id).fin_received));
    let st = sim.client(a).stream(id);
    assert_failed_with(st, code::NOT_AUTHENTICATED, false, 19);
    assert_eq!(st.acked, 0);
    assert_eq!(
        batches_in(&sim),
        sim.client(b).batches_acked() + sim.batches_waiting(0) as u64
    );
    // The same connection authenticates on another stream and works.
    sim.client_send_hello(a);
    assert!(sim.run_until_settled(limit));
    assert!(sim.client(a).done(), "{:?}", sim.client(a));
    assert!(sim.client(b).done());
    assert_eq!(sim.server(0).stats().stream_errors, 1);
    sim.check_positions_unique();
}

/// Guards bug: on STOP_SENDING the server stopped its receive half and forgot the stream but
/// never reset its send half, so quinn-proto never freed the stream and the client never got
/// its stream credit back; after `streams_per_connection_max` streams the connection was stuck.
#[test]
fn stop_sending_from_the_client_returns_stream_credit() {
    let (reg, token) = registry();
    let mut profile = profile();
    profile.limits.streams_per_connection_max = 4;
    let mut cfg = SimConfig::new(21, 1, profile);
    // The server still holds each batch when the client's STOP_SENDING arrives.
    cfg.storage = disk(Duration::from_millis(100), Duration::ZERO);
    let mut sim = Sim::new(Instant::now(), cfg, &tls(), reg);
    let mut plan = well_behaved_plan(&token);
    plan.streams = 0;
    let a = sim.add_client(plan);
    let limit = Duration::from_secs(10);
    assert!(sim.run_until_cond(limit, |s| s.client(a).phase() == Phase::Welcomed));
    let r = wire::Recipient::parse(b"+15550001111").unwrap();
    let streams = 12u64;
    for i in 0..streams {
        let mut submit = bytes::BytesMut::new();
        let m = wire::OutMessage {
            client_id: i,
            recipient: &r,
            payload: b"x",
        };
        wire::encode_submit(i, &[m], &mut submit);
        let mut id = None;
        // Bounded: 100 tries 10 ms apart.
        for _ in 0..100 {
            id = sim.client_open_raw(a, &submit, true);
            if id.is_some() {
                break;
            }
            sim.run_for(Duration::from_millis(10));
        }
        let id = id.unwrap_or_else(|| panic!("no stream credit for stream {i}"));
        sim.client_stop_receiving(a, id, 0x99);
        sim.run_for(Duration::from_millis(20));
    }
    sim.run_for(Duration::from_millis(200));
    let stats = sim.server(0).stats();
    assert_eq!(stats.batches_in, streams);
    assert_eq!(stats.acks_orphaned, streams, "nobody wanted these ACKs");
    assert_eq!(sim.client(a).phase(), Phase::Welcomed);
}

/// Guards bug: a bad frame made the server reset its half of the stream at once. The reset
/// discarded ACK bytes not yet delivered (the server counted ACKs the client never got, for
/// batches that already had log positions) and orphaned the batches the stage chain held.
/// Now every batch decoded before the bad frame is answered, whatever the network loses.
#[test]
fn bad_frame_while_batches_are_in_flight_loses_no_ack() {
    // Bounded: 24 seeds of a short run each.
    for seed in 100..124 {
        let (reg, token) = registry();
        let mut cfg = SimConfig::new(seed, 1, profile());
        cfg.net = NetConfig::lossy(0.10);
        cfg.storage = disk(Duration::from_millis(1), Duration::from_millis(2));
        let mut sim = Sim::new(Instant::now(), cfg, &tls(), reg);
        let plan = well_behaved_plan(&token);
        let a = sim.add_client(plan.clone());
        let limit = Duration::from_secs(60);
        assert!(sim.run_until_cond(limit, |s| {
            s.client(a).work_streams().len() == plan.streams
                && s.client(a).work_stream(0).acked >= 5
        }));
        let id = sim.client(a).work_streams()[0];
        assert!(sim.client(a).stream(id).in_flight() > 0, "seed {seed}");
        sim.client_inject(a, id, &header(4, 0x7f), false);
        assert!(sim.run_until_settled(limit), "seed {seed}");
        let ca = sim.client(a);
        let st = ca.stream(id);
        assert_failed_with(st, code::UNKNOWN_FRAME_TYPE, false, seed);
        assert_eq!(
            st.acked, st.sent,
            "seed {seed}: every SUBMIT before the bad frame answered"
        );
        assert_eq!(st.in_flight(), 0);
        let received: u64 = ca.streams().values().map(|s| s.acked).sum();
        let stats = sim.server(0).stats();
        assert_eq!(
            stats.acks_out, received,
            "seed {seed}: every ACK written arrived"
        );
        assert_eq!(stats.acks_orphaned, 0, "seed {seed}");
        assert_eq!(
            received,
            stats.acks_out + stats.acks_orphaned,
            "seed {seed}"
        );
        sim.check_positions_unique();
    }
}

// ---- authentication, limits, migration, timeouts -------------------------------------

#[test]
fn bad_token_closes_the_connection_unauthorized_and_takes_nothing() {
    let (reg, token) = registry();
    let mut sim = Sim::new(
        Instant::now(),
        SimConfig::new(31, 2, profile()),
        &tls(),
        reg,
    );
    // Right business id, wrong secret; and no valid token form at all.
    let mut wrong = token.clone().into_bytes();
    let last = wrong.len() - 1;
    wrong[last] = if wrong[last] == b'0' { b'1' } else { b'0' };
    let bad = [
        sim.add_client(ClientPlan::new(wrong)),
        sim.add_client(ClientPlan::new(&b"c1.1.nonsense"[..])),
    ];
    let good = sim.add_client(well_behaved_plan(&token));
    assert!(sim.run_until_settled(Duration::from_secs(30)));
    for c in bad {
        let client = sim.client(c);
        assert_eq!(client.phase(), Phase::Closed, "{client:?}");
        assert_eq!(client.close_code(), Some(u64::from(code::UNAUTHORIZED)));
        assert!(client.welcome().is_none());
        assert!(client.accepted().is_empty());
        assert!(client.work_streams().is_empty());
    }
    assert!(sim.client(good).done());
    let auth_failures: u64 = (0..2).map(|s| sim.server(s).stats().auth_failures).sum();
    assert_eq!(auth_failures, 2);
    // Only the good client's batches reached the stage chain.
    assert_eq!(batches_in(&sim), sim.client(good).batches_acked());
}

#[test]
fn backpressure_holds_a_stream_to_its_in_flight_bound() {
    let (reg, token) = registry();
    let mut profile = profile();
    profile.limits.batches_in_flight_per_stream_max = 2;
    let mut cfg = SimConfig::new(41, 1, profile);
    // A slow log: batches wait 20 to 30 ms for their ack, out of order.
    cfg.storage = disk(Duration::from_millis(20), Duration::from_millis(10));
    let mut sim = Sim::new(Instant::now(), cfg, &tls(), reg);
    let mut plan = ClientPlan::new(token);
    plan.streams = 1;
    plan.batches_per_stream = 50;
    // The client would keep 16 in flight; the server reads no more than 2 at a time.
    plan.depth = 16;
    let c = sim.add_client(plan);
    assert!(sim.run_until_settled(Duration::from_secs(60)));
    let client = sim.client(c);
    assert!(client.done(), "{client:?}");
    assert_eq!(client.work_stream(0).acked, 50);
    assert_eq!(
        sim.server(0).stats().stream_pending_max,
        2,
        "the server read at most 2 of the stream's batches ahead, and did reach 2"
    );
    assert_eq!(batches_in(&sim), 50);
    sim.check_positions_unique();
}

#[test]
fn a_full_shard_refuses_the_next_connection() {
    let (reg, token) = registry();
    let mut profile = profile();
    profile.limits.connections_per_shard_max = 2;
    let mut sim = Sim::new(Instant::now(), SimConfig::new(51, 1, profile), &tls(), reg);
    let plan = well_behaved_plan(&token);
    let first = [sim.add_client(plan.clone()), sim.add_client(plan.clone())];
    assert!(sim.run_until_cond(Duration::from_secs(10), |s| first
        .iter()
        .all(|&c| s.client(c).phase() == Phase::Welcomed)));
    let third = sim.add_client(plan.clone());
    assert!(sim.run_until_settled(Duration::from_secs(30)));
    let refused = sim.client(third);
    assert_eq!(refused.phase(), Phase::Closed);
    match refused.close_reason() {
        Some(quinn_proto::ConnectionError::ConnectionClosed(c)) => {
            assert_eq!(
                c.error_code,
                quinn_proto::TransportErrorCode::CONNECTION_REFUSED
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    for c in first {
        assert!(sim.client(c).done());
    }
    assert!(sim.server(0).stats().connections_refused >= 1);
    assert_eq!(sim.server(0).stats().connections_accepted, 2);
}

/// `retry = "always"`: every connection first proves its address with a Retry round trip
/// and then works as before.
#[test]
fn with_retry_always_every_connection_proves_its_address_and_works() {
    use courier_pipeline::server::RetryMode;
    let (reg, token) = registry();
    let mut profile = profile();
    profile.quic.retry = RetryMode::Always;
    let mut cfg = SimConfig::new(52, 2, profile);
    cfg.net = NetConfig::lossy(0.02);
    let mut sim = Sim::new(Instant::now(), cfg, &tls(), reg);
    let clients: Vec<usize> = (0..4)
        .map(|_| sim.add_client(well_behaved_plan(&token)))
        .collect();
    assert!(sim.run_until_settled(Duration::from_secs(30)));
    for c in clients {
        assert!(sim.client(c).done(), "{:?}", sim.client(c));
    }
    let (retries, accepted): (u64, u64) = (0..2)
        .map(|s| {
            let st = sim.server(s).stats();
            (st.retries_sent, st.connections_accepted)
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(accepted, 4);
    assert!(
        retries >= 4,
        "one Retry per connection at least, got {retries}"
    );
    assert_eq!(
        sim.server(0).stats().half_open + sim.server(1).stats().half_open,
        0
    );
}

/// `retry = "under_load"`: below `retry_half_open_min` handshakes nobody pays the extra
/// round trip.
#[test]
fn under_load_retry_is_not_sent_below_its_threshold() {
    let (reg, token) = registry();
    let mut profile = profile();
    profile.quic.retry_half_open_min = 8;
    let mut sim = Sim::new(Instant::now(), SimConfig::new(53, 1, profile), &tls(), reg);
    let clients: Vec<usize> = (0..4)
        .map(|_| sim.add_client(well_behaved_plan(&token)))
        .collect();
    assert!(sim.run_until_settled(Duration::from_secs(30)));
    assert!(clients.iter().all(|&c| sim.client(c).done()));
    assert_eq!(sim.server(0).stats().retries_sent, 0);
    // With a threshold of 1, the second of two simultaneous handshakes is sent a Retry.
    let (reg, token) = registry();
    let mut profile = self::profile();
    profile.quic.retry_half_open_min = 1;
    let mut sim = Sim::new(Instant::now(), SimConfig::new(54, 1, profile), &tls(), reg);
    let clients: Vec<usize> = (0..2)
        .map(|_| sim.add_client(well_behaved_plan(&token)))
        .collect();
    assert!(sim.run_until_settled(Duration::from_secs(30)));
    assert!(clients.iter().all(|&c| sim.client(c).done()));
    assert!(sim.server(0).stats().retries_sent >= 1);
}

/// One source address holds at most `connections_per_address_max` connections of a
/// shard; its next handshake is refused while other addresses still connect.
#[test]
fn one_address_holds_at_most_its_share_of_connections() {
    let (reg, token) = registry();
    let mut profile = profile();
    profile.limits.connections_per_address_max = 2;
    let mut sim = Sim::new(Instant::now(), SimConfig::new(55, 1, profile), &tls(), reg);
    let plan = well_behaved_plan(&token);
    let host = sim.add_client(plan.clone());
    let mut same = plan.clone();
    same.host = Some(host);
    let second = sim.add_client(same.clone());
    assert!(
        sim.run_until_cond(Duration::from_secs(10), |s| [host, second]
            .iter()
            .all(|&c| s.client(c).phase() == Phase::Welcomed))
    );
    let third = sim.add_client(same);
    let other = sim.add_client(plan);
    assert!(sim.run_until_settled(Duration::from_secs(30)));
    match sim.client(third).close_reason() {
        Some(quinn_proto::ConnectionError::ConnectionClosed(c)) => assert_eq!(
            c.error_code,
            quinn_proto::TransportErrorCode::CONNECTION_REFUSED
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    for c in [host, second, other] {
        assert!(sim.client(c).done(), "{:?}", sim.client(c));
    }
    let st = sim.server(0).stats();
    assert_eq!((st.address_cap_refused, st.connections_accepted), (1, 3));
}

/// One credential holds at most `connections_per_business_max` authenticated
/// connections of a shard: a HELLO beyond it closes its connection with
/// `too_many_connections`; once one closes, a new one is welcome.
#[test]
fn one_business_holds_at_most_its_share_of_connections() {
    let (reg, token) = registry();
    let mut profile = profile();
    profile.limits.connections_per_business_max = 1;
    let mut sim = Sim::new(Instant::now(), SimConfig::new(56, 1, profile), &tls(), reg);
    let plan = well_behaved_plan(&token);
    let first = sim.add_client(plan.clone());
    assert!(
        sim.run_until_cond(Duration::from_secs(10), |s| s.client(first).phase()
            == Phase::Welcomed)
    );
    let second = sim.add_client(plan.clone());
    assert!(
        sim.run_until_cond(Duration::from_secs(10), |s| s.client(second).phase()
            == Phase::Closed)
    );
    assert_eq!(
        sim.client(second).close_code(),
        Some(u64::from(code::TOO_MANY_CONNECTIONS))
    );
    assert!(sim.client(second).accepted().is_empty());
    assert!(sim.run_until_settled(Duration::from_secs(30)));
    assert!(sim.client(first).done());
    assert_eq!(sim.server(0).stats().business_cap_refused, 1);
}

/// Before HELLO a connection has one stream and HELLO-sized frames: a second stream
/// waits for credit, and a frame header announcing more than a HELLO fails the stream
/// with frame_too_large before any of its body is buffered.
#[test]
fn before_hello_a_connection_gets_one_stream_and_hello_sized_frames() {
    let (reg, token) = registry();
    let mut sim = Sim::new(
        Instant::now(),
        SimConfig::new(57, 1, profile()),
        &tls(),
        reg,
    );
    let mut silent = well_behaved_plan(&token);
    silent.auto_hello = false;
    let a = sim.add_client(silent);
    let limit = Duration::from_secs(10);
    assert!(sim.run_until_cond(limit, |s| s.client(a).phase() == Phase::Connected));
    // 64 KiB announced: far below frame_bytes_max, far above any HELLO.
    let big = header(64 << 10, wire::frame_type::SUBMIT);
    let id = sim
        .client_open_raw(a, &big, false)
        .expect("one stream before HELLO");
    assert!(
        sim.client_open_raw(a, b"", false).is_none(),
        "a second stream before HELLO"
    );
    assert!(sim.run_until_cond(limit, |s| s.client(a).stream(id).failed()));
    assert_failed_with(sim.client(a).stream(id), code::FRAME_TOO_LARGE, false, 57);
    // Authenticated, the connection gets its full allowance and works.
    sim.client_send_hello(a);
    assert!(sim.run_until_settled(Duration::from_secs(30)));
    assert!(sim.client(a).done(), "{:?}", sim.client(a));
}

fn migration_run(seed: u64, steer_by_cid: bool) -> Sim {
    let (reg, token) = registry();
    let mut cfg = SimConfig::new(seed, 2, profile());
    cfg.net = NetConfig::lossy(0.02);
    cfg.steer_by_cid = steer_by_cid;
    let mut sim = Sim::new(Instant::now(), cfg, &tls(), reg);
    let mut plan = well_behaved_plan(&token);
    plan.streams = 4;
    plan.batches_per_stream = 60;
    let a = sim.add_client(plan.clone());
    let b = sim.add_client(plan.clone());
    assert_eq!(a, 0);
    assert_eq!(b, 1);
    assert!(
        sim.run_until_cond(Duration::from_secs(30), |s| s.client(a).batches_acked()
            >= 40)
    );
    let home = sim.client_home_shard(a);
    let now_hashed_to = sim.migrate_client(a);
    assert_ne!(
        home, now_hashed_to,
        "the new address hashes to the other shard"
    );
    sim.run_until_settled(Duration::from_secs(60));
    sim
}

#[test]
fn a_migrated_connection_is_handed_to_its_shard_and_keeps_going() {
    let sim = migration_run(61, true);
    let (a, b) = (sim.client(0), sim.client(1));
    assert!(a.done(), "{a:?}");
    assert!(b.done(), "{b:?}");
    assert!(
        sim.net_stats().handoffs > 0,
        "datagrams went through the hand-off"
    );
    // The connection stayed on its first shard: every position is in that shard's log.
    let home = sim.client_home_shard(0);
    assert!(a.accepted().values().all(|p| p.shard_id() == Some(home)));
    sim.check_positions_unique();
}

#[test]
fn without_the_hand_off_a_migrated_connection_dies() {
    // The model's counter-check. The shard that receives a datagram whose connection ID
    // another shard issued drops it (ShardCidGenerator::validate refuses the ID, so no
    // stateless reset either), and the connection times out.
    let sim = migration_run(61, false);
    let a = sim.client(0);
    assert_eq!(a.phase(), Phase::Closed, "{a:?}");
    assert!(
        matches!(
            a.close_reason(),
            Some(quinn_proto::ConnectionError::TimedOut)
        ),
        "{a:?}"
    );
    assert_eq!(sim.net_stats().handoffs, 0);
    assert!(sim.client(1).done(), "the other connection is unaffected");
}

#[test]
fn a_connection_without_hello_is_closed_after_hello_timeout() {
    let (reg, token) = registry();
    let mut profile = profile();
    profile.limits.hello_timeout_ms = 500;
    let mut sim = Sim::new(Instant::now(), SimConfig::new(71, 1, profile), &tls(), reg);
    let mut silent = well_behaved_plan(&token);
    silent.auto_hello = false;
    let start = sim.now();
    let quiet = sim.add_client(silent);
    let good = sim.add_client(well_behaved_plan(&token));
    assert!(sim.run_until_settled(Duration::from_secs(10)));
    let client = sim.client(quiet);
    assert_eq!(client.phase(), Phase::Closed);
    assert_eq!(client.close_code(), Some(u64::from(code::HELLO_TIMEOUT)));
    // The deadline runs from the first Initial, 5 ms after the client started; the close
    // takes 5 ms to arrive.
    let after = client.closed_at().unwrap() - start;
    assert!(
        (Duration::from_millis(505)..=Duration::from_millis(520)).contains(&after),
        "closed after {after:?}"
    );
    assert_eq!(sim.server(0).stats().hello_timeouts, 1);
    assert!(
        sim.client(good).done(),
        "the authenticated connection is not timed out"
    );
}

#[test]
#[should_panic(expected = "the run does not settle")]
fn a_run_past_its_step_bound_fails_loudly() {
    let (reg, token) = registry();
    let mut cfg = SimConfig::new(81, 1, profile());
    cfg.steps_max = 5;
    let mut sim = Sim::new(Instant::now(), cfg, &tls(), reg);
    sim.add_client(ClientPlan::new(token));
    sim.run_until_settled(Duration::from_secs(10));
}

/// Shuts a shard with 4 connections down mid-run; returns the trace digest.
fn shutdown_run(seed: u64) -> [u8; 32] {
    let (reg, token) = registry();
    let mut sim = Sim::new(
        Instant::now(),
        SimConfig::new(seed, 1, profile()),
        &tls(),
        reg,
    );
    let mut plan = well_behaved_plan(&token);
    plan.batches_per_stream = 1000;
    for _ in 0..4 {
        sim.add_client(plan.clone());
    }
    let limit = Duration::from_secs(10);
    assert!(sim.run_until_cond(limit, |s| s
        .clients()
        .iter()
        .all(|c| c.batches_acked() >= 5)));
    sim.stop_node();
    assert!(sim.run_until_settled(limit));
    sim.digest()
}

/// Guards bug: `Server::close_all` closed connections in `HashMap` order, which differs
/// from run to run, so a shutdown did not replay from its seed.
#[test]
fn shutdown_replays_from_its_seed() {
    let first = shutdown_run(92);
    for _ in 0..4 {
        assert_eq!(shutdown_run(92), first);
    }
}

#[test]
fn shutdown_closes_every_connection_and_late_acks_are_harmless() {
    let (reg, token) = registry();
    let mut cfg = SimConfig::new(91, 1, profile());
    // The stage chain still holds batches when the shard shuts down.
    cfg.storage = disk(Duration::from_millis(40), Duration::from_millis(20));
    let mut sim = Sim::new(Instant::now(), cfg, &tls(), reg);
    let mut plan = well_behaved_plan(&token);
    plan.batches_per_stream = 1000;
    let clients = [sim.add_client(plan.clone()), sim.add_client(plan)];
    let limit = Duration::from_secs(10);
    assert!(sim.run_until_cond(limit, |s| s.client(1).batches_acked() >= 10));
    assert!(sim.batches_waiting(0) > 0);
    sim.stop_node();
    assert!(sim.run_until_settled(limit));
    for c in clients {
        let client = sim.client(c);
        assert_eq!(client.phase(), Phase::Closed);
        assert_eq!(client.close_code(), Some(u64::from(code::SHUTTING_DOWN)));
    }
    // Every connection drains; each batch handed out was acked once, before or after the
    // close (an ACK written into a closed connection is never sent).
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.server(0).connection_count(), 0);
    assert_eq!(sim.batches_waiting(0), 0);
    let st = sim.server(0).stats();
    assert_eq!(st.connections_drained, 2);
    assert_eq!(st.acks_out + st.acks_orphaned, st.batches_in);
    sim.check_positions_unique();
}

// ---- swarm: many seeds, each drawing its own scenario ----------------------------------

/// A bad input for a vandal to write on one of its streams, and the stream error code the
/// server must answer it with.
fn bad_input(kind: u32, frame_bytes_max: u32, token: &str) -> (Vec<u8>, bool, u32) {
    let mut buf = bytes::BytesMut::new();
    match kind {
        0 => {
            let mut v = header(100, wire::frame_type::SUBMIT);
            v.extend_from_slice(&[0; 10]);
            (v, true, code::TRUNCATED)
        }
        1 => {
            let mut v = header(4, 0x7f);
            v.extend_from_slice(&[1, 2, 3, 4]);
            (v, false, code::UNKNOWN_FRAME_TYPE)
        }
        2 => (
            header(frame_bytes_max + 1, wire::frame_type::SUBMIT),
            false,
            code::FRAME_TOO_LARGE,
        ),
        3 => (submit_to(1, b"+0123456"), false, code::INVALID_RECIPIENT),
        4 => {
            wire::encode_hello(token.as_bytes(), &mut buf);
            (buf.to_vec(), false, code::UNEXPECTED_FRAME)
        }
        5 => {
            let w = wire::Welcome {
                business_id: 1,
                batch_messages_max: 1,
                payload_bytes_max: 1,
                frame_bytes_max: 1,
                features: None,
            };
            wire::encode_welcome(&w, &mut buf);
            (buf.to_vec(), false, code::UNEXPECTED_FRAME)
        }
        6 => {
            // SUBMIT announcing zero messages.
            let mut v = header(12, wire::frame_type::SUBMIT);
            v.extend_from_slice(&[0; 12]);
            (v, false, code::BAD_BATCH_SIZE)
        }
        7 => {
            // A valid SUBMIT body with a byte too many.
            let mut v = submit_to(2, b"+15550001111");
            let len = u32::from_le_bytes(v[..4].try_into().unwrap()) + 1;
            v[..4].copy_from_slice(&len.to_le_bytes());
            v.push(0);
            (v, false, code::MALFORMED_FRAME)
        }
        _ => {
            // HELLO of an unsupported version.
            let mut v = header(4, wire::frame_type::HELLO);
            v.extend_from_slice(&3u16.to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes());
            (v, false, code::BAD_HELLO)
        }
    }
}

/// Something that happens at a drawn instant of a swarm run.
#[derive(Debug)]
enum Chaos {
    /// A client moves to a new address.
    Migrate(usize),
    /// The vandal writes bad input number `kind` on its work stream `stream`.
    BadInput { stream: usize, kind: u32 },
    /// The vandal stops reading its work stream `stream`.
    StopReading { stream: usize },
}

/// One scenario drawn from `seed`: shards, clients, network faults, ack latency, batch
/// shapes, flow-control windows, client migrations, and perhaps a vandal that writes bad
/// frames and abandons streams. Every well-behaved client must finish with every batch
/// acked once and every position unique; each vandalised stream fails with its code and
/// the vandal's other streams finish.
fn swarm_run(seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5a5a_5a5a);
    let (reg, token) = registry();
    let mut profile = profile();
    profile.limits.batches_in_flight_per_stream_max = r.random_range(1..=8);
    // The deadline runs from the first Initial; at 15% loss a handshake whose first RTT
    // sample includes a PTO can take longer than the default 10 s (seed 174 took 8 s, and its
    // HELLO, dropped as 1-RTT data before the handshake completed, waited for the next PTO).
    // The HELLO timeout has its own test.
    profile.limits.hello_timeout_ms = 60_000;
    let small_windows = r.random_bool(0.5);
    if small_windows {
        // Small windows: frames span many reads and flow control binds.
        profile.quic.stream_receive_window_bytes = 16 << 10;
        profile.quic.connection_receive_window_bytes = r.random_range(16..=64) << 10;
    }
    let frame_bytes_max = profile.limits.frame_bytes_max;
    let shards = r.random_range(1..=3);
    let mut cfg = SimConfig::new(seed, shards, profile);
    cfg.net = NetConfig::lossy(r.random_range(0.0..0.15));
    cfg.net.reorder = r.random_range(0.0..0.1);
    cfg.storage = disk(
        Duration::from_micros(r.random_range(0..20_000)),
        Duration::from_micros(r.random_range(0..20_000)),
    );
    let mut sim = Sim::new(Instant::now(), cfg, &tls(), reg);
    let clients = r.random_range(1..=4);
    for _ in 0..clients {
        let mut plan = ClientPlan::new(token.as_bytes());
        plan.streams = r.random_range(1..=6);
        plan.batches_per_stream = r.random_range(1..=40);
        plan.depth = r.random_range(1..=10);
        plan.batch_messages = r.random_range(1..=200);
        plan.payload_bytes = r.random_range(1..=1500);
        sim.add_client(plan);
    }
    // No migration with small windows: see
    // nat_rebinding_under_loss_with_small_windows_stalls_in_quinn_proto.
    let migrations = if small_windows {
        0
    } else {
        r.random_range(0..=2)
    };
    let mut chaos: Vec<(Duration, Chaos)> = (0..migrations)
        .map(|_| {
            let at = Duration::from_millis(r.random_range(50..2000));
            (at, Chaos::Migrate(r.random_range(0..clients)))
        })
        .collect();
    let vandal = r.random_bool(0.5).then(|| {
        let mut plan = ClientPlan::new(token.as_bytes());
        plan.streams = 4;
        plan.batches_per_stream = 30;
        plan.depth = r.random_range(1..=4);
        sim.add_client(plan)
    });
    if vandal.is_some() {
        for stream in 0..3 {
            let at = Duration::from_millis(r.random_range(100..1500));
            let act = if r.random_bool(0.8) {
                Chaos::BadInput {
                    stream,
                    kind: r.random_range(0..9),
                }
            } else {
                Chaos::StopReading { stream }
            };
            chaos.push((at, act));
        }
    }
    chaos.sort_by_key(|(at, _)| *at);
    if std::env::var_os("SWARM_DEBUG").is_some() {
        eprintln!(
            "seed {seed}: {:?}\nplans {:?}\nchaos {chaos:?}",
            sim.config(),
            sim.clients().iter().map(|c| c.plan()).collect::<Vec<_>>()
        );
    }
    let limit = Duration::from_secs(60);
    let mut expected = Vec::new();
    for (at, act) in chaos {
        let deadline = sim.at(at).max(sim.now());
        sim.run_until(deadline);
        match act {
            Chaos::Migrate(c) => {
                // A client may not move during its handshake (RFC 9000 9): its Initials
                // carry no connection ID a shard can steer by, so the move would strand it.
                assert!(
                    sim.run_until_cond(limit, |s| s.client(c).welcome().is_some()),
                    "seed {seed}: client {c} never authenticated"
                );
                sim.migrate_client(c);
            }
            Chaos::BadInput { stream, .. } | Chaos::StopReading { stream } => {
                let v = vandal.expect("vandal acts");
                let open = |s: &Sim| s.client(v).work_streams().len() > stream;
                assert!(sim.run_until_cond(limit, open), "seed {seed}");
                let id = sim.client(v).work_streams()[stream];
                let st = sim.client(v).stream(id);
                if st.finished_sending() || st.settled() {
                    continue; // too late to break it
                }
                if let Chaos::BadInput { kind, .. } = act {
                    let (bytes, fin, code) = bad_input(kind, frame_bytes_max, &token);
                    sim.client_inject(v, id, &bytes, fin);
                    expected.push((id, Some(code)));
                } else {
                    sim.client_stop_receiving(v, id, 0x77);
                    expected.push((id, None));
                }
            }
        }
    }
    let settled = sim.run_until_settled(Duration::from_secs(600));
    assert!(settled, "seed {seed}: {sim:?}");
    let mut batches = 0;
    for c in sim.clients() {
        if Some(c.index()) == vandal {
            for &id in c.work_streams() {
                let st = c.stream(id);
                match expected.iter().find(|(e, _)| *e == id) {
                    Some((_, Some(code))) => assert_eq!(
                        st.error_code(),
                        Some(*code),
                        "seed {seed}: vandalised {id}: {st:?}"
                    ),
                    Some((_, None)) => assert!(st.receive_stopped),
                    None => {
                        assert!(st.fin_received && !st.failed(), "seed {seed}: {id}: {st:?}");
                        assert_eq!(st.acked, c.plan().batches_per_stream, "seed {seed}");
                    }
                }
            }
            continue;
        }
        if !c.done() {
            for (id, st) in c.streams() {
                eprintln!("seed {seed}: client {} {id}: {st:?}", c.index());
            }
            for s in 0..shards {
                eprintln!("seed {seed}: shard {s}: {:?}", sim.server(s));
            }
        }
        assert!(c.done(), "seed {seed}: {c:?}");
        assert_eq!(c.not_accepted(), 0, "seed {seed}");
        batches += c.batches_acked();
    }
    let stream_errors: u64 = (0..shards)
        .map(|s| sim.server(s).stats().stream_errors)
        .sum();
    let bad_inputs = expected.iter().filter(|(_, code)| code.is_some()).count() as u64;
    assert_eq!(stream_errors, bad_inputs, "seed {seed}");
    let totals = sim.server_totals().expect("the node runs");
    assert_eq!(
        totals.batches_in,
        totals.acks_out + totals.acks_orphaned,
        "seed {seed}"
    );
    if vandal.is_none() {
        assert_eq!(totals.batches_in, batches, "seed {seed}");
        for s in 0..shards {
            assert_eq!(sim.server(s).stats().acks_orphaned, 0, "seed {seed}");
        }
    }
    sim.check_positions_unique();
}

/// 24 seeds by default; `COURIER_SIM_SEEDS=FIRST..END` runs others (a failing seed then
/// reruns alone as `COURIER_SIM_SEEDS=N..N+1`).
#[test]
fn swarm_of_seeds() {
    let seeds = match std::env::var("COURIER_SIM_SEEDS") {
        Ok(range) => {
            let (a, b) = range.split_once("..").expect("FIRST..END");
            a.parse::<u64>().expect("FIRST")..b.parse::<u64>().expect("END")
        }
        Err(_) => 1000..1024,
    };
    for seed in seeds {
        swarm_run(seed);
    }
}

/// Reproduces a stall that looks like a quinn-proto 0.11.19 bug, not a courier one; ignored
/// until quinn-proto is upgraded or patched (run with `--ignored` to see it).
///
/// A client behind a NAT rebinding (same IP, new port), at 6.8% loss, with 16 KiB stream
/// windows, is blocked by connection flow control and waits for MAX_DATA. The server's
/// connection migrates, validates the new path, and from then on sends nothing at all,
/// not even ACKs: every poll_transmit finds it "blocked by congestion control" while its
/// only armed timer is the idle timeout, so no PTO probe ever unblocks it, and the client
/// times out. The server keeps its part of the contract (the connection is queued and
/// polled after every datagram, and its timer is the one quinn-proto reports); where
/// quinn-proto loses its loss-detection timer is not pinned down yet. 3 of about 750
/// small-window seeds stalled, none of 1,500 with default windows, so the swarm migrates
/// clients only with default windows.
#[test]
#[ignore = "quinn-proto stall after NAT rebinding; see the doc comment"]
fn nat_rebinding_under_loss_with_small_windows_stalls_in_quinn_proto() {
    let (reg, token) = registry();
    let mut profile = profile();
    profile.quic.stream_receive_window_bytes = 16 << 10;
    profile.quic.connection_receive_window_bytes = 27 << 10;
    let mut cfg = SimConfig::new(10, 1, profile);
    cfg.net = NetConfig::lossy(0.068);
    let mut sim = Sim::new(Instant::now(), cfg, &tls(), reg);
    let mut plan = ClientPlan::new(token);
    plan.streams = 2;
    plan.batches_per_stream = 5;
    plan.depth = 9;
    plan.batch_messages = 183;
    plan.payload_bytes = 775;
    sim.add_client(plan);
    sim.run_until(sim.at(Duration::from_millis(1102)));
    assert!(sim.run_until_cond(Duration::from_secs(60), |s| s.client(0).welcome().is_some()));
    sim.migrate_client(0);
    sim.run_until_settled(Duration::from_secs(600));
    let c = sim.client(0);
    assert!(c.done(), "{c:?}");
}
