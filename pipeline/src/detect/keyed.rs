//! Keyed hashing of recipients and the checkpoint checksum.
//!
//! A recipient enters detector state only as `SipHash-1-3(secret, number)`: 64 bits keyed
//! with a 128-bit per-process secret the caller supplies, over the number zero-padded to
//! 16 bytes (`+` included; no number holds a zero byte, so the padding is unambiguous).
//! Without the secret the hashes cannot be inverted by enumerating phone numbers (the
//! number space is small, so an unkeyed hash would be no protection). SipHash-1-3 (the
//! variant Rust's `HashMap` keys itself with) is a keyed PRF like SipHash-2-4 with fewer
//! rounds: 5 SipRounds for the fixed 16 bytes instead of 8, and no variable-length tail,
//! a few ns per number. The checkpoint is framed with CRC-32C (software table).

use crate::wire::Recipient;

/// SipHash-1-3 keyed by a per-process secret. `Debug` never shows the key.
#[derive(Clone)]
pub struct RecipientHasher {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for RecipientHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecipientHasher(<key redacted>)")
    }
}

impl RecipientHasher {
    /// A hasher keyed with 16 secret random bytes from the caller.
    pub fn new(secret: [u8; 16]) -> RecipientHasher {
        let k0 = u64::from_le_bytes(secret[..8].try_into().expect("8 bytes"));
        let k1 = u64::from_le_bytes(secret[8..].try_into().expect("8 bytes"));
        RecipientHasher { k0, k1 }
    }

    /// The keyed hash of a recipient: SipHash-1-3 of its zero-padded 16 bytes.
    #[inline]
    pub fn hash(&self, r: &Recipient) -> u64 {
        let p = r.padded();
        let m0 = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
        let m1 = u64::from_le_bytes(p[8..].try_into().expect("8 bytes"));
        siphash13_16(self.k0, self.k1, m0, m1)
    }
}

#[inline(always)]
fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

#[inline(always)]
fn init(k0: u64, k1: u64) -> [u64; 4] {
    [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ]
}

#[inline(always)]
fn compress<const C: usize>(v: &mut [u64; 4], m: u64) {
    v[3] ^= m;
    for _ in 0..C {
        round(v);
    }
    v[0] ^= m;
}

#[inline(always)]
fn finish<const D: usize>(v: &mut [u64; 4]) -> u64 {
    v[2] ^= 0xff;
    for _ in 0..D {
        round(v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// SipHash-C-D of `msg` under key `(k0, k1)` (the general form; tests check the
/// recipient hash against it).
#[cfg(test)]
fn siphash<const C: usize, const D: usize>(k0: u64, k1: u64, msg: &[u8]) -> u64 {
    let mut v = init(k0, k1);
    let mut chunks = msg.chunks_exact(8);
    for c in &mut chunks {
        compress::<C>(&mut v, u64::from_le_bytes(c.try_into().expect("8 bytes")));
    }
    let mut last = [0u8; 8];
    let rest = chunks.remainder();
    last[..rest.len()].copy_from_slice(rest);
    compress::<C>(
        &mut v,
        u64::from_le_bytes(last) | ((msg.len() as u64) << 56),
    );
    finish::<D>(&mut v)
}

/// SipHash-2-4 of `msg` under key `(k0, k1)`.
#[cfg(test)]
pub(crate) fn siphash24(k0: u64, k1: u64, msg: &[u8]) -> u64 {
    siphash::<2, 4>(k0, k1, msg)
}

/// SipHash-1-3 of the 16 bytes `m0 || m1` (little endian) under key `(k0, k1)`: the
/// general function unrolled for that one length.
#[inline(always)]
fn siphash13_16(k0: u64, k1: u64, m0: u64, m1: u64) -> u64 {
    let mut v = init(k0, k1);
    compress::<1>(&mut v, m0);
    compress::<1>(&mut v, m1);
    compress::<1>(&mut v, 16 << 56);
    finish::<3>(&mut v)
}

const fn crc32c_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC32C: [u32; 256] = crc32c_table();

/// CRC-32C (Castagnoli) of `data`.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC32C[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siphash_matches_reference_vectors() {
        // Vectors from the SipHash paper's reference implementation: key 00..0f,
        // message 00..(n-1).
        let key: Vec<u8> = (0u8..16).collect();
        let k0 = u64::from_le_bytes(key[..8].try_into().unwrap());
        let k1 = u64::from_le_bytes(key[8..].try_into().unwrap());
        let msg: Vec<u8> = (0u8..64).collect();
        assert_eq!(siphash24(k0, k1, &msg[..0]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(k0, k1, &msg[..15]), 0xa129_ca61_49be_45e5);
        // And std's (deprecated) SipHasher, which is SipHash-2-4, on every length.
        #[allow(deprecated)]
        for n in 0..64 {
            use std::hash::Hasher;
            let mut s = std::hash::SipHasher::new_with_keys(k0, k1);
            s.write(&msg[..n]);
            assert_eq!(siphash24(k0, k1, &msg[..n]), s.finish(), "length {n}");
        }
    }

    #[test]
    fn recipient_hash_is_siphash13_of_the_padded_number() {
        // The 2-4 instance of the same code matches the reference above, so the rounds,
        // padding and length byte are right; the 16-byte path must equal the general one.
        let secret: [u8; 16] = *b"0123456789abcdef";
        let h = RecipientHasher::new(secret);
        for s in ["+12025550123", "+123456789012345", "+4420799460"] {
            let r = Recipient::parse(s.as_bytes()).unwrap();
            let mut padded = [0u8; 16];
            padded[..s.len()].copy_from_slice(s.as_bytes());
            assert_eq!(h.hash(&r), siphash::<1, 3>(h.k0, h.k1, &padded));
            assert_ne!(h.hash(&r), siphash::<2, 4>(h.k0, h.k1, &padded));
        }
        // Another key gives another hash.
        let r = Recipient::parse(b"+12025550123").unwrap();
        assert_ne!(h.hash(&r), RecipientHasher::new([7; 16]).hash(&r));
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn debug_hides_the_key() {
        let h = RecipientHasher::new([0xab; 16]);
        assert!(!format!("{h:?}").contains("171"));
    }
}
