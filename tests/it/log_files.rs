//! The log's real files: torn tails, bit flips, a wrong master key and a full disk, on
//! segments a real in-process server wrote; the operator tools run on them.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use courier::audit::{self, AcceptedEntry, SegmentState};
use courier::serve::{self, Running, ServeError};
use courier::store::MasterKeyText;
use courier_client::Client;
use courier_pipeline::wire::{LogPosition, Reason, Status};
use courier_pipeline::ShardId;
use courier_testkit::logkit::*;
use courier_testkit::server::{self, Setup};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn start(dir: &Path, key: &MasterKeyText) -> Result<(Running, String), ServeError> {
    start_with_reserve(dir, key, 0)
}

/// A one-shard server on `dir` whose log keeps `reserve` bytes free on its file system
/// (0 here by default: the tests on tiny file systems are about what a full disk does).
fn start_with_reserve(
    dir: &Path,
    key: &MasterKeyText,
    reserve: u64,
) -> Result<(Running, String), ServeError> {
    let (registry, token) = registry();
    let mut setup = Setup {
        master_key: key.clone(),
        ..Setup::new(1, registry)
    };
    setup.profile.log.disk_reserve_bytes = reserve;
    let running = serve::start(server::options(dir, setup))?;
    Ok((running, token))
}

fn stop(r: Running) {
    r.shutdown();
    r.join().unwrap();
}

/// Starts a one-shard server on `dir`, sends 12 batches of 32 messages, stops it.
async fn fill(dir: &Path, key: &MasterKeyText) -> Vec<AcceptedEntry> {
    let (running, token) = start(dir, key).unwrap();
    let cfg = client_config(running.local_addr(), running.certificate().clone(), &token);
    let entries = tokio::time::timeout(TEST_TIMEOUT, async {
        let client = Arc::new(Client::connect(&cfg).await.unwrap());
        let e = send(&client, 0, 12, 32).await;
        client.close().await;
        e
    })
    .await
    .expect("test timed out");
    assert_eq!(entries.len(), 12 * 32, "every message accepted");
    stop(running);
    entries
}

fn restart(dir: &Path, key: &MasterKeyText) -> Result<(), ServeError> {
    start(dir, key).map(|(r, _)| stop(r))
}

fn courier() -> Command {
    Command::new(env!("CARGO_BIN_EXE_courier"))
}

fn write_key_file(dir: &Path, seed: u8) -> std::path::PathBuf {
    let p = dir.join(format!("master-{seed}.key"));
    courier_testkit::write_secret(&p, key_text(seed));
    p
}

/// Output of a command, stdout and stderr together; asserts it shows no recipient and no
/// payload of the `n` messages the tests send.
fn run_without_leaks(cmd: &mut Command, n: u64) -> (bool, String) {
    let out = cmd.env("COURIER_LOG", "info").output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains(PAYLOAD_MARKER), "a payload leaked: {text}");
    for i in 0..n {
        let r = recipient_text(i);
        assert!(!text.contains(&r[1..]), "a phone number leaked: {text}");
    }
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_truncated_on_restart_and_every_acked_message_stays() {
    let dir = tempfile::tempdir().unwrap();
    let key = master_key(1);
    let entries = fill(dir.path(), &key).await;
    let seg = segments(dir.path(), 0).pop().expect("a segment");
    let (offsets, len) = record_offsets(dir.path(), 0, &seg, &key);
    let last = *offsets.last().unwrap();
    // The records, without the zero padding after them (direct I/O).
    let bytes = std::fs::read(&seg).unwrap()[..len as usize].to_vec();

    // A crash in the middle of writing a record that was never acked: half a record
    // after the last complete one.
    let half = &bytes[last as usize..last as usize + (len - last) as usize / 2];
    let mut torn = bytes.clone();
    torn.extend_from_slice(half);
    std::fs::write(&seg, &torn).unwrap();
    let report = audit::verify(dir.path(), &key).unwrap();
    assert!(report.is_clean(), "a torn tail is not damage: {report:?}");
    assert!(
        matches!(report.segments.last().unwrap().state, SegmentState::TornTail { offset, .. } if offset == len),
        "{report:?}"
    );
    restart(dir.path(), &key).expect("restart truncates the torn tail");
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        len,
        "cut back to the last record"
    );
    let report = audit::verify(dir.path(), &key).unwrap();
    assert!(
        report.segments.iter().all(|s| s.state == SegmentState::Ok),
        "{report:?}"
    );
    let a = audit::audit(dir.path(), &key, &entries).unwrap();
    assert_eq!(
        (a.present, a.missing, a.mismatched),
        (entries.len() as u64, 0, 0)
    );

    // The last acked record itself cut in the middle (the disk lost acked bytes): restart
    // still succeeds, and the audit names exactly that message as missing.
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(last + (len - last) / 2).unwrap();
    drop(f);
    restart(dir.path(), &key).expect("restart truncates the cut record");
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), last);
    let report = audit::verify(dir.path(), &key).unwrap();
    assert!(
        report.segments.iter().all(|s| s.state == SegmentState::Ok),
        "{report:?}"
    );
    let a = audit::audit(dir.path(), &key, &entries).unwrap();
    assert_eq!((a.present, a.missing), (entries.len() as u64 - 1, 1));
    let newest = entries.iter().max_by_key(|e| e.position).unwrap();
    assert!(
        matches!(&a.findings[..], [audit::Finding::Missing { entry, .. }] if entry == newest),
        "{a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flip_mid_segment_stops_restart_naming_segment_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let key = master_key(2);
    fill(dir.path(), &key).await;
    let seg = segments(dir.path(), 0).pop().unwrap();
    let (offsets, _) = record_offsets(dir.path(), 0, &seg, &key);
    let bad = offsets[offsets.len() / 2];
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[bad as usize + 30] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    let before = snapshot(dir.path());

    let err = restart(dir.path(), &key)
        .expect_err("corruption stops the shard")
        .to_string();
    let id: u64 = seg.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert!(
        err.contains(&format!("segment {id} ")) && err.contains(&format!("offset {bad}")),
        "{err}"
    );
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a refused start changes no file"
    );

    let keys = tempfile::tempdir().unwrap();
    let (ok, text) = run_without_leaks(
        courier()
            .args(["log", "verify"])
            .arg(dir.path())
            .arg("--master-key-file")
            .arg(write_key_file(keys.path(), 2)),
        12 * 32,
    );
    assert!(!ok, "verify exits non-zero on corruption: {text}");
    assert!(text.contains(&format!("CORRUPT at offset {bad}")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_master_key_stops_start_up_before_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), &master_key(3)).await;
    let before = snapshot(dir.path());
    let err = restart(dir.path(), &master_key(4))
        .expect_err("wrong key refused")
        .to_string();
    assert!(err.contains("wrong master key"), "{err}");
    assert_eq!(
        snapshot(dir.path()),
        before,
        "files unchanged byte for byte"
    );
    restart(dir.path(), &master_key(3)).expect("the right key still opens it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_audit_commands_report_counts_and_never_print_content() {
    let dir = tempfile::tempdir().unwrap();
    let entries = fill(dir.path(), &master_key(5)).await;
    let keys = tempfile::tempdir().unwrap();
    let key_file = write_key_file(keys.path(), 5);
    let n = entries.len() as u64;

    let (ok, text) = run_without_leaks(
        courier()
            .args(["log", "verify"])
            .arg(dir.path())
            .env("COURIER_MASTER_KEY_FILE", &key_file),
        n,
    );
    assert!(ok, "{text}");
    assert!(
        text.contains(" OK") && text.contains(&format!("{n} record(s) verified; 0 problem(s)")),
        "{text}"
    );

    let (ok, text) = run_without_leaks(
        courier()
            .args(["log", "verify"])
            .arg(dir.path())
            .arg("--master-key-file")
            .arg(write_key_file(keys.path(), 6)),
        n,
    );
    assert!(
        !ok && text.contains("KEY ERROR") && text.contains("wrong master key"),
        "{text}"
    );

    let list = keys.path().join("accepted.csv");
    let mut csv = Vec::new();
    audit::write_accepted(&mut csv, &entries).unwrap();
    std::fs::write(&list, &csv).unwrap();
    let audit_cmd = |list: &Path| {
        let mut c = courier();
        c.args(["log", "audit", "--accepted"])
            .arg(list)
            .arg(dir.path())
            .arg("--master-key-file")
            .arg(&key_file);
        c
    };
    let (ok, text) = run_without_leaks(&mut audit_cmd(&list), n);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("present {n}, missing 0, mismatched 0")),
        "{text}"
    );

    // One message the log never took, one listed under another client id.
    let mut extra = entries.clone();
    extra.push(AcceptedEntry {
        business_id: entries[0].business_id,
        client_id: 999_999,
        position: LogPosition::new(ShardId::new(0), n + 100),
    });
    extra[0].client_id += 1_000_000;
    let mut csv = Vec::new();
    audit::write_accepted(&mut csv, &extra).unwrap();
    std::fs::write(&list, &csv).unwrap();
    let (ok, text) = run_without_leaks(&mut audit_cmd(&list), n);
    assert!(
        !ok,
        "audit exits non-zero when a message is missing: {text}"
    );
    assert!(
        text.contains(&format!("present {}, missing 1, mismatched 1", n - 1)),
        "{text}"
    );
}

/// Unmounts on drop.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `size` (as `mount -o size=`) on a new directory `mnt`, unmounted
/// when the guard drops; `None` (the test says SKIPPED and returns) where this machine
/// does not let the tests mount.
fn mount_tmpfs(mnt: &Path, size: &str, test: &str) -> Option<Mount> {
    std::fs::create_dir(mnt).unwrap();
    match Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(mnt)
        .output()
    {
        Ok(o) if o.status.success() => Some(Mount(mnt.to_path_buf())),
        Ok(o) => {
            eprintln!(
                "SKIPPED {test}: cannot mount a {size} tmpfs here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: cannot run mount: {e}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_rejects_with_storage_unavailable_and_loses_no_acked_message() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    let Some(_guard) = mount_tmpfs(&mnt, "4m", "a_full_disk...") else {
        return;
    };
    let key = master_key(6);
    let (running, token) = start(&mnt, &key).unwrap();
    let cfg = client_config(running.local_addr(), running.certificate().clone(), &token);
    let (entries, refused, unavailable) = tokio::time::timeout(TEST_TIMEOUT, async {
        let client = Arc::new(Client::connect(&cfg).await.unwrap());
        let business = client.welcome().business_id;
        let (mut entries, mut refused, mut unavailable) = (Vec::new(), 0u64, 0u64);
        // 4 MiB fill with ~1.2 KiB records in well under 200 batches of 32; bounded.
        for b in 0..200u64 {
            let first = b * 32;
            let statuses = tokio::time::timeout(
                Duration::from_secs(10),
                client.submit(batch(first, 32, 1024)),
            )
            .await
            .expect("a full disk answers, it does not hang")
            .expect("batch answered");
            for s in &statuses {
                match s {
                    Status::Accepted(_) => {}
                    Status::Rejected(Reason::StorageUnavailable) => {
                        refused += 1;
                        unavailable += 1;
                    }
                    Status::Throttled { .. } => refused += 1,
                    other => panic!("unexpected status {other:?}"),
                }
            }
            entries.extend(accepted(business, first, &statuses));
            if refused >= 64 {
                break;
            }
        }
        client.close().await;
        (entries, refused, unavailable)
    })
    .await
    .expect("test timed out");
    assert!(refused >= 64, "the disk never filled");
    assert!(unavailable > 0, "a failed log answers storage_unavailable");
    assert!(!entries.is_empty());
    assert_eq!(running.totals().logs_failed, 1);
    stop(running);

    // Read back in place, then recovered on a bigger disk.
    let a = audit::audit(&mnt, &key, &entries).unwrap();
    assert_eq!(
        (a.present, a.missing, a.mismatched),
        (entries.len() as u64, 0, 0)
    );
    let big = tmp.path().join("big");
    for (path, bytes) in snapshot(&mnt) {
        let to = big.join(path.strip_prefix(&mnt).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(&to, bytes).unwrap();
        // As an operator's copy keeps modes (`cp -p`): the keyring stays private.
        std::fs::set_permissions(&to, std::fs::metadata(&path).unwrap().permissions()).unwrap();
    }
    restart(&big, &key).expect("recovers on a bigger disk");
    assert!(audit::verify(&big, &key).unwrap().is_clean());
    let a = audit::audit(&big, &key, &entries).unwrap();
    assert_eq!(
        (a.present, a.missing, a.mismatched),
        (entries.len() as u64, 0, 0)
    );
    eprintln!(
        "full disk: {} acked and all present after restart; {refused} refused \
         ({unavailable} storage_unavailable)",
        entries.len()
    );
}

/// With a disk reserve the disk never fills: once free space falls below it new batches
/// are `throttled` (never `storage_unavailable`, the log never fails), every acked
/// message stays, and serving resumes by itself once space returns (issue 18).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_disk_reserve_batches_are_throttled_and_serving_resumes_when_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    let Some(_guard) = mount_tmpfs(&mnt, "8m", "below_the_disk_reserve...") else {
        return;
    };
    // Something else on the disk that the operator can delete: 2 MiB.
    let ballast = mnt.join("ballast");
    std::fs::write(&ballast, vec![0u8; 2 << 20]).unwrap();
    let key = master_key(7);
    let (running, token) = start_with_reserve(&mnt, &key, 3 << 20).unwrap();
    let cfg = client_config(running.local_addr(), running.certificate().clone(), &token);
    let (entries, throttled) = tokio::time::timeout(TEST_TIMEOUT, async {
        let client = Arc::new(Client::connect(&cfg).await.unwrap());
        let business = client.welcome().business_id;
        let (mut entries, mut throttled) = (Vec::new(), 0u64);
        // 8 MiB - 2 MiB ballast - 3 MiB reserve: about 3 MiB of ~1.2 KiB records, well
        // under 200 batches of 32; bounded. The shard measures the disk once a second, so
        // it may go a little below the reserve before it throttles; never to the end.
        for b in 0..200u64 {
            let first = b * 32;
            let statuses = client.submit(batch(first, 32, 1024)).await.unwrap();
            for s in &statuses {
                match s {
                    Status::Accepted(_) => {}
                    Status::Throttled { .. } => throttled += 1,
                    other => panic!("unexpected status {other:?}"),
                }
            }
            entries.extend(accepted(business, first, &statuses));
            if throttled >= 64 {
                break;
            }
            // Paced a little, so that the once-a-second measurement sees the fill.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(throttled >= 64, "the reserve was never reached");

        // The operator frees space: within about two measurements batches are taken.
        std::fs::remove_file(&ballast).unwrap();
        let freed = std::time::Instant::now();
        let mut b = 1_000u64;
        loop {
            let statuses = client.submit(batch(b * 32, 32, 1024)).await.unwrap();
            entries.extend(accepted(business, b * 32, &statuses));
            if statuses.iter().all(|s| matches!(s, Status::Accepted(_))) {
                break;
            }
            assert!(
                freed.elapsed() < Duration::from_secs(5),
                "serving did not resume after space returned"
            );
            b += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "disk reserve: {} accepted, {throttled} throttled, resumed {:?} after space returned",
            entries.len(),
            freed.elapsed()
        );
        client.close().await;
        (entries, throttled)
    })
    .await
    .expect("test timed out");
    assert_eq!(running.totals().logs_failed, 0, "the log never failed");
    assert!(throttled > 0);
    stop(running);
    let a = audit::audit(&mnt, &key, &entries).unwrap();
    assert_eq!(
        (a.present, a.missing, a.mismatched),
        (entries.len() as u64, 0, 0)
    );
}
