//! Issue 19: deletion does not wait for the server. A data directory holds what a server
//! wrote 30 days and a few seconds ago (its oldest segment) and an hour ago, and the
//! server stayed stopped across the deadline (the records are written here with those
//! times, through the same log code the server uses: a simulated clock for the stored
//! data). The next `courier serve` drops the expired segment before it serves, and
//! `courier log expire` drops it offline, refusing while a server holds the directory;
//! the messages still waiting in it get their `expired` status first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use courier::store::{MasterKeyText, ShardStore};
use courier_pipeline::log::{Action, KeyState, Keyring, LogConfig, Record, RecordHeader};
use courier_pipeline::profile::Profile;
use courier_pipeline::wire::Recipient;
use courier_pipeline::ShardId;
use courier_testkit::logkit::{segments, shard_dir, PAYLOAD_MARKER};
use courier_testkit::spawn::{add_business, free_port, Files, Serve};

const DAY_MS: u64 = 86_400_000;
pub(super) const MASTER_HEX: &str =
    "5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f5f";
pub(super) const RECIPIENT: &str = "+15557654321";

pub(super) fn root() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"))
}

/// Appends messages of business 1 at `time_ms` (client ids `first..first + n`), durably,
/// as the server's shard would.
fn append(
    store: &mut ShardStore,
    log: &mut courier_pipeline::log::Log,
    time_ms: u64,
    first: u64,
    n: u64,
) {
    let recipient = Recipient::parse(RECIPIENT.as_bytes()).unwrap();
    let payload = format!("{PAYLOAD_MARKER}retention").into_bytes();
    let records: Vec<Record<'_>> = (first..first + n)
        .map(|c| Record {
            header: RecordHeader::message(1, time_ms, c, recipient, time_ms + 2 * 3_600_000),
            payload: &payload,
        })
        .collect();
    append_durably(store, log, time_ms, &records);
}

/// Appends `records` at `time_ms` and syncs them, performing the log's actions on
/// `store` as the server's shard would.
pub(super) fn append_durably(
    store: &mut ShardStore,
    log: &mut courier_pipeline::log::Log,
    time_ms: u64,
    records: &[Record<'_>],
) {
    let (mut actions, mut positions) = (Vec::new(), Vec::new());
    log.append(
        time_ms,
        &mut rand::rng(),
        records,
        &mut actions,
        &mut positions,
    )
    .unwrap();
    for a in actions {
        store.perform_action(a).unwrap();
    }
    let req = log.begin_sync().unwrap();
    for &segment_id in &req.segment_ids {
        store
            .perform_action(Action::SyncSegment { segment_id })
            .unwrap();
    }
    log.on_synced(req.id);
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A data directory whose shard 0 holds two messages accepted 30 days and 5 s ago (one
/// segment) and one an hour ago (another); returns its files and the old segment's id.
pub(super) fn stopped_across_the_deadline(dir: &Path) -> (Files, u64) {
    let files = Files::new(dir, MASTER_HEX);
    std::fs::create_dir_all(&files.data).unwrap();
    let bin = crate::courier_bin();
    add_business(bin, &files.registry, "sender", &["--tier", "unlimited"]);
    let key = MasterKeyText::read(&files.key_file).unwrap();
    let text = std::fs::read_to_string(format!("{}/tuning/small.toml", root())).unwrap();
    let p = Profile::from_toml(&text).unwrap();
    let cfg = LogConfig::new(&p.log, p.limits.payload_bytes_max);
    let (mut store, mut log) =
        ShardStore::open(&files.data, ShardId::new(0), &key, cfg, &mut |_, _| {}).unwrap();
    let now = now_ms();
    append(&mut store, &mut log, now - 30 * DAY_MS - 5_000, 1, 2);
    append(&mut store, &mut log, now - 3_600_000, 3, 1);
    let ids: Vec<u64> = log.segment_ids().collect();
    assert_eq!(ids.len(), 2, "a segment a day: {ids:?}");
    (files, ids[0])
}

pub(super) fn courier(args: &[&str]) -> Output {
    Command::new(crate::courier_bin())
        .current_dir(root())
        .args(args)
        .env_remove("COURIER_MASTER_KEY_FILE")
        .output()
        .expect("courier runs")
}

pub(super) fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The messages accepted 30 days ago, as an accepted list (positions 0 and 1 of shard 0).
pub(super) fn old_accepted(dir: &Path) -> PathBuf {
    let csv = dir.join("accepted.csv");
    std::fs::write(&csv, "business_id,client_id,log_position\n1,1,0\n1,2,1\n").unwrap();
    csv
}

/// What `courier log audit` says became of the old messages: gone from the log, each with
/// its `expired` status.
fn assert_expired_and_gone(files: &Files, dir: &Path) {
    let csv = old_accepted(dir);
    let out = courier(&[
        "log",
        "audit",
        "--accepted",
        path(&csv),
        path(&files.data),
        "--master-key-file",
        path(&files.key_file),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("present 0, missing 2"), "{stdout}");
    assert!(stdout.contains("expired 2, no final status 0"), "{stdout}");
}

fn assert_dropped(files: &Files, old: u64) {
    let segs = segments(&files.data, 0);
    assert_eq!(
        segs.len(),
        2,
        "the fresh segment and the statuses' one: {segs:?}"
    );
    assert!(!segs.iter().any(|s| s.ends_with(format!("{old:020}.seg"))));
    let ring = std::fs::read(shard_dir(&files.data, 0).join("keyring")).unwrap();
    let ring = Keyring::from_bytes(&ring).unwrap();
    assert_eq!(ring.state(old), KeyState::Destroyed, "crypto-shredded");
}

#[test]
fn the_next_start_drops_an_expired_segment_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (files, old) = stopped_across_the_deadline(dir.path());
    assert_eq!(segments(&files.data, 0).len(), 2);
    let token = add_business(crate::courier_bin(), &files.registry, "late", &[]);
    let log = dir.path().join("serve.log");
    let addr = free_port();
    let mut server = Serve::new(crate::courier_bin(), &files, addr, &log).spawn();
    assert_dropped(&files, old);
    // The `expired` statuses opened a segment before serving; shard 0 goes on writing it
    // (with direct I/O, from its partial last block): new messages until one connection
    // lands on shard 0 (the kernel spreads connections over the shards by their ports).
    let statuses_segment = segments(&files.data, 0).pop().unwrap();
    // Where its records end: the file may also hold zeros written ahead of them
    // (`log.prepare_ahead_bytes`), so its length does not say.
    let records_end = |path: &std::path::Path| {
        let bytes = std::fs::read(path).unwrap();
        bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
    };
    let end_before = records_end(&statuses_segment);
    let messages = dir.path().join("late.jsonl");
    let mut appended = false;
    for run in 0..20u64 {
        let lines: String = (0..5)
            .map(|i| {
                let id = run * 5 + i + 1;
                format!(
                    "{{\"id\": {id}, \"recipient\": \"+1555000{id:04}\", \"payload\": \"late\"}}\n"
                )
            })
            .collect();
        std::fs::write(&messages, lines).unwrap();
        let out = Command::new(crate::courier_bin())
            .arg("send")
            .arg(&messages)
            .arg("--target")
            .arg(addr.to_string())
            .arg("--ca")
            .arg(files.data.join("tls/cert.der"))
            .arg("--quiet")
            .env("COURIER_TOKEN", &token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if records_end(&statuses_segment) != end_before {
            appended = true;
            break;
        }
    }
    assert!(appended, "no send reached shard 0 in 20 connections");
    let text = server.log_text();
    let dropped = text
        .find("retention dropped a segment before serving")
        .unwrap_or_else(|| panic!("no drop logged: {text}"));
    let serving = text.find("courier serving").unwrap();
    assert!(
        dropped < serving,
        "dropped only after serving began: {text}"
    );
    assert!(text.contains(&format!("segment={old}")), "{text}");
    // While it runs, the offline command refuses: the server owns the directory.
    let out = courier(&[
        "log",
        "expire",
        path(&files.data),
        "--master-key-file",
        path(&files.key_file),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another courier server is using this data directory"),
        "{stderr}"
    );
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    assert_expired_and_gone(&files, dir.path());
    let text = server.log_text();
    assert!(
        !text.contains(PAYLOAD_MARKER) && !text.contains(RECIPIENT),
        "{text}"
    );
}

#[test]
fn log_expire_drops_an_expired_segment_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (files, old) = stopped_across_the_deadline(dir.path());
    let args = [
        "log",
        "expire",
        path(&files.data),
        "--profile",
        "tuning/small.toml",
        "--master-key-file",
        path(&files.key_file),
    ];
    let started = Instant::now();
    let out = courier(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("shard 0: dropped segment {old} (2 records")),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 segment(s) dropped, 2 waiting message(s) recorded as expired"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(PAYLOAD_MARKER) && !stdout.contains(RECIPIENT),
        "{stdout}"
    );
    assert_dropped(&files, old);
    assert!(started.elapsed() < Duration::from_secs(60));
    // Nothing more is due: a second run drops nothing and records nothing.
    let again = courier(&args);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success());
    assert!(
        stdout.contains("0 segment(s) dropped, 0 waiting"),
        "{stdout}"
    );
    assert_expired_and_gone(&files, dir.path());
    // A wrong master key changes nothing.
    let wrong = dir.path().join("wrong.key");
    courier_testkit::write_secret(&wrong, format!("{}\n", "6a".repeat(32)));
    let out = courier(&[
        "log",
        "expire",
        path(&files.data),
        "--master-key-file",
        path(&wrong),
    ]);
    assert!(!out.status.success());
}
