//! Two SHA-256 compressions at once.
//!
//! A SHA-256 compression is one chain of 64 dependent rounds: with SHA-NI a single
//! chain waits on `sha256rnds2`'s latency and leaves the unit idle between rounds. Two
//! independent chains, interleaved round by round, fill those gaps: on the machine of
//! BENCHMARKS.md ("Sealing (issue 4)") two compressions this way take about 50 ns
//! against about 80 ns one after the other, and a derived key costs 70–74 ns instead of
//! 124 ns (`parts/hkdf_batch16`, `parts/hkdf`).
//! The sealer derives the keys of a batch's new recipients two at a time with it (each
//! key is an HKDF-Expand block: two compressions).
//!
//! [`compress2`] is exactly `sha2::compress256` applied to each (state, block) pair;
//! without SHA-NI (or off x86-64) it is literally that. The tests compare the two over
//! random states and blocks and check the FIPS 180-4 example digest.
//!
//! **Why `unsafe` lives here.** courier keeps `unsafe` in as few rooms as possible
//! (STYLE.md). The interleaving needs the SHA-NI intrinsics inside a
//! `#[target_feature]` function, and calling that after the run-time CPU check is the
//! one `unsafe` operation; the 16-byte loads of the block are the others. They are kept
//! in this crate, apart from the sans-IO pipeline (which forbids `unsafe`), behind a
//! safe function whose result is checked against the `sha2` crate.
#![deny(unsafe_code)]
#![warn(missing_docs)]

/// Bytes of a SHA-256 block.
pub const BLOCK_BYTES: usize = 64;

/// SHA-256's initial state (FIPS 180-4, 5.3.3), where every hash's first compression
/// starts.
pub const IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// Compresses `blocks[i]` into `states[i]`, for `i` in 0 and 1: the same result as
/// `sha2::compress256(states[i], &[blocks[i]])`, the two computed together.
#[inline]
pub fn compress2(states: [&mut [u32; 8]; 2], blocks: [&[u8; BLOCK_BYTES]; 2]) {
    #[cfg(target_arch = "x86_64")]
    if shani::available() {
        shani::compress2(states, blocks);
        return;
    }
    compress2_portable(states, blocks);
}

/// [`compress2`] one after the other through `sha2`: the fallback.
fn compress2_portable(states: [&mut [u32; 8]; 2], blocks: [&[u8; BLOCK_BYTES]; 2]) {
    for (state, block) in states.into_iter().zip(blocks) {
        sha2::compress256(state, std::slice::from_ref(block.into()));
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod shani {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi32, _mm_alignr_epi8, _mm_extract_epi32, _mm_loadu_si128, _mm_set_epi32,
        _mm_set_epi64x, _mm_sha256msg1_epu32, _mm_sha256msg2_epu32, _mm_sha256rnds2_epu32,
        _mm_shuffle_epi32, _mm_shuffle_epi8,
    };

    /// FIPS 180-4, 4.2.2.
    const K: [u32; 64] = [
        0x428a_2f98,
        0x7137_4491,
        0xb5c0_fbcf,
        0xe9b5_dba5,
        0x3956_c25b,
        0x59f1_11f1,
        0x923f_82a4,
        0xab1c_5ed5,
        0xd807_aa98,
        0x1283_5b01,
        0x2431_85be,
        0x550c_7dc3,
        0x72be_5d74,
        0x80de_b1fe,
        0x9bdc_06a7,
        0xc19b_f174,
        0xe49b_69c1,
        0xefbe_4786,
        0x0fc1_9dc6,
        0x240c_a1cc,
        0x2de9_2c6f,
        0x4a74_84aa,
        0x5cb0_a9dc,
        0x76f9_88da,
        0x983e_5152,
        0xa831_c66d,
        0xb003_27c8,
        0xbf59_7fc7,
        0xc6e0_0bf3,
        0xd5a7_9147,
        0x06ca_6351,
        0x1429_2967,
        0x27b7_0a85,
        0x2e1b_2138,
        0x4d2c_6dfc,
        0x5338_0d13,
        0x650a_7354,
        0x766a_0abb,
        0x81c2_c92e,
        0x9272_2c85,
        0xa2bf_e8a1,
        0xa81a_664b,
        0xc24b_8b70,
        0xc76c_51a3,
        0xd192_e819,
        0xd699_0624,
        0xf40e_3585,
        0x106a_a070,
        0x19a4_c116,
        0x1e37_6c08,
        0x2748_774c,
        0x34b0_bcb5,
        0x391c_0cb3,
        0x4ed8_aa4a,
        0x5b9c_ca4f,
        0x682e_6ff3,
        0x748f_82ee,
        0x78a5_636f,
        0x84c8_7814,
        0x8cc7_0208,
        0x90be_fffa,
        0xa450_6ceb,
        0xbef9_a3f7,
        0xc671_78f2,
    ];

    #[inline]
    pub(super) fn available() -> bool {
        // std caches the CPUID answer: each call is a load and a test.
        std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("sse4.1")
            && std::arch::is_x86_feature_detected!("ssse3")
    }

    #[inline]
    pub(super) fn compress2(states: [&mut [u32; 8]; 2], blocks: [&[u8; 64]; 2]) {
        debug_assert!(available());
        // SAFETY: `available()` checked that this CPU has every feature the function
        // is compiled for (sha, sse2, ssse3, sse4.1).
        unsafe { compress2_shani(states, blocks) }
    }

    /// Lanes: the two independent compressions.
    type Pair = [__m128i; 2];

    /// Four rounds of both lanes, with message words `w` (plus the round constants
    /// of group `group`): `sha256rnds2` does two rounds on the state kept as
    /// (ABEF, CDGH), taking its two words from the low half of its third operand.
    ///
    /// Only called from `compress2_shani` (SHA-NI checked), into which it is inlined.
    #[inline(always)]
    fn rounds(abef: &mut Pair, cdgh: &mut Pair, w: &Pair, group: usize) {
        let k = &K[4 * group..4 * group + 4];
        // SAFETY: inlined into `compress2_shani`, which runs only where SHA-NI and SSE4.1
        // were detected.
        unsafe {
            let k = _mm_set_epi32(k[3] as i32, k[2] as i32, k[1] as i32, k[0] as i32);
            for l in 0..2 {
                let wk = _mm_add_epi32(w[l], k);
                cdgh[l] = _mm_sha256rnds2_epu32(cdgh[l], abef[l], wk);
                abef[l] = _mm_sha256rnds2_epu32(abef[l], cdgh[l], _mm_shuffle_epi32(wk, 0x0e));
            }
        }
    }

    /// The next four schedule words W[t..t+4] from W[t-16..t-12] (`a`), W[t-12..t-8]
    /// (`b`), W[t-8..t-4] (`c`) and W[t-4..t] (`d`):
    /// σ0 terms and W[t-16] by `sha256msg1`, W[t-7] by the byte shift, σ1 terms by
    /// `sha256msg2`. Only called from `compress2_shani`, like [`rounds`].
    #[inline(always)]
    fn schedule(a: &Pair, b: &Pair, c: &Pair, d: &Pair) -> Pair {
        let mut next = *a;
        for l in 0..2 {
            // SAFETY: as in `rounds`.
            next[l] = unsafe {
                let t = _mm_add_epi32(
                    _mm_sha256msg1_epu32(a[l], b[l]),
                    _mm_alignr_epi8(d[l], c[l], 4),
                );
                _mm_sha256msg2_epu32(t, d[l])
            };
        }
        next
    }

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn compress2_shani(states: [&mut [u32; 8]; 2], blocks: [&[u8; 64]; 2]) {
        // Big-endian words: reverse the bytes of each 32-bit lane.
        let bswap = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
        let load = |block: &[u8; 64], i: usize| {
            let bytes: &[u8; 16] = block[16 * i..16 * i + 16].try_into().expect("16 bytes");
            // SAFETY: `bytes` is 16 readable bytes; the load is unaligned.
            _mm_shuffle_epi8(unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }, bswap)
        };
        let words = |i: usize| [load(blocks[0], i), load(blocks[1], i)];
        let (mut w0, mut w1, mut w2, mut w3) = (words(0), words(1), words(2), words(3));
        // The state as sha256rnds2 keeps it: (A, B, E, F) and (C, D, G, H), the first
        // letter in the highest lane.
        let abef0 =
            |s: &[u32; 8]| _mm_set_epi32(s[0] as i32, s[1] as i32, s[4] as i32, s[5] as i32);
        let cdgh0 =
            |s: &[u32; 8]| _mm_set_epi32(s[2] as i32, s[3] as i32, s[6] as i32, s[7] as i32);
        let start_abef = [abef0(states[0]), abef0(states[1])];
        let start_cdgh = [cdgh0(states[0]), cdgh0(states[1])];
        let (mut abef, mut cdgh) = (start_abef, start_cdgh);
        rounds(&mut abef, &mut cdgh, &w0, 0);
        rounds(&mut abef, &mut cdgh, &w1, 1);
        rounds(&mut abef, &mut cdgh, &w2, 2);
        rounds(&mut abef, &mut cdgh, &w3, 3);
        for g in 1..4 {
            let group = 4 * g;
            w0 = schedule(&w0, &w1, &w2, &w3);
            rounds(&mut abef, &mut cdgh, &w0, group);
            w1 = schedule(&w1, &w2, &w3, &w0);
            rounds(&mut abef, &mut cdgh, &w1, group + 1);
            w2 = schedule(&w2, &w3, &w0, &w1);
            rounds(&mut abef, &mut cdgh, &w2, group + 2);
            w3 = schedule(&w3, &w0, &w1, &w2);
            rounds(&mut abef, &mut cdgh, &w3, group + 3);
        }
        for (l, state) in states.into_iter().enumerate() {
            let abef = _mm_add_epi32(abef[l], start_abef[l]);
            let cdgh = _mm_add_epi32(cdgh[l], start_cdgh[l]);
            *state = [
                _mm_extract_epi32(abef, 3) as u32,
                _mm_extract_epi32(abef, 2) as u32,
                _mm_extract_epi32(cdgh, 3) as u32,
                _mm_extract_epi32(cdgh, 2) as u32,
                _mm_extract_epi32(abef, 1) as u32,
                _mm_extract_epi32(abef, 0) as u32,
                _mm_extract_epi32(cdgh, 1) as u32,
                _mm_extract_epi32(cdgh, 0) as u32,
            ];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn sha2_compress(state: &mut [u32; 8], block: &[u8; 64]) {
        sha2::compress256(state, std::slice::from_ref(block.into()));
    }

    #[test]
    fn both_lanes_equal_sha2_over_random_states_and_blocks() {
        let mut rng = StdRng::seed_from_u64(0x5a256);
        for _ in 0..20_000 {
            let (mut a, mut b) = (rng.random::<[u32; 8]>(), rng.random::<[u32; 8]>());
            let (x, y): ([u8; 64], [u8; 64]) = (rng.random(), rng.random());
            let (mut ea, mut eb) = (a, b);
            sha2_compress(&mut ea, &x);
            sha2_compress(&mut eb, &y);
            compress2([&mut a, &mut b], [&x, &y]);
            assert_eq!((a, b), (ea, eb));
        }
    }

    #[test]
    fn same_input_in_both_lanes_and_the_portable_path_agree() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            let s = rng.random::<[u32; 8]>();
            let x: [u8; 64] = rng.random();
            let (mut a, mut b, mut c, mut d) = (s, s, s, s);
            compress2([&mut a, &mut b], [&x, &x]);
            compress2_portable([&mut c, &mut d], [&x, &x]);
            assert_eq!(a, b);
            assert_eq!((a, b), (c, d));
        }
    }

    #[test]
    fn fips_180_example_abc() {
        // FIPS 180-4 example: SHA-256("abc") in one padded block.
        let mut block = [0u8; 64];
        block[..3].copy_from_slice(b"abc");
        block[3] = 0x80;
        block[63] = 24;
        let (mut a, mut b) = (IV, IV);
        compress2([&mut a, &mut b], [&block, &[0; 64]]);
        assert_eq!(
            a,
            [
                0xba78_16bf,
                0x8f01_cfea,
                0x4141_40de,
                0x5dae_2223,
                0xb003_61a3,
                0x9617_7a9c,
                0xb410_ff61,
                0xf200_15ad
            ]
        );
        let mut e = IV;
        sha2_compress(&mut e, &[0; 64]);
        assert_eq!(b, e);
    }
}
