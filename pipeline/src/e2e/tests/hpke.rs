//! RFC 9180's vectors (`pipeline/tests/data/hpke_rfc9180_base.json`) and the contexts'
//! refusals: tampering, wrong keys, reused and replayed sequence numbers.

use serde::Deserialize;

use super::pair;
use crate::e2e::hpke::{
    compute_nonce, decap_schedule, encap_schedule, export, setup_base_s_derand, setup_r_with,
    setup_s_with, Aead, CONTEXT_SECRETS_BYTES, REPLAY_WINDOW, TAG_BYTES,
};
use crate::e2e::*;

// ---- RFC 9180 vectors ----

#[derive(Deserialize)]
struct Fixture {
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(non_snake_case)]
struct Vector {
    mode: u8,
    kem_id: u16,
    kdf_id: u16,
    aead_id: u16,
    info: String,
    skRm: String,
    skEm: String,
    pkRm: String,
    pkEm: String,
    shared_secret: Option<String>,
    key_schedule_context: Option<String>,
    secret: Option<String>,
    key: Option<String>,
    base_nonce: Option<String>,
    exporter_secret: Option<String>,
    encryptions: Vec<Encryption>,
    exports: Vec<Export>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Encryption {
    seq: u64,
    aad: String,
    ct: String,
    pt: String,
    nonce: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Export {
    exporter_context: String,
    #[serde(rename = "L")]
    length: usize,
    exported_value: String,
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("fixture hex")
}

fn unhex32(s: &str) -> [u8; 32] {
    unhex(s).try_into().expect("32 bytes")
}

fn vectors() -> Vec<Vector> {
    let json = include_str!("../../../tests/data/hpke_rfc9180_base.json");
    let fixture: Fixture = serde_json::from_str(json).expect("fixture parses");
    fixture.vectors
}

#[test]
fn fixture_holds_base_mode_of_both_aes_suites() {
    let v = vectors();
    let suites: Vec<_> = v
        .iter()
        .map(|v| (v.mode, v.kem_id, v.kdf_id, v.aead_id))
        .collect();
    assert_eq!(suites, [(0, 0x20, 1, 1), (0, 0x20, 1, 2)]);
    for v in &v {
        assert_eq!(v.encryptions.len(), 257, "sequence numbers 0..=256");
        assert!(v
            .encryptions
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq == i as u64));
    }
}

fn aead_of(v: &Vector) -> Aead {
    match v.aead_id {
        1 => Aead::Aes128Gcm,
        2 => Aead::Aes256Gcm,
        other => panic!("aead {other} is not in the fixture's suites"),
    }
}

#[test]
fn rfc9180_key_schedule() {
    for v in vectors() {
        let aead = aead_of(&v);
        let info = unhex(&v.info);
        let sk_e = X25519SecretKey::from_bytes(&unhex32(&v.skEm));
        let sk_r = X25519SecretKey::from_bytes(&unhex32(&v.skRm));
        assert_eq!(
            sk_e.public_key(),
            &unhex32(&v.pkEm),
            "aead {}: pkEm",
            v.aead_id
        );
        assert_eq!(
            sk_r.public_key(),
            &unhex32(&v.pkRm),
            "aead {}: pkRm",
            v.aead_id
        );
        // The private key round-trips through its bytes.
        assert_eq!(*sk_r.to_bytes(), unhex32(&v.skRm));

        let (enc, s) = encap_schedule(aead, sk_r.public_key(), &info, &sk_e).expect("encap");
        assert_eq!(enc, unhex32(&v.pkEm), "enc is pkEm");
        let (shared, r) = decap_schedule(aead, &enc, &sk_r, &info).expect("decap");
        let nk = aead.key_bytes();
        assert_eq!((&s.key[..nk], s.base_nonce), (&r.key[..nk], r.base_nonce));
        // Both entries of the fixture carry every intermediate value.
        let field = |f: &Option<String>| f.clone().expect("the fixture has every field");
        assert_eq!(hex::encode(&shared[..]), field(&v.shared_secret));
        assert_eq!(
            hex::encode(s.key_schedule_context),
            field(&v.key_schedule_context)
        );
        assert_eq!(hex::encode(&s.secret[..]), field(&v.secret));
        assert_eq!(hex::encode(&s.key[..nk]), field(&v.key));
        assert_eq!(hex::encode(s.base_nonce), field(&v.base_nonce));
        for e in &v.exports {
            let mut out = vec![0; e.length];
            let exporter_secret = export(aead, &s, &unhex(&e.exporter_context), &mut out);
            assert_eq!(
                hex::encode(&out),
                e.exported_value,
                "aead {}: export",
                v.aead_id
            );
            assert_eq!(hex::encode(exporter_secret), field(&v.exporter_secret));
        }
    }
}

#[test]
fn rfc9180_every_encryption_seals_and_opens() {
    for v in vectors() {
        let aead = aead_of(&v);
        let info = unhex(&v.info);
        let sk_e = X25519SecretKey::from_bytes(&unhex32(&v.skEm));
        let sk_r = X25519SecretKey::from_bytes(&unhex32(&v.skRm));
        let (enc, mut sender) =
            setup_s_with(aead, sk_r.public_key(), &info, &sk_e).expect("setup_s");
        let mut recipient = setup_r_with(aead, &enc, &sk_r, &info).expect("setup_r");
        let (_, schedule) = encap_schedule(aead, sk_r.public_key(), &info, &sk_e).expect("encap");
        for e in &v.encryptions {
            let (aad, pt, ct) = (unhex(&e.aad), unhex(&e.pt), unhex(&e.ct));
            let nonce = e.nonce.as_ref().expect("the fixture has every nonce");
            let n = compute_nonce(&schedule.base_nonce, e.seq);
            assert_eq!(hex::encode(n.as_ref()), *nonce, "nonce of seq {}", e.seq);
            let sealed = sender.seal(e.seq, &aad, &pt).expect("seal");
            assert_eq!(
                hex::encode(&sealed),
                e.ct,
                "aead {} seq {}",
                v.aead_id,
                e.seq
            );
            assert_eq!(recipient.open(e.seq, &aad, &ct).expect("open"), pt);
        }
        assert_eq!(sender.next_seq(), 257);
        assert_eq!(recipient.window().newest(), Some(256));
    }
}

#[test]
fn derandomized_public_setup_matches_the_aes256_vector() {
    let v = vectors()
        .into_iter()
        .find(|v| v.aead_id == 2)
        .expect("aead 2 vector");
    let info = unhex(&v.info);
    let (enc, mut sender) =
        setup_base_s_derand(&unhex32(&v.pkRm), &info, &unhex32(&v.skEm)).expect("setup");
    assert_eq!(enc, unhex32(&v.pkEm));
    let e = &v.encryptions[0];
    assert_eq!(
        hex::encode(sender.seal(0, &unhex(&e.aad), &unhex(&e.pt)).unwrap()),
        e.ct
    );
    let sk_r = X25519SecretKey::from_bytes(&unhex32(&v.skRm));
    let mut r = setup_base_r(&enc, &sk_r, &info).expect("setup_r");
    assert_eq!(
        r.open(0, &unhex(&e.aad), &unhex(&e.ct)).unwrap(),
        unhex(&e.pt)
    );
}

// ---- Refusals ----

#[test]
fn tampered_ciphertext_or_tag_is_refused_and_the_seq_stays_open() {
    let (mut s, mut r, _) = pair(b"info");
    let ct = s.seal(0, b"aad", b"hello device").unwrap();
    for i in 0..ct.len() {
        let mut bad = ct.clone();
        bad[i] ^= 0x01;
        assert_eq!(
            r.open(0, b"aad", &bad),
            Err(HpkeError::Open),
            "byte {i} flipped"
        );
    }
    let mut short = ct.clone();
    short.truncate(ct.len() - 1);
    assert_eq!(r.open(0, b"aad", &short), Err(HpkeError::Open));
    assert_eq!(
        r.open(0, b"aad", &ct[..TAG_BYTES - 1]),
        Err(HpkeError::Truncated)
    );
    // A refused forgery does not burn the sequence number.
    assert_eq!(r.open(0, b"aad", &ct).unwrap(), b"hello device");
}

#[test]
fn tampered_aad_wrong_seq_wrong_info_and_wrong_key_are_refused() {
    let (mut s, mut r, _) = pair(b"info");
    let ct = s.seal(5, b"aad", b"m").unwrap();
    assert_eq!(r.open(5, b"aaD", &ct), Err(HpkeError::Open));
    assert_eq!(r.open(5, b"", &ct), Err(HpkeError::Open));
    assert_eq!(r.open(4, b"aad", &ct), Err(HpkeError::Open));
    assert_eq!(r.open(6, b"aad", &ct), Err(HpkeError::Open));

    // The right enc with another recipient key, or another info: a different context.
    let sk_r = X25519SecretKey::generate().unwrap();
    let (enc, mut s2) = setup_base_s(sk_r.public_key(), b"info").unwrap();
    let ct2 = s2.seal(0, b"aad", b"m").unwrap();
    let other = X25519SecretKey::generate().unwrap();
    let mut wrong_key = setup_base_r(&enc, &other, b"info").unwrap();
    assert_eq!(wrong_key.open(0, b"aad", &ct2), Err(HpkeError::Open));
    let mut wrong_info = setup_base_r(&enc, &sk_r, b"infp").unwrap();
    assert_eq!(wrong_info.open(0, b"aad", &ct2), Err(HpkeError::Open));
    let mut right = setup_base_r(&enc, &sk_r, b"info").unwrap();
    assert_eq!(right.open(0, b"aad", &ct2).unwrap(), b"m");
}

#[test]
fn replayed_and_too_old_sequence_numbers_are_refused() {
    let (mut s, mut r, _) = pair(b"info");
    let cts: Vec<_> = (0..=100u64)
        .map(|q| s.seal(q, b"", &q.to_be_bytes()).unwrap())
        .collect();
    // Out of order within the window is fine; a second copy is refused.
    for q in [3u64, 1, 2, 0] {
        assert_eq!(r.open(q, b"", &cts[q as usize]).unwrap(), q.to_be_bytes());
    }
    for q in [3u64, 0] {
        let refused = r.open(q, b"", &cts[q as usize]);
        assert_eq!(
            refused,
            Err(HpkeError::SequenceReused { seq: q, next: 4 }),
            "replay of {q}"
        );
    }
    for q in [100u64, 40, 37] {
        assert_eq!(r.open(q, b"", &cts[q as usize]).unwrap(), q.to_be_bytes());
    }
    for q in [100u64, 37] {
        let refused = r.open(q, b"", &cts[q as usize]);
        assert_eq!(
            refused,
            Err(HpkeError::SequenceReused { seq: q, next: 101 }),
            "replay of {q}"
        );
    }
    // Behind the window, opened or not, it is refused.
    assert_eq!(
        r.open(3, b"", &cts[3]),
        Err(HpkeError::SequenceTooOld {
            seq: 3,
            newest: 100
        })
    );
    let old = 100 - REPLAY_WINDOW;
    assert_eq!(
        r.open(old, b"", &cts[old as usize]),
        Err(HpkeError::SequenceTooOld {
            seq: old,
            newest: 100
        })
    );
    // 37, the oldest in the window, was refused above as opened; 38 was never opened.
    assert_eq!(
        r.open(old + 2, b"", &cts[old as usize + 2]).unwrap(),
        (old + 2).to_be_bytes()
    );
}

#[test]
fn the_sender_never_seals_twice_at_one_seq() {
    let (mut s, _, _) = pair(b"info");
    s.seal(7, b"", b"a").unwrap();
    assert_eq!(
        s.seal(7, b"", b"b"),
        Err(HpkeError::SequenceReused { seq: 7, next: 8 })
    );
    assert_eq!(
        s.seal(3, b"", b"b"),
        Err(HpkeError::SequenceReused { seq: 3, next: 8 })
    );
    let mut buf = b"xyz".to_vec();
    assert_eq!(
        s.seal_in_place(0, b"", &mut buf),
        Err(HpkeError::SequenceReused { seq: 0, next: 8 })
    );
    assert_eq!(buf, b"xyz", "a refused seal leaves the buffer alone");
    let mut out = b"head".to_vec();
    assert!(s.seal_append(1, b"", b"p", &mut out).is_err());
    assert_eq!(out, b"head");
    assert_eq!(
        s.seal(u64::MAX, b"", b"c"),
        Err(HpkeError::SequenceExhausted)
    );
    assert_eq!(s.next_seq(), 8);
}

#[test]
fn small_order_public_keys_are_refused() {
    let sk = X25519SecretKey::generate().unwrap();
    for bad in [[0u8; 32], {
        let mut one = [0u8; 32];
        one[0] = 1;
        one
    }] {
        assert_eq!(
            setup_base_s(&bad, b"").err(),
            Some(HpkeError::InvalidPublicKey)
        );
        assert_eq!(
            setup_base_r(&bad, &sk, b"").err(),
            Some(HpkeError::InvalidPublicKey)
        );
    }
}

#[test]
fn in_place_and_append_agree_with_seal() {
    let sk_r = X25519SecretKey::from_bytes(&[7; 32]);
    let seal_with = |f: &dyn Fn(&mut SenderContext) -> Vec<u8>| {
        let (_, mut s) = setup_base_s_derand(sk_r.public_key(), b"i", &[9; 32]).unwrap();
        f(&mut s)
    };
    let whole = seal_with(&|s| s.seal(3, b"a", b"plaintext").unwrap());
    let in_place = seal_with(&|s| {
        let mut buf = b"plaintext".to_vec();
        let tag = s.seal_in_place(3, b"a", &mut buf).unwrap();
        buf.extend_from_slice(&tag);
        buf
    });
    let appended = seal_with(&|s| {
        let mut out = b"frame header".to_vec();
        s.seal_append(3, b"a", b"plaintext", &mut out).unwrap();
        out.split_off(b"frame header".len())
    });
    assert_eq!(whole, in_place);
    assert_eq!(whole, appended);
    let (enc, _) = setup_base_s_derand(sk_r.public_key(), b"i", &[9; 32]).unwrap();
    let mut r = setup_base_r(&enc, &sk_r, b"i").unwrap();
    let mut buf = whole.clone();
    assert_eq!(r.open_in_place(3, b"a", &mut buf).unwrap(), b"plaintext");
}

#[test]
fn contexts_export_and_import() {
    let (mut s, mut r, _) = pair(b"info");
    let c0 = s.seal(0, b"", b"zero").unwrap();
    let (secrets, next) = s.export();
    assert_eq!(next, 1);
    let bytes = secrets.to_bytes();
    assert_eq!(bytes.len(), CONTEXT_SECRETS_BYTES);
    let mut s2 = SenderContext::import(ContextSecrets::from_bytes(&bytes), next);
    assert!(
        s2.seal(0, b"", b"again").is_err(),
        "the floor survives the export"
    );
    let c1 = s2.seal(1, b"", b"one").unwrap();

    assert_eq!(r.open(0, b"", &c0).unwrap(), b"zero");
    let (rs, window) = r.export();
    let w = ReplayWindow::from_bytes(&window.to_bytes()).expect("window round-trips");
    assert_eq!(w, window);
    let mut r2 = RecipientContext::import(ContextSecrets::from_bytes(&rs.to_bytes()), w);
    assert!(matches!(
        r2.open(0, b"", &c0),
        Err(HpkeError::SequenceReused { .. })
    ));
    assert_eq!(r2.open(1, b"", &c1).unwrap(), b"one");
}

#[test]
fn malformed_replay_windows_are_refused() {
    let mut b = ReplayWindow::new().to_bytes();
    assert_eq!(ReplayWindow::from_bytes(&b), Some(ReplayWindow::new()));
    b[0] = 2;
    assert_eq!(ReplayWindow::from_bytes(&b), None);
    b[0] = 0;
    b[16] = 1;
    assert_eq!(ReplayWindow::from_bytes(&b), None, "bits without a newest");
    b[0] = 1;
    b[16] = 2;
    assert_eq!(
        ReplayWindow::from_bytes(&b),
        None,
        "newest not marked opened"
    );
}
