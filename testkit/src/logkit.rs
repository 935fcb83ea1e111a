//! Helpers for the tests that run servers and read their logs (the root's log_files,
//! crash and spawned-server tests): a known master key, a registry, traffic that records
//! what was acked, the segments of a shard, and waiting for a server's output.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use courier::audit::AcceptedEntry;
use courier::store::MasterKeyText;
use courier_client::ServerTrust;
use courier_client::{Client, ClientConfig, OutgoingMessage};
use courier_pipeline::log::{Keyring, SegmentCodec, SegmentHeader};
use courier_pipeline::registry::{Registry, Tier};
use courier_pipeline::wire::{Recipient, Status};
use rustls::pki_types::CertificateDer;

/// Recipients are `+1555` and seven digits; payloads carry this marker. Neither may ever
/// show in a tool's output.
pub const PAYLOAD_MARKER: &str = "SECRET-BODY-";

/// A master key file's text (64 hex characters and a newline) from `seed`.
pub fn key_text(seed: u8) -> Vec<u8> {
    let mut s: String = (0..32u8)
        .map(|i| format!("{:02x}", i.wrapping_mul(7).wrapping_add(seed)))
        .collect();
    s.push('\n');
    s.into_bytes()
}

/// The key of [`key_text`].
pub fn master_key(seed: u8) -> MasterKeyText {
    MasterKeyText::new(key_text(seed)).unwrap()
}

pub use crate::server::small_profile;

/// A registry with one unlimited business; returns it and its token.
pub fn registry() -> (Registry, String) {
    let mut r = Registry::default();
    let (id, token) = r
        .add("log test sender", Tier::Unlimited, 1_000_000, &[5u8; 32])
        .unwrap();
    // A load sender: the log tests are not about detection.
    r.set_exempt(id, true);
    (r, token)
}

/// A client configuration for a server at `addr` with certificate `cert`.
pub fn client_config(
    addr: std::net::SocketAddr,
    cert: CertificateDer<'static>,
    token: &str,
) -> ClientConfig {
    ClientConfig {
        server: addr,
        server_name: "localhost".into(),
        token: token.into(),
        trust: ServerTrust::Pinned(cert),
        streams: 4,
        batches_in_flight_per_stream: 4,
    }
}

/// Recipient of message `i`.
pub fn recipient_text(i: u64) -> String {
    format!("+1555{:07}", 1_000_000 + i % 8_000_000)
}

/// A batch of messages with client ids `first..first + n`.
pub fn batch(first: u64, n: u64, size: usize) -> Vec<OutgoingMessage> {
    (first..first + n)
        .map(|id| {
            let mut payload = format!("{PAYLOAD_MARKER}{id}-").into_bytes();
            payload.resize(size.max(payload.len()), b'x');
            OutgoingMessage {
                client_id: id,
                recipient: Recipient::parse(recipient_text(id).as_bytes()).unwrap(),
                payload: Bytes::from(payload),
            }
        })
        .collect()
}

/// The accepted entries of a batch's statuses.
pub fn accepted(business_id: u32, first: u64, statuses: &[Status]) -> Vec<AcceptedEntry> {
    statuses
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Status::Accepted(p) => Some(AcceptedEntry {
                business_id,
                client_id: first + i as u64,
                position: *p,
            }),
            _ => None,
        })
        .collect()
}

/// Sends `batches` batches of `per_batch` messages, 8 at a time; returns what was accepted.
pub async fn send(
    client: &Arc<Client>,
    first: u64,
    batches: u64,
    per_batch: u64,
) -> Vec<AcceptedEntry> {
    let business = client.welcome().business_id;
    let mut out = Vec::new();
    for chunk in (0..batches).collect::<Vec<_>>().chunks(8) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|&b| {
                let client = client.clone();
                let f = first + b * per_batch;
                tokio::spawn(async move { (f, client.submit(batch(f, per_batch, 120)).await) })
            })
            .collect();
        for h in handles {
            let (f, r) = h.await.unwrap();
            out.extend(accepted(business, f, &r.expect("batch answered")));
        }
    }
    out
}

/// The log directory of `shard`.
pub fn shard_dir(data_dir: &Path, shard: usize) -> PathBuf {
    let shard = courier_pipeline::ShardId::try_from(shard).expect("a shard id");
    courier::store::shard_dir(data_dir, shard)
}

/// Segment files of a shard, oldest first.
pub fn segments(data_dir: &Path, shard: usize) -> Vec<PathBuf> {
    let dir = shard_dir(data_dir, shard);
    courier::store::list_segments(&dir)
        .unwrap()
        .into_iter()
        .map(|id| dir.join(format!("{id:020}.seg")))
        .collect()
}

/// Byte offsets of every readable record of a segment file, and where the last one ends
/// (before any zero padding of a direct I/O write).
pub fn record_offsets(
    data_dir: &Path,
    shard: usize,
    segment: &Path,
    key: &MasterKeyText,
) -> (Vec<u64>, u64) {
    let bytes = std::fs::read(segment).unwrap();
    let keyring =
        Keyring::from_bytes(&std::fs::read(shard_dir(data_dir, shard).join("keyring")).unwrap())
            .unwrap();
    let header = SegmentHeader::decode(&bytes).unwrap();
    let codec = SegmentCodec::new(
        header,
        keyring
            .data_key(&key.master_key(), header.data_key_id)
            .unwrap(),
        courier::audit::PAYLOAD_BYTES_MAX,
    );
    let mut records = codec.records(&bytes);
    let offsets = records.by_ref().map(|r| r.unwrap().0).collect();
    (offsets, records.offset())
}

/// Every file under `dir` with its bytes, sorted by path.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Polls `path` until it contains `text` or `deadline` passes (a spawned server's log).
pub fn wait_for(path: &Path, text: &str, deadline: std::time::Instant) -> bool {
    while std::time::Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(text)) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}
