//! Unit tests of each mechanism through the public API (sketch internals are tested in
//! their modules).

use super::*;
use crate::registry::Tier;

const SECRET: [u8; 16] = *b"0123456789abcdef";

fn num(i: u64) -> Recipient {
    Recipient::parse(format!("+1555{i:07}").as_bytes()).unwrap()
}

fn limits(id: u32, tier: Tier, mps: u32) -> BusinessLimits {
    BusinessLimits {
        id,
        tier,
        mps,
        exempt: false,
        baseline_per_min: 0,
    }
}

#[test]
fn state_per_business_fits_64_kib() {
    let cfg = DetectConfig::default();
    assert!(
        cfg.business_state_bytes_needed() <= BUSINESS_STATE_BYTES_LIMIT,
        "{}",
        cfg.business_state_bytes_needed()
    );
    // Enough recipients to leave exact mode (the sketch ring is the larger state), sent
    // fast, so the surge test is set out of reach (it would pause the sender first).
    let mut d = Detector::new(
        DetectConfig {
            surge_distinct_per_sec_min: 1_000_000,
            ..cfg.clone()
        },
        SECRET,
    );
    let b = limits(1, Tier::Unlimited, 1_000_000);
    let mut t = 0;
    for i in 0..5_000 {
        t += 1;
        d.observe(t, &b, &num(i));
    }
    let bytes = d.business_state_bytes(1).unwrap();
    eprintln!(
        "one business: {bytes} bytes, at most {} bytes",
        cfg.business_state_bytes_needed()
    );
    assert!(bytes <= cfg.business_state_bytes_needed(), "{bytes}");
    assert!(bytes <= BUSINESS_STATE_BYTES_LIMIT, "{bytes}");
    assert!(
        matches!(
            d.businesses[&1].recipients,
            recipients::Recipients::Sketch(_)
        ),
        "sketch mode, the larger"
    );
}

#[test]
fn rate_is_limited_with_a_retry_after() {
    // Fan-out detection off: this test sends to many new numbers on purpose.
    let cfg = DetectConfig {
        surge_distinct_per_sec_min: 1_000_000,
        ..DetectConfig::default()
    };
    let mut d = Detector::new(cfg, SECRET);
    let b = limits(1, Tier::Unlimited, 10);
    // One second of burst: 10 admitted at once, then throttled.
    let v: Vec<_> = (0..12).map(|i| d.observe(1_000, &b, &num(i))).collect();
    assert!(v[..10].iter().all(|v| *v == Verdict::Admit), "{v:?}");
    let Verdict::Throttle { retry_after_ms } = v[10] else {
        panic!("{v:?}");
    };
    assert_eq!(retry_after_ms, 100, "one token per 100 ms at 10 mps");
    assert_eq!(d.observe(1_100, &b, &num(20)), Verdict::Admit);
    // Over 10 s at 100 attempts/s: about 10/s admitted.
    let mut admitted = 0;
    for i in 0..1000u64 {
        if d.observe(2_000 + i * 10, &b, &num(100 + i)) == Verdict::Admit {
            admitted += 1;
        }
    }
    assert!((100..=111).contains(&admitted), "{admitted}");
}

#[test]
fn same_recipient_is_throttled_within_the_window() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let b = limits(1, Tier::Unlimited, 1000);
    let r = num(7);
    for k in 0..5 {
        assert_eq!(d.observe(1_000 + k, &b, &r), Verdict::Admit);
    }
    let v = d.observe(1_010, &b, &r);
    assert!(matches!(v, Verdict::Throttle { .. }), "{v:?}");
    assert_eq!(
        d.observe(1_010, &b, &num(8)),
        Verdict::Admit,
        "others unaffected"
    );
    // Two windows later the count is gone.
    assert_eq!(d.observe(21_000, &b, &r), Verdict::Admit);
}

#[test]
fn tier_limit_rejects_new_recipients_but_not_known_ones() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let b = limits(1, Tier::T250, 1000);
    let mut t = 0;
    for i in 0..250 {
        t += 1_000; // slow: no surge
        assert_eq!(d.observe(t, &b, &num(i)), Verdict::Admit, "{i}");
    }
    t += 1_000;
    assert_eq!(
        d.observe(t, &b, &num(250)),
        Verdict::Reject(Reason::MessagingLimitReached)
    );
    assert_eq!(d.observe(t, &b, &num(3)), Verdict::Admit, "known recipient");
    // 24 hours after the first sends, the window has room again.
    t = 25 * 3_600_000;
    assert_eq!(d.observe(t, &b, &num(250)), Verdict::Admit);
    assert_eq!(d.recipients_24h(1), Some(1));
}

#[test]
fn blast_is_paused_with_a_signal_and_operator_unpauses() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let b = limits(9, Tier::T100k, 80);
    let start = 10_000_000;
    let mut flagged_at = None;
    for i in 0..2_000u64 {
        let t = start + i; // 1,000 attempts per second to numbers never seen
        if d.observe(t, &b, &num(i)) == Verdict::Reject(Reason::SenderPaused) {
            flagged_at = Some(t);
            break;
        }
    }
    let at = flagged_at.expect("blast flagged");
    assert!(at - start < 1_000, "flagged after {} ms", at - start);
    let s = d.poll_signal().expect("signal");
    assert_eq!(
        (s.business_id, s.paused, s.why),
        (9, true, Some(Why::FanOutSurge))
    );
    assert_eq!(
        d.observe(at + 60_000, &b, &num(5)),
        Verdict::Reject(Reason::SenderPaused),
        "stays paused"
    );
    assert!(d.unpause(9));
    assert_eq!(d.observe(at + 60_001, &b, &num(5)), Verdict::Admit);
    assert!(!d.signal(9).unwrap().paused);
}

#[test]
fn report_storm_turns_red_and_lowers_the_tier() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let b = limits(3, Tier::T10k, 100);
    for i in 0..1_000u64 {
        d.observe(i * 100, &b, &num(i));
    }
    d.report(100_000, 3, 2);
    assert_eq!(
        d.signal(3).unwrap().rating,
        Rating::Green,
        "below reports_min"
    );
    d.report(100_000, 3, 8); // 10 reports / 1000 delivered = 10,000 ppm
    let s = d.signal(3).unwrap();
    assert_eq!(s.rating, Rating::Red);
    assert_eq!(s.tier, Tier::T2k);
    assert_eq!(s.why, Some(Why::QualityRed));
    let mut polled = Vec::new();
    while let Some(s) = d.poll_signal() {
        polled.push(s);
    }
    assert!(polled.iter().any(|s| s.rating == Rating::Red), "{polled:?}");
    // Operator restores the tier at once.
    assert!(d.set_limits(3, Tier::T10k, 100));
    assert_eq!(d.signal(3).unwrap().tier, Tier::T10k);
}

#[test]
fn set_limits_takes_effect_on_the_next_message() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let b = limits(4, Tier::Unlimited, 1000);
    assert_eq!(d.observe(0, &b, &num(1)), Verdict::Admit);
    d.set_limits(4, Tier::T250, 1);
    // The registry still says 1000 mps; the operator's 1 mps wins: the bucket shrinks to
    // one token, so of two more messages in the same millisecond one is throttled.
    assert_eq!(d.observe(1, &b, &num(2)), Verdict::Admit);
    let v = d.observe(1, &b, &num(3));
    assert_eq!(
        v,
        Verdict::Throttle {
            retry_after_ms: 1000
        }
    );
    assert_eq!(d.signal(4).unwrap().tier, Tier::T250);
}

#[test]
fn billing_counts_reset_each_day() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let b = limits(5, Tier::Unlimited, 1000);
    d.observe(0, &b, &num(1));
    d.record_accepted(10, 5, 40);
    d.record_accepted(20, 5, 2);
    assert_eq!(d.signal(5).unwrap().accepted_today, 42);
    d.record_accepted(86_400_000 + 1, 5, 1);
    assert_eq!(d.signal(5).unwrap().accepted_today, 1);
}

#[test]
fn table_is_bounded() {
    let cfg = DetectConfig {
        businesses_max: 2,
        ..DetectConfig::default()
    };
    let mut d = Detector::new(cfg, SECRET);
    for id in 1..=2 {
        assert_eq!(
            d.observe(0, &limits(id, Tier::T250, 80), &num(1)),
            Verdict::Admit
        );
    }
    assert!(matches!(
        d.observe(0, &limits(3, Tier::T250, 80), &num(1)),
        Verdict::Throttle { .. }
    ));
    assert_eq!(d.stats().table_full, 1);
}

#[test]
fn debug_and_checkpoint_hold_no_recipient() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let b = limits(6, Tier::T2k, 1000);
    let numbers: Vec<Recipient> = (0..200)
        .map(|i| Recipient::parse(format!("+4915{:09}", 123_456_789 - i * 7).as_bytes()).unwrap())
        .collect();
    for (i, r) in numbers.iter().enumerate() {
        d.observe(i as u64 * 50, &b, r);
    }
    let dbg = format!("{d:?} {:?}", d.export_delta(20_000));
    let bytes = d.checkpoint();
    for r in &numbers {
        let digits = &r.as_str()[1..];
        assert!(!dbg.contains(digits), "Debug shows a number");
        assert!(
            !bytes.windows(digits.len()).any(|w| w == digits.as_bytes()),
            "checkpoint holds a number"
        );
        // Not even the last 7 digits.
        let tail = &digits[digits.len() - 7..];
        assert!(!bytes.windows(7).any(|w| w == tail.as_bytes()));
    }
}

#[test]
fn checkpoint_round_trips_and_refuses_damage() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let b = limits(7, Tier::T250, 1000);
    for i in 0..250 {
        d.observe(i * 1_000, &b, &num(i));
    }
    d.record_accepted(300_000, 7, 250);
    let bytes = d.checkpoint();
    let mut e = Detector::new(DetectConfig::default(), SECRET);
    e.restore(&bytes).unwrap();
    assert_eq!(e.checkpoint(), bytes, "restore(checkpoint) is exact");
    assert_eq!(
        e.observe(300_000, &b, &num(999)),
        Verdict::Reject(Reason::MessagingLimitReached),
        "the 24 h window survives"
    );
    assert_eq!(e.signal(7).unwrap().accepted_today, 250);

    let mut bad = bytes.clone();
    bad[40] ^= 1;
    assert_eq!(e.restore(&bad), Err(CheckpointError::Checksum));
    assert_eq!(
        e.restore(&bytes[..bytes.len() - 1]),
        Err(CheckpointError::Checksum)
    );
    assert_eq!(e.restore(b"nope"), Err(CheckpointError::Truncated));
    let other = DetectConfig {
        hll_precision: 10,
        ..DetectConfig::default()
    };
    assert_eq!(
        Detector::new(other, SECRET).restore(&bytes),
        Err(CheckpointError::Config("hll_precision"))
    );
}

/// The recipient hash changed in checkpoint version 2: a version-1 checkpoint (same
/// layout) must not lift a pause or lose billing on the upgrade, and must not be read as
/// if its hashes were this build's.
#[test]
fn a_version_1_checkpoint_keeps_pauses_and_billing_but_not_its_hashes() {
    // Version 1 has version 2's layout: the version-2 fixture (see the test below),
    // relabelled.
    let mut v1 = include_bytes!("fixtures/version-2.ckpt").to_vec();
    v1[4..6].copy_from_slice(&1u16.to_le_bytes());
    let n = v1.len() - 4;
    let crc = super::keyed::crc32c(&v1[..n]);
    v1[n..].copy_from_slice(&crc.to_le_bytes());

    let b = limits(7, Tier::T250, 1000);
    let l = limits(11, Tier::T100k, 80);
    let mut e = Detector::new(DetectConfig::default(), SECRET);
    e.restore(&v1).unwrap();
    assert_eq!(
        e.observe(300_000, &l, &num(1)),
        Verdict::Reject(Reason::SenderPaused),
        "the pause survives the upgrade"
    );
    assert_eq!(e.signal(7).unwrap().accepted_today, 250);
    // The 24 h window was built from the old hashes: it starts again.
    assert_eq!(e.observe(300_000, &b, &num(999)), Verdict::Admit);
    // Other versions are still refused.
    let mut v5 = v1.clone();
    v5[4..6].copy_from_slice(&5u16.to_le_bytes());
    let crc5 = super::keyed::crc32c(&v5[..n]);
    v5[n..].copy_from_slice(&crc5.to_le_bytes());
    assert_eq!(e.restore(&v5), Err(CheckpointError::Version(5)));
}

#[test]
fn pause_and_unpause_travel_between_shards_by_epoch() {
    let mut a = Detector::new(DetectConfig::default(), SECRET);
    let mut b = Detector::new(DetectConfig::default(), SECRET);
    let l = limits(11, Tier::T100k, 80);
    assert_eq!(b.observe(0, &l, &num(1)), Verdict::Admit);
    // A blast on shard a only.
    let mut t = 1_000;
    while a.observe(t, &l, &num(t)) != Verdict::Reject(Reason::SenderPaused) {
        t += 1;
    }
    let d = a.export_delta(t);
    b.merge(t, &d);
    assert_eq!(
        b.observe(t + 1, &l, &num(1)),
        Verdict::Reject(Reason::SenderPaused),
        "the pause reached shard b"
    );
    // The operator unpauses on shard b; shard a learns it from b's delta.
    assert!(b.unpause(11));
    let d = b.export_delta(t + 100);
    a.merge(t + 100, &d);
    assert!(!a.signal(11).unwrap().paused);
    assert_eq!(a.signal(11).unwrap().why, Some(Why::Operator));
    // An old delta (lower epoch) does not re-pause.
    b.merge(t + 100, &Delta::default());
    assert!(!b.signal(11).unwrap().paused);
}

#[test]
fn recipients_merge_across_shards() {
    let mut a = Detector::new(DetectConfig::default(), SECRET);
    let mut b = Detector::new(DetectConfig::default(), SECRET);
    let l = limits(12, Tier::T250, 1000);
    // Shards must be exchanging before events are recorded.
    a.export_delta(0);
    b.export_delta(0);
    let mut t = 0;
    for i in 0..200 {
        t += 1_000;
        let d = if i % 2 == 0 { &mut a } else { &mut b };
        assert_eq!(d.observe(t, &l, &num(i)), Verdict::Admit);
    }
    let (da, db) = (a.export_delta(t), b.export_delta(t));
    a.merge(t, &db);
    b.merge(t, &da);
    assert_eq!(a.recipients_24h(12), Some(200));
    assert_eq!(b.recipients_24h(12), Some(200));
}

#[test]
fn exempt_business_is_never_limited_but_is_billed() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let b = BusinessLimits {
        exempt: true,
        ..limits(9, Tier::T250, 1)
    };
    // A blast far over its tier, rate and fan-out, and one number many times: all admitted.
    for i in 0..5_000u64 {
        assert_eq!(d.observe(1_000 + i / 10, &b, &num(i)), Verdict::Admit);
        assert_eq!(d.observe(1_000 + i / 10, &b, &num(7)), Verdict::Admit);
    }
    d.record_accepted(2_000, 9, 10_000);
    let s = d.signal(9).unwrap();
    assert_eq!((s.paused, s.accepted_today), (false, 10_000));
    // The same traffic from a business that is not exempt is stopped.
    let c = limits(10, Tier::T250, 1);
    let admitted = (0..5_000u64)
        .filter(|&i| d.observe(1_000 + i / 10, &c, &num(i)) == Verdict::Admit)
        .count();
    assert!(admitted < 10, "{admitted}");
}

#[test]
fn a_shard_that_never_saw_the_business_reports_its_registry_tier() {
    let cfg = DetectConfig::default();
    let mut a = Detector::new(cfg.clone(), SECRET);
    let mut b = Detector::new(cfg, SECRET);
    let l = limits(3, Tier::T10k, 100);
    for i in 0..1_000u64 {
        a.observe(i * 100, &l, &num(i));
    }
    a.report(100_000, 3, 10); // red: one step down, to 2,000
    let d = a.export_delta(100_000);
    b.merge(100_000, &d);
    let _ = b.export_delta(100_050);
    assert_eq!(a.signal(3).unwrap().tier, Tier::T2k);
    assert_eq!(
        b.signal(3).unwrap().tier,
        Tier::T2k,
        "b holds the registry's tier (from a), demoted once, not a placeholder"
    );
}

#[test]
fn reports_that_reach_a_shard_before_the_business_does_are_passed_on() {
    let cfg = DetectConfig::default();
    let mut a = Detector::new(cfg.clone(), SECRET);
    let mut b = Detector::new(cfg, SECRET);
    let l = limits(3, Tier::T10k, 100);
    for i in 0..1_000u64 {
        a.observe(i * 100, &l, &num(i));
    }
    // b has not heard of business 3 yet: it keeps the reports without rating it...
    b.report(100_000, 3, 20);
    assert_eq!(
        b.signal(3).unwrap().rating,
        Rating::Green,
        "nothing delivered here"
    );
    // ...and passes them on; a, which saw the 1,000 deliveries, rates it red.
    let d = b.export_delta(100_010);
    a.merge(100_010, &d);
    let s = a.signal(3).unwrap();
    assert_eq!((s.rating, s.tier), (Rating::Red, Tier::T2k));
}

#[test]
fn a_declared_baseline_lets_a_known_large_sender_start_at_its_volume() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    // 1,000 new numbers a second from a business new to this detector...
    let known = BusinessLimits {
        baseline_per_min: 60_000,
        ..limits(1, Tier::Unlimited, 100_000)
    };
    let unknown = limits(2, Tier::Unlimited, 100_000);
    let mut paused = [false; 2];
    for i in 0..3_000u64 {
        let t = 1_000 + i;
        paused[0] |= d.observe(t, &known, &num(i)) == Verdict::Reject(Reason::SenderPaused);
        paused[1] |=
            d.observe(t, &unknown, &num(1_000_000 + i)) == Verdict::Reject(Reason::SenderPaused);
    }
    // ...is its normal when declared (60,000 a minute), and a blast when not.
    assert_eq!(paused, [false, true]);
    // A declared baseline is no licence: ten times it is a surge, paused at the factor
    // (5) times it.
    let modest = BusinessLimits {
        baseline_per_min: 1_200,
        ..limits(3, Tier::Unlimited, 100_000)
    };
    let admitted = (0..400u64)
        .take_while(|&i| d.observe(20_000 + i * 5, &modest, &num(7_000_000 + i)) == Verdict::Admit)
        .count();
    assert!(
        (95..=100).contains(&admitted),
        "5x a declared 20 a second (not the 50 floor) pauses: after {admitted}"
    );
}

#[test]
fn a_batch_decides_as_its_messages_one_by_one() {
    // Small tiers, rates and table so that every verdict kind occurs: admitted, throttled
    // (rate and same recipient), limit reached, paused by a surge, table full; and an
    // exempt business.
    let cfg = DetectConfig {
        businesses_max: 4,
        surge_distinct_per_sec_min: 200,
        ..DetectConfig::default()
    };
    let mut one = Detector::new(cfg.clone(), SECRET);
    let mut batched = Detector::new(cfg, SECRET);
    // 1: few recipients (same-recipient throttling); 2: exempt; 3: tier 250, then a blast;
    // 4: 20 mps (rate throttling); 5: no room in the table.
    let mut ls = [
        limits(1, Tier::T2k, 1_000),
        limits(2, Tier::T10k, 1_000),
        limits(3, Tier::T250, 1_000),
        limits(4, Tier::T2k, 20),
        limits(5, Tier::T2k, 1_000),
    ];
    ls[1].exempt = true;
    let mut kinds = HashMap::<&str, u32>::new();
    let mut state = 1u64;
    let mut out = Vec::new();
    for batch in 0..400u64 {
        let now = 1_000 + batch * 37;
        let b = &ls[(batch % 5) as usize];
        let blast = b.id == 3 && batch >= 300;
        let n = if blast { 100 } else { 1 + batch % 50 };
        let rs: Vec<Recipient> = (0..n)
            .map(|i| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                if blast {
                    num(1_000_000 + batch * 100 + i)
                } else if b.id == 1 {
                    num(state >> 33 & 63)
                } else {
                    num(state >> 33 & 511)
                }
            })
            .collect();
        let want: Vec<Verdict> = rs.iter().map(|r| one.observe(now, b, r)).collect();
        out.clear();
        batched.observe_batch(now, b, &rs, &mut out);
        assert_eq!(out, want, "batch {batch}");
        if batch % 20 == 19 {
            // Recipient events and counters for the peers, as the shell takes them.
            let (a, b) = (one.export_delta(now), batched.export_delta(now));
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "batch {batch}");
        }
        for v in want {
            let k = match v {
                Verdict::Admit => "admit",
                Verdict::Throttle {
                    retry_after_ms: 1000,
                } => "throttle 1000",
                Verdict::Throttle { .. } => "throttle",
                Verdict::Reject(Reason::MessagingLimitReached) => "limit",
                Verdict::Reject(Reason::SenderPaused) => "paused",
                Verdict::Reject(_) => "other",
            };
            *kinds.entry(k).or_default() += 1;
        }
    }
    for k in ["admit", "throttle", "limit", "paused", "throttle 1000"] {
        assert!(kinds.get(k).copied().unwrap_or(0) > 0, "no {k}: {kinds:?}");
    }
    assert_eq!(one.checkpoint(), batched.checkpoint());
    assert_eq!(one.stats(), batched.stats());
}

/// Sends `numbers` as a client following the README does: one batch, then the messages
/// that came back throttled again after the largest `retry_after_ms` of the round (or
/// after `fixed_wait_ms`, a client that ignores it), for at most `rounds` rounds.
/// Returns the last verdict of each message and the time the last round was sent.
fn send_with_retries(
    d: &mut Detector,
    start_ms: u64,
    b: &BusinessLimits,
    numbers: &[Recipient],
    fixed_wait_ms: Option<u64>,
    rounds: usize,
) -> (Vec<Verdict>, u64) {
    let mut last = vec![Verdict::Admit; numbers.len()];
    let mut todo: Vec<usize> = (0..numbers.len()).collect();
    let mut now = start_ms;
    let mut out = Vec::new();
    for _ in 0..rounds {
        out.clear();
        d.observe_batch(now, b, todo.iter().map(|&i| &numbers[i]), &mut out);
        let mut wait = 0;
        let mut again = Vec::new();
        for (&i, v) in todo.iter().zip(&out) {
            last[i] = *v;
            if let Verdict::Throttle { retry_after_ms } = *v {
                wait = wait.max(u64::from(retry_after_ms));
                again.push(i);
            }
        }
        if again.is_empty() {
            break;
        }
        todo = again;
        now += fixed_wait_ms.unwrap_or(wait);
    }
    (last, now)
}

/// Issue 14, first case: a business at 10 msg/s sends 30 distinct numbers and resends
/// the throttled ones after their retry-after. It used to end with 11 accepted and 19
/// `sender_paused` (each retry counted as a new recipient until 50 "distinct" made a
/// surge). Now all 30 are admitted within three rounds, and nothing is paused, even for
/// a client that retries every 10 ms whatever it is told.
#[test]
fn retries_of_throttled_messages_are_not_new_recipients() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let b = limits(21, Tier::T2k, 10);
    let numbers: Vec<Recipient> = (0..30).map(|i| num(400 + i)).collect();
    let (last, end) = send_with_retries(&mut d, 1_000, &b, &numbers, None, 10);
    assert!(last.iter().all(|v| *v == Verdict::Admit), "{last:?}");
    assert!(
        end - 1_000 <= 2_000,
        "three rounds, one second apart: {end}"
    );
    assert!(!d.signal(21).unwrap().paused);
    assert_eq!(
        d.recipients_24h(21),
        Some(30),
        "each counted once for the tier"
    );

    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let numbers: Vec<Recipient> = (0..45).map(|i| num(600 + i)).collect();
    let (last, _) = send_with_retries(&mut d, 1_000, &b, &numbers, Some(10), 1_000);
    assert!(last.iter().all(|v| *v == Verdict::Admit), "{last:?}");
    assert!(!d.signal(21).unwrap().paused);
    assert!(d.poll_signal().is_none());
}

#[test]
fn the_rate_retry_after_spreads_a_throttled_batch_over_the_refill() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let b = limits(22, Tier::T2k, 10);
    let numbers: Vec<Recipient> = (0..30).map(|i| num(800 + i)).collect();
    let mut out = Vec::new();
    d.observe_batch(5_000, &b, &numbers, &mut out);
    let waits: Vec<u32> = out
        .iter()
        .filter_map(|v| match v {
            Verdict::Throttle { retry_after_ms } => Some(*retry_after_ms),
            _ => None,
        })
        .collect();
    let want: Vec<u32> = (1..=10).map(|k| k * 100).chain([1_000; 10]).collect();
    assert_eq!(waits, want, "a token each, up to a full bucket");
    // A message throttled later, while those wait, is told to come after them.
    assert_eq!(
        d.observe(5_050, &b, &num(900)),
        Verdict::Throttle {
            retry_after_ms: 950
        }
    );
    // Once the promised times have passed, the next one waits for one token again.
    d.observe_batch(8_000, &b, &numbers[..10], &mut out);
    assert_eq!(
        d.observe(8_000, &b, &num(901)),
        Verdict::Throttle {
            retry_after_ms: 100
        }
    );
}

/// Issue 14, second case: a sender declared at 60,000 recipients a minute sends 1,000
/// fresh numbers a second. The count-min sketch (1,024 counters a row) saturated and
/// throttled 5-18 % of them; now none is throttled. Its jump to ten times that is a surge,
/// paused within a second, and the pause says what was measured.
#[test]
fn a_large_sender_of_fresh_numbers_is_never_throttled_and_its_10x_jump_is_paused() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let b = BusinessLimits {
        baseline_per_min: 60_000,
        ..limits(23, Tier::Unlimited, 100_000)
    };
    let start = 3_600_000;
    let mut n = 0u64;
    let mut out = Vec::new();
    // 10 s at 1,000 a second, batches of 50 every 50 ms.
    for k in 0..200u64 {
        let batch: Vec<Recipient> = (0..50).map(|i| num(1_000_000 + n + i)).collect();
        n += 50;
        out.clear();
        d.observe_batch(start + k * 50, &b, &batch, &mut out);
        assert!(out.iter().all(|v| *v == Verdict::Admit), "{k}: {out:?}");
    }
    // Then 10,000 a second: batches of 50 every 5 ms.
    let jump = start + 10_000;
    let mut paused_at = None;
    for k in 0..400u64 {
        let batch: Vec<Recipient> = (0..50).map(|i| num(1_000_000 + n + i)).collect();
        n += 50;
        out.clear();
        let now = jump + k * 5;
        d.observe_batch(now, &b, &batch, &mut out);
        if out.contains(&Verdict::Reject(Reason::SenderPaused)) {
            paused_at = Some(now);
            break;
        }
        assert!(out.iter().all(|v| *v == Verdict::Admit), "{k}: {out:?}");
    }
    let at = paused_at.expect("the 10x jump is paused");
    assert!(at - jump < 1_000, "paused {} ms after the jump", at - jump);
    let s = d.poll_signal().expect("a signal");
    let Some(Evidence::FanOut {
        distinct_per_sec,
        baseline_per_min,
        baseline_declared,
        threshold_per_sec,
        ..
    }) = s.evidence
    else {
        panic!("{s:?}");
    };
    assert_eq!((baseline_per_min, baseline_declared), (60_000, true));
    assert_eq!(threshold_per_sec, 5_000);
    assert!(distinct_per_sec >= threshold_per_sec);
}

#[test]
fn a_pause_and_a_rating_change_say_what_was_measured() {
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    let l = limits(24, Tier::T100k, 1_000);
    let mut t = 60_000;
    while d.observe(t, &l, &num(t)) != Verdict::Reject(Reason::SenderPaused) {
        t += 2;
    }
    let s = d.signal(24).unwrap();
    let e = s.evidence.expect("evidence of the pause");
    let Evidence::FanOut {
        distinct_per_sec,
        new_pct,
        threshold_per_sec,
        floor_per_sec,
        ..
    } = e
    else {
        panic!("{e:?}");
    };
    assert_eq!((threshold_per_sec, floor_per_sec), (50, 50));
    assert!((50..60).contains(&distinct_per_sec), "{distinct_per_sec}");
    assert_eq!(new_pct, 100);
    let text = e.to_string();
    assert!(
        text.starts_with(&format!("distinct new recipients {distinct_per_sec}/s")),
        "{text}"
    );
    assert!(text.contains("against a threshold of 50/s"), "{text}");
    // It travels with the pause and survives a checkpoint.
    let mut other = Detector::new(DetectConfig::default(), SECRET);
    other.merge(t, &d.export_delta(t));
    assert_eq!(other.signal(24).unwrap().evidence, Some(e));
    let mut restored = Detector::new(DetectConfig::default(), SECRET);
    restored.restore(&d.checkpoint()).unwrap();
    assert_eq!(restored.signal(24).unwrap().evidence, Some(e));
    // The operator's unpause clears it.
    d.unpause(24);
    assert_eq!(d.signal(24).unwrap().evidence, None);

    let r = limits(25, Tier::T10k, 100);
    for i in 0..1_000u64 {
        d.observe(i * 100, &r, &num(50_000 + i));
    }
    d.report(100_000, 25, 12);
    let s = d.signal(25).unwrap();
    assert_eq!(s.why, Some(Why::QualityRed));
    assert_eq!(
        s.evidence,
        Some(Evidence::Quality {
            reports: 12,
            delivered: 1_000,
            threshold_ppm: 10_000
        })
    );
    assert_eq!(
        s.evidence.unwrap().to_string(),
        "12 spam reports on 1000 delivered messages in 24 h (12000 per million) against a \
         threshold of 10000 per million"
    );
}

/// A retry that reaches another shard (another connection) is known there too: the
/// first attempt travels in the delta.
#[test]
fn a_retry_on_another_shard_is_not_a_new_recipient_there() {
    let mut a = Detector::new(DetectConfig::default(), SECRET);
    let mut b = Detector::new(DetectConfig::default(), SECRET);
    a.export_delta(0);
    b.export_delta(0);
    let l = limits(26, Tier::T2k, 10);
    let numbers: Vec<Recipient> = (0..40).map(|i| num(3_000 + i)).collect();
    let mut out = Vec::new();
    a.observe_batch(1_000, &l, &numbers, &mut out);
    let throttled: Vec<&Recipient> = numbers
        .iter()
        .zip(&out)
        .filter(|(_, v)| matches!(v, Verdict::Throttle { .. }))
        .map(|(r, _)| r)
        .collect();
    assert_eq!(throttled.len(), 30);
    let (da, db) = (a.export_delta(1_050), b.export_delta(1_050));
    a.merge(1_050, &db);
    b.merge(1_050, &da);
    // b has seen 40 distinct recipients from a's delta; the retries add none.
    out.clear();
    b.observe_batch(1_100, &l, throttled.iter().copied(), &mut out);
    assert_eq!(b.businesses[&26].fanout.sum_local, 0, "no retry counted");
    assert_eq!(b.businesses[&26].fanout.sum_peer, 40);
}

/// Checkpoints written before issue 14 (version 2, a count-min sketch for the same
/// recipient; this fixture was written by that build) restore with their pauses,
/// limits, 24 h windows, ratings and billing counts (not their past-recipient filters).
#[test]
fn a_version_2_checkpoint_restores_all_but_its_same_recipient_counts() {
    let v2 = include_bytes!("fixtures/version-2.ckpt");
    let mut d = Detector::new(DetectConfig::default(), SECRET);
    d.restore(v2).unwrap();
    // Its past-recipient filters are not kept (issue 19: their entries' ages are unknown).
    assert!(d.businesses[&7].filter.generation_words().all(|w| w == 0));
    // Business 7: tier 250, its 250 recipients in the window, billed for them.
    let b = limits(7, Tier::T250, 1000);
    assert_eq!(d.signal(7).unwrap().accepted_today, 250);
    assert_eq!(d.recipients_24h(7), Some(250));
    assert_eq!(
        d.observe(300_000, &b, &num(999)),
        Verdict::Reject(Reason::MessagingLimitReached)
    );
    assert_eq!(d.observe(300_000, &b, &num(3)), Verdict::Admit);
    // Business 11: paused by a blast, still paused; no evidence was kept then.
    let s = d.signal(11).unwrap();
    assert_eq!(
        (s.paused, s.why, s.evidence),
        (true, Some(Why::FanOutSurge), None)
    );
    assert_eq!(
        d.observe(300_000, &limits(11, Tier::T100k, 80), &num(1)),
        Verdict::Reject(Reason::SenderPaused)
    );
    // Business 3: red, tier lowered from 10,000 to 2,000.
    let s = d.signal(3).unwrap();
    assert_eq!((s.rating, s.tier), (Rating::Red, Tier::T2k));
    // Written again, it is a version-4 checkpoint that restores exactly.
    let v4 = d.checkpoint();
    assert_eq!(u16::from_le_bytes([v4[4], v4[5]]), 4);
    let mut e = Detector::new(DetectConfig::default(), SECRET);
    e.restore(&v4).unwrap();
    assert_eq!(e.checkpoint(), v4);
}

/// A client resending on another connection before the shards exchanged deltas: both
/// shards count the recipient's first attempt; when their deltas cross, each takes its
/// own count back, so each view counts it once.
#[test]
fn a_first_attempt_counted_on_two_shards_is_counted_once() {
    let mut a = Detector::new(DetectConfig::default(), SECRET);
    let mut b = Detector::new(DetectConfig::default(), SECRET);
    a.export_delta(0);
    b.export_delta(0);
    let l = limits(27, Tier::T2k, 10);
    let numbers: Vec<Recipient> = (0..45).map(|i| num(5_000 + i)).collect();
    let mut out = Vec::new();
    a.observe_batch(1_000, &l, &numbers, &mut out);
    out.clear();
    b.observe_batch(1_010, &l, &numbers[10..], &mut out);
    let (da, db) = (a.export_delta(1_050), b.export_delta(1_050));
    a.merge(1_050, &db);
    b.merge(1_050, &da);
    for d in [&a, &b] {
        let f = &d.businesses[&27].fanout;
        assert_eq!(
            f.sum_local + f.sum_peer,
            45,
            "{} + {}",
            f.sum_local,
            f.sum_peer
        );
    }
    assert!(!a.signal(27).unwrap().paused && !b.signal(27).unwrap().paused);
}
