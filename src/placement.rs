//! Which shard a new connection lives on: the one with the fewest connections.
//!
//! The kernel hands a new connection's first datagrams to a shard by the hash of its
//! 4-tuple. A relay's senders are few and large, so the hash often puts two of them on one
//! core while another idles: four connections on two shards land two and two only 6 times
//! in 16, and all four on one shard 2 times in 16. Once the reuseport program steers every
//! later datagram by the shard in its connection ID (`uring::steer_by_connection_id`), a
//! connection can live on any shard at no cost after its handshake. So the shard that
//! receives a new connection's Initial picks the shard holding the fewest connections
//! (ties to itself), forwards the Initial there, and sends that address's later Initial
//! and 0-RTT packets (their DCID is the client's, so the kernel's hash keeps bringing them
//! here) the same way until [`ROUTE_TTL`] has passed; by then the client addresses the
//! server's connection IDs, which the kernel steers.
//!
//! ```text
//!  datagram, no shard in its DCID ──> short header: here (an unknown connection)
//!                                     Initial / 0-RTT: the address's route, if any
//!                                     Initial of full size, no route, room for one:
//!                                       the fewest (live + placed within ROUTE_TTL),
//!                                       ties here; remembered
//!                                     else: here
//! ```
//!
//! Bounds: at most [`ROUTES_MAX`] routes per shard; with the table full (a flood of
//! Initials from many addresses) new connections stay where the kernel put them. Only an
//! Initial of at least [`INITIAL_BYTES_MIN`] bytes is placed, the size a client must pad
//! it to, so small junk takes no route. The counts are read across shards without locks
//! (each shard's live count is its own gauge; a placement counts until its route ends),
//! so two shards placing at the same instant may both pick the same one: the balance is
//! close, not exact.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_pipeline::node::ShardStats;

/// How long an address's Initial and 0-RTT packets follow its placement (and the
/// placement counts towards its shard). A handshake takes a few round trips.
pub const ROUTE_TTL: Duration = Duration::from_secs(10);
/// Routes one shard remembers at most.
pub const ROUTES_MAX: usize = 16_384;
/// The smallest datagram that carries a client's Initial (RFC 9000, section 14.1).
pub const INITIAL_BYTES_MIN: usize = 1200;

/// What every shard's placement reads: each shard's live connections and the
/// placements made towards it whose routes are still remembered.
#[derive(Debug)]
pub struct Loads {
    shards: Vec<Arc<ShardStats>>,
    placed: Vec<AtomicU64>,
}

impl Loads {
    /// The loads of the shards whose counters are `shards` (index = shard).
    pub fn new(shards: Vec<Arc<ShardStats>>) -> Loads {
        let placed = shards.iter().map(|_| AtomicU64::new(0)).collect();
        Loads { shards, placed }
    }

    fn load(&self, shard: usize) -> u64 {
        self.shards[shard].connections.load(Ordering::Relaxed)
            + self.placed[shard].load(Ordering::Relaxed)
    }
}

/// One shard's placement decisions and the routes that follow them.
#[derive(Debug)]
pub struct Placement {
    me: usize,
    loads: Arc<Loads>,
    routes: HashMap<SocketAddr, usize>,
    /// The routes in the order they were made, to end them after `ROUTE_TTL`.
    made: VecDeque<(Instant, SocketAddr)>,
}

impl Placement {
    /// The placement of shard `me`.
    pub fn new(me: usize, loads: Arc<Loads>) -> Placement {
        assert!(me < loads.shards.len(), "a shard of the node");
        Placement {
            me,
            loads,
            routes: HashMap::new(),
            made: VecDeque::new(),
        }
    }

    /// The shard a datagram without a shard in its DCID goes to, received at `now` from
    /// `from`.
    pub fn route(&mut self, now: Instant, datagram: &[u8], from: SocketAddr) -> usize {
        self.expire(now);
        let Some(&first) = datagram.first() else {
            return self.me;
        };
        // Long header, type 0 (Initial) or 1 (0-RTT).
        let long_type = (first >> 4) & 0x3;
        if first & 0x80 == 0 || long_type > 1 {
            return self.me;
        }
        if let Some(&shard) = self.routes.get(&from) {
            return shard;
        }
        if long_type != 0 || datagram.len() < INITIAL_BYTES_MIN || self.routes.len() >= ROUTES_MAX {
            return self.me;
        }
        let mut best = self.me;
        let mut least = self.loads.load(self.me);
        for shard in 0..self.loads.shards.len() {
            let load = self.loads.load(shard);
            if load < least {
                best = shard;
                least = load;
            }
        }
        self.loads.placed[best].fetch_add(1, Ordering::Relaxed);
        self.routes.insert(from, best);
        self.made.push_back((now, from));
        best
    }

    /// Ends the routes made `ROUTE_TTL` or longer before `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, from)) = self.made.front() {
            if now.saturating_duration_since(at) < ROUTE_TTL {
                break;
            }
            self.made.pop_front();
            if let Some(shard) = self.routes.remove(&from) {
                self.loads.placed[shard].fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Routes remembered now.
    pub fn routes(&self) -> usize {
        self.routes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(live: &[u64]) -> Arc<Loads> {
        let shards = live
            .iter()
            .map(|&n| {
                let s = ShardStats::default();
                s.connections.store(n, Ordering::Relaxed);
                Arc::new(s)
            })
            .collect();
        Arc::new(Loads::new(shards))
    }

    fn initial(len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        d[0] = 0xc0;
        d
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn new_connections_go_to_the_shard_with_the_fewest_and_stay_there() {
        let l = loads(&[0, 0]);
        let mut p0 = Placement::new(0, l.clone());
        let mut p1 = Placement::new(1, l.clone());
        let t = Instant::now();
        // Four connections whose Initials the kernel all gave shard 0: two and two.
        let placed: Vec<usize> = (1..=4)
            .map(|i| p0.route(t, &initial(1200), addr(i)))
            .collect();
        assert_eq!(placed, [0, 1, 0, 1]);
        // A fifth, from shard 1's receive side: the loads are even, so it stays there.
        assert_eq!(p1.route(t, &initial(1250), addr(5)), 1);
        // Later Initials and 0-RTT packets of the same address follow the first.
        let mut zero_rtt = initial(1200);
        zero_rtt[0] = 0xd0;
        assert_eq!(p0.route(t, &initial(1200), addr(2)), 1);
        assert_eq!(p0.route(t, &zero_rtt, addr(2)), 1);
        assert_eq!(p0.route(t, &zero_rtt, addr(3)), 0);
        // Short headers and Handshake packets without our shard stay here.
        assert_eq!(p0.route(t, &[0x40, 9, 9], addr(2)), 0);
        let mut handshake = initial(1200);
        handshake[0] = 0xe0;
        assert_eq!(p0.route(t, &handshake, addr(2)), 0);
        // A 0-RTT packet or a short Initial never makes a route.
        assert_eq!(p0.route(t, &zero_rtt, addr(9)), 0);
        assert_eq!(p0.route(t, &initial(1199), addr(9)), 0);
        assert_eq!(p0.routes(), 4);
        // Live connections count: shard 1 busy, so the next goes to shard 0.
        l.shards[1].connections.store(10, Ordering::Relaxed);
        assert_eq!(p1.route(t, &initial(1200), addr(6)), 0);
    }

    #[test]
    fn routes_end_after_their_ttl_and_their_placements_stop_counting() {
        let l = loads(&[0, 0]);
        let mut p = Placement::new(0, l.clone());
        let t = Instant::now();
        assert_eq!(p.route(t, &initial(1200), addr(1)), 0);
        assert_eq!(p.route(t, &initial(1200), addr(2)), 1);
        assert_eq!(l.placed[0].load(Ordering::Relaxed), 1);
        let later = t + ROUTE_TTL;
        // Address 2's route is gone: its next Initial is a new placement, made on the
        // live counts only (both zero now): here.
        assert_eq!(p.route(later, &initial(1200), addr(2)), 0);
        assert_eq!(p.routes(), 1);
        assert_eq!(l.placed[1].load(Ordering::Relaxed), 0);
        assert_eq!(l.placed[0].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_full_table_leaves_new_connections_where_the_kernel_put_them() {
        let l = loads(&[5, 0]);
        let mut p = Placement::new(0, l);
        let t = Instant::now();
        for i in 0..ROUTES_MAX {
            let from = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 4433));
            p.route(t, &initial(1200), from);
        }
        assert_eq!(p.routes(), ROUTES_MAX);
        assert_eq!(
            p.route(t, &initial(1200), addr(1)),
            0,
            "no room: stays here"
        );
        assert_eq!(p.routes(), ROUTES_MAX);
    }
}
