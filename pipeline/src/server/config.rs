//! The server's configuration: the profile's `[limits]` (what one shard's server takes
//! in) and `[quic]` (the transport) sections, and the bounds each key keeps.

use serde::Deserialize;

use crate::idempotency;
use crate::profile::Checker;
use crate::wire::{
    self, WireLimits, BATCH_MESSAGES_LIMIT, FRAME_BYTES_LIMIT, FRAME_BYTES_MIN, PAYLOAD_BYTES_LIMIT,
};

/// The smallest UDP payload QUIC allows, bytes (RFC 9000, 14.1): the least
/// `quic.initial_mtu` and `quic.mtu_upper_bound`.
pub const MTU_MIN: u16 = 1200;
/// The largest UDP payload quinn-proto takes as `max_udp_payload_size`, bytes.
pub const MTU_MAX: u16 = 65_527;
/// Most bidirectional streams a profile may let one connection open
/// (`limits.streams_per_connection_max`).
pub const STREAMS_PER_CONNECTION_LIMIT: u32 = 1024;
/// The least flow-control and send window, bytes.
pub const WINDOW_BYTES_MIN: u32 = 16 << 10;
/// The largest flow-control and send window, bytes.
pub const WINDOW_BYTES_MAX: u32 = 1 << 30;

/// `[limits]`: what one shard's server takes in.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest frame body, bytes.
    pub frame_bytes_max: u32,
    /// Most messages in one SUBMIT.
    pub batch_messages_max: u32,
    /// Largest message payload, bytes.
    pub payload_bytes_max: u32,
    /// Most connections one shard holds.
    pub connections_per_shard_max: u32,
    /// Most connections one source IP address holds on a shard; further handshakes
    /// from it are refused.
    pub connections_per_address_max: u32,
    /// Most authenticated connections one credential holds on a shard; a HELLO beyond
    /// it closes its connection with `too_many_connections`.
    pub connections_per_business_max: u32,
    /// Most concurrent bidirectional streams a client may open per connection.
    pub streams_per_connection_max: u32,
    /// Most SUBMITs of one stream waiting for their ACK before the stream stops being read.
    pub batches_in_flight_per_stream_max: u32,
    /// Most SUBMITs of one business decoded on a shard and not yet acked, all its
    /// connections and streams together; past it the business's streams are not read
    /// (backpressure, not rejection). See `server::fair` for the bound it gives others.
    pub batches_in_flight_per_business_max: u32,
    /// Milliseconds a connection may take, after its handshake, to send a valid HELLO.
    pub hello_timeout_ms: u32,
    /// Most client message ids the idempotency table remembers, all shards together
    /// (about 51 bytes each when full; see [`crate::idempotency`]).
    pub idempotency_ids_max: u32,
    /// Ids of one business the idempotency table keeps when it is full, whatever other
    /// businesses send (see [`crate::idempotency`], "Fair shares").
    pub idempotency_ids_per_business_max: u32,
}

impl Limits {
    /// The bounds the frame decoder enforces.
    pub fn wire(&self) -> WireLimits {
        WireLimits {
            frame_bytes_max: self.frame_bytes_max,
            batch_messages_max: self.batch_messages_max,
        }
    }

    /// Checks every key of `[limits]`, naming each broken one.
    pub(crate) fn validate(&self, c: &mut Checker) {
        c.range(
            "limits.frame_bytes_max",
            self.frame_bytes_max,
            FRAME_BYTES_MIN,
            FRAME_BYTES_LIMIT,
        );
        c.range(
            "limits.batch_messages_max",
            self.batch_messages_max,
            1,
            BATCH_MESSAGES_LIMIT,
        );
        c.range(
            "limits.payload_bytes_max",
            self.payload_bytes_max,
            1,
            PAYLOAD_BYTES_LIMIT,
        );
        self.validate_frame(c);
        c.range(
            "limits.connections_per_shard_max",
            self.connections_per_shard_max,
            1,
            1 << 20,
        );
        c.range(
            "limits.connections_per_address_max",
            self.connections_per_address_max,
            1,
            1 << 20,
        );
        c.range(
            "limits.connections_per_business_max",
            self.connections_per_business_max,
            1,
            1 << 20,
        );
        c.range(
            "limits.streams_per_connection_max",
            self.streams_per_connection_max,
            1,
            STREAMS_PER_CONNECTION_LIMIT,
        );
        c.range(
            "limits.batches_in_flight_per_stream_max",
            self.batches_in_flight_per_stream_max,
            1,
            1024,
        );
        c.range(
            "limits.batches_in_flight_per_business_max",
            self.batches_in_flight_per_business_max,
            1,
            1 << 20,
        );
        c.range(
            "limits.hello_timeout_ms",
            self.hello_timeout_ms,
            10,
            600_000,
        );
        c.range(
            "limits.idempotency_ids_max",
            self.idempotency_ids_max,
            idempotency::ENTRIES_MIN as u32,
            idempotency::ENTRIES_MAX as u32,
        );
        c.range(
            "limits.idempotency_ids_per_business_max",
            self.idempotency_ids_per_business_max,
            idempotency::ENTRIES_MIN as u32,
            idempotency::ENTRIES_MAX as u32,
        );
        if self.idempotency_ids_per_business_max > self.idempotency_ids_max {
            c.fail(
                "limits.idempotency_ids_per_business_max",
                format!(
                    "{} exceeds limits.idempotency_ids_max ({}): a share is part of the table",
                    self.idempotency_ids_per_business_max, self.idempotency_ids_max
                ),
            );
        }
    }

    /// A frame holds one message of the largest payload, and the ACK of a full batch.
    fn validate_frame(&self, c: &mut Checker) {
        let one_message = (wire::BATCH_HEADER_BYTES
            + wire::MESSAGE_OVERHEAD_BYTES
            + wire::RECIPIENT_BYTES_MAX) as u64
            + u64::from(self.payload_bytes_max);
        if u64::from(self.frame_bytes_max) < one_message {
            c.fail(
                "limits.frame_bytes_max",
                format!(
                    "{} cannot hold one message of limits.payload_bytes_max ({} bytes needed)",
                    self.frame_bytes_max, one_message
                ),
            );
        }
        // An ACK for a full batch must fit in a frame the client accepts.
        let ack_bytes = (wire::BATCH_HEADER_BYTES
            + self.batch_messages_max as usize * wire::STATUS_BYTES) as u64;
        if u64::from(self.frame_bytes_max) < ack_bytes {
            c.fail(
                "limits.batch_messages_max",
                format!(
                    "an ACK of {} statuses ({ack_bytes} bytes) exceeds limits.frame_bytes_max",
                    self.batch_messages_max
                ),
            );
        }
    }
}

/// `[quic]`: the QUIC transport of every connection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quic {
    /// Milliseconds without traffic before a connection is closed.
    pub idle_timeout_ms: u32,
    /// Flow-control window per stream, bytes.
    pub stream_receive_window_bytes: u32,
    /// Flow-control window per connection, bytes.
    pub connection_receive_window_bytes: u32,
    /// Bytes a connection may have in flight towards the peer.
    pub send_window_bytes: u32,
    /// UDP payload size used from the start, bytes (at least [`MTU_MIN`]).
    pub initial_mtu: u16,
    /// Largest UDP payload MTU discovery may try, bytes.
    pub mtu_upper_bound: u16,
    /// When a new connection must first prove its address with a Retry round trip.
    pub retry: RetryMode,
    /// With `retry = "under_load"`: handshaking connections on a shard from which new
    /// ones are sent a Retry.
    pub retry_half_open_min: u32,
}

/// When a new connection must first prove that it receives at its source address (a
/// QUIC Retry round trip, RFC 9000 8.1.2) before the shard spends a handshake and a
/// connection slot on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryMode {
    /// Every new connection: one extra round trip for everyone.
    Always,
    /// Once the shard has `quic.retry_half_open_min` handshakes in progress: floods of
    /// spoofed Initials cost one small Retry packet each and hold nothing.
    UnderLoad,
    /// Never (quinn-proto still keeps to the 3x anti-amplification limit of RFC 9000
    /// 8.1 for an unvalidated address).
    Never,
}

impl Quic {
    /// Checks every key of `[quic]`, naming each broken one.
    pub(crate) fn validate(&self, c: &mut Checker) {
        c.range("quic.idle_timeout_ms", self.idle_timeout_ms, 100, 3_600_000);
        c.range(
            "quic.retry_half_open_min",
            self.retry_half_open_min,
            1,
            1 << 20,
        );
        let windows = [
            (
                "quic.stream_receive_window_bytes",
                self.stream_receive_window_bytes,
            ),
            (
                "quic.connection_receive_window_bytes",
                self.connection_receive_window_bytes,
            ),
            ("quic.send_window_bytes", self.send_window_bytes),
        ];
        for (key, v) in windows {
            c.range(key, v, WINDOW_BYTES_MIN, WINDOW_BYTES_MAX);
        }
        if self.connection_receive_window_bytes < self.stream_receive_window_bytes {
            c.fail(
                "quic.connection_receive_window_bytes",
                "must be at least quic.stream_receive_window_bytes".into(),
            );
        }
        c.range("quic.initial_mtu", self.initial_mtu, MTU_MIN, MTU_MAX);
        c.range(
            "quic.mtu_upper_bound",
            self.mtu_upper_bound,
            MTU_MIN,
            MTU_MAX,
        );
        if self.mtu_upper_bound < self.initial_mtu {
            c.fail(
                "quic.mtu_upper_bound",
                "must be at least quic.initial_mtu".into(),
            );
        }
    }
}
