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
    // A one-time prekey whose signature does not verify gets no session.
    let mut forged = phone.bundle();
    let forged_id = forged.one_time_prekeys[0].id;
    forged.one_time_prekeys[0].public[3] ^= 1;
    let forged = VerifiedBundle::new(forged).expect("the signed prekey is good");
    assert_eq!(
        DeviceSession::new(BUSINESS, &forged, Some(forged_id)).err(),
        Some(SessionError::BadOneTimeSignature {
            device_id: 1,
            prekey_id: forged_id
        })
    );
    assert!(DeviceSession::new(BUSINESS, &forged, None).is_ok());
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

fn seal_one(s: &mut DeviceSession, i: u64) -> Result<(u64, Vec<u8>), SessionError> {
    let mut out = Vec::new();
    let seq = s.seal_append(&aad(i, i), &i.to_be_bytes(), &mut out)?;
    Ok((seq, out))
}

#[test]
fn a_session_seals_only_below_its_durable_reservation() {
    let vb = VerifiedBundle::new(device(1, 0).bundle()).unwrap();
    let mut s = DeviceSession::new(BUSINESS, &vb, None).unwrap();
    // Never persisted: no copy could be restored, no limit.
    assert_eq!(s.seq_limit(), None);
    for i in 0..2 {
        assert_eq!(seal_one(&mut s, i).unwrap().0, i);
    }
    // The first state bounds sealing at once: it may be durable any moment.
    let first = s.reserve(4);
    assert_eq!(first.seq_limit(), 6);
    assert_eq!(s.seq_limit(), Some(6));
    for i in 2..6 {
        assert_eq!(seal_one(&mut s, i).unwrap().0, i);
    }
    let refused = SessionError::SeqNotReserved {
        next_seq: 6,
        seq_limit: 6,
    };
    assert_eq!(seal_one(&mut s, 6).err(), Some(refused));
    let mut buf = b"untouched".to_vec();
    assert_eq!(s.seal_in_place(&aad(6, 6), &mut buf).err(), Some(refused));
    assert_eq!(buf, b"untouched", "a refused seal leaves the buffer alone");
    // A second state is not a licence until it is durable.
    let second = s.reserve(4);
    assert_eq!(second.seq_limit(), 10);
    assert_eq!(seal_one(&mut s, 6).err(), Some(refused));
    s.reserved(second.seq_limit());
    s.reserved(first.seq_limit()); // a late, older confirmation changes nothing
    assert_eq!(s.seq_limit(), Some(10));
    for i in 6..10 {
        assert_eq!(seal_one(&mut s, i).unwrap().0, i);
    }
    assert!(seal_one(&mut s, 10).is_err());
    // Reservations are counted past what was reserved, not only what was sealed.
    let third = s.reserve(1);
    let fourth = s.reserve(1);
    assert_eq!((third.seq_limit(), fourth.seq_limit()), (11, 12));
}

#[test]
fn a_restored_session_never_reseals_a_seq() {
    let mut phone = device(1, 0);
    let vb = VerifiedBundle::new(phone.bundle()).unwrap();
    let mut s = DeviceSession::new(BUSINESS, &vb, None).unwrap();
    let first = s.reserve(3);
    s.reserved(first.seq_limit());
    let mut sealed: Vec<(u64, Vec<u8>)> = (0..3).map(|i| seal_one(&mut s, i).unwrap()).collect();
    // The process writes a second state but crashes before it is durable: the disk
    // holds `first`, and the lost process sealed only below its limit.
    let _lost = s.reserve(100);
    assert!(seal_one(&mut s, 3).is_err());
    drop(s);

    let mut resumed = DeviceSession::import(first.as_bytes()).unwrap();
    assert_eq!(resumed.next_seq(), 3);
    assert_eq!(resumed.seq_limit(), Some(3));
    assert!(
        matches!(
            seal_one(&mut resumed, 3),
            Err(SessionError::SeqNotReserved { .. })
        ),
        "nothing is sealed before a reservation is durable"
    );
    let state = resumed.reserve(5);
    resumed.reserved(state.seq_limit());
    sealed.push(seal_one(&mut resumed, 3).unwrap());
    // A crash after `state` is durable and a second restore: it resumes past it.
    let mut again = DeviceSession::import(state.as_bytes()).unwrap();
    assert_eq!(again.next_seq(), 8);
    let next = again.reserve(5);
    again.reserved(next.seq_limit());
    sealed.push(seal_one(&mut again, 4).unwrap());

    let seqs: Vec<u64> = sealed.iter().map(|(q, _)| *q).collect();
    assert_eq!(seqs, [0, 1, 2, 3, 8]);
    assert_eq!(again.header(), resumed.header());
    let mut r = phone.accept_session(BUSINESS, again.header()).unwrap();
    for (i, (seq, ct)) in sealed.iter().enumerate() {
        let i = [0u64, 1, 2, 3, 4][i];
        assert_eq!(r.open(*seq, &aad(i, i), ct).unwrap(), i.to_be_bytes());
    }
}

#[test]
fn malformed_session_states_are_refused() {
    let vb = VerifiedBundle::new(device(1, 0).bundle()).unwrap();
    let mut s = DeviceSession::new(BUSINESS, &vb, None).unwrap();
    let state = s.reserve(1);
    assert!(DeviceSession::import(state.as_bytes()).is_ok());
    let mut bad = *state.as_bytes();
    bad[4 + 8] = 2; // the one-time flag
    assert_eq!(
        DeviceSession::import(&bad).err(),
        Some(SessionError::BadState)
    );
    let mut bad = *state.as_bytes();
    bad[4 + 8] = 0;
    bad[4 + 12] = 1; // no one-time prekey, yet an id
    assert_eq!(
        DeviceSession::import(&bad).err(),
        Some(SessionError::BadState)
    );
    let mut bad = *state.as_bytes();
    let n = bad.len();
    bad[n - 8..].copy_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(
        DeviceSession::import(&bad).err(),
        Some(SessionError::BadState),
        "a limit with no sequence number left"
    );
}

#[test]
#[should_panic(expected = "was never reserved")]
fn confirming_a_limit_never_reserved_is_a_bug() {
    let vb = VerifiedBundle::new(device(1, 0).bundle()).unwrap();
    let mut s = DeviceSession::new(BUSINESS, &vb, None).unwrap();
    let state = s.reserve(4);
    s.reserved(state.seq_limit() + 1);
}

proptest::proptest! {
    /// Any interleaving of seals, reservations, writes that land (confirmed or not) and
    /// crashes: no sequence number is sealed twice under one session key.
    #[test]
    fn no_interleaving_with_crashes_reseals_a_seq(ops in proptest::collection::vec(0u8..6, 1..120)) {
        let vb = VerifiedBundle::new(device(1, 0).bundle()).unwrap();
        let mut s = DeviceSession::new(BUSINESS, &vb, None).unwrap();
        let mut in_flight: Vec<SessionState> = Vec::new();
        let mut durable: Option<SessionState> = None;
        // (enc, seq) of every message sealed, across all lives.
        let mut used = std::collections::HashSet::new();
        for op in ops {
            match op {
                0 | 1 => {
                    if let Ok((seq, _)) = seal_one(&mut s, 0) {
                        proptest::prop_assert!(used.insert((s.header().enc, seq)), "seq {} resealed", seq);
                    }
                }
                2 => in_flight.push(s.reserve(3)),
                // The oldest write lands and is confirmed.
                3 if !in_flight.is_empty() => {
                    let st = in_flight.remove(0);
                    s.reserved(st.seq_limit());
                    durable = Some(st);
                }
                // The oldest write lands; the process dies before confirming it.
                4 if !in_flight.is_empty() => durable = Some(in_flight.remove(0)),
                // Crash: restore the durable state, or start a new session.
                5 => {
                    in_flight.clear();
                    s = match &durable {
                        Some(st) => DeviceSession::import(st.as_bytes()).unwrap(),
                        None => DeviceSession::new(BUSINESS, &vb, None).unwrap(),
                    };
                }
                _ => {}
            }
        }
    }
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
    let mut session = DeviceSession::new(BUSINESS, &vb, Some(1)).unwrap();
    let state = session.reserve(16);
    let secrets = &state.as_bytes()[4 + 45..4 + 45 + CONTEXT_SECRETS_BYTES];
    let rs = phone.accept_session(BUSINESS, session.header()).unwrap();
    let (s, r, sk) = pair(b"info");
    let (s_secrets, _) = s.export();
    let (r_secrets, _) = r.export();
    let business = BusinessKey::from_bytes(3, &[0x5a; 32]);
    let reply = seal_reply(&business.public(), BUSINESS, 1, b"my secret plaintext").unwrap();

    let debug = [
        format!("{session:?}"),
        format!("{state:?}"),
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
    // Errors of failing operations on these very keys show none of them, in Display
    // or Debug (their variants hold ids and counts only).
    let mut rs = rs;
    let mut ct = Vec::new();
    session.reserved(state.seq_limit());
    session
        .seal_append(&aad(1, 1), b"my secret plaintext", &mut ct)
        .unwrap();
    ct[0] ^= 1;
    let hpke = rs.open(0, &aad(1, 1), &ct).unwrap_err();
    let mut exhausted = DeviceSession::import(state.as_bytes()).unwrap();
    let unreserved = exhausted.seal_append(&aad(2, 2), b"x", &mut Vec::new());
    let wrong_key = BusinessKey::from_bytes(4, &[0x5a; 32]).open_reply(BUSINESS, 1, &reply);
    let mut forged = reply.clone();
    forged.ciphertext[0] ^= 1;
    let forged = business.open_reply(BUSINESS, 1, &forged);
    let mut bad_bundle = phone.bundle();
    bad_bundle.one_time_prekeys.clear();
    bad_bundle.signed_prekey.signature[0] ^= 1;
    let mut unsigned = device(2, 1).bundle();
    unsigned.one_time_prekeys[0].signature[0] ^= 1;
    let unsigned_id = unsigned.one_time_prekeys[0].id;
    let unsigned = VerifiedBundle::new(unsigned).unwrap();
    let errors: Vec<Box<dyn std::error::Error>> = vec![
        Box::new(hpke),
        Box::new(unreserved.unwrap_err()),
        Box::new(wrong_key.unwrap_err()),
        Box::new(forged.unwrap_err()),
        Box::new(bad_bundle.verify().unwrap_err()),
        Box::new(unsigned.one_time_prekey(unsigned_id).unwrap_err()),
        Box::new(DeviceSession::new(BUSINESS, &unsigned, Some(unsigned_id)).unwrap_err()),
        Box::new(
            phone
                .accept_session(BUSINESS, session.header())
                .unwrap_err(),
        ),
    ];
    for e in &errors {
        for shown in [e.to_string(), format!("{e:?}")] {
            assert!(!shown.is_empty());
            for k in &keys {
                assert!(!leaks(&shown, k), "error {shown} shows secret bytes");
            }
        }
    }
}
