//! The log under simulated storage faults: crashes with torn writes, retention with
//! crypto-shredding over 31 days, failing fsync, full disk. Every test is seeded.

use std::collections::BTreeMap;

use courier_pipeline::log::{
    recover_segment, KeyError, KeyState, Keyring, LogConfig, LogError, LogFailure, MasterKey,
    Record, RecordHeader, SegmentHeader, SegmentVerdict,
};
use courier_pipeline::wire::{Reason, Recipient, Status};
use courier_pipeline::ShardId;
use courier_sim::storage::{MemStorage, SimShell};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MASTER: [u8; 32] = [0x42; 32];
const DAY_MS: u64 = 86_400_000;

fn small_cfg() -> LogConfig {
    LogConfig {
        segment_bytes_max: 2048,
        segment_age_max_ms: 500,
        retention_ms: 30 * DAY_MS,
        group_commit_records_max: 64,
        group_commit_bytes_max: 64 << 10,
        payload_bytes_max: 512,
        drops_per_step_max: 16,
    }
}

/// What the test expects at a log index.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expect {
    client_id: u64,
    time_ms: u64,
    payload: Vec<u8>,
}

fn header(client_id: u64, time_ms: u64) -> RecordHeader {
    RecordHeader::message(
        9,
        time_ms,
        client_id,
        Recipient::parse(b"+15550001111").unwrap(),
        time_ms,
    )
}

fn payload_for(client_id: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (client_id as usize * 31 + i) as u8)
        .collect()
}

/// Appends `n` records at `now_ms`; returns (index, expectation) per record.
fn append(
    sh: &mut SimShell,
    now_ms: u64,
    next_client: &mut u64,
    n: usize,
    rng: &mut StdRng,
) -> Result<Vec<(u64, Expect)>, LogError> {
    let payloads: Vec<(u64, Vec<u8>)> = (0..n)
        .map(|_| {
            *next_client += 1;
            let len = rng.random_range(1..200);
            (*next_client, payload_for(*next_client, len))
        })
        .collect();
    let records: Vec<Record<'_>> = payloads
        .iter()
        .map(|(c, p)| Record {
            header: header(*c, now_ms),
            payload: p,
        })
        .collect();
    let positions = sh.append(now_ms, &records)?;
    Ok(positions
        .iter()
        .zip(&payloads)
        .map(|(pos, (c, p))| {
            (
                pos.index(),
                Expect {
                    client_id: *c,
                    time_ms: now_ms,
                    payload: p.clone(),
                },
            )
        })
        .collect())
}

fn present(sh: &SimShell) -> BTreeMap<u64, Expect> {
    sh.read_all()
        .expect("every record on storage reads back intact")
        .into_iter()
        .map(|(i, r)| {
            (
                i,
                Expect {
                    client_id: r.header.client_id,
                    time_ms: r.header.time_ms,
                    payload: r.payload,
                },
            )
        })
        .collect()
}

fn boot(seed: u64, cfg: LogConfig) -> SimShell {
    let mut sh = SimShell::new(
        MemStorage::new(seed),
        cfg,
        ShardId::new(3),
        MASTER,
        seed ^ 0x5eed,
    );
    sh.boot().expect("empty storage boots");
    sh
}

#[test]
fn durable_records_survive_random_crashes() {
    let mut crashes = 0;
    let mut durable_checked = 0usize;
    let (mut truncated, mut removed) = (0, 0);
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut sh = boot(seed, small_cfg());
        let mut now = 1_700_000_000_000u64;
        let mut next_client = 0u64;
        // What was appended at each index (latest wins), and what was reported durable.
        let mut appended: BTreeMap<u64, Expect> = BTreeMap::new();
        let mut durable: BTreeMap<u64, Expect> = BTreeMap::new();
        // The run (boots so far) that appended each index; indexes are never reused.
        let mut run_of: BTreeMap<u64, u32> = BTreeMap::new();
        let mut run = 0u32;
        for _step in 0..60 {
            now += rng.random_range(0..120);
            match rng.random_range(0..10) {
                0..=5 => {
                    let n = rng.random_range(1..8);
                    match append(&mut sh, now, &mut next_client, n, &mut rng) {
                        Ok(recs) => {
                            run_of.extend(recs.iter().map(|(i, _)| (*i, run)));
                            appended.extend(recs);
                        }
                        Err(LogError::Busy) => {}
                        Err(e) => panic!("seed {seed}: {e}"),
                    }
                }
                6..=8 => {
                    let range = sh.sync().expect("no injected sync failure");
                    for i in range {
                        durable.insert(i, appended[&i].clone());
                    }
                }
                _ => {
                    crashes += 1;
                    if rng.random_bool(0.5) {
                        // The power goes out part-way through one call's actions: between
                        // the keyring and the new segment, between header and records, or
                        // in the middle of a retention step.
                        sh.arm_power_loss(rng.random_range(0..5));
                        if rng.random_bool(0.7) {
                            now += rng.random_range(0..1000);
                            let n = rng.random_range(1..20);
                            match append(&mut sh, now, &mut next_client, n, &mut rng) {
                                Ok(recs) => {
                                    run_of.extend(recs.iter().map(|(i, _)| (*i, run)));
                                    appended.extend(recs);
                                }
                                Err(LogError::Busy) => {}
                                Err(e) => panic!("seed {seed}: {e}"),
                            }
                        } else {
                            sh.tick(now + 31 * DAY_MS);
                            now += 31 * DAY_MS;
                        }
                    }
                    let report = sh
                        .crash_and_boot()
                        .unwrap_or_else(|e| panic!("seed {seed}: recovery failed: {e}"));
                    truncated += report.truncated;
                    removed += report.removed;
                    let got = present(&sh);
                    for (i, e) in &durable {
                        if e.time_ms + small_cfg().retention_ms < now {
                            continue; // expired by the retention step above
                        }
                        assert_eq!(got.get(i), Some(e), "seed {seed}: durable index {i} lost");
                        durable_checked += 1;
                    }
                    for (i, e) in &got {
                        assert_eq!(
                            appended.get(i),
                            Some(e),
                            "seed {seed}: index {i} is not what was appended"
                        );
                    }
                    // No record past a lost one of the same run: it was never acknowledged
                    // (one sync covers every segment written since the last), and keeping
                    // it would leave a hole (a `read` status without its `delivered`).
                    // Gaps where a new run resumed above the index floor are fine.
                    for &i in got.keys() {
                        let lost_before = i > 0
                            && !got.contains_key(&(i - 1))
                            && appended
                                .get(&(i - 1))
                                .is_some_and(|e| e.time_ms + small_cfg().retention_ms >= now);
                        if lost_before && run_of.get(&(i - 1)) == run_of.get(&i) {
                            panic!(
                                "seed {seed}: index {i} kept, {} of the same run lost",
                                i - 1
                            );
                        }
                    }
                    run += 1;
                    assert!(sh.log().next_index() >= got.keys().next_back().map_or(0, |i| i + 1));
                    // What survived is durable now (recovery synced it); the rest is gone.
                    appended = got.clone();
                    durable = got;
                }
            }
        }
    }
    assert!(crashes > 100, "the simulation crashed only {crashes} times");
    assert!(truncated > 20, "only {truncated} torn tails were recovered");
    assert!(
        removed > 5,
        "only {removed} dead segment files were removed"
    );
    assert!(
        durable_checked > 1000,
        "only {durable_checked} durable records checked"
    );
}

#[test]
fn segments_roll_by_size_and_age() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut sh = boot(1, small_cfg());
    let mut next_client = 0;
    let t0 = 1_700_000_000_000;
    for k in 0..20 {
        append(&mut sh, t0 + k, &mut next_client, 5, &mut rng).unwrap();
        sh.sync().unwrap();
    }
    let by_size = sh.log().segment_ids().count();
    assert!(by_size > 3, "2 KiB segments must roll by size: {by_size}");
    for id in sh.storage.file_ids() {
        assert!(sh.storage.file(id).unwrap().len() <= 2048);
    }
    // One small record, then time passes beyond the age limit: the next append rolls.
    append(&mut sh, t0 + 100, &mut next_client, 1, &mut rng).unwrap();
    let before = sh.log().segment_ids().count();
    append(&mut sh, t0 + 100 + 600, &mut next_client, 1, &mut rng).unwrap();
    assert_eq!(sh.log().segment_ids().count(), before + 1);
}

#[test]
fn retention_over_31_days_drops_expired_segments_and_shreds_their_keys() {
    let cfg = LogConfig {
        segment_bytes_max: 1 << 20,
        segment_age_max_ms: DAY_MS,
        retention_ms: 30 * DAY_MS,
        ..small_cfg()
    };
    let mut rng = StdRng::seed_from_u64(31);
    let mut sh = boot(31, cfg);
    let t0 = 1_700_000_000_000u64;
    let mut next_client = 0;
    let mut copies: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut dropped = Vec::new();
    let hour = DAY_MS / 24;
    let mut now = t0;
    // 31 days and one hour: the first day's segment is then past 30 days.
    for _ in 0..=31 * 24 {
        append(&mut sh, now, &mut next_client, 3, &mut rng).unwrap();
        sh.sync().unwrap();
        for id in sh.storage.file_ids() {
            copies.insert(id, sh.storage.file(id).unwrap().to_vec());
        }
        dropped.extend(sh.tick(now));
        now += hour;
    }
    let end = now - hour;
    assert!(
        !dropped.is_empty(),
        "31 days under 30-day retention drop something"
    );
    let ring = Keyring::from_bytes(sh.storage.keyring().unwrap()).unwrap();
    let master = MasterKey::from_bytes(MASTER);
    // Expired segments and their keys are gone.
    for id in &dropped {
        assert!(
            sh.storage.file(*id).is_none(),
            "segment {id} still on storage"
        );
        assert_eq!(ring.state(*id), KeyState::Destroyed);
        // Crypto-shredding: the copy kept by the test cannot be decrypted any more.
        let copy = &copies[id];
        let h = SegmentHeader::decode(copy).unwrap();
        assert_eq!(
            ring.data_key(&master, h.data_key_id).unwrap_err(),
            KeyError::Destroyed {
                key_id: h.data_key_id
            }
        );
        // Restored onto storage, recovery removes it instead of serving it.
        assert_eq!(
            recover_segment(*id, copy, &ring, &master, 512).unwrap(),
            SegmentVerdict::Remove(courier_pipeline::log::RemoveReason::KeyDestroyed)
        );
    }
    // Newer segments are intact, and every record they hold is younger than the
    // retention (issue 19: a segment goes when its oldest record reaches it; it once went
    // when its newest did, keeping records up to a roll interval longer).
    let got = present(&sh);
    assert!(!got.is_empty());
    let oldest = got.values().map(|e| e.time_ms).min().unwrap();
    assert!(end - oldest < 30 * DAY_MS, "a record outlived retention");
    // Everything from the last 29 days is still there: 3 records an hour.
    let recent = got
        .values()
        .filter(|e| e.time_ms + 29 * DAY_MS > end)
        .count();
    assert_eq!(recent, 29 * 24 * 3);
    for id in sh.storage.file_ids() {
        assert_eq!(ring.state(id), KeyState::Live);
    }
    assert_eq!(ring.live_ids().count(), sh.storage.file_ids().len());
}

#[test]
fn failing_fsync_fails_the_log_for_good_and_loses_nothing_acked() {
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut sh = boot(seed, small_cfg());
        let mut next_client = 0;
        let now = 1_700_000_000_000;
        let mut durable = BTreeMap::new();
        let mut appended = BTreeMap::new();
        for _ in 0..5 {
            appended.extend(append(&mut sh, now, &mut next_client, 4, &mut rng).unwrap());
            for i in sh.sync().unwrap() {
                durable.insert(i, appended[&i].clone());
            }
        }
        appended.extend(append(&mut sh, now, &mut next_client, 4, &mut rng).unwrap());
        let durable_end = sh.log().durable_end();
        sh.storage.fail_syncs = true;
        let failure = sh.sync().unwrap_err();
        assert!(matches!(failure, LogFailure::SyncFailed { .. }));
        assert!(failure.to_string().contains("fdatasync"), "{failure}");
        assert_eq!(
            sh.log().durable_end(),
            durable_end,
            "nothing became durable"
        );
        // Never retry and carry on: later appends are refused with a typed error.
        sh.storage.fail_syncs = false;
        let err = append(&mut sh, now, &mut next_client, 1, &mut rng).unwrap_err();
        assert_eq!(err, LogError::Failed(failure));
        assert_eq!(err.status(), Status::Rejected(Reason::StorageUnavailable));
        assert_eq!(sh.sync().unwrap_err(), failure);
        // After a crash every record reported durable is there.
        sh.crash_and_boot().unwrap();
        let got = present(&sh);
        for (i, e) in &durable {
            assert_eq!(got.get(i), Some(e), "seed {seed}: durable {i} lost");
        }
    }
}

#[test]
fn full_disk_fails_the_log_and_loses_nothing_acked() {
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut sh = boot(seed, small_cfg());
        sh.storage.capacity_bytes = Some(rng.random_range(3000..9000));
        let mut next_client = 0;
        let now = 1_700_000_000_000;
        let mut durable = BTreeMap::new();
        let mut appended = BTreeMap::new();
        let err = loop {
            match append(&mut sh, now, &mut next_client, 3, &mut rng) {
                Ok(recs) => appended.extend(recs),
                Err(e) => break e,
            }
            match sh.sync() {
                Ok(range) => {
                    for i in range {
                        durable.insert(i, appended[&i].clone());
                    }
                }
                Err(f) => panic!("seed {seed}: sync failed before the disk filled: {f}"),
            }
        };
        let LogError::Failed(f @ LogFailure::DiskFull { .. }) = err else {
            panic!("seed {seed}: expected disk full, got {err:?}");
        };
        assert!(f.to_string().contains("disk full"));
        assert_eq!(err.status(), Status::Rejected(Reason::StorageUnavailable));
        // No sync can make the half-written batch durable.
        assert_eq!(sh.sync().unwrap_err(), f);
        sh.crash_and_boot().unwrap();
        let got = present(&sh);
        for (i, e) in &durable {
            assert_eq!(got.get(i), Some(e), "seed {seed}: durable {i} lost");
        }
        // Full to the byte: the recovered log refuses with the same typed error.
        let used: u64 = sh
            .storage
            .file_ids()
            .iter()
            .map(|id| sh.storage.file(*id).unwrap().len() as u64)
            .sum();
        sh.storage.capacity_bytes = Some(used);
        let again = append(&mut sh, now, &mut next_client, 3, &mut rng);
        assert!(
            matches!(again, Err(LogError::Failed(LogFailure::DiskFull { .. }))),
            "{again:?}"
        );
    }
}

#[test]
fn a_full_group_commit_throttles_until_the_sync() {
    let cfg = LogConfig {
        group_commit_records_max: 8,
        ..small_cfg()
    };
    let mut rng = StdRng::seed_from_u64(2);
    let mut sh = boot(2, cfg);
    let mut next_client = 0;
    append(&mut sh, 1, &mut next_client, 6, &mut rng).unwrap();
    let err = append(&mut sh, 1, &mut next_client, 3, &mut rng).unwrap_err();
    assert_eq!(err, LogError::Busy);
    assert!(matches!(err.status(), Status::Throttled { .. }));
    assert_eq!(sh.sync().unwrap(), 0..6);
    append(&mut sh, 1, &mut next_client, 3, &mut rng).unwrap();
}

#[test]
fn recovery_bumps_the_nonce_epoch_and_never_reuses_positions() {
    let mut rng = StdRng::seed_from_u64(4);
    let mut sh = boot(4, small_cfg());
    assert_eq!(sh.log().epoch(), 1);
    let mut next_client = 0;
    append(&mut sh, 1, &mut next_client, 5, &mut rng).unwrap();
    sh.sync().unwrap();
    sh.crash_and_boot().unwrap();
    assert_eq!(sh.log().epoch(), 2);
    assert_eq!(
        Keyring::from_bytes(sh.storage.keyring().unwrap())
            .unwrap()
            .epoch(),
        2,
        "the epoch is persisted before serving"
    );
    // Everything expires; positions still continue after a restart.
    let later = 1 + 31 * DAY_MS;
    assert!(!sh.tick(later).is_empty());
    assert!(sh.storage.file_ids().is_empty());
    sh.crash_and_boot().unwrap();
    let recs = append(&mut sh, later, &mut next_client, 1, &mut rng).unwrap();
    assert_eq!(recs[0].0, 5);
}

#[test]
fn a_wrong_master_key_stops_boot_before_anything_is_touched() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut sh = boot(5, small_cfg());
    let mut next_client = 0;
    for _ in 0..10 {
        append(&mut sh, 1, &mut next_client, 5, &mut rng).unwrap();
    }
    sh.sync().unwrap();
    // Unsynced records too: a successful boot would sync them.
    append(&mut sh, 1, &mut next_client, 5, &mut rng).unwrap();
    let storage = std::mem::replace(&mut sh.storage, MemStorage::new(0));
    let snapshot = |st: &MemStorage| {
        let files: Vec<Vec<u8>> = st
            .file_ids()
            .iter()
            .map(|id| st.file(*id).unwrap().to_vec())
            .collect();
        (st.keyring().unwrap().to_vec(), files)
    };
    let before = snapshot(&storage);
    let mut wrong = SimShell::new(storage, small_cfg(), ShardId::new(3), [0x43; 32], 5);
    let err = wrong.boot().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("wrong master key"), "{msg}");
    assert_eq!(snapshot(&wrong.storage), before, "storage untouched");
}

#[test]
fn a_keyring_that_cannot_be_persisted_fails_the_log_before_any_record_uses_its_key() {
    let mut rng = StdRng::seed_from_u64(6);
    let mut sh = boot(6, small_cfg());
    let mut next_client = 0;
    append(&mut sh, 1, &mut next_client, 3, &mut rng).unwrap();
    assert_eq!(sh.sync().unwrap(), 0..3);
    let files = sh.storage.file_ids();
    sh.storage.fail_keyring_writes = true;
    // Past the age limit: the next append rolls, which needs a new key in the keyring.
    let err = append(&mut sh, 10_000, &mut next_client, 3, &mut rng).unwrap_err();
    assert_eq!(err, LogError::Failed(LogFailure::KeyringFailed));
    assert_eq!(err.status(), Status::Rejected(Reason::StorageUnavailable));
    assert_eq!(
        sh.storage.file_ids(),
        files,
        "no segment without a persisted key"
    );
    assert_eq!(sh.sync().unwrap_err(), LogFailure::KeyringFailed);
    assert_eq!(sh.log().durable_end(), 3);
}
