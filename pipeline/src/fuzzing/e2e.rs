//! Target `e2e`: the decoders of end-to-end sealing's bytes that come from the network: a
//! recipient's bundle list (DEVICE_KEYS), a DELIVER_E2E payload's device copies, a sealed
//! reply (INBOUND with E2E) and a session header. `data[0] % 4` picks the decoder, the
//! rest is its input; whatever decodes must encode back to exactly its bytes.

use bytes::Bytes;

use crate::e2e::{decode_bundles, encode_bundles, SealedReply, SessionHeader, VerifiedBundle};
use crate::wire::delivery::{decode_device_copies, put_device_copy};

/// See the module docs.
pub fn e2e(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    match ctl % 4 {
        0 => {
            if let Ok(list) = decode_bundles(rest) {
                let mut out = Vec::new();
                encode_bundles(&list, &mut out);
                assert_eq!(out, rest, "a bundle list re-encodes to its bytes");
                // Signatures: checked, never a panic (the first bundle only: each check
                // costs a signature verification per key).
                if let Some(b) = list.into_iter().next() {
                    let _ = VerifiedBundle::new(b);
                }
            }
        }
        1 => {
            if let Ok(copies) = decode_device_copies(&Bytes::copy_from_slice(rest)) {
                let mut out = vec![copies.len() as u8];
                for c in &copies {
                    put_device_copy(&mut out, c.device_id, c.seq, &c.header, &c.ciphertext);
                }
                assert_eq!(out, rest, "device copies re-encode to their bytes");
            }
        }
        2 => {
            if let Ok(reply) = SealedReply::decode(rest) {
                let mut out = Vec::new();
                reply.encode(&mut out);
                assert_eq!(out, rest, "a sealed reply re-encodes to its bytes");
            }
        }
        _ => {
            if let Ok(b) = <&[u8; crate::e2e::session::SESSION_HEADER_BYTES]>::try_from(rest) {
                if let Ok(h) = SessionHeader::from_bytes(b) {
                    assert_eq!(&h.to_bytes(), b, "a session header re-encodes to its bytes");
                }
            }
        }
    }
}

/// Seeds made by the real encoders.
pub(super) fn seeds() -> Vec<(String, Vec<u8>)> {
    use crate::e2e::{seal_reply, BusinessKey, Device, DeviceSession};
    let phone = Device::from_seed(1, &[1; 32], 2);
    let laptop = Device::from_seed(2, &[2; 32], 0);
    let mut list = Vec::new();
    encode_bundles(&[phone.bundle(), laptop.bundle()], &mut list);
    let mut empty = Vec::new();
    encode_bundles(&[], &mut empty);
    let verified = VerifiedBundle::new(phone.bundle()).expect("a device's own bundle verifies");
    let session = DeviceSession::new(7, &verified, Some(1)).expect("a session");
    let header = session.header().to_bytes();
    let mut copies = vec![2u8];
    put_device_copy(&mut copies, 1, 0, &header, &[9; 40]);
    put_device_copy(&mut copies, 2, 5, &header, &[8; 16]);
    let key = BusinessKey::from_bytes(3, &[4; 32]);
    let mut reply = Vec::new();
    seal_reply(&key.public(), 7, 11, b"yes")
        .expect("a reply")
        .encode(&mut reply);
    let with = |ctl: u8, bytes: &[u8]| [&[ctl][..], bytes].concat();
    vec![
        ("bundles-two-devices".into(), with(0, &list)),
        ("bundles-none".into(), with(0, &empty)),
        ("copies-two".into(), with(1, &copies)),
        ("reply".into(), with(2, &reply)),
        ("session-header".into(), with(3, &header)),
    ]
}
