//! Round trips, tampering, nonce uniqueness across restarts, exhaustion, privacy.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;

use super::*;

const MASTER: [u8; 32] = [0x4d; 32];
const BUSINESS: u32 = 77;
const DIGITS: &str = "4915112345678";

fn recipient(i: u32) -> Recipient {
    Recipient::parse(format!("+49151{i:08}").as_bytes()).unwrap()
}

fn message(client_id: u64, recipient: Recipient, payload: &[u8]) -> Message {
    Message {
        client_id,
        recipient,
        payload: Bytes::copy_from_slice(payload),
    }
}

fn keys() -> Arc<DerivedKeys> {
    let mut keys = DerivedKeys::new();
    keys.insert_root(BUSINESS, &RootKey::from_bytes([0x11; 32]));
    keys.insert_root(BUSINESS + 1, &RootKey::from_bytes([0x22; 32]));
    Arc::new(keys)
}

fn sealer<K: RecipientKeys>(keys: K, epoch: u32, shard: u8) -> Sealer<K> {
    Sealer::new(
        keys,
        SealerConfig {
            epoch,
            shard: ShardId::new(shard),
            nonce_mask: [0; 12],
            cache_keys_max: 64,
        },
    )
}

fn key_of(keys: &DerivedKeys, business_id: u32, r: &Recipient) -> RecipientKey {
    let mut k = RecipientKey::zeroed();
    keys.recipient_key(business_id, r, &mut k).unwrap();
    k
}

#[test]
fn a_batch_round_trips_in_order_with_the_stated_layout() {
    let keys = keys();
    let mut s = sealer(keys.clone(), 3, 5);
    let batch: Vec<Message> = (0..40)
        .map(|i| {
            message(
                1000 + i,
                recipient(i as u32 % 7),
                &vec![i as u8; i as usize],
            )
        })
        .collect();
    let mut out = SealedBatch::new();
    s.seal_batch(BUSINESS, &batch, &mut out).unwrap();
    assert_eq!(out.len(), batch.len());
    let mut plain = Vec::new();
    for (i, (m, sealed)) in batch.iter().zip(out.iter()).enumerate() {
        assert_eq!(sealed.len(), m.payload.len() + SEAL_OVERHEAD_BYTES);
        assert_eq!(&sealed[..12], &nonce_bytes(3, ShardId::new(5), i as u64));
        let k = key_of(&keys, BUSINESS, &m.recipient);
        let p = open(&k, BUSINESS, &m.recipient, m.client_id, sealed, &mut plain).unwrap();
        assert_eq!(p, &m.payload[..]);
    }
    // 7 distinct recipients: 7 misses, the rest hits; each recipient's second message
    // expanded its stored key once.
    assert_eq!(
        s.cache_stats(),
        CacheStats {
            hits: 33,
            misses: 7,
            expansions: 7,
        }
    );
    assert_eq!(s.nonces_left(), COUNTER_END - 40);
}

#[test]
fn reusing_the_output_keeps_its_memory() {
    let mut s = sealer(keys(), 1, 0);
    let batch: Vec<Message> = (0..64)
        .map(|i| message(i, recipient(i as u32), &[7; 1024]))
        .collect();
    let mut out = SealedBatch::new();
    s.seal_batch(BUSINESS, &batch, &mut out).unwrap();
    let held = out.capacity_bytes();
    for _ in 0..10 {
        out.clear();
        s.seal_batch(BUSINESS, &batch, &mut out).unwrap();
        assert_eq!(out.capacity_bytes(), held, "no growth once sized");
    }
}

#[test]
fn taken_over_whole_the_sealed_messages_are_slices_of_one_exact_buffer() {
    let mut s = sealer(keys(), 1, 0);
    let batch: Vec<Message> = (0..5)
        .map(|i| message(i, recipient(i as u32), &vec![i as u8; 100 + i as usize]))
        .collect();
    let mut out = SealedBatch::new();
    s.seal_batch(BUSINESS, &batch, &mut out).unwrap();
    let copies: Vec<Vec<u8>> = out.iter().map(<[u8]>::to_vec).collect();
    let (capacity, slices) = out.take_shared();
    let slices: Vec<bytes::Bytes> = slices.collect();
    // A fresh buffer is sized exactly for the batch: the capacity counted is its bytes.
    let total: usize = copies.iter().map(Vec::len).sum();
    assert_eq!(capacity, total);
    assert_eq!(slices, copies, "the same sealed messages, in order");
    for (i, slice) in slices.iter().enumerate().skip(1) {
        let prev = &slices[i - 1];
        assert_eq!(
            slice.as_ptr(),
            prev.as_ptr().wrapping_add(prev.len()),
            "back to back"
        );
    }
    assert!(
        out.is_empty() && out.as_bytes().is_empty(),
        "the batch is empty after"
    );
    // The next batch seals into a buffer of its own; the slices are untouched.
    s.seal_batch(BUSINESS, &batch[..1], &mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(slices, copies);
}

#[test]
fn tampering_of_any_kind_fails_to_open() {
    let keys = keys();
    let mut s = sealer(keys.clone(), 9, 1);
    let r = recipient(1);
    let other = recipient(2);
    let batch = [
        message(500, r, b"meet at the usual place"),
        message(501, r, b"a different message, same recipient"),
    ];
    let mut out = SealedBatch::new();
    s.seal_batch(BUSINESS, &batch, &mut out).unwrap();
    let sealed = out.get(0).unwrap().to_vec();
    let k = key_of(&keys, BUSINESS, &r);
    let mut plain = Vec::new();
    assert!(open(&k, BUSINESS, &r, 500, &sealed, &mut plain).is_ok());
    let fails = |k: &RecipientKey, b: u32, rc: &Recipient, id: u64, bytes: &[u8]| {
        let mut p = Vec::new();
        let e = open(k, b, rc, id, bytes, &mut p).unwrap_err();
        assert!(p.is_empty(), "nothing unauthenticated is returned");
        e
    };

    // A flipped bit anywhere: nonce, ciphertext, tag.
    for byte in 0..sealed.len() {
        for bit in [0, 7] {
            let mut t = sealed.clone();
            t[byte] ^= 1 << bit;
            assert_eq!(
                fails(&k, BUSINESS, &r, 500, &t),
                OpenError::Authentication,
                "byte {byte} bit {bit}"
            );
        }
    }
    // Truncated.
    assert_eq!(
        fails(&k, BUSINESS, &r, 500, &sealed[..27]),
        OpenError::Truncated
    );
    assert_eq!(
        fails(&k, BUSINESS, &r, 500, &sealed[..sealed.len() - 1]),
        OpenError::Authentication
    );
    // A changed AAD field: business, recipient, client id.
    fails(&k, BUSINESS + 1, &r, 500, &sealed);
    fails(&k, BUSINESS, &other, 500, &sealed);
    fails(&k, BUSINESS, &r, 501, &sealed);
    // The wrong recipient's key, with that recipient's AAD or the right one.
    let k_other = key_of(&keys, BUSINESS, &other);
    fails(&k_other, BUSINESS, &r, 500, &sealed);
    fails(&k_other, BUSINESS, &other, 500, &sealed);
    // The same recipient of another business has another key.
    let k_biz = key_of(&keys, BUSINESS + 1, &r);
    fails(&k_biz, BUSINESS, &r, 500, &sealed);
    // A replayed nonce: message 0's nonce spliced onto message 1's ciphertext and tag.
    let second = out.get(1).unwrap();
    let mut spliced = sealed[..12].to_vec();
    spliced.extend_from_slice(&second[12..]);
    fails(&k, BUSINESS, &r, 501, &spliced);
    fails(&k, BUSINESS, &r, 500, &spliced);
    // ... and message 0 moved under message 1's client id.
    fails(&k, BUSINESS, &r, 501, &sealed);
}

#[test]
fn restarts_with_fresh_epochs_never_repeat_a_nonce() {
    // The caller persists epoch + 1 before each start; here many runs in a row, several
    // shards each, few recipients so that most nonces fall under the same keys.
    let keys = keys();
    let batch: Vec<Message> = (0..50)
        .map(|i| message(i, recipient(i as u32 % 3), b"x"))
        .collect();
    let mut seen: HashSet<(Vec<u8>, [u8; 12])> = HashSet::new();
    let mut out = SealedBatch::new();
    let mut sealed_total = 0;
    for epoch in 1..=200u32 {
        for shard in 0..3u8 {
            let mut s = sealer(keys.clone(), epoch, shard);
            for _ in 0..(1 + epoch % 3) {
                out.clear();
                s.seal_batch(BUSINESS, &batch, &mut out).unwrap();
                for (m, sealed) in batch.iter().zip(out.iter()) {
                    let key = key_of(&keys, BUSINESS, &m.recipient).as_bytes().to_vec();
                    let nonce: [u8; 12] = sealed[..12].try_into().unwrap();
                    assert!(seen.insert((key, nonce)), "nonce repeated under a key");
                    sealed_total += 1;
                }
            }
            // The sealer is dropped: a crash loses its counter, never its epoch.
        }
    }
    assert_eq!(seen.len(), sealed_total);
    assert!(sealed_total > 50_000);
}

#[test]
fn a_restored_keyring_hands_out_epochs_again_and_the_run_masks_keep_nonces_apart() {
    // A data directory restored from an older copy: the keyrings give every run the
    // same epochs as runs before them did, under the same business keys. Ten "restores"
    // of one (epoch, shard), each run with its own mask as the shell draws it.
    let keys = keys();
    let batch: Vec<Message> = (0..500)
        .map(|i| message(i, recipient(i as u32 % 2), b"x"))
        .collect();
    let mut seen: HashSet<(Vec<u8>, [u8; 12])> = HashSet::new();
    let mut out = SealedBatch::new();
    for run in 0..10u8 {
        let mut s = Sealer::new(
            keys.clone(),
            SealerConfig {
                epoch: 7,
                shard: ShardId::new(1),
                nonce_mask: rand::random(),
                cache_keys_max: 8,
            },
        );
        out.clear();
        s.seal_batch(BUSINESS, &batch, &mut out).unwrap();
        for (m, sealed) in batch.iter().zip(out.iter()) {
            let key = key_of(&keys, BUSINESS, &m.recipient);
            let nonce: [u8; 12] = sealed[..12].try_into().unwrap();
            assert!(
                seen.insert((key.as_bytes().to_vec(), nonce)),
                "run {run}: a nonce repeated under a key"
            );
            // The opener needs no mask: the nonce travels with the message.
            let mut plain = Vec::new();
            open(
                &key,
                BUSINESS,
                &m.recipient,
                m.client_id,
                sealed,
                &mut plain,
            )
            .unwrap();
        }
    }
    assert_eq!(seen.len(), 5_000);

    // Without masks (what the shell did before), the second run of the same epoch
    // repeats the first one's nonces: the failure the masks remove.
    let unmasked = |out: &mut SealedBatch| {
        let mut s = sealer(keys.clone(), 7, 1);
        out.clear();
        s.seal_batch(BUSINESS, &batch, out).unwrap();
        out.get(0).unwrap()[..12].to_vec()
    };
    assert_eq!(unmasked(&mut out), unmasked(&mut out));
}

#[test]
fn the_counter_refuses_to_wrap_and_a_refused_batch_leaves_out_untouched() {
    let mut s = sealer(keys(), 4, 2).with_counter(COUNTER_END - 3);
    let batch: Vec<Message> = (0..2).map(|i| message(i, recipient(1), b"p")).collect();
    let mut out = SealedBatch::new();
    s.seal_batch(BUSINESS, &batch, &mut out).unwrap();
    assert_eq!(
        &out.get(1).unwrap()[..12],
        &nonce_bytes(4, ShardId::new(2), COUNTER_END - 2)
    );
    let before = out.as_bytes().to_vec();
    let err = s.seal_batch(BUSINESS, &batch, &mut out).unwrap_err();
    assert_eq!(
        err,
        SealError::NoncesExhausted {
            epoch: 4,
            shard: ShardId::new(2)
        }
    );
    assert_eq!(out.as_bytes(), &before[..]);
    assert_eq!(out.len(), 2);
    // The last counter is still usable one message at a time, then nothing.
    s.seal(BUSINESS, &batch[0], &mut out).unwrap();
    assert_eq!(
        &out.get(2).unwrap()[..12],
        &nonce_bytes(4, ShardId::new(2), COUNTER_END - 1)
    );
    assert_eq!(s.nonces_left(), 0);
    assert!(matches!(
        s.seal(BUSINESS, &batch[0], &mut out),
        Err(SealError::NoncesExhausted { .. })
    ));
}

#[test]
fn an_unknown_business_fails_the_whole_batch_and_burns_no_reused_nonce() {
    let mut s = sealer(keys(), 1, 0);
    let batch = [
        message(1, recipient(1), b"a"),
        message(2, recipient(2), b"b"),
    ];
    let mut out = SealedBatch::new();
    s.seal_batch(BUSINESS, &batch[..1], &mut out).unwrap();
    let err = s.seal_batch(999, &batch, &mut out).unwrap_err();
    assert_eq!(
        err,
        SealError::Key(KeyError::UnknownBusiness { business_id: 999 })
    );
    assert_eq!(out.len(), 1);
    // The failed attempt consumed a counter; the next message gets a later one.
    s.seal(BUSINESS, &batch[1], &mut out).unwrap();
    assert_eq!(
        &out.get(1).unwrap()[..12],
        &nonce_bytes(1, ShardId::new(0), 2)
    );
}

#[test]
fn wrapped_root_keys_feed_the_sealer() {
    use rand::{rngs::StdRng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(7);
    let root = RootKey::generate(&mut rng);
    let wrapped = wrap_root_key(&MASTER, BUSINESS, &root, &mut rng);
    let mut keys = DerivedKeys::new();
    keys.insert_wrapped(&MASTER, BUSINESS, &wrapped).unwrap();
    let mut s = Sealer::new(
        keys,
        SealerConfig {
            epoch: 1,
            shard: ShardId::new(0),
            nonce_mask: [0; 12],
            cache_keys_max: 8,
        },
    );
    let m = message(3, recipient(3), b"hello");
    let mut out = SealedBatch::new();
    s.seal(BUSINESS, &m, &mut out).unwrap();
    // The recipient side derives the same key from the unwrapped root.
    let mut theirs = DerivedKeys::new();
    theirs.insert_root(
        BUSINESS,
        &unwrap_root_key(&MASTER, BUSINESS, &wrapped).unwrap(),
    );
    let k = key_of(&theirs, BUSINESS, &m.recipient);
    let mut plain = Vec::new();
    assert_eq!(
        open(
            &k,
            BUSINESS,
            &m.recipient,
            3,
            out.get(0).unwrap(),
            &mut plain
        )
        .unwrap(),
        b"hello"
    );
    // Replacing a business's root key requires dropping its cached keys.
    s.keys_mut()
        .insert_root(BUSINESS, &RootKey::from_bytes([5; 32]));
    s.forget_business(BUSINESS);
    out.clear();
    s.seal(BUSINESS, &m, &mut out).unwrap();
    assert!(open(
        &k,
        BUSINESS,
        &m.recipient,
        3,
        out.get(0).unwrap(),
        &mut plain
    )
    .is_err());
}

#[test]
fn debug_output_never_shows_keys_digits_or_payloads() {
    let keys = keys();
    let r = Recipient::parse(format!("+{DIGITS}").as_bytes()).unwrap();
    let payload = b"SECRET-PAYLOAD-TEXT";
    let mut s = sealer(keys.clone(), 1, 0);
    let mut out = SealedBatch::new();
    s.seal(BUSINESS, &message(1, r, payload), &mut out).unwrap();
    let root = RootKey::from_bytes([0xab; 32]);
    let k = key_of(&keys, BUSINESS, &r);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    let wrapped = wrap_root_key(&MASTER, BUSINESS, &root, &mut rng);
    let texts = [
        format!("{s:?}"),
        format!("{out:?}"),
        format!("{keys:?}"),
        format!("{root:?}"),
        format!("{k:?}"),
        format!("{wrapped:?}"),
        format!(
            "{:?}",
            SealError::Key(KeyError::NoRecipientKey { business_id: 1 })
        ),
        format!(
            "{}",
            SealError::Key(KeyError::NoRecipientKey { business_id: 1 })
        ),
        format!("{:?}", OpenError::Authentication),
        format!("{:?}", UnwrapError::Authentication { business_id: 1 }),
        format!("{:?}", s.cache_stats()),
    ];
    let secrets: Vec<String> = vec![
        DIGITS.to_string(),
        String::from_utf8_lossy(payload).into_owned(),
        hex::encode(root.as_bytes()),
        hex::encode(k.as_bytes()),
        format!("{:?}", root.as_bytes()),
        format!("{:?}", k.as_bytes()),
        "171, 171".into(),
        "0xab".into(),
    ];
    for t in &texts {
        for secret in &secrets {
            assert!(!t.contains(secret.as_str()), "{t} shows a secret");
        }
        assert!(!t.contains(&hex::encode(&k.as_bytes()[..4])), "{t}");
    }
}

#[test]
fn ring_sealing_is_byte_identical_to_aws_lc_and_opens_with_both() {
    // The sealer seals with ring; `open` (and the raw references of the bench) use
    // aws-lc-rs. Same key, nonce, AAD and plaintext must give the same bytes, for lengths
    // around every block and bulk-loop boundary of both implementations.
    let keys = keys();
    let mut s = sealer(keys.clone(), 9, 3);
    let lengths = [
        0usize, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 95, 96, 97, 127, 128, 129, 191, 192, 255,
        256, 257, 383, 384, 511, 512, 513, 767, 768, 1023, 1024, 1025, 1535, 2048, 4096, 4099,
        8197,
    ];
    let mut plain = Vec::new();
    for (i, &len) in lengths.iter().enumerate() {
        // Every recipient length, 7 to 15 digits.
        let r = Recipient::parse(format!("+{}", "4".repeat(7 + i % 9)).as_bytes()).unwrap();
        let payload: Vec<u8> = (0..len).map(|j| (j * 131 + i * 7) as u8).collect();
        let m = message(500 + i as u64, r, &payload);
        let mut out = SealedBatch::new();
        s.seal(BUSINESS, &m, &mut out).unwrap();
        let sealed = out.get(0).unwrap();

        let key = key_of(&keys, BUSINESS, &r);
        let nonce = nonce_bytes(9, ShardId::new(3), i as u64);
        // The associated data as the module docs state it, built independently.
        let mut aad_ref = AAD_PREFIX.to_vec();
        aad_ref.extend_from_slice(&BUSINESS.to_le_bytes());
        aad_ref.extend_from_slice(&m.client_id.to_le_bytes());
        aad_ref.push(r.as_bytes().len() as u8);
        aad_ref.extend_from_slice(r.as_bytes());
        let mut expected = nonce.to_vec();
        let mut body = payload.clone();
        let tag = expand_for_open(&key)
            .seal_in_place_separate_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(&aad_ref[..]),
                &mut body,
            )
            .unwrap();
        expected.extend_from_slice(&body);
        expected.extend_from_slice(tag.as_ref());
        assert_eq!(sealed, &expected[..], "length {len}");

        // Opens with aws-lc-rs (`open`) and with ring.
        let opened = open(&key, BUSINESS, &r, m.client_id, sealed, &mut plain).unwrap();
        assert_eq!(opened, &payload[..], "length {len}");
        let mut in_out = sealed[SEAL_NONCE_BYTES..].to_vec();
        let opened = expand(&key)
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad_ref[..]),
                &mut in_out,
            )
            .unwrap();
        assert_eq!(opened, &payload[..], "length {len}");
    }
}

/// A key source that counts how it is asked, and can refuse batch requests.
struct Counting {
    inner: Arc<DerivedKeys>,
    singles: std::cell::Cell<usize>,
    batches: std::cell::RefCell<Vec<usize>>,
    refuse_batches: bool,
}

impl Counting {
    fn new(refuse_batches: bool) -> Counting {
        Counting {
            inner: keys(),
            singles: 0.into(),
            batches: Vec::new().into(),
            refuse_batches,
        }
    }
}

impl RecipientKeys for Counting {
    fn recipient_key(&self, b: u32, r: &Recipient, out: &mut RecipientKey) -> Result<(), KeyError> {
        self.singles.set(self.singles.get() + 1);
        self.inner.recipient_key(b, r, out)
    }

    fn recipient_keys(
        &self,
        b: u32,
        r: &[Recipient],
        out: &mut [RecipientKey],
    ) -> Result<(), KeyError> {
        self.batches.borrow_mut().push(r.len());
        if self.refuse_batches {
            return Err(KeyError::NoRecipientKey { business_id: b });
        }
        self.inner.recipient_keys(b, r, out)
    }
}

/// `batch` sealed one message at a time by a fresh sealer of epoch 9, shard 2.
fn sealed_one_by_one(batch: &[Message]) -> (SealedBatch, CacheStats) {
    let mut s = sealer(keys(), 9, 2);
    let mut out = SealedBatch::new();
    for m in batch {
        s.seal(BUSINESS, m, &mut out).unwrap();
    }
    (out, s.cache_stats())
}

/// 40 messages: recipients 0..20 new, then 10 repeats of 0..10, then 10 new ones
/// (20..30), one of them twice in a row.
fn mixed_batch() -> Vec<Message> {
    let mut rs: Vec<u32> = (0..20).chain(0..10).chain(20..29).collect();
    rs.push(28);
    rs.iter()
        .enumerate()
        .map(|(i, &r)| message(500 + i as u64, recipient(r), &[i as u8; 33]))
        .collect()
}

#[test]
fn a_batch_asks_its_likely_misses_together_and_seals_as_one_by_one_would() {
    let batch = mixed_batch();
    let mut together = sealer(Counting::new(false), 9, 2);
    let mut out = SealedBatch::new();
    together.seal_batch(BUSINESS, &batch, &mut out).unwrap();

    // Chunks of 16: 0..16 all new; 16..32 = 16..20 new, 0..10 cached, 20, 21 new;
    // 32..40 = 22..29 new, 28 again (asked twice: the guess is made before the chunk
    // is sealed; the second lookup then hits).
    assert_eq!(*together.keys.batches.borrow(), vec![16, 6, 8]);
    assert_eq!(
        together.keys.singles.get(),
        0,
        "every miss had its key ready"
    );
    assert_eq!(
        together.cache_stats(),
        CacheStats {
            hits: 11,
            misses: 29,
            expansions: 11,
        }
    );

    let (expected, stats) = sealed_one_by_one(&batch);
    assert_eq!(out.as_bytes(), expected.as_bytes());
    assert_eq!(stats, together.cache_stats());

    // References seal the same.
    let refs: Vec<&Message> = batch.iter().collect();
    let mut by_ref = sealer(keys(), 9, 2);
    let mut out_refs = SealedBatch::new();
    by_ref.seal_batch(BUSINESS, &refs, &mut out_refs).unwrap();
    assert_eq!(out_refs.as_bytes(), expected.as_bytes());
}

#[test]
fn a_source_refusing_the_batch_request_is_asked_per_miss() {
    let batch = mixed_batch();
    let mut s = sealer(Counting::new(true), 9, 2);
    let mut out = SealedBatch::new();
    s.seal_batch(BUSINESS, &batch, &mut out).unwrap();
    assert_eq!(s.keys.batches.borrow().len(), 3);
    assert_eq!(s.keys.singles.get(), 29, "one request per miss");
    assert_eq!(out.as_bytes(), sealed_one_by_one(&batch).0.as_bytes());
}

#[test]
fn derived_keys_in_pairs_equal_keys_one_at_a_time() {
    let keys = keys();
    for n in 0..=7 {
        let rs: Vec<Recipient> = (0..n).map(|i| recipient(1000 + i * 37)).collect();
        let mut got: Vec<RecipientKey> = (0..n).map(|_| RecipientKey::zeroed()).collect();
        keys.recipient_keys(BUSINESS + 1, &rs, &mut got).unwrap();
        for (r, k) in rs.iter().zip(&got) {
            assert!(*k == key_of(&keys, BUSINESS + 1, r), "{n} keys");
        }
    }
    let rs = [recipient(1), recipient(2)];
    let mut out = [RecipientKey::zeroed(), RecipientKey::zeroed()];
    assert_eq!(
        keys.recipient_keys(999, &rs, &mut out),
        Err(KeyError::UnknownBusiness { business_id: 999 })
    );
}

#[test]
fn random_batches_through_a_tiny_cache_seal_as_one_by_one_would() {
    // Four ways for twelve recipients: keys guessed cached are evicted by earlier misses
    // of the same chunk, guessed misses turn out cached after an earlier duplicate, and
    // every such miss without a key derived ahead asks for its own.
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(44);
    let keys = keys();
    let config = SealerConfig {
        epoch: 5,
        shard: ShardId::new(1),
        nonce_mask: [0x3c; 12],
        cache_keys_max: 4,
    };
    let mut batched = Sealer::new(keys.clone(), config);
    let mut single = Sealer::new(keys.clone(), config);
    let (mut out, mut expected, mut plain) = (SealedBatch::new(), SealedBatch::new(), Vec::new());
    let mut client_id = 0;
    for _ in 0..200 {
        let batch: Vec<Message> = (0..rng.random_range(1..40))
            .map(|_| {
                client_id += 1;
                message(client_id, recipient(rng.random_range(0..12)), &[7; 20])
            })
            .collect();
        out.clear();
        expected.clear();
        batched.seal_batch(BUSINESS, &batch, &mut out).unwrap();
        for m in &batch {
            single.seal(BUSINESS, m, &mut expected).unwrap();
        }
        assert_eq!(out.as_bytes(), expected.as_bytes());
        for (m, sealed) in batch.iter().zip(out.iter()) {
            let k = key_of(&keys, BUSINESS, &m.recipient);
            open(&k, BUSINESS, &m.recipient, m.client_id, sealed, &mut plain).unwrap();
        }
    }
    assert_eq!(batched.cache_stats(), single.cache_stats());
    assert!(batched.cache_stats().hits > 0 && batched.cache_stats().misses > 1000);
}
