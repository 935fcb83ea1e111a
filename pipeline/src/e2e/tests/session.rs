//! Delivery sessions and replies end to end, and the privacy of `Debug`.

use super::{device, pair};
use crate::e2e::hpke::CONTEXT_SECRETS_BYTES;
use crate::e2e::session::{deliver_info, reply_aad, reply_info};
use crate::e2e::*;

// ---- Sessions ----

const BUSINESS: u32 = 42;

fn aad(client_id: u64, position: u64) -> MessageAad {
    MessageAad {
        business_id: BUSINESS,
        client_id,
        log_position: position,
    }
}

#[test]
fn delivered_messages_open_on_their_device_and_no_other() {
    let mut phone = device(1, 0);
    let mut laptop = device(2, 0);
    let vb = VerifiedBundle::new(phone.bundle()).unwrap();
    let mut session = DeviceSession::new(BUSINESS, &vb, None).unwrap();
    assert_eq!(session.header().device_id, 1);

    let mut sealed = Vec::new();
    for i in 0..5u64 {
        let msg = format!("message {i}").into_bytes();
        let mut buf = Vec::new();
        let seq = if i % 2 == 0 {
            session
                .seal_append(&aad(i, 1000 + i), &msg, &mut buf)
                .unwrap()
        } else {
            let mut b = msg.clone();
            let (seq, tag) = session.seal_in_place(&aad(i, 1000 + i), &mut b).unwrap();
            b.extend_from_slice(&tag);
            buf = b;
            seq
        };
        assert_eq!(seq, i);
        sealed.push((seq, buf, msg));
    }

    let mut rs = phone.accept_session(BUSINESS, session.header()).unwrap();
    for (seq, ct, msg) in &sealed {
        assert_eq!(&rs.open(*seq, &aad(*seq, 1000 + seq), ct).unwrap(), msg);
    }
    // Not on another device, even one told it is the addressee.
    assert_eq!(
        laptop.accept_session(BUSINESS, session.header()).err(),
        Some(SessionError::WrongDevice {
            expected: 2,
            got: 1
        })
    );
    let mut forged = *session.header();
    forged.device_id = 2;
    let mut on_laptop = laptop.accept_session(BUSINESS, &forged).unwrap();
    let (seq, ct, _) = &sealed[0];
    assert_eq!(
        on_laptop.open(*seq, &aad(0, 1000), ct),
        Err(HpkeError::Open)
    );
    // Nor for another business, nor under another client id or log position.
    let mut other = phone
        .accept_session(BUSINESS + 1, session.header())
        .unwrap();
    assert_eq!(other.open(0, &aad(0, 1000), ct), Err(HpkeError::Open));
    let mut rs2 = phone.accept_session(BUSINESS, session.header()).unwrap();
    assert_eq!(rs2.open(0, &aad(1, 1000), ct), Err(HpkeError::Open));
    assert_eq!(rs2.open(0, &aad(0, 1001), ct), Err(HpkeError::Open));
    assert_eq!(rs2.open(0, &aad(0, 1000), ct).unwrap(), b"message 0");
    assert!(matches!(
        rs2.open(0, &aad(0, 1000), ct),
        Err(HpkeError::SequenceReused { .. })
    ));
}

#[test]
fn one_time_prekeys_are_used_once() {
    let mut phone = device(1, 3);
    let vb = VerifiedBundle::new(phone.bundle()).unwrap();
    let mut s = DeviceSession::new(BUSINESS, &vb, Some(2)).unwrap();
    let mut out = Vec::new();
    let seq = s.seal_append(&aad(1, 1), b"hi", &mut out).unwrap();
    let mut r = phone.accept_session(BUSINESS, s.header()).unwrap();
    assert_eq!(r.open(seq, &aad(1, 1), &out).unwrap(), b"hi");
    assert_eq!(
        phone.accept_session(BUSINESS, s.header()).err(),
        Some(SessionError::UnknownOneTimePrekey {
            device_id: 1,
            prekey_id: 2
        })
    );
    assert_eq!(phone.bundle().one_time_prekeys.len(), 2);
    assert_eq!(
        DeviceSession::new(BUSINESS, &vb, Some(9)).err(),
        Some(SessionError::UnknownOneTimePrekey {
            device_id: 1,
            prekey_id: 9
        })
    );
    // Sealed to the signed prekey, it does not open with the one-time prekey (or back).
    let s_signed = DeviceSession::new(BUSINESS, &vb, None).unwrap();
    let mut wrong = *s_signed.header();
    wrong.one_time_prekey_id = Some(1);
    let mut signed = s_signed;
    let mut out = Vec::new();
    signed.seal_append(&aad(1, 1), b"x", &mut out).unwrap();
    let mut r = phone.accept_session(BUSINESS, &wrong).unwrap();
    assert_eq!(r.open(0, &aad(1, 1), &out), Err(HpkeError::Open));
}

#[test]
fn a_rotated_prekey_opens_until_the_next_rotation() {
    let mut phone = device(1, 0);
    let old = VerifiedBundle::new(phone.bundle()).unwrap();
    let mut s = DeviceSession::new(BUSINESS, &old, None).unwrap();
    let mut out = Vec::new();
    s.seal_append(&aad(1, 1), b"before rotation", &mut out)
        .unwrap();
    assert_eq!(phone.rotate_prekey(), 2);
    let new = VerifiedBundle::new(phone.bundle()).unwrap();
    assert_eq!(new.bundle().signed_prekey.id, 2);
    let mut r = phone.accept_session(BUSINESS, s.header()).unwrap();
    assert_eq!(r.open(0, &aad(1, 1), &out).unwrap(), b"before rotation");
    phone.rotate_prekey();
    assert_eq!(
        phone.accept_session(BUSINESS, s.header()).err(),
        Some(SessionError::UnknownPrekey {
            device_id: 1,
            prekey_id: 1
        })
    );
}

#[test]
fn a_persisted_session_resumes_without_reusing_a_seq() {
    let mut phone = device(1, 0);
    let vb = VerifiedBundle::new(phone.bundle()).unwrap();
    let mut s = DeviceSession::new(BUSINESS, &vb, None).unwrap();
    let mut c0 = Vec::new();
    s.seal_append(&aad(1, 1), b"first", &mut c0).unwrap();
    let state = s.export();
    // Crash: the persisted floor was 100, the export says 1: resume at 100.
    let mut resumed = DeviceSession::import(&state, 100).unwrap();
    assert_eq!(resumed.next_seq(), 100);
    assert_eq!(resumed.header(), s.header());
    let mut c1 = Vec::new();
    assert_eq!(
        resumed.seal_append(&aad(2, 2), b"second", &mut c1).unwrap(),
        100
    );
    let mut r = phone.accept_session(BUSINESS, resumed.header()).unwrap();
    assert_eq!(r.open(0, &aad(1, 1), &c0).unwrap(), b"first");
    assert_eq!(r.open(100, &aad(2, 2), &c1).unwrap(), b"second");
    assert_eq!(DeviceSession::import(&state, 0).unwrap().next_seq(), 1);

    let mut bad = *state;
    bad[4 + 8] = 2; // the one-time flag
    assert_eq!(
        DeviceSession::import(&bad, 0).err(),
        Some(SessionError::BadState)
    );
}

#[test]
#[should_panic(expected = "a session seals only its business's messages")]
fn sealing_another_business_message_is_a_bug() {
    let vb = VerifiedBundle::new(device(1, 0).bundle()).unwrap();
    let mut s = DeviceSession::new(BUSINESS, &vb, None).unwrap();
    let mut other = aad(1, 1);
    other.business_id = BUSINESS + 1;
    let _ = s.seal_append(&other, b"x", &mut Vec::new());
}

#[test]
fn info_and_aad_layouts() {
    let h = SessionHeader {
        device_id: 0x0102_0304,
        prekey_id: 5,
        one_time_prekey_id: Some(6),
        enc: [0; 32],
    };
    let info = deliver_info(7, &h);
    assert_eq!(&info[..22], b"courier/e2e/v1 deliver");
    assert_eq!(
        &info[22..],
        &[0, 0, 0, 7, 1, 2, 3, 4, 0, 0, 0, 5, 1, 0, 0, 0, 6]
    );
    let none = SessionHeader {
        one_time_prekey_id: None,
        ..h
    };
    assert_eq!(&deliver_info(7, &none)[34..], &[0, 0, 0, 0, 0]);
    let a = MessageAad {
        business_id: 7,
        client_id: 8,
        log_position: 9,
    }
    .encode();
    assert_eq!(&a[..22], b"courier/e2e/v1 message");
    assert_eq!(
        &a[22..],
        &[0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 9]
    );
    let ri = reply_info(7, 3);
    assert_eq!(
        (&ri[..20], &ri[20..]),
        (&b"courier/e2e/v1 reply"[..], &[0, 0, 0, 7, 0, 0, 0, 3][..])
    );
    let ra = reply_aad(7, 0x0a);
    assert_eq!(&ra[20..], &[0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0x0a]);
}

// ---- Replies ----

#[test]
fn replies_open_at_courier_with_their_business_and_edge_id_only() {
    let key = BusinessKey::generate(3).unwrap();
    let reply = seal_reply(&key.public(), BUSINESS, 77, b"yes please").unwrap();
    let mut wire = Vec::new();
    reply.encode(&mut wire);
    let decoded = SealedReply::decode(&wire).unwrap();
    assert_eq!(decoded, reply);
    assert_eq!(
        key.open_reply(BUSINESS, 77, &decoded).unwrap(),
        b"yes please"
    );

    let open = ReplyError::Hpke(HpkeError::Open);
    assert_eq!(key.open_reply(BUSINESS, 78, &decoded).err(), Some(open));
    assert_eq!(key.open_reply(BUSINESS + 1, 77, &decoded).err(), Some(open));
    let mut t = decoded.clone();
    t.ciphertext[0] ^= 1;
    assert_eq!(key.open_reply(BUSINESS, 77, &t).err(), Some(open));
    let mut t = decoded.clone();
    t.enc[0] ^= 1;
    assert!(key.open_reply(BUSINESS, 77, &t).is_err());
    let rotated = BusinessKey::generate(4).unwrap();
    assert_eq!(
        rotated.open_reply(BUSINESS, 77, &decoded).err(),
        Some(ReplyError::WrongKey {
            expected: 4,
            got: 3
        })
    );
    let impostor = BusinessKey::generate(3).unwrap();
    assert_eq!(
        impostor.open_reply(BUSINESS, 77, &decoded).err(),
        Some(open)
    );
    // The key survives storage.
    let restored = BusinessKey::from_bytes(3, &key.to_bytes());
    assert_eq!(restored.public(), key.public());
    assert_eq!(
        restored.open_reply(BUSINESS, 77, &decoded).unwrap(),
        b"yes please"
    );
    // Too short to hold key id, enc and tag.
    assert_eq!(
        SealedReply::decode(&wire[..4 + 32 + 15]).err(),
        Some(ReplyError::Truncated { len: 51 })
    );
}

// ---- Privacy ----

/// The ways a byte string could show up in a `Debug` string.
fn leaks(debug: &str, secret: &[u8]) -> bool {
    let list = format!("{:?}", &secret[..8]);
    debug.contains(&hex::encode(secret))
        || debug.contains(&hex::encode(&secret[..8]))
        || debug.contains(list.trim_start_matches('[').trim_end_matches(']'))
}

#[test]
fn debug_shows_no_secret() {
    let mut phone = device(1, 1);
    let vb = VerifiedBundle::new(phone.bundle()).unwrap();
    let session = DeviceSession::new(BUSINESS, &vb, Some(1)).unwrap();
    let state = session.export();
    let secrets = &state[4 + 45..4 + 45 + CONTEXT_SECRETS_BYTES];
    let rs = phone.accept_session(BUSINESS, session.header()).unwrap();
    let (s, r, sk) = pair(b"info");
    let (s_secrets, _) = s.export();
    let (r_secrets, _) = r.export();
    let business = BusinessKey::from_bytes(3, &[0x5a; 32]);
    let reply = seal_reply(&business.public(), BUSINESS, 1, b"my secret plaintext").unwrap();

    let debug = [
        format!("{session:?}"),
        format!("{rs:?}"),
        format!("{s:?}"),
        format!("{r:?}"),
        format!("{s_secrets:?}"),
        format!("{r_secrets:?}"),
        format!("{sk:?}"),
        format!("{phone:?}"),
        format!("{business:?}"),
        format!("{reply:?}"),
    ];
    let keys: Vec<Vec<u8>> = vec![
        secrets[..32].to_vec(),
        secrets[32..].to_vec(),
        s_secrets.to_bytes()[..32].to_vec(),
        s_secrets.to_bytes()[32..].to_vec(),
        sk.to_bytes().to_vec(),
        vec![0x5a; 32],
        b"my secret plaintext".to_vec(),
    ];
    for d in &debug {
        assert!(!d.is_empty());
        for k in &keys {
            assert!(!leaks(d, k), "{d} shows secret bytes");
        }
    }
    // The check would catch a derived Debug of the bytes.
    assert!(leaks(&format!("{:?}", &keys[0][..]), &keys[0]));
    assert!(leaks(&hex::encode(&keys[1]), &keys[1]));
    // Errors carry numbers only.
    let errors = [
        format!("{}", HpkeError::Open),
        format!("{:?}", SessionError::BadState),
        format!(
            "{}",
            ReplyError::WrongKey {
                expected: 1,
                got: 2
            }
        ),
    ];
    assert!(errors.iter().all(|e| keys.iter().all(|k| !leaks(e, k))));
}
