//! The stage chain a submitted batch runs through before its ACK.
//!
//! Wire v1 ships the first stage: per-message checks and the position the message takes
//! in its shard's log. Detection, sealing and the durable log append slot in here (see
//! ARCHITECTURE.md); until the log lands, `accepted` means received, decoded and checked,
//! and the position is the message's index in the shard's sequence of accepted messages.

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

    /// Decides every message of a batch; appends one status per message to `out`.
    pub fn process(&mut self, _business_id: u32, messages: &[Message], out: &mut Vec<Status>) {
        out.reserve(messages.len());
        for m in messages {
            let len = m.payload.len();
            let status = if len == 0 || len > self.payload_bytes_max as usize {
                Status::Rejected(Reason::PayloadTooLarge)
            } else {
                let p = LogPosition::new(self.shard, self.next_index);
                self.next_index += 1;
                self.accepted += 1;
                Status::Accepted(p)
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
