//! The simulated network: datagrams between addresses, each delayed, jittered, perhaps
//! lost, duplicated or held back to arrive out of order, every draw from the simulation's
//! seeded RNG.
//!
//! It owns the datagrams in flight and keeps one invariant: they leave in `(arrival time,
//! send order)` order, so two runs from the same seed deliver the same datagrams at the same
//! virtual instants. The queue is bounded like a router's buffer: a datagram that finds it
//! full is dropped and counted.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;

/// How the simulated network treats datagrams. Every probability is drawn per datagram.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    /// One-way delay every datagram takes.
    pub delay: Duration,
    /// Extra delay, uniform in `0..=jitter`; more than the gap between two datagrams
    /// reorders them.
    pub jitter: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Probability that a datagram is held back by `reorder_delay` on top of its delay, so
    /// that datagrams sent after it overtake it.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_delay: Duration,
    /// Probability that a datagram arrives twice (the copy with a jitter of its own).
    pub duplicate: f64,
    /// Datagrams in flight at most; more are dropped (a full router queue).
    pub in_flight_max: usize,
    /// Largest datagram the path carries; larger ones are dropped (a path MTU).
    pub mtu_bytes: usize,
}

impl NetConfig {
    /// A clean path: 5 ms one way, no jitter, no loss, no reordering.
    pub fn clean() -> NetConfig {
        NetConfig {
            delay: Duration::from_millis(5),
            jitter: Duration::ZERO,
            loss: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
            duplicate: 0.0,
            in_flight_max: 65_536,
            mtu_bytes: 1452,
        }
    }

    /// A poor path: `loss` lost, jitter of 4 ms on 10 ms, 2% held back by 15 ms, 1%
    /// duplicated.
    pub fn lossy(loss: f64) -> NetConfig {
        NetConfig {
            delay: Duration::from_millis(10),
            jitter: Duration::from_millis(4),
            loss,
            reorder: 0.02,
            reorder_delay: Duration::from_millis(15),
            duplicate: 0.01,
            ..NetConfig::clean()
        }
    }

    fn check(&self) {
        assert!((0.0..=1.0).contains(&self.loss), "loss is a probability");
        assert!(
            (0.0..=1.0).contains(&self.reorder),
            "reorder is a probability"
        );
        assert!(
            (0.0..=1.0).contains(&self.duplicate),
            "duplicate is a probability"
        );
        assert!(
            self.in_flight_max > 0,
            "the network holds at least one datagram"
        );
        assert!(self.mtu_bytes >= 1200, "QUIC needs 1200-byte datagrams");
    }
}

/// What happened to one datagram handed to the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Queued; it arrives at this instant.
    Queued(Instant),
    /// Lost on the way (the loss probability).
    Lost,
    /// The queue was full.
    QueueFull,
    /// Larger than the path MTU.
    TooLarge,
}

/// Counters of the network.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NetStats {
    /// Datagrams handed to the network.
    pub sent: u64,
    /// Datagrams delivered to an address that had a listener.
    pub delivered: u64,
    /// Datagrams lost on purpose.
    pub lost: u64,
    /// Datagrams held back to be overtaken.
    pub reordered: u64,
    /// Datagrams sent twice.
    pub duplicated: u64,
    /// Datagrams dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Datagrams dropped for exceeding the MTU.
    pub dropped_too_large: u64,
    /// Datagrams that arrived at an address nobody listens on (a client that moved).
    pub undeliverable: u64,
    /// Datagrams that the receiving shard handed to the shard owning their connection ID.
    pub handoffs: u64,
}

/// A datagram in flight.
#[derive(Debug)]
pub(crate) struct Datagram {
    pub at: Instant,
    pub seq: u64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub data: Vec<u8>,
}

// Ordered by arrival, then by send order; reversed so that `BinaryHeap` pops the earliest.
impl Ord for Datagram {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}
impl PartialOrd for Datagram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Datagram {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Datagram {}

#[derive(Debug)]
pub(crate) struct Network {
    cfg: NetConfig,
    queue: BinaryHeap<Datagram>,
    next_seq: u64,
    pub stats: NetStats,
}

impl Network {
    pub fn new(cfg: NetConfig) -> Network {
        cfg.check();
        Network {
            cfg,
            queue: BinaryHeap::new(),
            next_seq: 0,
            stats: NetStats::default(),
        }
    }

    pub fn set_config(&mut self, cfg: NetConfig) {
        cfg.check();
        self.cfg = cfg;
    }

    /// Hands one datagram to the network at `now`.
    pub fn send(
        &mut self,
        now: Instant,
        rng: &mut StdRng,
        src: SocketAddr,
        dst: SocketAddr,
        data: &[u8],
    ) -> Fate {
        self.stats.sent += 1;
        // Draw every random number whatever the outcome, so that one datagram's fate does
        // not shift the draws of the next: a trace then changes locally when a knob moves.
        let lost = rng.random_bool(self.cfg.loss);
        let jitter_nanos = rng.random_range(0..=self.cfg.jitter.as_nanos() as u64);
        let reordered = rng.random_bool(self.cfg.reorder);
        let duplicated = rng.random_bool(self.cfg.duplicate);
        let copy_jitter_nanos = rng.random_range(0..=self.cfg.jitter.as_nanos() as u64);
        if data.len() > self.cfg.mtu_bytes {
            self.stats.dropped_too_large += 1;
            return Fate::TooLarge;
        }
        if lost {
            self.stats.lost += 1;
            return Fate::Lost;
        }
        if self.queue.len() >= self.cfg.in_flight_max {
            self.stats.dropped_queue_full += 1;
            return Fate::QueueFull;
        }
        let mut at = now + self.cfg.delay + Duration::from_nanos(jitter_nanos);
        if reordered {
            self.stats.reordered += 1;
            at += self.cfg.reorder_delay;
        }
        self.enqueue(at, src, dst, data);
        if duplicated && self.queue.len() < self.cfg.in_flight_max {
            self.stats.duplicated += 1;
            let copy_at = now + self.cfg.delay + Duration::from_nanos(copy_jitter_nanos);
            self.enqueue(copy_at, src, dst, data);
        }
        Fate::Queued(at)
    }

    fn enqueue(&mut self, at: Instant, src: SocketAddr, dst: SocketAddr, data: &[u8]) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push(Datagram {
            at,
            seq,
            src,
            dst,
            data: data.to_vec(),
        });
    }

    /// When the next datagram arrives.
    pub fn next_arrival(&self) -> Option<Instant> {
        self.queue.peek().map(|d| d.at)
    }

    /// The next datagram that has arrived by `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Datagram> {
        if self.queue.peek()?.at <= now {
            self.queue.pop()
        } else {
            None
        }
    }

    /// Datagrams in flight.
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn arrival_order_is_time_then_send_order() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(1);
        let mut net = Network::new(NetConfig::clean());
        for i in 0..5u8 {
            net.send(now, &mut rng, addr(1), addr(2), &[i; 1200]);
        }
        assert_eq!(net.next_arrival(), Some(now + Duration::from_millis(5)));
        assert!(
            net.pop_due(now).is_none(),
            "nothing arrives before its delay"
        );
        let later = now + Duration::from_millis(5);
        let order: Vec<u8> = std::iter::from_fn(|| net.pop_due(later))
            .map(|d| d.data[0])
            .collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn loss_queue_bound_and_mtu_drop_and_count() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(2);
        let mut net = Network::new(NetConfig {
            loss: 1.0,
            ..NetConfig::clean()
        });
        assert_eq!(
            net.send(now, &mut rng, addr(1), addr(2), &[0; 1200]),
            Fate::Lost
        );
        net.set_config(NetConfig {
            in_flight_max: 1,
            ..NetConfig::clean()
        });
        assert!(matches!(
            net.send(now, &mut rng, addr(1), addr(2), &[0; 1200]),
            Fate::Queued(_)
        ));
        assert_eq!(
            net.send(now, &mut rng, addr(1), addr(2), &[0; 1200]),
            Fate::QueueFull
        );
        assert_eq!(
            net.send(now, &mut rng, addr(1), addr(2), &[0; 1500]),
            Fate::TooLarge
        );
        let s = &net.stats;
        assert_eq!(
            (s.sent, s.lost, s.dropped_queue_full, s.dropped_too_large),
            (4, 1, 1, 1)
        );
        assert_eq!(net.in_flight(), 1);
    }

    #[test]
    fn jitter_and_reordering_let_later_datagrams_overtake() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(3);
        let mut net = Network::new(NetConfig {
            reorder: 0.5,
            reorder_delay: Duration::from_millis(20),
            jitter: Duration::from_millis(2),
            ..NetConfig::clean()
        });
        for i in 0..64u8 {
            net.send(
                now + Duration::from_micros(u64::from(i) * 100),
                &mut rng,
                addr(1),
                addr(2),
                &[i; 1200],
            );
        }
        let end = now + Duration::from_secs(1);
        let order: Vec<u8> = std::iter::from_fn(|| net.pop_due(end))
            .map(|d| d.data[0])
            .collect();
        assert_eq!(order.len(), 64);
        assert!(order.windows(2).any(|w| w[0] > w[1]), "some overtaking");
        assert!(net.stats.reordered > 0);
    }
}
