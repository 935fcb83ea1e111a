//! Whole servers on loopback: io_uring shards, QUIC, the client library.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use courier::serve::Running;
use courier_client::ServerTrust;
use courier_client::{Client, ClientConfig, ClientError, OutgoingMessage};
use courier_pipeline::registry::Registry;
use courier_pipeline::wire::{self, code, Frame, FrameDecoder, Recipient, Status, WireLimits};
use courier_testkit::server::{self, Setup};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

struct TestServer {
    running: Option<Running>,
    token: String,
    _dir: tempfile::TempDir,
}

impl TestServer {
    fn start(shards: u32) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = Registry::default();
        // These tests are about ingest: the detector is tested in detect_e2e.
        let token = server::add_exempt(&mut registry, "test sender", &[3u8; 32]);
        let running = server::start(dir.path(), Setup::new(shards, registry));
        TestServer {
            running: Some(running),
            token,
            _dir: dir,
        }
    }

    fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    fn client_config(&self, token: &str) -> ClientConfig {
        ClientConfig {
            server: self.running().local_addr(),
            server_name: "localhost".into(),
            token: token.into(),
            trust: ServerTrust::Pinned(self.running().certificate().clone()),
            streams: 4,
            batches_in_flight_per_stream: 4,
        }
    }

    fn stop(mut self) -> Vec<courier_pipeline::server::ServerStats> {
        let r = self.running.take().unwrap();
        r.shutdown();
        r.join().unwrap()
    }
}

fn recipient(i: u64) -> Recipient {
    Recipient::parse(format!("+1555{:07}", i % 10_000_000).as_bytes()).unwrap()
}

fn batch(first_id: u64, n: u64, size: usize) -> Vec<OutgoingMessage> {
    (first_id..first_id + n)
        .map(|id| OutgoingMessage {
            client_id: id,
            recipient: recipient(id),
            payload: Bytes::from(vec![b'p'; size]),
        })
        .collect()
}

/// Submits `batches` batches at once (pipelined) and returns every status in order.
async fn submit_many(
    client: &Arc<Client>,
    batches: u64,
    per_batch: u64,
    first: u64,
) -> Vec<Status> {
    let handles: Vec<_> = (0..batches)
        .map(|b| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .submit(batch(first + b * per_batch, per_batch, 100))
                    .await
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.extend(h.await.expect("task ran").expect("batch answered"));
    }
    out
}

fn assert_all_accepted_unique(statuses: &[Status]) {
    let mut seen = HashSet::new();
    for s in statuses {
        match s {
            Status::Accepted(p) => assert!(seen.insert(*p), "position {p:?} given twice"),
            other => panic!("expected accepted, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batches_are_all_accepted_with_unique_positions() {
    let server = TestServer::start(2);
    let cfg = server.client_config(&server.token);
    tokio::time::timeout(TEST_TIMEOUT, async {
        let client = Arc::new(Client::connect(&cfg).await.unwrap());
        let statuses = submit_many(&client, 300, 32, 0).await;
        assert_eq!(statuses.len(), 300 * 32);
        assert_all_accepted_unique(&statuses);
        client.close().await;
    })
    .await
    .expect("test timed out");
    let stats = server.stop();
    let batches: u64 = stats.iter().map(|s| s.batches_in).sum();
    assert_eq!(batches, 300);
}

/// The kernel's hash alone puts eight connections on two shards four and four only 70
/// times in 256; placement does it every time, and each connection's later datagrams reach
/// the shard it was placed on (they carry on to acks without forwarding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_placed_evenly_over_the_shards() {
    let server = TestServer::start(2);
    let cfg = server.client_config(&server.token);
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(Arc::new(Client::connect(&cfg).await.unwrap()));
            // The shard publishes its live count on its next turn.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while server.running().shard_connections().iter().sum::<u64>() < 8 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "connections not counted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.running().shard_connections(), [4, 4]);
        let forwarded_before = server.running().totals().forwarded;
        for (i, c) in clients.iter().enumerate() {
            let statuses = submit_many(c, 20, 16, i as u64 * 1000).await;
            assert_eq!(statuses.len(), 20 * 16);
            assert_all_accepted_unique(&statuses);
        }
        assert_eq!(
            server.running().totals().forwarded,
            forwarded_before,
            "the kernel steers established connections' datagrams to their shard"
        );
        for c in clients {
            c.close().await;
        }
    })
    .await
    .expect("test timed out");
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_is_refused_with_unauthorized() {
    let server = TestServer::start(1);
    let mut wrong = server.token.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    let cfg = server.client_config(&wrong);
    let r = tokio::time::timeout(TEST_TIMEOUT, Client::connect(&cfg))
        .await
        .expect("test timed out");
    assert!(matches!(r, Err(ClientError::Unauthorized)), "{r:?}");
    let stats = server.stop();
    assert_eq!(stats.iter().map(|s| s.auth_failures).sum::<u64>(), 1);
    assert_eq!(stats.iter().map(|s| s.batches_in).sum::<u64>(), 0);
}

/// A raw connection that speaks wire v1 by hand, to send what the client library never would.
struct Raw {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl Raw {
    async fn connect(server: &TestServer) -> Raw {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(courier_client::tls::client_config(
            &ServerTrust::Pinned(server.running().certificate().clone()),
        ));
        let conn = endpoint
            .connect(server.running().local_addr(), "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut tx, mut rx) = conn.open_bi().await.unwrap();
        let mut hello = BytesMut::new();
        wire::encode_hello(server.token.as_bytes(), &mut hello);
        tx.write_all(&hello).await.unwrap();
        let frame = read_frame(&mut rx).await.unwrap();
        assert!(matches!(frame, Frame::Welcome(_)), "{frame:?}");
        Raw {
            conn,
            _endpoint: endpoint,
        }
    }

    /// Sends `bytes` on a new stream and returns what came back: the frames, how the
    /// server's half ended (`Some(code)` for RESET_STREAM, `None` for FIN) and the code of
    /// the server's STOP_SENDING, if it sent one.
    async fn exchange(&self, bytes: &[u8], finish: bool) -> Exchange {
        let (mut tx, mut rx) = self.conn.open_bi().await.unwrap();
        tx.write_all(bytes).await.unwrap();
        if finish {
            tx.finish().unwrap();
        }
        let mut frames = Vec::new();
        let reset = loop {
            match read_frame(&mut rx).await {
                Ok(f) => frames.push(f),
                Err(code) => break code,
            }
        };
        let stopped = match tx.stopped().await {
            Ok(code) => code.map(|c| c.into_inner()),
            Err(_) => None,
        };
        Exchange {
            frames,
            reset,
            stopped,
        }
    }
}

#[derive(Debug)]
struct Exchange {
    frames: Vec<Frame>,
    reset: Option<u64>,
    stopped: Option<u64>,
}

/// The next frame, or Err(Some(code)) for a reset, Err(None) for a clean end.
async fn read_frame(rx: &mut quinn::RecvStream) -> Result<Frame, Option<u64>> {
    let mut d = FrameDecoder::new(WireLimits::PERMISSIVE);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = d.next_frame().expect("server sent a valid frame") {
            return Ok(f);
        }
        match rx.read(&mut buf).await {
            Ok(Some(n)) => d.push(&buf[..n]),
            Ok(None) => return Err(None),
            Err(quinn::ReadError::Reset(code)) => return Err(Some(code.into_inner())),
            Err(e) => panic!("unexpected read error {e}"),
        }
    }
}

fn submit_frame(batch_id: u64, first: u64, n: u64) -> BytesMut {
    let msgs = batch(first, n, 50);
    let out: Vec<wire::OutMessage<'_>> = msgs
        .iter()
        .map(|m| wire::OutMessage {
            client_id: m.client_id,
            recipient: &m.recipient,
            payload: &m.payload,
        })
        .collect();
    let mut b = BytesMut::new();
    wire::encode_submit(batch_id, &out, &mut b);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_its_stream_and_spares_other_connections() {
    let server = TestServer::start(2);
    let cfg = server.client_config(&server.token);
    tokio::time::timeout(TEST_TIMEOUT, async {
        let good = Arc::new(Client::connect(&cfg).await.unwrap());
        let raw = Raw::connect(&server).await;
        let good_load = submit_many(&good, 200, 16, 1_000_000);

        let hostile = async {
            // A valid batch, then an unknown frame type on the same stream: the server
            // stops reading with the documented code (STOP_SENDING), still answers the
            // batch it decoded before the bad frame, then ends its half cleanly.
            let mut bytes = submit_frame(7, 0, 4);
            bytes.put_u32_le(3);
            bytes.put_u8(0x7f);
            bytes.put_slice(b"xyz");
            let x = raw.exchange(&bytes, false).await;
            assert!(
                matches!(&x.frames[..], [Frame::Ack { batch_id: 7, statuses }] if statuses.len() == 4),
                "{x:?}"
            );
            assert_eq!(x.stopped, Some(u64::from(code::UNKNOWN_FRAME_TYPE)));
            assert_eq!(x.reset, None);

            // Oversized header: refused on the header alone.
            let mut big = BytesMut::new();
            big.put_u32_le(u32::MAX);
            big.put_u8(wire::frame_type::SUBMIT);
            let x = raw.exchange(&big, false).await;
            assert_eq!(x.stopped, Some(u64::from(code::FRAME_TOO_LARGE)), "{x:?}");

            // Truncated: the stream ends inside a frame. The client's half is finished, so
            // only RESET_STREAM can carry the code.
            let whole = submit_frame(8, 100, 2);
            let x = raw.exchange(&whole[..whole.len() - 3], true).await;
            assert!(x.frames.is_empty());
            assert_eq!(x.reset, Some(u64::from(code::TRUNCATED)), "{x:?}");

            // Invalid recipient.
            let mut bad = submit_frame(9, 200, 1);
            let at = wire::FRAME_HEADER_BYTES + wire::BATCH_HEADER_BYTES + 8 + 1;
            bad[at] = b'0'; // "+" replaced: no longer E.164
            let x = raw.exchange(&bad, false).await;
            assert_eq!(x.stopped, Some(u64::from(code::INVALID_RECIPIENT)), "{x:?}");
            assert!(x.frames.is_empty());

            // The same connection still serves a well-formed stream.
            let x = raw.exchange(&submit_frame(10, 300, 3), true).await;
            assert!(
                matches!(&x.frames[..], [Frame::Ack { batch_id: 10, statuses }] if statuses.iter().all(|s| matches!(s, Status::Accepted(_)))),
                "{x:?}"
            );
            assert_eq!((x.reset, x.stopped), (None, None), "clean end after the last ACK");
        };
        let (statuses, ()) = tokio::join!(good_load, hostile);
        assert_eq!(statuses.len(), 200 * 16);
        assert_all_accepted_unique(&statuses);
        good.close().await;
    })
    .await
    .expect("test timed out");
    let stats = server.stop();
    assert_eq!(stats.iter().map(|s| s.stream_errors).sum::<u64>(), 4);
}

/// A client that moves to a new port (a NAT rebinding) hashes to either shard; the
/// kernel's steering program still hands its datagrams to the shard that owns its
/// connection, by the connection ID, so none needs forwarding between shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_changes_address_keeps_its_connection_across_shards() {
    let server = TestServer::start(2);
    let cfg = server.client_config(&server.token);
    tokio::time::timeout(TEST_TIMEOUT, async {
        let client = Arc::new(Client::connect(&cfg).await.unwrap());
        let forwarded = server.running().totals().forwarded;
        let mut next = 0;
        // With two shards a new port hashes to the other shard about half the time: in
        // 12 moves, all but once in 4,096 runs.
        for _ in 0..12 {
            client.rebind().unwrap();
            let statuses = submit_many(&client, 10, 8, next).await;
            next += 80;
            assert_all_accepted_unique(&statuses);
        }
        assert_eq!(
            server.running().totals().forwarded,
            forwarded,
            "the kernel steers a moved client's datagrams to its connection's shard"
        );
        client.close().await;
    })
    .await
    .expect("test timed out");
    server.stop();
}
