//! Retention before anything is served: at start-up (`courier serve`, each shard after its
//! recovery) and offline (`courier log expire`, with the server stopped), the segments
//! whose oldest record reached the retention are dropped, so a server stopped across the
//! deadline never serves, and a stopped one need not keep, what it should have deleted.
//!
//! ```text
//!  ShardStore::open (recovery; Replay filled from every kept record)
//!    loop: Log::expiring_end(now) ──> Replay::expire_below: the messages still waiting
//!          there ──> `expired` status records appended and fdatasync'd ──> Replay::visit
//!          (their businesses hear them) ──> Log::tick_below: keys destroyed, keyring
//!          persisted, files removed, directory fsync'd
//! ```
//!
//! Invariant (as while serving, `pipeline/src/node/retention.rs`): a segment goes only
//! after the `expired` statuses of the messages waiting in it are durable, so a crash
//! between the two repeats the drop at the next start and loses no status (the messages
//! then have their final status and are not expired twice).

use courier_pipeline::log::{Action, DroppedSegment, Log, LogError, OwnedRecord, Record};
use courier_pipeline::node::Replay;

use crate::store::{ShardStore, StoreError};

/// What one shard's expiry did (ids and counts only).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The segments dropped, oldest first.
    pub segments: Vec<DroppedSegment>,
    /// `expired` statuses recorded for messages still waiting in them.
    pub statuses: u64,
}

/// Drops every segment of `log` whose oldest record reached the retention at `now_ms`,
/// recording first an `expired` status for each message still waiting in it (when
/// `statuses`: delivery is on) and feeding those statuses to `replay`. Performs
/// everything durably through `store` before it returns.
pub fn before_serving(
    store: &mut ShardStore,
    log: &mut Log,
    replay: &mut Replay,
    statuses: bool,
    now_ms: u64,
) -> Result<Expired, StoreError> {
    let mut out = Expired::default();
    let mut rng = rand::rng();
    // Bounded: every round drops at least one of the segments recovery kept.
    while let Some(end) = log.expiring_end(now_ms) {
        let headers = replay.expire_below(end, now_ms);
        if statuses && !headers.is_empty() {
            append_durably(store, log, replay, &headers, now_ms, &mut rng)?;
            out.statuses += headers.len() as u64;
        }
        let mut actions = Vec::new();
        let dropped = log.tick_below(now_ms, end, &mut actions);
        assert!(!dropped.is_empty(), "expiring_end named segments to drop");
        for a in actions {
            perform(store, a)?;
        }
        out.segments.extend(dropped);
    }
    Ok(out)
}

/// Appends status records and makes them durable (each write is synced as it is
/// performed: `ShardStore`'s start-up path), then feeds them to `replay`.
fn append_durably(
    store: &mut ShardStore,
    log: &mut Log,
    replay: &mut Replay,
    headers: &[courier_pipeline::log::RecordHeader],
    now_ms: u64,
    rng: &mut dyn rand::RngCore,
) -> Result<(), StoreError> {
    let cfg = *log.config();
    let each = Log::record_bytes(0, 0);
    let chunk = (cfg.group_commit_records_max as usize)
        .min((cfg.group_commit_bytes_max / each) as usize)
        .max(1);
    for part in headers.chunks(chunk) {
        let records: Vec<Record<'_>> = part
            .iter()
            .map(|h| Record {
                header: *h,
                payload: &[],
            })
            .collect();
        let (mut actions, mut positions) = (Vec::new(), Vec::new());
        log.append(now_ms, rng, &records, &mut actions, &mut positions)
            .map_err(|source| append_error(store, source))?;
        for a in actions {
            perform(store, a)?;
        }
        let req = log.begin_sync().expect("records were appended");
        for &segment_id in &req.segment_ids {
            perform(store, Action::SyncSegment { segment_id })?;
        }
        log.on_synced(req.id);
        for (h, p) in part.iter().zip(&positions) {
            let rec = OwnedRecord {
                header: *h,
                payload: Vec::new(),
                fields_hidden: false,
            };
            replay.visit(p.index(), &rec);
        }
    }
    Ok(())
}

fn perform(store: &mut ShardStore, a: Action) -> Result<(), StoreError> {
    let what = format!("{a:?}");
    store.perform_action(a).map_err(|source| StoreError::Io {
        path: store.dir().join(what),
        source,
    })
}

fn append_error(store: &ShardStore, source: LogError) -> StoreError {
    StoreError::Append {
        dir: store.dir().to_path_buf(),
        source,
    }
}
