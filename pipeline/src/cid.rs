//! Connection IDs that carry the shard index, and the steering decision built on them.
//!
//! Every connection ID a shard issues is `shard:u8 | 7 random bytes`. The server's
//! reuseport program (`courier::uring::steer_by_connection_id`) reads the same byte, so
//! the kernel hands each datagram to its owner; where the kernel refuses the program, a
//! datagram that the SO_REUSEPORT hash delivers to the wrong shard (a client changed
//! address, so its 4-tuple hashes elsewhere) names its owner in its destination
//! connection ID, and [`owner_shard`] reads it without decrypting anything. The same
//! layout leaves room for a QUIC-LB server id in front of it later.

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use rand::{RngCore, SeedableRng};

use crate::ShardId;

/// Bytes of every connection ID courier issues.
pub const CID_BYTES: usize = 8;

const _: () = assert!(
    CID_BYTES >= 8,
    "RFC 9000 asks for at least 64 bits of entropy"
);

/// Issues connection IDs whose first byte is the shard index.
#[derive(Debug)]
pub struct ShardCidGenerator {
    shard: ShardId,
    rng: rand::rngs::StdRng,
}

impl ShardCidGenerator {
    /// A generator for `shard`, its random bytes drawn from a generator seeded by `seed`.
    pub fn new(shard: ShardId, seed: [u8; 32]) -> ShardCidGenerator {
        ShardCidGenerator {
            shard,
            rng: rand::rngs::StdRng::from_seed(seed),
        }
    }
}

impl ConnectionIdGenerator for ShardCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_BYTES];
        bytes[0] = self.shard.get();
        self.rng.fill_bytes(&mut bytes[1..]);
        ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if cid.len() == CID_BYTES && cid[0] == self.shard.get() {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_BYTES
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The shard that owns the connection a datagram belongs to, when the datagram says so.
///
/// Short-header packets and long-header Handshake packets carry a connection ID that a
/// shard issued; Initial and 0-RTT packets carry one the client chose, so they belong to
/// whichever shard received them (`None`). An index at or above `shards` is `None` too:
/// the receiving endpoint then answers it as it would any unknown packet.
pub fn owner_shard(datagram: &[u8], shards: usize) -> Option<ShardId> {
    let first = *datagram.first()?;
    let shard = if first & 0x80 == 0 {
        // Short header: DCID right after the first byte.
        *datagram.get(1)?
    } else {
        // Long header: type in bits 4-5; 2 = Handshake. version:u32, dcid_len:u8, dcid.
        if (first >> 4) & 0x3 != 2 || usize::from(*datagram.get(5)?) != CID_BYTES {
            return None;
        }
        *datagram.get(6)?
    };
    let shard = ShardId::new(shard);
    shard.within(shards).then_some(shard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids_carry_the_shard_and_differ() {
        let mut g = ShardCidGenerator::new(ShardId::new(5), [1; 32]);
        let a = g.generate_cid();
        let b = g.generate_cid();
        assert_eq!((a[0], b[0]), (5, 5));
        assert_ne!(a, b);
        assert!(g.validate(&a).is_ok());
        assert!(ShardCidGenerator::new(ShardId::new(4), [1; 32])
            .validate(&a)
            .is_err());
    }

    #[test]
    fn steering_reads_short_and_handshake_headers() {
        let mut short = vec![0x40, 3];
        short.extend_from_slice(&[0; 20]);
        assert_eq!(owner_shard(&short, 4), Some(ShardId::new(3)));
        assert_eq!(owner_shard(&short, 2), None, "index beyond shard count");
        // Handshake long header: 0xe0 = long, fixed bit, type 2.
        let mut hs = vec![0xe0, 0, 0, 0, 1, CID_BYTES as u8, 1];
        hs.extend_from_slice(&[0; 20]);
        assert_eq!(owner_shard(&hs, 4), Some(ShardId::new(1)));
        // Initial long header (type 0): the client chose the DCID.
        let mut init = vec![0xc0, 0, 0, 0, 1, CID_BYTES as u8, 1];
        init.extend_from_slice(&[0; 20]);
        assert_eq!(owner_shard(&init, 4), None);
        assert_eq!(owner_shard(&[], 4), None);
    }
}
