//! Loopback tests of the io_uring driver. Every loop is bounded by a deadline, and the
//! tests that block in `wait(None)` run under a watchdog that aborts the process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::udp::{Setup, RECVMSG_OUT_BYTES, RECV_CONTROL_BYTES, RECV_NAME_BYTES};
use super::*;

const LOOPBACK_V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const TEST_DEADLINE: Duration = Duration::from_secs(10);
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Aborts the process if a test blocks longer than `limit`; disarmed on drop.
struct Watchdog(Arc<AtomicBool>);

fn watchdog(limit: Duration) -> Watchdog {
    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&done);
    thread::spawn(move || {
        let t0 = Instant::now();
        while !seen.load(Ordering::Relaxed) {
            if t0.elapsed() > limit {
                eprintln!("watchdog: test blocked for more than {limit:?}");
                std::process::abort();
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    Watchdog(done)
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn test_config() -> RingConfig {
    RingConfig {
        entries: 256,
        recv_buffers: 64,
        send_slots: 16,
        ..RingConfig::default()
    }
}

fn ring_on(addr: &str, cfg: &RingConfig) -> UdpRing {
    ring_with(addr, cfg, Setup::SingleIssuer)
}

fn ring_with(addr: &str, cfg: &RingConfig, setup: Setup) -> UdpRing {
    let socket = bind_reuseport(
        addr.parse().unwrap(),
        SOCKET_BUFFER_BYTES,
        SOCKET_BUFFER_BYTES,
    )
    .unwrap();
    let ring = UdpRing::with_setup(socket, cfg, setup).unwrap();
    assert_eq!(ring.setup(), setup, "kernel 6.18 accepts every setup");
    ring
}

/// The setups a kernel without SINGLE_ISSUER / DEFER_TASKRUN would fall back to.
const FALLBACK_SETUPS: [Setup; 2] = [Setup::CoopTaskrun, Setup::Plain];

/// Datagram `i` of `len >= 4` bytes: its index, then a pattern derived from it.
fn payload(i: u32, len: usize) -> Vec<u8> {
    let mut p = i.to_le_bytes().to_vec();
    p.extend((4..len).map(|k| (i as u8).wrapping_mul(31).wrapping_add(k as u8)));
    p
}

fn index_of(datagram: &[u8]) -> u32 {
    u32::from_le_bytes(datagram[..4].try_into().unwrap())
}

/// Split a received payload into its datagrams.
fn datagrams(data: &[u8], segment_size: Option<usize>) -> Vec<&[u8]> {
    match segment_size {
        Some(s) => data.chunks(s).collect(),
        None => vec![data],
    }
}

/// Wait and drain until `done()` or the test deadline; returns whether `done()` held.
fn pump(
    ring: &mut UdpRing,
    mut on_event: impl FnMut(RingEvent<'_>),
    mut done: impl FnMut(&UdpRing) -> bool,
) -> bool {
    let t0 = Instant::now();
    while !done(ring) {
        if t0.elapsed() > TEST_DEADLINE {
            return false;
        }
        ring.wait(Some(Duration::from_millis(50))).unwrap();
        ring.drain(&mut on_event).unwrap();
    }
    true
}

/// Receive `count` datagrams from `tx` (sent by another thread with a window of 64 in
/// flight, so loopback never overflows the socket buffer) and check each one.
fn receive_from_std_socket(addr: &str, count: u32, setup: Setup) {
    let mut ring = ring_with(addr, &test_config(), setup);
    let dest = ring.local_addr().unwrap();
    let tx = UdpSocket::bind(SocketAddr::new(dest.ip(), 0)).unwrap();
    let tx_addr = tx.local_addr().unwrap();
    let size_of = |i: u32| 4 + (i as usize * 37) % 1400;
    let expected_bytes: usize = (0..count).map(size_of).sum();

    let received = Arc::new(AtomicUsize::new(0));
    let window = Arc::clone(&received);
    let sender = thread::spawn(move || {
        let t0 = Instant::now();
        for i in 0..count {
            while i as usize >= window.load(Ordering::Relaxed) + 64 {
                assert!(t0.elapsed() < TEST_DEADLINE, "receiver stalled");
                thread::sleep(Duration::from_micros(100));
            }
            tx.send_to(&payload(i, size_of(i)), dest).unwrap();
        }
    });

    let mut seen = vec![false; count as usize];
    let (mut n, mut bytes) = (0usize, 0usize);
    let all = pump(
        &mut ring,
        |ev| {
            let RingEvent::Recv {
                data,
                segment_size,
                from,
                local_ip,
            } = ev
            else {
                return;
            };
            assert_eq!(from, tx_addr);
            assert_eq!(local_ip, Some(dest.ip()));
            for d in datagrams(data, segment_size) {
                let i = index_of(d);
                assert_eq!(d, payload(i, size_of(i)), "datagram {i}");
                assert!(!seen[i as usize], "datagram {i} twice");
                seen[i as usize] = true;
                n += 1;
                bytes += d.len();
            }
            received.store(n, Ordering::Relaxed);
        },
        |_| received.load(Ordering::Relaxed) == count as usize,
    );
    sender.join().unwrap();
    assert!(all, "received {n} of {count}");
    assert_eq!(bytes, expected_bytes);
    let stats = ring.stats();
    assert_eq!(stats.datagrams_received, u64::from(count));
    assert_eq!(stats.bytes_received, expected_bytes as u64);
    assert_eq!(
        stats.recv_truncated + stats.recv_malformed + stats.recv_errors,
        0
    );
}

#[test]
fn uring_recv_thousand_datagrams_v4() {
    receive_from_std_socket("127.0.0.1:0", 1_000, Setup::SingleIssuer);
}

#[test]
fn uring_recv_datagrams_v6() {
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    receive_from_std_socket("[::1]:0", 100, Setup::SingleIssuer);
}

/// Ten segments of 1200 bytes, the last one 500.
fn gso_batch() -> Vec<Vec<u8>> {
    (0..10)
        .map(|k| payload(k, if k == 9 { 500 } else { 1200 }))
        .collect()
}

fn fill_and_submit(ring: &mut UdpRing, dest: SocketAddr, segments: &[Vec<u8>], gso: Option<usize>) {
    let mut buf = ring.send_buffer().expect("a free send slot");
    assert!(buf.is_empty());
    for segment in segments {
        buf.extend_from_slice(segment);
    }
    buf.submit(dest, Some(LOOPBACK_V4), gso);
}

#[test]
fn uring_gso_send_splits_into_datagrams() {
    let mut ring = ring_on("127.0.0.1:0", &test_config());
    assert!(
        ring.max_gso_segments() > 1,
        "kernel 6.18 supports UDP_SEGMENT"
    );
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    fill_and_submit(
        &mut ring,
        rx.local_addr().unwrap(),
        &gso_batch(),
        Some(1200),
    );
    assert!(pump(&mut ring, |_| {}, |r| r.stats().sends_ok == 1));

    let mut buf = [0u8; 2048];
    for expected in gso_batch() {
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &expected[..]);
        assert_eq!(from, ring.local_addr().unwrap());
    }
    let stats = ring.stats();
    assert_eq!(
        (stats.datagrams_sent, stats.bytes_sent),
        (10, 9 * 1200 + 500)
    );
    assert_eq!((stats.send_errors, stats.sends_in_flight), (0, 0));
    assert!(!stats.gso_disabled);
}

#[test]
fn uring_gso_to_gro_arrives_as_one_coalesced_payload() {
    let mut tx = ring_on("127.0.0.1:0", &test_config());
    let mut rx = ring_on("127.0.0.1:0", &test_config());
    assert!(rx.stats().gro_enabled);
    let rx_addr = rx.local_addr().unwrap();
    fill_and_submit(&mut tx, rx_addr, &gso_batch(), Some(1200));
    assert!(pump(&mut tx, |_| {}, |r| r.stats().sends_ok == 1));

    let mut got = Vec::new();
    let mut sizes = Vec::new();
    assert!(pump(
        &mut rx,
        |ev| {
            if let RingEvent::Recv {
                data,
                segment_size,
                local_ip,
                ..
            } = ev
            {
                assert_eq!(local_ip, Some(LOOPBACK_V4));
                sizes.push(segment_size);
                got.extend(
                    datagrams(data, segment_size)
                        .into_iter()
                        .map(<[u8]>::to_vec),
                );
            }
        },
        |r| r.stats().datagrams_received == 10,
    ));
    assert_eq!(got, gso_batch());
    // Loopback hands a GSO skb to a GRO socket whole.
    assert_eq!(sizes, vec![Some(1200)]);
}

#[test]
fn uring_gso_off_sends_single_datagrams_and_drops_batches() {
    let cfg = RingConfig {
        gso: false,
        ..test_config()
    };
    let mut ring = ring_on("127.0.0.1:0", &cfg);
    assert_eq!(ring.max_gso_segments(), 1);
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let dest = rx.local_addr().unwrap();
    // One datagram no longer than the segment size needs no GSO.
    fill_and_submit(&mut ring, dest, &[payload(7, 1200)], Some(1200));
    // A batch cannot be sent without GSO: dropped and counted, the slot stays free.
    fill_and_submit(&mut ring, dest, &gso_batch(), Some(1200));
    assert_eq!(ring.stats().send_dropped_gso_off, 1);
    assert!(pump(&mut ring, |_| {}, |r| r.stats().sends_ok == 1));
    let mut buf = [0u8; 2048];
    let (n, _) = rx.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &payload(7, 1200)[..]);
}

#[test]
fn uring_send_slots_run_out_until_completions_are_drained() {
    let cfg = RingConfig {
        entries: 8,
        send_slots: 2,
        file_slots: 0,
        ..test_config()
    };
    let mut ring = ring_on("127.0.0.1:0", &cfg);
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let dest = rx.local_addr().unwrap();

    {
        // Filled but dropped unsubmitted: the slot stays free and nothing is sent.
        let mut unsent = ring.send_buffer().unwrap();
        unsent.extend_from_slice(b"never sent");
    }
    for i in 0..2 {
        fill_and_submit(&mut ring, dest, &[payload(i, 100)], None);
    }
    assert!(ring.send_buffer().is_none(), "both slots in flight");
    assert_eq!(ring.stats().sends_in_flight, 2);
    assert!(ring.send_buffer().is_none(), "still none before a drain");

    assert!(pump(&mut ring, |_| {}, |r| r.stats().sends_ok == 2));
    assert!(ring.send_buffer().is_some());
    assert_eq!(ring.stats().sends_in_flight, 0);
    let mut buf = [0u8; 2048];
    for i in 0..2 {
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &payload(i, 100)[..]);
    }
}

#[test]
fn uring_wait_deadline_yields_timer() {
    wait_deadline_yields_timer(Setup::SingleIssuer);
}

fn wait_deadline_yields_timer(setup: Setup) {
    let mut ring = ring_with("127.0.0.1:0", &test_config(), setup);
    let t0 = Instant::now();
    let mut timers = 0;
    while timers == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "no Timer event");
        ring.wait(Some(Duration::from_millis(20))).unwrap();
        ring.drain(|ev| {
            if let RingEvent::Timer = ev {
                timers += 1;
            }
        })
        .unwrap();
    }
    // A timeout never fires early; no upper bound tighter than the loop's is asserted.
    assert!(t0.elapsed() >= Duration::from_millis(15));
    assert_eq!(ring.stats().timers, 1);
}

#[test]
fn uring_waker_interrupts_a_blocked_wait() {
    waker_interrupts_a_blocked_wait(Setup::SingleIssuer);
}

fn waker_interrupts_a_blocked_wait(setup: Setup) {
    fn assert_send_sync<T: Send + Sync + Clone>(_: &T) {}
    let _watchdog = watchdog(Duration::from_secs(30));
    let mut ring = ring_with("127.0.0.1:0", &test_config(), setup);
    let waker = ring.waker();
    assert_send_sync(&waker);
    let remote = waker.clone();
    let waking = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        remote.wake();
    });
    let mut wakes = 0;
    while wakes == 0 {
        ring.wait(None).unwrap();
        ring.drain(|ev| wakes += usize::from(matches!(ev, RingEvent::Wake)))
            .unwrap();
    }
    waking.join().unwrap();

    // The eventfd read was re-armed: a second wake is seen too.
    waker.wake();
    let mut wakes = 0;
    while wakes == 0 {
        ring.wait(None).unwrap();
        ring.drain(|ev| wakes += usize::from(matches!(ev, RingEvent::Wake)))
            .unwrap();
    }
    assert_eq!(ring.stats().wakes, 2);
}

#[test]
fn uring_reuseport_sockets_share_a_port() {
    let a = bind_reuseport("127.0.0.1:0".parse().unwrap(), 0, 0).unwrap();
    let addr = a.local_addr().unwrap();
    let b = bind_reuseport(addr, 0, 0).unwrap();
    assert_eq!(b.local_addr().unwrap(), addr);
    assert!(
        UdpSocket::bind(addr).is_err(),
        "the port is taken for sockets without REUSEPORT"
    );
    let _ra = UdpRing::new(a, &test_config()).unwrap();
    let _rb = UdpRing::new(b, &test_config()).unwrap();
}

/// Which of `socks` receives each of `datagrams`, each sent from a socket of its own (a
/// new 4-tuple each, so the kernel's hash alone would spread them).
fn receivers(socks: &[UdpSocket], datagrams: &[Vec<u8>]) -> Vec<usize> {
    let to = socks[0].local_addr().unwrap();
    let mut got = Vec::new();
    for d in datagrams {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(d, to).unwrap();
        let deadline = Instant::now() + TEST_DEADLINE;
        let mut buf = [0u8; 64];
        let at = loop {
            let hit = socks
                .iter()
                .position(|s| s.recv_from(&mut buf).is_ok_and(|(n, _)| buf[..n] == d[..]));
            if let Some(i) = hit {
                break i;
            }
            assert!(Instant::now() < deadline, "a datagram never arrived");
            thread::sleep(Duration::from_millis(1));
        };
        got.push(at);
    }
    got
}

#[test]
fn uring_steering_sends_a_connections_datagrams_to_its_shard() {
    let first = bind_reuseport("127.0.0.1:0".parse().unwrap(), 0, 0).unwrap();
    let addr = first.local_addr().unwrap();
    let mut socks = vec![first];
    for _ in 1..3 {
        socks.push(bind_reuseport(addr, 0, 0).unwrap());
    }
    steer_by_connection_id(&socks[1]).unwrap();
    // Short headers: the DCID's first byte names the socket, whatever the 4-tuple.
    for round in 0..8u8 {
        let short: Vec<Vec<u8>> = (0..3u8).map(|k| vec![0x40, k, round, 9, 9, 9]).collect();
        assert_eq!(receivers(&socks, &short), [0, 1, 2]);
        // Handshake packets with courier's 8-byte DCIDs.
        let handshake: Vec<Vec<u8>> = (0..3u8)
            .map(|k| vec![0xe0, 0, 0, 0, 1, 8, k, round, 1, 2, 3, 4, 5, 6])
            .collect();
        assert_eq!(receivers(&socks, &handshake), [0, 1, 2]);
    }
    // Initials, a DCID of another length, an index past the group: the hash decides,
    // so over many source ports more than one socket receives them.
    let mut hashed = Vec::new();
    for round in 0..24u8 {
        hashed.push(vec![0xc0, 0, 0, 0, 1, 8, 0, round, 1, 2, 3, 4, 5, 6]);
        hashed.push(vec![0xe0, 0, 0, 0, 1, 16, 0, round, 1, 2, 3, 4, 5, 6]);
        hashed.push(vec![0x40, 7, round, 1]);
    }
    let at = receivers(&socks, &hashed);
    for kind in 0..3 {
        let spread: std::collections::BTreeSet<usize> =
            at.iter().skip(kind).step_by(3).copied().collect();
        assert!(spread.len() > 1, "kind {kind} went by the hash: {spread:?}");
    }
}

#[test]
fn uring_recv_recovers_after_enobufs() {
    recv_recovers_after_enobufs(Setup::SingleIssuer);
}

fn recv_recovers_after_enobufs(setup: Setup) {
    let cfg = RingConfig {
        recv_buffers: 4,
        recv_buffer_bytes: 2048,
        ..test_config()
    };
    let mut ring = ring_with("127.0.0.1:0", &cfg, setup);
    let dest = ring.local_addr().unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();

    let mut seen = Vec::new();
    let record = |seen: &mut Vec<u32>, ev: RingEvent<'_>| {
        if let RingEvent::Recv {
            data, segment_size, ..
        } = ev
        {
            for d in datagrams(data, segment_size) {
                assert_eq!(d, payload(index_of(d), 100));
                seen.push(index_of(d));
            }
        }
    };
    for i in 0..32 {
        tx.send_to(&payload(i, 100), dest).unwrap();
    }
    // Let the kernel fill all four buffers while nothing is drained.
    thread::sleep(Duration::from_millis(20));
    ring.wait(Some(Duration::from_millis(100))).unwrap();
    thread::sleep(Duration::from_millis(20));
    ring.wait(Some(Duration::from_millis(100))).unwrap();
    let t0 = Instant::now();
    let mut burst_two_sent = false;
    loop {
        assert!(
            t0.elapsed() < TEST_DEADLINE,
            "received {} of 48",
            seen.len()
        );
        ring.drain(|ev| record(&mut seen, ev)).unwrap();
        if seen.len() == 32 && !burst_two_sent {
            for i in 32..48 {
                tx.send_to(&payload(i, 100), dest).unwrap();
            }
            burst_two_sent = true;
        }
        if seen.len() == 48 {
            break;
        }
        ring.wait(Some(Duration::from_millis(50))).unwrap();
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..48).collect::<Vec<_>>());
    let stats = ring.stats();
    assert!(
        stats.recv_enobufs >= 1,
        "4 buffers cannot hold 32 datagrams: {stats:?}"
    );
    assert!(stats.recv_rearms >= stats.recv_enobufs);
}

#[test]
fn uring_fallback_setups_receive_wake_and_time_out() {
    for setup in FALLBACK_SETUPS {
        receive_from_std_socket("127.0.0.1:0", 200, setup);
        recv_recovers_after_enobufs(setup);
        waker_interrupts_a_blocked_wait(setup);
        wait_deadline_yields_timer(setup);
    }
}

#[test]
fn uring_pin_current_thread() {
    // In a thread of its own, so the affinity does not leak into other tests.
    thread::spawn(|| {
        let cpus = available_cpus().unwrap();
        assert!(!cpus.is_empty());
        pin_current_thread(cpus[0]).unwrap();
        assert_eq!(available_cpus().unwrap(), vec![cpus[0]]);
        assert!(pin_current_thread(4096).is_err(), "beyond CPU_SETSIZE");
        if !cpus.contains(&1023) {
            assert!(pin_current_thread(1023).is_err(), "no such CPU");
        }
        assert_eq!(
            available_cpus().unwrap(),
            vec![cpus[0]],
            "a failed pin changes nothing"
        );
    })
    .join()
    .unwrap();
}

#[test]
fn uring_config_bounds_name_the_key() {
    assert!(RingConfig::default().validate().is_ok());
    let key_of = |cfg: RingConfig| match cfg.validate() {
        Err(RingError::InvalidConfig { key, .. }) => key,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    let d = RingConfig::default;
    assert_eq!(
        key_of(RingConfig {
            entries: 1000,
            ..d()
        }),
        "entries"
    );
    assert_eq!(
        key_of(RingConfig {
            recv_buffers: 3,
            ..d()
        }),
        "recv_buffers"
    );
    assert_eq!(
        key_of(RingConfig {
            recv_buffer_bytes: 100,
            ..d()
        }),
        "recv_buffer_bytes"
    );
    let huge = RingConfig {
        recv_buffers: 32_768,
        recv_buffer_bytes: 1 << 20,
        ..d()
    };
    assert_eq!(key_of(huge), "recv_buffer_bytes");
    assert_eq!(
        key_of(RingConfig {
            send_slots: 0,
            ..d()
        }),
        "send_slots"
    );
    assert_eq!(
        key_of(RingConfig {
            entries: 8,
            send_slots: 5,
            ..d()
        }),
        "send_slots"
    );
    assert_eq!(
        key_of(RingConfig {
            send_slot_bytes: 100,
            ..d()
        }),
        "send_slot_bytes"
    );
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let err = UdpRing::new(socket, &RingConfig { entries: 3, ..d() }).unwrap_err();
    assert!(err.to_string().contains("`entries`"), "{err}");
}

#[test]
fn uring_drop_waits_for_sends_in_flight() {
    let _watchdog = watchdog(Duration::from_secs(30));
    let mut ring = ring_on("127.0.0.1:0", &test_config());
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 0..3 {
        fill_and_submit(&mut ring, rx.local_addr().unwrap(), &[payload(i, 64)], None);
    }
    // Never waited: the sends are only queued; drop submits, cancels the receive and
    // the eventfd read, and reaps everything before freeing the slots.
    let t0 = Instant::now();
    drop(ring);
    assert!(t0.elapsed() < Duration::from_secs(3));
    let mut buf = [0u8; 128];
    for i in 0..3 {
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &payload(i, 64)[..]);
    }
}

#[test]
fn uring_recvmsg_out_header_is_sixteen_bytes() {
    // The payload starts after header + name + control, as RECV_HEADER_BYTES assumes.
    let mut buf = vec![0u8; RECV_HEADER_BYTES as usize + 3];
    buf[8..12].copy_from_slice(&3u32.to_ne_bytes()); // payloadlen
    buf[RECV_HEADER_BYTES as usize..].copy_from_slice(b"abc");
    // Safety: all zeroes is an empty msghdr.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_namelen = RECV_NAME_BYTES as libc::socklen_t;
    hdr.msg_controllen = RECV_CONTROL_BYTES as _;
    let out = io_uring::types::RecvMsgOut::parse(&buf, &hdr).unwrap();
    assert_eq!(out.payload_data(), b"abc");
    assert_eq!(RECVMSG_OUT_BYTES, 16);
}

#[test]
fn uring_dual_stack_socket_serves_ipv4_peers() {
    let Ok(socket) = bind_reuseport("[::]:0".parse().unwrap(), 0, 0) else {
        eprintln!("skipped: no IPv6");
        return;
    };
    let mut ring = UdpRing::new(socket, &test_config()).unwrap();
    let port = ring.local_addr().unwrap().port();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if peer.send_to(b"ping", (Ipv4Addr::LOCALHOST, port)).is_err() {
        eprintln!("skipped: socket is IPv6-only");
        return;
    }
    let mut got = None;
    let t0 = Instant::now();
    while got.is_none() {
        assert!(t0.elapsed() < TEST_DEADLINE, "ping not received");
        ring.wait(Some(Duration::from_millis(50))).unwrap();
        ring.drain(|ev| {
            if let RingEvent::Recv {
                data,
                from,
                local_ip,
                ..
            } = ev
            {
                got = Some((data.to_vec(), from, local_ip));
            }
        })
        .unwrap();
    }
    let (data, from, local_ip) = got.unwrap();
    assert_eq!(data, b"ping");
    // The kernel reports IPv4 peers of a dual-stack socket as v4-mapped addresses.
    let mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
    assert_eq!(
        from,
        SocketAddr::new(mapped.into(), peer.local_addr().unwrap().port())
    );
    // IP_PKTINFO wins over the v4-mapped IPV6_PKTINFO.
    assert_eq!(local_ip, Some(LOOPBACK_V4));

    // Reply both to the mapped address and to the plain IPv4 one (mapped by the ring).
    for dest in [from, peer.local_addr().unwrap()] {
        let mut buf = ring.send_buffer().unwrap();
        buf.extend_from_slice(b"pong");
        buf.submit(dest, local_ip, None);
    }
    assert!(pump(&mut ring, |_| {}, |r| r.stats().sends_ok == 2));
    let mut buf = [0u8; 16];
    for _ in 0..2 {
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"pong");
        assert_eq!(from, SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
}

// ---------------------------------------------------------------------------------------
// File slots

/// Drains until `n` file operations finished (bounded).
fn file_results(ring: &mut UdpRing, n: usize) -> Vec<crate::uring::FileDone> {
    let mut done = Vec::new();
    for _ in 0..500 {
        if done.len() >= n {
            break;
        }
        ring.wait(Some(Duration::from_millis(10))).unwrap();
        ring.drain(|ev| {
            if let RingEvent::File(d) = ev {
                done.push(d);
            }
        })
        .unwrap();
    }
    assert_eq!(done.len(), n, "file operations did not finish in time");
    done
}

#[test]
fn durable_writes_land_at_their_offsets_and_syncs_report_theirs() {
    use crate::uring::FileOpKind;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg");
    let file = std::sync::Arc::new(
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap(),
    );
    let mut ring = ring_on("127.0.0.1:0", &test_config());
    ring.submit_file(
        file.clone(),
        FileOpKind::DurableWrite,
        0,
        b"hello ".to_vec(),
        0,
        1,
    )
    .unwrap();
    ring.submit_file(
        file.clone(),
        FileOpKind::DurableWrite,
        6,
        // The first two bytes are skipped (as a direct write's alignment slack is).
        b"..world".to_vec(),
        2,
        2,
    )
    .unwrap();
    let dirf = std::sync::Arc::new(std::fs::File::open(dir.path()).unwrap());
    ring.submit_file(dirf, FileOpKind::Sync, 0, Vec::new(), 0, 3)
        .unwrap();
    let mut done = file_results(&mut ring, 3);
    done.sort_by_key(|d| d.token);
    assert!(done[0].is_complete(6) && done[1].is_complete(5), "{done:?}");
    // A durable write's sync is part of the write (RWF_DSYNC): no separate result.
    assert!(done[0].synced.is_none() && done[1].synced.is_none());
    assert_eq!(done[1].data, b"..world", "the buffer comes back for reuse");
    assert_eq!(done[1].skip, 2);
    assert!(matches!(done[2].synced, Some(Ok(()))));
    assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
}

#[test]
fn a_failed_durable_write_reports_its_error_and_frees_the_slot() {
    use crate::uring::FileOpKind;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro");
    std::fs::write(&path, b"x").unwrap();
    // Opened read-only: the write fails with EBADF.
    let file = std::sync::Arc::new(std::fs::File::open(&path).unwrap());
    let cfg = RingConfig {
        file_slots: 1,
        ..test_config()
    };
    let mut ring = ring_on("127.0.0.1:0", &cfg);
    ring.submit_file(file.clone(), FileOpKind::DurableWrite, 0, vec![1; 8], 0, 9)
        .unwrap();
    assert!(!ring.file_slot_free(), "one slot, in flight");
    assert!(ring
        .submit_file(file.clone(), FileOpKind::Write, 0, vec![2; 8], 0, 10)
        .is_err());
    let done = file_results(&mut ring, 1);
    assert_eq!(done[0].token, 9);
    assert_eq!(
        done[0].written.as_ref().unwrap_err().raw_os_error(),
        Some(libc::EBADF)
    );
    assert!(done[0].synced.is_none());
    assert!(!done[0].is_complete(8));
    assert!(ring.file_slot_free(), "the slot is free again");
}
