//! Bundle signatures and the bundle list's encoding against hostile input.

use proptest::prelude::*;

use super::device;
use crate::e2e::bundle::{
    BUNDLE_FIXED_BYTES, BUNDLE_LIST_BYTES_MAX, DEVICES_PER_RECIPIENT_MAX, ONE_TIME_PREKEYS_MAX,
};
use crate::e2e::*;

// ---- Bundles ----

#[test]
fn a_generated_device_bundle_verifies_and_any_change_breaks_it() {
    let b = device(1, 2).bundle();
    b.verify().expect("a device signs its own prekey");
    let bad = BundleError::BadSignature {
        device_id: b.device_id,
        prekey_id: b.signed_prekey.id,
    };
    let mut t = b.clone();
    t.signed_prekey.signature[10] ^= 1;
    assert_eq!(t.verify(), Err(bad));
    let mut t = b.clone();
    t.signed_prekey.public[0] ^= 1;
    assert_eq!(t.verify(), Err(bad));
    let mut t = b.clone();
    t.signed_prekey.id += 1;
    assert!(t.verify().is_err(), "the prekey id is signed");
    let mut t = b.clone();
    t.device_id += 1;
    assert!(t.verify().is_err(), "the device id is signed");
    let mut t = b.clone();
    t.identity_key = device(2, 0).identity_key();
    assert_eq!(t.verify(), Err(bad));
    assert!(VerifiedBundle::new(t).is_err());
    assert!(VerifiedBundle::new(b).is_ok());
}

#[test]
fn a_substituted_or_tampered_one_time_prekey_is_refused() {
    let b = device(1, 3).bundle();
    let bad = |prekey_id| {
        Err(BundleError::BadOneTimeSignature {
            device_id: 1,
            prekey_id,
        })
    };
    // The edge swaps in a key of its own: it cannot sign it.
    let mut t = b.clone();
    t.one_time_prekeys[1].public = *X25519SecretKey::from_bytes(&[9; 32]).public_key();
    assert_eq!(t.verify(), bad(2));
    // Another device's one-time prekey with its valid signature: the device id is signed.
    let mut t = b.clone();
    t.one_time_prekeys[0] = device(2, 1).bundle().one_time_prekeys[0];
    assert_eq!(t.verify(), bad(1));
    // Renumbered: the id is signed.
    let mut t = b.clone();
    t.one_time_prekeys[2].id = 7;
    assert_eq!(t.verify(), bad(7));
    // The signed prekey's signature is not a one-time prekey's (domain separation).
    let mut t = b.clone();
    t.one_time_prekeys[0] = OneTimePrekey {
        id: b.signed_prekey.id,
        public: b.signed_prekey.public,
        signature: b.signed_prekey.signature,
    };
    assert_eq!(t.verify(), bad(b.signed_prekey.id));
    // Learned with its signed prekey checked; the bad one-time prekey is refused when a
    // session would use it, the good ones are handed out.
    let vt = VerifiedBundle::new(t).expect("the signed prekey is good");
    assert_eq!(
        vt.one_time_prekey(b.signed_prekey.id).unwrap_err(),
        bad(b.signed_prekey.id).unwrap_err()
    );
    let vb = VerifiedBundle::new(b.clone()).unwrap();
    for k in &b.one_time_prekeys {
        assert_eq!(vb.one_time_prekey(k.id), Ok(Some(k)));
    }
    assert_eq!(vb.one_time_prekey(99), Ok(None));
}

#[test]
fn signed_prekey_message_layout() {
    let m = signed_prekey_message(0x01020304, 0x0a0b0c0d, &[0xee; 32]);
    assert_eq!(&m[..28], b"courier/e2e/v1 signed prekey");
    assert_eq!(&m[28..36], &[1, 2, 3, 4, 0x0a, 0x0b, 0x0c, 0x0d]);
    assert_eq!(&m[36..], &[0xee; 32]);
    let m = one_time_prekey_message(0x01020304, 0x0a0b0c0d, &[0xee; 32]);
    assert_eq!(&m[..30], b"courier/e2e/v1 one-time prekey");
    assert_eq!(&m[30..38], &[1, 2, 3, 4, 0x0a, 0x0b, 0x0c, 0x0d]);
    assert_eq!(&m[38..], &[0xee; 32]);
}

fn full_list() -> Vec<DeviceBundle> {
    (0..DEVICES_PER_RECIPIENT_MAX as u32)
        .map(|i| device(i, ONE_TIME_PREKEYS_MAX as u32).bundle())
        .collect()
}

#[test]
fn bundle_lists_round_trip_up_to_their_bounds() {
    for list in [vec![], vec![device(9, 0).bundle()], full_list()] {
        let mut out = Vec::new();
        encode_bundles(&list, &mut out);
        assert_eq!(
            out.len(),
            2 + list.iter().map(DeviceBundle::encoded_len).sum::<usize>()
        );
        assert_eq!(decode_bundles(&out).expect("decodes"), list);
    }
    let mut out = Vec::new();
    encode_bundles(&full_list(), &mut out);
    assert_eq!(out.len(), BUNDLE_LIST_BYTES_MAX);
}

#[test]
fn every_truncation_of_a_bundle_list_is_refused() {
    let mut out = Vec::new();
    encode_bundles(&[device(1, 3).bundle(), device(2, 0).bundle()], &mut out);
    for len in 0..out.len() {
        assert!(
            matches!(
                decode_bundles(&out[..len]),
                Err(BundleError::Truncated { .. })
            ),
            "prefix of {len} bytes"
        );
    }
}

#[test]
fn hostile_bundle_lists_are_refused() {
    let one = device(1, 1).bundle();
    let mut good = Vec::new();
    encode_bundles(std::slice::from_ref(&one), &mut good);

    let mut t = good.clone();
    t.push(0);
    assert_eq!(
        decode_bundles(&t),
        Err(BundleError::TrailingBytes { count: 1 })
    );
    let mut t = good.clone();
    t[0] = 2;
    assert_eq!(decode_bundles(&t), Err(BundleError::Version(2)));
    let mut t = good.clone();
    t[1] = DEVICES_PER_RECIPIENT_MAX as u8 + 1;
    assert_eq!(
        decode_bundles(&t),
        Err(BundleError::TooManyDevices { count: 17 })
    );
    let mut t = good.clone();
    t[1] = 255;
    assert_eq!(
        decode_bundles(&t),
        Err(BundleError::TooManyDevices { count: 255 })
    );
    // The one-time count sits right after the signature.
    let at = 2 + BUNDLE_FIXED_BYTES - 1;
    let mut t = good.clone();
    t[at] = ONE_TIME_PREKEYS_MAX as u8 + 1;
    assert_eq!(
        decode_bundles(&t),
        Err(BundleError::TooManyOneTimePrekeys {
            device_id: 1,
            count: 33
        })
    );
    let mut t = good.clone();
    t[at] = 2; // claims two, holds one: truncated
    assert!(matches!(
        decode_bundles(&t),
        Err(BundleError::Truncated { .. })
    ));

    let mut twice = Vec::new();
    encode_bundles(&[one.clone(), one.clone()], &mut twice);
    assert_eq!(
        decode_bundles(&twice),
        Err(BundleError::DuplicateDevice { device_id: 1 })
    );
    let mut dup = one.clone();
    dup.one_time_prekeys.push(dup.one_time_prekeys[0]);
    let mut t = Vec::new();
    encode_bundles(&[dup], &mut t);
    assert_eq!(
        decode_bundles(&t),
        Err(BundleError::DuplicateOneTimePrekey {
            device_id: 1,
            prekey_id: 1
        })
    );
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(list) = decode_bundles(&bytes) {
            let mut out = Vec::new();
            encode_bundles(&list, &mut out);
            prop_assert_eq!(out, bytes);
        }
    }

    #[test]
    fn mutated_lists_never_panic(at in 0usize..400, byte in any::<u8>()) {
        let mut out = Vec::new();
        encode_bundles(&[device(1, 2).bundle(), device(2, 0).bundle()], &mut out);
        let at = at % out.len();
        out[at] = byte;
        if let Ok(list) = decode_bundles(&out) {
            prop_assert_eq!(list.len(), 2);
        }
    }
}
