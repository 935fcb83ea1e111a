//! [`ShardId`]: the one type that names a shard of a node, wherever a shard is named
//! (connection IDs, log positions, nonces, routing between shards, files, threads).
//!
//! Its width is the connection ID's: a shard's connection IDs carry its index in one byte
//! ([`crate::cid`]), so that any shard steers a datagram to its owner without decrypting
//! it. Hence a node runs at most [`SHARDS_MAX`] shards, and every `u8` is a shard id.
//!
//! Encodings keep their own widths: a log position carries the shard in 16 bits
//! ([`crate::wire::LogPosition`]), a seal nonce in 16 bits, a directory name in decimal.
//! Writing one converts with `From` (never lossy); reading one back converts with
//! [`ShardId::try_from`], which refuses a value no shard can have, and a value that is a
//! shard id but not one of this node's is checked with [`ShardId::within`].

use std::fmt;

/// The most shards a node runs: connection IDs carry the shard index in one byte.
pub const SHARDS_MAX: u32 = 256;

const _: () = assert!(SHARDS_MAX == u8::MAX as u32 + 1, "every u8 is a shard id");

/// The index of a shard within its node, `0..SHARDS_MAX`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ShardId(u8);

impl ShardId {
    /// Shard `id`.
    pub const fn new(id: u8) -> ShardId {
        ShardId(id)
    }

    /// The id as the byte that connection IDs carry.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The id as an index into per-shard tables (`0..shards`).
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// Whether this is a shard of a node that runs `shards` shards.
    pub const fn within(self, shards: usize) -> bool {
        self.index() < shards
    }

    /// Every shard of a node that runs `shards` shards, in order.
    ///
    /// # Panics
    /// If `shards` exceeds [`SHARDS_MAX`] (profiles are validated against it).
    pub fn all(shards: usize) -> impl Iterator<Item = ShardId> + Clone {
        assert!(
            shards <= SHARDS_MAX as usize,
            "{shards} shards exceed SHARDS_MAX"
        );
        (0..shards).map(|i| ShardId(i as u8))
    }
}

/// A number that is no shard id: at least [`SHARDS_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a shard id (a node has at most {SHARDS_MAX} shards)")]
pub struct NotAShardId(pub u64);

impl From<u8> for ShardId {
    fn from(id: u8) -> ShardId {
        ShardId(id)
    }
}

impl From<ShardId> for u16 {
    fn from(id: ShardId) -> u16 {
        u16::from(id.0)
    }
}

impl From<ShardId> for usize {
    fn from(id: ShardId) -> usize {
        id.index()
    }
}

impl TryFrom<u16> for ShardId {
    type Error = NotAShardId;
    fn try_from(v: u16) -> Result<ShardId, NotAShardId> {
        u8::try_from(v)
            .map(ShardId)
            .map_err(|_| NotAShardId(v.into()))
    }
}

impl TryFrom<usize> for ShardId {
    type Error = NotAShardId;
    fn try_from(v: usize) -> Result<ShardId, NotAShardId> {
        u8::try_from(v)
            .map(ShardId)
            .map_err(|_| NotAShardId(v as u64))
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wider_encodings_convert_back_only_when_they_name_a_shard() {
        let s = ShardId::new(255);
        assert_eq!(u16::from(s), 255);
        assert_eq!(ShardId::try_from(255u16), Ok(s));
        assert_eq!(ShardId::try_from(256u16), Err(NotAShardId(256)));
        assert_eq!(ShardId::try_from(300usize), Err(NotAShardId(300)));
        assert_eq!(ShardId::try_from(7usize).map(ShardId::index), Ok(7));
    }

    #[test]
    fn a_node_names_its_own_shards() {
        let all: Vec<ShardId> = ShardId::all(3).collect();
        assert_eq!(all, [ShardId::new(0), ShardId::new(1), ShardId::new(2)]);
        assert!(ShardId::new(2).within(3));
        assert!(!ShardId::new(3).within(3));
        assert_eq!(ShardId::all(SHARDS_MAX as usize).count(), 256);
        assert_eq!(ShardId::new(4).to_string(), "4");
    }
}
