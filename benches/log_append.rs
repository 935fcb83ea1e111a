//! Durable append throughput: the shard's real path against plain writes + fdatasync.
//!
//! - `append/<payload bytes>`: what a shard does for one group commit of 64 records:
//!   `GroupCommit::append` (`Log::append`: frame, AES-256-GCM, CRC; writes joined into the
//!   group buffer) → `GroupCommit::poll_io` (metadata performed by `ShardStore`; one
//!   `RWF_DSYNC` write through the shard's io_uring, `courier::uring::UdpRing`) →
//!   completions → `GroupCommit::complete` (`Log::on_synced`). The records are durable when
//!   an iteration ends.
//! - `raw_fdatasync/<payload bytes>`: the reference: the same number of bytes written
//!   sequentially with `pwrite` (std `write_all_at`) and one `fdatasync` per group, i.e.
//!   the same cadence, with no encoding, no encryption and no ring.
//!
//! Both append to files in a temporary directory on the real disk (`$TMPDIR`, or `/tmp`)
//! and roll to a new file every 64 MiB (the log's own roll: new key, keyring persisted,
//! file created, directory synced; the reference: file created, directory synced), timed.
//! Files left behind by a roll are deleted outside the timed part, to bound disk use.
//! The two run interleaved: each timed group of one kind is followed by an untimed group of
//! the other, so that both meet the same disk conditions (the development machine's disk
//! is shared and its fdatasync latency swings between 0.5 and 4 ms within minutes).
//! Throughput is in bytes on disk per group (64 records with their framing, tag and header).
//!
//! Run: `cargo bench --bench log_append -- --warm-up-time 1 --measurement-time 5`

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use courier::courier_pipeline::log::format::RECORD_OVERHEAD_BYTES;
use courier::courier_pipeline::log::{LogConfig, Record, RecordHeader};
use courier::courier_pipeline::node::{Completion, GroupCommit, LogWrite, WriteOutcome};
use courier::courier_pipeline::profile::Profile;
use courier::courier_pipeline::wire::Recipient;
use courier::courier_pipeline::ShardId;
use courier::store::{list_segments, shard_dir, MasterKeyText, ShardStore};
use courier::uring::{bind_reuseport, FileDone, FileOpKind, RingConfig, RingEvent, UdpRing};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Records per group commit (one fdatasync each).
const GROUP_RECORDS: usize = 64;
const PAYLOAD_SIZES: [usize; 2] = [256, 1024];
/// Both sides start a new file past this many bytes.
const FILE_BYTES_MAX: u64 = 64 << 20;
/// Ring waits one group commit may take; a sync takes milliseconds, a wait up to 1 s.
const WAITS_PER_GROUP_MAX: usize = 1_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn bench_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("courier-log-append-")
        .tempdir()
        .expect("a temporary directory")
}

/// The shard's store and ring, on the built-in default profile with 64 MiB segments.
struct Shell {
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
    store: ShardStore,
    commit: GroupCommit,
    ring: UdpRing,
    done: Vec<FileDone>,
}

impl Shell {
    fn new() -> Shell {
        let dir = bench_dir();
        let mut profile = Profile::default_profile();
        profile.log.segment_bytes_max = FILE_BYTES_MAX;
        let data_dir = dir.path().to_path_buf();
        let (store, log) = ShardStore::open(
            &data_dir,
            ShardId::new(0),
            &MasterKeyText::random(),
            LogConfig::new(&profile.log, profile.limits.payload_bytes_max),
            &mut |_, _| {},
        )
        .expect("a fresh log opens");
        let commit = GroupCommit::new(log, [7; 32]);
        let socket = bind_reuseport("127.0.0.1:0".parse().expect("literal"), 1 << 20, 1 << 20)
            .expect("a loopback socket for the ring");
        let ring = UdpRing::new(
            socket,
            &RingConfig {
                file_slots: 16,
                ..RingConfig::default()
            },
        )
        .expect("an io_uring");
        Shell {
            _dir: dir,
            data_dir,
            store,
            commit,
            ring,
            done: Vec::new(),
        }
    }

    /// One group commit, as the shard performs it; returns when it is durable.
    fn append_group(
        &mut self,
        records: &[Record<'_>],
        positions: &mut Vec<courier::courier_pipeline::wire::LogPosition>,
    ) {
        positions.clear();
        self.commit
            .append(now_ms(), records, positions)
            .expect("the log takes the group");
        let target = self.commit.log().next_index();
        for _ in 0..WAITS_PER_GROUP_MAX {
            self.perform_io();
            if self.commit.log().durable_end() >= target {
                return;
            }
            self.ring
                .wait(Some(Duration::from_secs(1)))
                .expect("ring wait");
            let done = &mut self.done;
            self.ring
                .drain(|ev| {
                    if let RingEvent::File(d) = ev {
                        done.push(d);
                    }
                })
                .expect("ring drain");
            for d in self.done.drain(..) {
                assert!(
                    d.is_complete(d.data.len() - d.skip),
                    "write + fdatasync failed"
                );
                if let Some(segment_id) = self.commit.segment_of(d.token) {
                    self.store.write_done(segment_id);
                }
                let c = self.commit.complete(d.token, WriteOutcome::Done, d.data);
                assert!(!matches!(c, Completion::Failed(_)), "the log failed");
            }
        }
        panic!("a group commit did not complete within {WAITS_PER_GROUP_MAX} waits");
    }

    /// The storage operations of the log, as the shard performs them.
    fn perform_io(&mut self) {
        while let Some(op) = self.commit.poll_io(self.ring.file_slots_free()) {
            match op.into_write() {
                Ok(LogWrite {
                    token,
                    segment_id,
                    offset,
                    skip,
                    bytes,
                }) => {
                    let file = self.store.segment_file(segment_id).expect("segment file");
                    let queued = self.ring.submit_file(
                        file,
                        FileOpKind::DurableWrite,
                        offset,
                        bytes,
                        skip,
                        token,
                    );
                    assert!(queued.is_ok(), "a free file slot");
                }
                Err(other) => self
                    .store
                    .perform(other)
                    .expect("keyring and segment files"),
            }
        }
    }

    /// Deletes segments the log rolled away from (the store closed them).
    fn drop_old_segments(&self) {
        let dir = shard_dir(&self.data_dir, ShardId::new(0));
        let ids = list_segments(&dir).expect("list segments");
        for id in ids.iter().rev().skip(1) {
            let _ = std::fs::remove_file(dir.join(format!("{id:020}.seg")));
        }
    }
}

/// Plain sequential writes + fdatasync, rolling files like the log.
struct Raw {
    dir: tempfile::TempDir,
    file: File,
    file_id: u64,
    offset: u64,
    old: Option<PathBuf>,
}

impl Raw {
    fn new() -> Raw {
        let dir = bench_dir();
        let file = Raw::create(dir.path(), 0);
        Raw {
            dir,
            file,
            file_id: 0,
            offset: 0,
            old: None,
        }
    }

    fn create(dir: &Path, id: u64) -> File {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(format!("{id:020}.raw")))
            .expect("create");
        File::open(dir)
            .and_then(|d| d.sync_all())
            .expect("sync dir");
        f
    }

    fn write_group(&mut self, bytes: &[u8]) {
        if self.offset + bytes.len() as u64 > FILE_BYTES_MAX {
            self.old = Some(self.dir.path().join(format!("{:020}.raw", self.file_id)));
            self.file_id += 1;
            self.file = Raw::create(self.dir.path(), self.file_id);
            self.offset = 0;
        }
        self.file.write_all_at(bytes, self.offset).expect("pwrite");
        self.file.sync_data().expect("fdatasync");
        self.offset += bytes.len() as u64;
    }

    fn drop_old(&mut self) {
        if let Some(p) = self.old.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn bench(c: &mut Criterion) {
    let recipient = Recipient::parse(b"+4915112345678").expect("valid E.164");
    for size in PAYLOAD_SIZES {
        let payload = vec![0x5a; size];
        let records: Vec<Record<'_>> = (0..GROUP_RECORDS)
            .map(|i| Record {
                header: RecordHeader::message(1, now_ms(), i as u64, recipient, now_ms()),
                payload: &payload,
            })
            .collect();
        let group_bytes =
            GROUP_RECORDS * (RECORD_OVERHEAD_BYTES + recipient.as_bytes().len() + size);

        let bytes = vec![0xa5u8; group_bytes];
        let mut shell = Shell::new();
        let mut raw = Raw::new();
        let mut positions = Vec::with_capacity(GROUP_RECORDS);
        let mut segments_seen = 1;
        // Interleaved: every timed group of one kind is followed by an untimed group of
        // the other, so both see the same disk (shared, noisy) over the same minutes.
        let mut run = |timed_append: bool, iters: u64| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                if timed_append {
                    shell.append_group(&records, &mut positions);
                    total += t.elapsed();
                    raw.write_group(&bytes);
                } else {
                    raw.write_group(&bytes);
                    total += t.elapsed();
                    shell.append_group(&records, &mut positions);
                }
                raw.drop_old();
                let segments = shell.commit.log().segment_ids().count();
                if segments != segments_seen {
                    segments_seen = segments;
                    shell.drop_old_segments();
                }
            }
            total
        };
        paired(size, &mut run);
        for (name, timed_append) in [("append", true), ("raw_fdatasync", false)] {
            let mut g = c.benchmark_group(name);
            g.throughput(Throughput::Bytes(group_bytes as u64));
            g.bench_function(BenchmarkId::from_parameter(size), |b| {
                b.iter_custom(|iters| run(timed_append, iters))
            });
            g.finish();
        }
    }
}

/// Groups of each kind the paired comparison times.
const PAIRED_GROUPS: u64 = 1_000;

/// The same comparison, robust to the disk's drift: one group of each kind in turn, both
/// timed, the order alternating; prints the medians and their ratio and writes them to
/// `target/criterion/paired/<size>.json`. Criterion times each id in its own window of
/// seconds, and on a shared disk whose fdatasync latency moves by 5x within minutes the
/// ids' windows can differ more than the two paths do.
fn paired(size: usize, run: &mut dyn FnMut(bool, u64) -> Duration) {
    let (mut append, mut raw) = (Vec::new(), Vec::new());
    for i in 0..PAIRED_GROUPS {
        // `run(true, 1)` times an append then does an untimed raw group, and back.
        if i % 2 == 0 {
            append.push(run(true, 1));
            raw.push(run(false, 1));
        } else {
            raw.push(run(false, 1));
            append.push(run(true, 1));
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let (a, r) = (median(&mut append), median(&mut raw));
    let ratio = r.as_secs_f64() / a.as_secs_f64();
    println!(
        "paired/{size}: {PAIRED_GROUPS} groups each; median append {:.1} µs, raw_fdatasync {:.1} µs; \
         append throughput / raw = {ratio:.3}",
        a.as_secs_f64() * 1e6,
        r.as_secs_f64() * 1e6
    );
    let dir = Path::new("target/criterion/paired");
    if std::fs::create_dir_all(dir).is_ok() {
        let _ = std::fs::write(
            dir.join(format!("{size}.json")),
            format!(
                "{{\"groups\":{PAIRED_GROUPS},\"append_median_ns\":{},\"raw_fdatasync_median_ns\":{},\"ratio\":{ratio:.4}}}\n",
                a.as_nanos(),
                r.as_nanos()
            ),
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
