//! What quinn-proto spends packing a stream's data into packets, by how the data was
//! handed to it: a chunk per DELIVER head and another per payload (as the server did
//! before 8f0381d), or whole frames copied into 64 KiB blocks (as it does now).
//!
//! quinn-proto finds the bytes of every stream frame it packs by walking the stream's
//! unacknowledged chunks from the oldest one (`SendBuffer::get`), so the cost per packet
//! grows with the chunks in flight. Here a client connection (in memory, no sockets)
//! writes `in_flight` bytes of DELIVER-sized frames (54-byte head, 1,024-byte payload) to
//! one stream and packs all of them into packets with nothing acknowledged: the whole
//! amount in flight at once, as over a link whose round trip holds that much. Congestion
//! and flow control are opened wide so that only the packing is measured.
//!
//! - `quinn_send/chunks_per_frame/in_flight=N`: two chunks per frame;
//! - `quinn_send/blocks_64k/in_flight=N`: the same bytes in 64 KiB chunks.
//!
//! Throughput is in frames; each iteration also writes the frames (a copy into blocks
//! for the second), so the figure is the whole cost of handing them to quinn and packing.
//!
//! Run: `cargo bench --bench quinn_send -- --warm-up-time 1 --measurement-time 3`

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use quinn_proto::congestion::NewRenoConfig;
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
    ServerConfig, TransportConfig, VarInt,
};

const HEAD_BYTES: usize = 54;
const PAYLOAD_BYTES: usize = 1024;
const BLOCK_BYTES: usize = 64 * 1024;
const WIDE: u64 = 1 << 30;

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    let mut cc = NewRenoConfig::default();
    cc.initial_window(WIDE);
    t.congestion_controller_factory(Arc::new(cc))
        .send_window(WIDE)
        .receive_window(VarInt::from_u64(WIDE).expect("fits"))
        .stream_receive_window(VarInt::from_u64(WIDE).expect("fits"))
        .max_concurrent_uni_streams(VarInt::from_u32(16));
    Arc::new(t)
}

struct Pair {
    client: Endpoint,
    server: Endpoint,
    conn: (ConnectionHandle, Connection),
    server_conn: Option<(ConnectionHandle, Connection)>,
    now: Instant,
}

const CLIENT_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40001);
const SERVER_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40002);

impl Pair {
    /// A connected client and server, the handshake pumped in memory.
    fn connected() -> Pair {
        let cert = rcgen::generate_simple_self_signed(vec!["bench".into()]).expect("a cert");
        let der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()),
        );
        let mut server_config =
            ServerConfig::with_single_cert(vec![der.clone()], key).expect("server config");
        server_config.transport_config(transport());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("the bench's own cert");
        let mut client_config =
            ClientConfig::with_root_certificates(Arc::new(roots)).expect("client config");
        client_config.transport_config(transport());
        let endpoint = Arc::new(EndpointConfig::default());
        let mut client = Endpoint::new(endpoint.clone(), None, true, None);
        let server = Endpoint::new(endpoint, Some(Arc::new(server_config)), true, None);
        let now = Instant::now();
        let conn = client
            .connect(now, client_config, SERVER_ADDR, "bench")
            .expect("connect");
        let mut pair = Pair {
            client,
            server,
            conn,
            server_conn: None,
            now,
        };
        // Bounded: a handshake takes a few round trips.
        for _ in 0..50 {
            pair.pump();
            if !pair.conn.1.is_handshaking()
                && pair
                    .server_conn
                    .as_ref()
                    .is_some_and(|(_, c)| !c.is_handshaking())
            {
                // Let the last handshake packets (and the stream limits) settle.
                for _ in 0..5 {
                    pair.pump();
                }
                return pair;
            }
        }
        panic!("the in-memory handshake did not complete");
    }

    /// One round: the client's packets to the server and the server's back.
    fn pump(&mut self) {
        self.now += Duration::from_millis(1);
        let mut buf = Vec::new();
        while let Some(t) = self.conn.1.poll_transmit(self.now, 1, &mut buf) {
            let data = BytesMut::from(&buf[..t.size]);
            buf.clear();
            match self
                .server
                .handle(self.now, CLIENT_ADDR, None, None, data, &mut Vec::new())
            {
                Some(DatagramEvent::NewConnection(incoming)) => {
                    let accepted = self
                        .server
                        .accept(incoming, self.now, &mut Vec::new(), None)
                        .expect("accept");
                    self.server_conn = Some(accepted);
                }
                Some(DatagramEvent::ConnectionEvent(_, ev)) => {
                    if let Some((_, c)) = self.server_conn.as_mut() {
                        c.handle_event(ev);
                    }
                }
                Some(DatagramEvent::Response(_)) | None => {}
            }
        }
        drain_events(&mut self.conn, &mut self.client);
        if let Some(server_conn) = self.server_conn.as_mut() {
            drain_events(server_conn, &mut self.server);
            let c = &mut server_conn.1;
            while let Some(t) = c.poll_transmit(self.now, 1, &mut buf) {
                let data = BytesMut::from(&buf[..t.size]);
                buf.clear();
                if let Some(DatagramEvent::ConnectionEvent(_, ev)) =
                    self.client
                        .handle(self.now, SERVER_ADDR, None, None, data, &mut Vec::new())
                {
                    self.conn.1.handle_event(ev);
                }
            }
        }
        drain_events(&mut self.conn, &mut self.client);
    }
}

/// A connection's application events dropped, its endpoint events handed to its
/// endpoint (and the endpoint's answers back).
fn drain_events((ch, c): &mut (ConnectionHandle, Connection), e: &mut Endpoint) {
    while c.poll().is_some() {}
    while let Some(ev) = c.poll_endpoint_events() {
        if let Some(back) = e.handle_event(*ch, ev) {
            c.handle_event(back);
        }
    }
}

/// The chunks of `frames` DELIVER-sized frames: two per frame, or copied into blocks.
fn chunks(frames: usize, blocks: bool, payload: &Bytes, head: &[u8]) -> Vec<Bytes> {
    if !blocks {
        let mut out = Vec::with_capacity(2 * frames);
        for _ in 0..frames {
            out.push(Bytes::copy_from_slice(head));
            out.push(payload.clone());
        }
        return out;
    }
    let mut out = Vec::new();
    let mut block = BytesMut::with_capacity(BLOCK_BYTES);
    for _ in 0..frames {
        if block.capacity() - block.len() < HEAD_BYTES + PAYLOAD_BYTES {
            out.push(block.split().freeze());
            block.reserve(BLOCK_BYTES);
        }
        block.extend_from_slice(head);
        block.extend_from_slice(payload);
    }
    out.push(block.freeze());
    out
}

/// Writes `frames` frames to a new stream and packs every byte into packets; returns the
/// packets.
fn send_all(pair: &mut Pair, frames: usize, blocks: bool, payload: &Bytes, head: &[u8]) -> usize {
    let conn = &mut pair.conn.1;
    let id = conn.streams().open(Dir::Uni).expect("a stream");
    let mut parts = chunks(frames, blocks, payload, head);
    let written = conn
        .send_stream(id)
        .write_chunks(&mut parts)
        .expect("the windows are open");
    assert_eq!(written.bytes, frames * (HEAD_BYTES + PAYLOAD_BYTES));
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut packets = 0;
    // Bounded: every packet carries stream data until the stream is sent.
    while conn.poll_transmit(pair.now, 1, &mut buf).is_some() {
        packets += 1;
        buf.clear();
    }
    packets
}

fn bench(c: &mut Criterion) {
    let payload = Bytes::from(vec![0x5a; PAYLOAD_BYTES]);
    let head = [0x11u8; HEAD_BYTES];
    let mut g = c.benchmark_group("quinn_send");
    for in_flight in [256 * 1024, 1024 * 1024, 4 * 1024 * 1024] {
        let frames = in_flight / (HEAD_BYTES + PAYLOAD_BYTES);
        g.throughput(Throughput::Elements(frames as u64));
        for (name, blocks) in [("chunks_per_frame", false), ("blocks_64k", true)] {
            g.bench_function(format!("{name}/in_flight={in_flight}"), |b| {
                b.iter_batched(
                    Pair::connected,
                    |mut pair| {
                        let packets = send_all(&mut pair, frames, blocks, &payload, &head);
                        assert!(packets >= frames * (HEAD_BYTES + PAYLOAD_BYTES) / 1500);
                        pair
                    },
                    BatchSize::PerIteration,
                );
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
