//! A message that reaches the log is sealed for its recipient: reading the log back with
//! the master key gives sealed bytes, never the payload, and the recipient's key opens them.

use bytes::Bytes;
use courier::store::MasterKeyText;
use courier_client::ServerTrust;
use courier_client::{Client, ClientConfig, OutgoingMessage};
use courier_pipeline::log::{
    Keyring, LogConfig, MasterKey, OwnedRecord, SegmentCodec, SegmentHeader,
};
use courier_pipeline::profile::Profile;
use courier_pipeline::registry::{Registry, Tier};
use courier_pipeline::seal::keys::{
    unwrap_root_key, DerivedKeys, RecipientKey, RecipientKeys, WrappedRootKey,
};
use courier_pipeline::wire::{Recipient, Status};
use courier_testkit::server::{self, small_profile, Setup};

const MASTER_HEX: &str = "8f1c2d3e4a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c7d8e9f0a1b2c3d4e5f";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logged_messages_are_sealed_and_open_with_the_recipient_key() {
    let dir = tempfile::tempdir().unwrap();
    let profile = small_profile(1);
    let mut registry = Registry::default();
    let (business, token) = registry
        .add("sealing test", Tier::Unlimited, 1_000_000, &[9u8; 32])
        .unwrap();
    registry.set_exempt(business, true);
    let master = MasterKeyText::new(format!("{MASTER_HEX}\n").into_bytes()).unwrap();
    let setup = Setup {
        profile: profile.clone(),
        registry,
        master_key: master,
    };
    let running = server::start(dir.path(), setup);
    let cfg = ClientConfig {
        server: running.local_addr(),
        server_name: "localhost".into(),
        token,
        trust: ServerTrust::Pinned(running.certificate().clone()),
        streams: 2,
        batches_in_flight_per_stream: 2,
    };
    let sent: Vec<(u64, Recipient, Vec<u8>)> = (0..40u64)
        .map(|i| {
            let r = Recipient::parse(format!("+4915{:09}", 100_000 + i * 7).as_bytes()).unwrap();
            (
                i + 1,
                r,
                format!("hello number {i}, meet at noon").into_bytes(),
            )
        })
        .collect();
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        let client = Client::connect(&cfg).await.unwrap();
        let batch = sent
            .iter()
            .map(|(id, r, p)| OutgoingMessage {
                client_id: *id,
                recipient: *r,
                payload: Bytes::from(p.clone()),
            })
            .collect();
        let statuses = client.submit(batch).await.unwrap();
        assert!(statuses.iter().all(|s| matches!(s, Status::Accepted(_))));
        client.close().await;
    })
    .await
    .expect("test timed out");
    running.shutdown();
    running.join().unwrap();

    // Read the shard's log back with the master key.
    let records = read_log(dir.path(), 0, &profile);
    assert_eq!(
        records.len(),
        sent.len(),
        "every accepted message is in the log"
    );

    // The recipient side: the business root key (wrapped by the master key) derives
    // each recipient's key.
    let line = std::fs::read_to_string(dir.path().join("business-keys")).unwrap();
    let (id, hexed) = line.trim().split_once(' ').unwrap();
    assert_eq!(id.parse::<u32>().unwrap(), business);
    let mut wrapped = [0u8; 60];
    hex::decode_to_slice(hexed, &mut wrapped).unwrap();
    let mut master_bytes = [0u8; 32];
    hex::decode_to_slice(MASTER_HEX, &mut master_bytes).unwrap();
    let root = unwrap_root_key(
        &master_bytes,
        business,
        &WrappedRootKey::from_bytes(wrapped),
    )
    .unwrap();
    let mut keys = DerivedKeys::new();
    keys.insert_root(business, &root);

    let mut out = Vec::new();
    for rec in &records {
        let (_, recipient, payload) = sent
            .iter()
            .find(|(id, _, _)| *id == rec.header.client_id)
            .expect("a message that was sent");
        assert_eq!(rec.header.recipient, Some(*recipient));
        assert_eq!(rec.header.business_id, business);
        // Stored sealed: the payload is not in the record body.
        assert_ne!(&rec.payload[..], &payload[..]);
        assert!(!rec
            .payload
            .windows(payload.len().min(12))
            .any(|w| w == &payload[..payload.len().min(12)]));
        let mut key = RecipientKey::zeroed();
        keys.recipient_key(business, recipient, &mut key).unwrap();
        let opened = courier_pipeline::seal::open(
            &key,
            business,
            recipient,
            rec.header.client_id,
            &rec.payload,
            &mut out,
        )
        .expect("opens with the recipient's key");
        assert_eq!(opened, &payload[..]);
        // Another recipient's key does not open it.
        let other = Recipient::parse(b"+15550009999").unwrap();
        let mut wrong = RecipientKey::zeroed();
        keys.recipient_key(business, &other, &mut wrong).unwrap();
        assert!(courier_pipeline::seal::open(
            &wrong,
            business,
            recipient,
            rec.header.client_id,
            &rec.payload,
            &mut out
        )
        .is_err());
    }
}

/// Every record of shard `shard`'s log under `data_dir`, read with the master key.
fn read_log(data_dir: &std::path::Path, shard: usize, profile: &Profile) -> Vec<OwnedRecord> {
    let shard_dir = data_dir.join(format!("log/shard-{shard}"));
    let master_key = MasterKey::parse(MASTER_HEX.as_bytes()).unwrap();
    let keyring = Keyring::from_bytes(&std::fs::read(shard_dir.join("keyring")).unwrap()).unwrap();
    let log_cfg = LogConfig::new(&profile.log, profile.limits.payload_bytes_max);
    // The businesses' root keys too: a record's user fields are under them (issue 19).
    let master = MasterKeyText::new(MASTER_HEX.as_bytes().to_vec()).unwrap();
    let fields: std::sync::Arc<dyn courier_pipeline::log::FieldKeys> =
        courier::business_keys::load(data_dir, &master).unwrap();
    let mut records = Vec::new();
    for seg in courier::store::list_segments(&shard_dir).unwrap() {
        let bytes = std::fs::read(shard_dir.join(format!("{seg:020}.seg"))).unwrap();
        let header = SegmentHeader::decode(&bytes).unwrap();
        let key = keyring.data_key(&master_key, header.data_key_id).unwrap();
        let codec = SegmentCodec::new(header, key, log_cfg.payload_bytes_max)
            .with_field_keys(Some(fields.clone()));
        records.extend(codec.records(&bytes).map(|r| r.unwrap().1));
    }
    records
}

/// Copies a directory tree, keeping file modes (as `cp -a` does).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Restoring the data directory from an older copy (log, keyrings and business keys
/// alike) hands every shard the nonce epochs it already used under the same recipient
/// keys; the sealers' run masks keep every (key, nonce) pair unique anyway (issue 18).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_data_directory_repeats_no_nonce_under_a_recipient_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let backup = dir.path().join("backup");
    let profile = small_profile(1);
    let mut registry = Registry::default();
    let (business, token) = registry
        .add("restore test", Tier::Unlimited, 1_000_000, &[9u8; 32])
        .unwrap();
    registry.set_exempt(business, true);
    let master = MasterKeyText::new(format!("{MASTER_HEX}\n").into_bytes()).unwrap();
    // Three recipients, so that every run seals many messages under each key.
    let recipients: Vec<Recipient> = (0..3)
        .map(|i| Recipient::parse(format!("+4420{:08}", 7_000 + i).as_bytes()).unwrap())
        .collect();
    let run = |first_id: u64| {
        let setup = Setup {
            profile: profile.clone(),
            registry: registry.clone(),
            master_key: master.clone(),
        };
        let running = server::start(&data, setup);
        let cfg = server::client_config(&running, &token, 1, 1);
        let recipients = recipients.clone();
        async move {
            tokio::time::timeout(std::time::Duration::from_secs(60), async {
                let client = Client::connect(&cfg).await.unwrap();
                for b in 0..4u64 {
                    let batch = (0..60u64)
                        .map(|i| OutgoingMessage {
                            client_id: first_id + b * 60 + i,
                            recipient: recipients[(i % 3) as usize],
                            payload: Bytes::from_static(b"restore"),
                        })
                        .collect();
                    let statuses = client.submit(batch).await.unwrap();
                    assert!(statuses.iter().all(|s| matches!(s, Status::Accepted(_))));
                }
                client.close().await;
            })
            .await
            .expect("test timed out");
            running.shutdown();
            running.join().unwrap();
        }
    };
    type Sealed = ((Option<Recipient>, u64), [u8; 12]);
    let nonces = |records: &[OwnedRecord]| -> Vec<Sealed> {
        records
            .iter()
            .map(|r| {
                (
                    (r.header.recipient, r.header.client_id),
                    r.payload[..12].try_into().unwrap(),
                )
            })
            .collect()
    };

    run(1).await;
    copy_tree(&data, &backup);
    // Run 2 goes on from the copy's state; run 3 from the same state again, after the
    // restore: same keyring, same epochs, same business keys.
    run(1_000).await;
    let second = nonces(&read_log(&data, 0, &profile));
    std::fs::remove_dir_all(&data).unwrap();
    copy_tree(&backup, &data);
    run(2_000).await;
    let third = nonces(&read_log(&data, 0, &profile));

    // One entry per message (run 1's messages are in both logs, with the same bytes).
    let mut messages = std::collections::HashMap::new();
    for (id, nonce) in second.iter().chain(&third) {
        assert_eq!(*messages.entry(*id).or_insert(*nonce), *nonce);
    }
    assert_eq!(messages.len(), 3 * 240, "runs 1, 2 and 3");
    // One business: the recipient names the key.
    let mut pairs = std::collections::HashSet::new();
    for ((recipient, _), nonce) in &messages {
        let key = recipient
            .expect("a message has a recipient")
            .as_bytes()
            .to_vec();
        assert!(
            pairs.insert((key, *nonce)),
            "a (recipient key, nonce) pair repeated after the restore"
        );
    }
}
