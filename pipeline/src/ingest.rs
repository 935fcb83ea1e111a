//! The stage chain a submitted batch runs through before its ACK.
//!
//! The first stage: per-message checks ([`Ingest::check`]). The shard then appends the
//! accepted messages to its log (`courier_pipeline::log`), which gives their positions,
//! and acks them once durable. [`Ingest::process`] also numbers messages itself, for the
//! QUIC simulation, which runs without a log.

use crate::wire::{LogPosition, Message, Reason, Status};

/// One shard's ingest stage.
#[derive(Debug)]
pub struct Ingest {
    shard: u16,
    payload_bytes_max: u32,
    next_index: u64,
    accepted: u64,
}

impl Ingest {
    /// A stage for `shard` whose log starts at `next_index`.
    pub fn new(shard: u16, payload_bytes_max: u32, next_index: u64) -> Ingest {
        Ingest {
            shard,
            payload_bytes_max,
            next_index,
            accepted: 0,
        }
    }

    /// The per-message checks alone: `Some(reason)` when the message must be rejected.
    /// The log assigns positions to the others.
    pub fn check(&self, m: &Message) -> Option<Reason> {
        let len = m.payload.len();
        (len == 0 || len > self.payload_bytes_max as usize).then_some(Reason::PayloadTooLarge)
    }

    /// Decides every message of a batch and gives accepted ones the next positions of
    /// the shard's sequence (the simulation's stand-in for the log); appends one status
    /// per message to `out`.
    pub fn process(&mut self, _business_id: u32, messages: &[Message], out: &mut Vec<Status>) {
        out.reserve(messages.len());
        for m in messages {
            let status = match self.check(m) {
                Some(reason) => Status::Rejected(reason),
                None => {
                    let p = LogPosition::new(self.shard, self.next_index);
                    self.next_index += 1;
                    self.accepted += 1;
                    Status::Accepted(p)
                }
            };
            out.push(status);
        }
    }

    /// Messages accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Recipient;
    use bytes::Bytes;

    #[test]
    fn positions_increase_and_oversized_payloads_are_rejected() {
        let r = Recipient::parse(b"+15550001111").unwrap();
        let msg = |n: usize| Message {
            client_id: n as u64,
            recipient: r,
            payload: Bytes::from(vec![b'x'; n]),
        };
        let mut ingest = Ingest::new(2, 10, 5);
        let mut out = Vec::new();
        ingest.process(1, &[msg(3), msg(11), msg(0), msg(10)], &mut out);
        assert_eq!(
            out,
            vec![
                Status::Accepted(LogPosition::new(2, 5)),
                Status::Rejected(Reason::PayloadTooLarge),
                Status::Rejected(Reason::PayloadTooLarge),
                Status::Accepted(LogPosition::new(2, 6)),
            ]
        );
        assert_eq!(ingest.accepted(), 2);
    }
}
