//! The Prometheus endpoint of a real server: scraped while a normal sender and a blast
//! (paused as a fan-out surge) send, and after. The text parses as exposition format
//! 0.0.4, its counters agree with what the clients were told, the businesses show by id
//! with their billing counts and pause, and no phone number, payload, token, business
//! name or master key ever appears in it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier::store::MasterKeyText;
use courier_client::ServerTrust;
use courier_client::{Client, ClientConfig, OutgoingMessage};
use courier_pipeline::registry::{Registry, Tier};
use courier_pipeline::wire::{Reason, Recipient, Status};
use courier_testkit::server::{self, small_profile, Setup};

const MASTER_HEX: &str = "3c9e1a7b5d2f8e4a6c0b9d3f7e1a5c8b2d6f0e4a9c3b7d1f5e8a2c6b0d4f9e3a";
const STEADY_NAME: &str = "Zanzibar Metrics Bakery";
const BLAST_NAME: &str = "Quokka Blast Ltd";

/// Distinctive numbers: `+4477` and 9 digits no other test uses.
fn number(i: u64) -> Recipient {
    Recipient::parse(format!("+4477{:09}", 314_159_265 + i * 13).as_bytes()).unwrap()
}

fn number_digits(i: u64) -> String {
    format!("4477{:09}", 314_159_265 + i * 13)
}

fn payload(i: u64) -> String {
    format!("secret-metrics-payload-{i}-xyzzy")
}

fn batch(ids: std::ops::Range<u64>) -> Vec<OutgoingMessage> {
    ids.map(|i| OutgoingMessage {
        client_id: i,
        recipient: number(i),
        payload: Bytes::from(payload(i)),
    })
    .collect()
}

/// One HTTP/1.1 request; returns the status line, the headers and the body.
fn http(addr: SocketAddr, request: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).expect("the answer is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let body = body.to_string();
    let length: usize = headers
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("a content length")
        .parse()
        .unwrap();
    assert_eq!(length, body.len(), "Content-Length matches the body");
    (status.to_string(), headers.to_string(), body)
}

fn scrape(addr: SocketAddr) -> String {
    let (status, headers, body) = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("Content-Type: text/plain; version=0.0.4"),
        "{headers}"
    );
    body
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Checks the exposition format; returns the samples as (name{labels}, value).
pub(crate) fn parse(text: &str) -> Vec<(String, f64)> {
    assert!(text.ends_with('\n'), "the text ends with a newline");
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name, arg) = (parts.next(), parts.next(), parts.next());
            assert!(name.is_some_and(is_name), "bad comment line {line:?}");
            match kw {
                Some("HELP") => assert!(arg.is_some_and(|h| !h.is_empty()), "{line:?}"),
                Some("TYPE") => assert!(
                    matches!(arg, Some("counter" | "gauge" | "histogram")),
                    "{line:?}"
                ),
                _ => panic!("unknown comment line {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("labels close");
                for pair in labels.split(',') {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    assert!(is_name(k), "{line:?}");
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "{line:?}"
                    );
                    assert!(!v[1..v.len() - 1].contains(['"', '\\', '\n']), "{line:?}");
                }
                name
            }
            None => series,
        };
        assert!(is_name(name), "bad metric name in {line:?}");
        assert!(name.starts_with("courier_"), "{line:?}");
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("value not numeric: {line:?}")),
        };
        samples.push((series.to_string(), v));
    }
    samples
}

pub(crate) fn value(samples: &[(String, f64)], series: &str) -> Option<f64> {
    samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_clients_and_reveal_nothing_private() {
    let dir = tempfile::tempdir().unwrap();
    let mut profile = small_profile(2);
    profile.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let mut registry = Registry::default();
    let (steady, steady_token) = registry
        .add(STEADY_NAME, Tier::T10k, 1000, &[7; 32])
        .unwrap();
    let (blaster, blast_token) = registry
        .add(BLAST_NAME, Tier::Unlimited, 100_000, &[8; 32])
        .unwrap();
    let setup = Setup {
        profile,
        registry,
        master_key: MasterKeyText::new(MASTER_HEX.as_bytes().to_vec()).unwrap(),
    };
    let running = server::start(&dir.path().join("data"), setup);
    let metrics = running.metrics_addr().expect("metrics are on");
    assert_ne!(metrics.port(), 0, "port 0 became a real port");
    let cfg = |token: &str| ClientConfig {
        server: running.local_addr(),
        server_name: "localhost".into(),
        token: token.to_string(),
        trust: ServerTrust::Pinned(running.certificate().clone()),
        streams: 2,
        batches_in_flight_per_stream: 2,
    };

    // Other paths and methods: 404, nothing echoed.
    let (status, _, body) = http(metrics, "GET /secret-path HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert!(!body.contains("secret-path"));
    let (status, headers, _) = http(metrics, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert!(headers.contains("Allow: GET"), "{headers}");

    // A scraper runs while the traffic flows (bounded: at most 500 scrapes).
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut scrapes = Vec::new();
            while !stop.load(Ordering::Acquire) && scrapes.len() < 500 {
                scrapes.push(scrape(metrics));
                std::thread::sleep(Duration::from_millis(20));
            }
            scrapes
        })
    };

    // The normal sender: 40 messages to 40 numbers, a batch of 10 at a time.
    let c = Client::connect(&cfg(&steady_token)).await.unwrap();
    let mut statuses = Vec::new();
    let mut batches = 0;
    for k in 0..4u64 {
        statuses.extend(c.submit(batch(k * 10..k * 10 + 10)).await.unwrap());
        batches += 1;
    }
    let steady_accepted = statuses
        .iter()
        .filter(|s| matches!(s, Status::Accepted(_)))
        .count();
    assert_eq!(steady_accepted, 40, "a normal sender is never held back");
    // A resend of its first ten: answered duplicate, neither stored nor billed again.
    let resent = c.submit(batch(0..10)).await.unwrap();
    assert!(
        resent.iter().all(|s| matches!(s, Status::Duplicate(_))),
        "{resent:?}"
    );
    statuses.extend(resent);
    batches += 1;

    // The blast: 2,000 never-contacted numbers at once; the detector pauses it.
    let b = Client::connect(&cfg(&blast_token)).await.unwrap();
    for k in 0..40u64 {
        let first = 10_000 + k * 50;
        statuses.extend(b.submit(batch(first..first + 50)).await.unwrap());
        batches += 1;
    }
    assert!(
        statuses.contains(&Status::Rejected(Reason::SenderPaused)),
        "the blast was paused"
    );
    let accepted = statuses
        .iter()
        .filter(|s| matches!(s, Status::Accepted(_)))
        .count() as f64;
    let not_accepted = statuses.len() as f64 - accepted;
    let blast_accepted = accepted - steady_accepted as f64;

    // Every ACK was counted before it was sent: the totals are final now. The business
    // figures follow within about a second (the control thread's merge).
    let deadline = Instant::now() + Duration::from_secs(15);
    let last = loop {
        let text = scrape(metrics);
        let s = parse(&text);
        let steady_today = format!("courier_business_accepted_today{{business=\"{steady}\"}}");
        let blast_today = format!("courier_business_accepted_today{{business=\"{blaster}\"}}");
        let paused = format!("courier_business_paused{{business=\"{blaster}\"}}");
        if value(&s, &steady_today) == Some(steady_accepted as f64)
            && value(&s, &blast_today) == Some(blast_accepted)
            && value(&s, &paused) == Some(1.0)
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "business figures never matched the clients:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::Release);
    let mut scrapes = scraper.join().unwrap();
    assert!(!scrapes.is_empty(), "scraped while traffic flowed");
    let s = parse(&last);
    assert_eq!(value(&s, "courier_shards"), Some(2.0));
    assert_eq!(value(&s, "courier_messages_accepted_total"), Some(accepted));
    assert_eq!(
        value(&s, "courier_messages_not_accepted_total"),
        Some(not_accepted)
    );
    assert_eq!(
        value(&s, "courier_batches_acked_total"),
        Some(batches as f64)
    );
    assert_eq!(
        value(&s, "courier_ack_latency_seconds_count"),
        Some(batches as f64)
    );
    assert_eq!(
        value(&s, "courier_ack_latency_seconds_bucket{le=\"+Inf\"}"),
        Some(batches as f64)
    );
    let per_shard: f64 = (0..2)
        .map(|i| {
            value(
                &s,
                &format!("courier_shard_messages_accepted_total{{shard=\"{i}\"}}"),
            )
            .unwrap()
        })
        .sum();
    assert_eq!(per_shard, accepted, "the shards add up to the total");
    assert_eq!(value(&s, "courier_messages_duplicate_total"), Some(10.0));
    // Every accepted id is remembered (the small profile's table holds 65,536).
    assert_eq!(value(&s, "courier_idempotency_ids"), Some(accepted));
    assert_eq!(
        value(&s, "courier_idempotency_ids_capacity"),
        Some(65_536.0)
    );
    assert_eq!(value(&s, "courier_idempotency_evicted_total"), Some(0.0));
    assert!(value(&s, "courier_idempotency_oldest_unix_seconds").unwrap() > 1.7e9);
    assert!(value(&s, "courier_detect_rejected_total").unwrap() > 0.0);
    assert!(value(&s, "courier_integrity_signals_total").unwrap() >= 1.0);
    assert!(value(&s, "courier_log_appended_bytes_total").unwrap() > 0.0);
    assert!(value(&s, "courier_group_commits_total").unwrap() >= 1.0);
    assert_eq!(
        value(
            &s,
            &format!("courier_business_tier_recipients{{business=\"{steady}\"}}")
        ),
        Some(10_000.0)
    );
    assert_eq!(
        value(
            &s,
            &format!("courier_business_rating{{business=\"{steady}\",rating=\"green\"}}")
        ),
        Some(1.0)
    );

    // Nothing private in any scrape, during or after the traffic.
    scrapes.push(last);
    let token_text = [steady_token.as_str(), blast_token.as_str()];
    for text in &scrapes {
        parse(text);
        for i in (0..40).chain(10_000..12_000) {
            assert!(!text.contains(&number_digits(i)), "a phone number leaked");
            assert!(!text.contains(&payload(i)), "a payload leaked");
        }
        assert!(!text.contains("secret-metrics-payload"));
        assert!(!text.contains("4477314"), "a number prefix leaked");
        for t in token_text {
            assert!(!text.contains(t), "a token leaked");
        }
        assert!(!text.contains(MASTER_HEX), "the master key leaked");
        assert!(!text.contains(&MASTER_HEX[..16]));
        assert!(!text.contains(STEADY_NAME) && !text.contains("Zanzibar"));
        assert!(!text.contains(BLAST_NAME) && !text.contains("Quokka"));
    }

    drop((c, b));
    running.shutdown();
    running.join().unwrap();
    // Stopped with the server: nothing listens on its port. A connect to a freed
    // loopback port can pick that very port as its own source and connect to itself
    // (TCP simultaneous open), which is not a listener answering.
    match TcpStream::connect_timeout(&metrics, Duration::from_secs(1)) {
        Err(_) => {}
        Ok(s) => assert_eq!(
            s.local_addr().unwrap(),
            s.peer_addr().unwrap(),
            "something still listens on the metrics port"
        ),
    }
}

/// Delivery's metrics on a real server: hand-offs, retransmissions, outcomes by kind,
/// replies, the oldest waiting message's age and each business's event backlog (by id),
/// while a business has not yet listened and after it acknowledged everything; still no
/// number or content in any scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_metrics_count_what_the_edge_and_the_business_saw() {
    use courier_pipeline::wire::delivery::{FailReason, InboundEntry, Outcome, OutcomeEntry};
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let mut profile = small_profile(2);
        profile.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        let mut registry = Registry::default();
        let (shop, shop_token) = registry
            .add(STEADY_NAME, Tier::Unlimited, 1000, &[7; 32])
            .unwrap();
        registry.set_exempt(shop, true);
        let (edge_id, edge_token) = registry
            .add("edge", Tier::Unlimited, 1000, &[9; 32])
            .unwrap();
        registry.set_platform(edge_id, true);
        let running = server::start(
            &dir.path().join("data"),
            Setup {
                profile,
                registry,
                master_key: MasterKeyText::new(MASTER_HEX.as_bytes().to_vec()).unwrap(),
            },
        );
        let metrics = running.metrics_addr().unwrap();
        let cfg = |token: &str| courier_testkit::server::client_config(&running, token, 1, 2);
        let (edge, mut deliveries) = super::delivery_kit::DeviceEdge::connect(
            &cfg(&edge_token),
            16,
            super::delivery_kit::device_world(5),
        )
        .await
        .unwrap();
        let client = Client::connect(&cfg(&shop_token)).await.unwrap();
        let statuses = client.submit(batch(0..3)).await.unwrap();
        assert!(statuses.iter().all(|s| matches!(s, Status::Accepted(_))));
        // 0: read; 1: failed; 2: offline, then back (a retransmission).
        let mut by_id = std::collections::BTreeMap::new();
        for _ in 0..3 {
            let d = deliveries.recv().await.unwrap();
            by_id.insert(d.client_id, d);
        }
        let out = |d: &courier_pipeline::wire::delivery::Deliver, outcome| OutcomeEntry {
            message: d.message,
            outcome,
        };
        edge.outcomes(&[
            out(&by_id[&0], Outcome::Read),
            out(&by_id[&1], Outcome::Failed(FailReason::BlockedByUser)),
            out(&by_id[&2], Outcome::RetryLater),
        ])
        .await
        .unwrap();
        let waiting = scrape_until(
            metrics,
            "courier_delivery_outcomes_total{kind=\"failed\"}",
            1.0,
        )
        .await;
        // One scrape reads the shards' figures one after another while they move: the
        // pending gauge may trail the outcome counter by a scrape, so wait for it too.
        scrape_until(metrics, "courier_delivery_pending", 1.0).await;
        edge.online(&[number(2)]).await.unwrap();
        let again = deliveries.recv().await.unwrap();
        assert_eq!(again.client_id, 2);
        edge.outcomes(&[out(&again, Outcome::Delivered)])
            .await
            .unwrap();
        edge.inbound(vec![InboundEntry {
            id: 3,
            business_id: shop,
            sender: number(3),
            payload: Bytes::from(payload(3)),
        }])
        .await
        .unwrap();
        // The business has not listened yet: its events wait, by its id.
        let backlog = format!("courier_business_event_backlog{{business=\"{shop}\"}}");
        // sent, delivered, read; sent, failed; sent, delivered; the reply.
        let before = scrape_until(metrics, &backlog, 8.0).await;
        let s = parse(&before);
        for (series, v) in [
            ("courier_delivery_handoffs_total", 4.0),
            ("courier_delivery_retransmissions_total", 1.0),
            ("courier_delivery_outcomes_total{kind=\"delivered\"}", 2.0),
            ("courier_delivery_outcomes_total{kind=\"read\"}", 1.0),
            ("courier_delivery_outcomes_total{kind=\"failed\"}", 1.0),
            ("courier_delivery_outcomes_total{kind=\"expired\"}", 0.0),
            ("courier_delivery_pending", 0.0),
            ("courier_delivery_oldest_pending_age_seconds", 0.0),
            ("courier_inbound_accepted_total", 1.0),
            ("courier_events_backlog", 8.0),
            (backlog.as_str(), 8.0),
            // Sealed for the devices (issue 16): every hand-off, a copy per device.
            ("courier_e2e_replies_refused_total", 0.0),
            ("courier_e2e_bundles_refused_total", 0.0),
            ("courier_e2e_one_time_prekeys_refused_total", 0.0),
        ] {
            assert_eq!(value(&s, series), Some(v), "{series}\n{before}");
        }
        let copies = value(&s, "courier_e2e_copies_total").unwrap_or(0.0);
        let sessions = value(&s, "courier_e2e_sessions_new_total").unwrap_or(0.0);
        assert!(copies >= 4.0 && sessions >= 3.0, "{before}");
        // It listens and acknowledges everything: the backlog goes.
        let (listener, mut events) = Client::connect_with_events(&cfg(&shop_token), 8)
            .await
            .unwrap();
        let mut heard = 0;
        while heard < 8 {
            let e = events.recv().await.unwrap();
            listener.ack_events(&[e.event()]).await.unwrap();
            heard += 1;
        }
        let after = scrape_until(metrics, "courier_events_acked_total", 8.0).await;
        let after_s = parse(&after);
        assert_eq!(value(&after_s, "courier_events_backlog"), Some(0.0));
        for text in [&waiting, &before, &after] {
            for i in 0..4 {
                assert!(!text.contains(&number_digits(i)), "a phone number leaked");
                assert!(!text.contains(&payload(i)), "a payload leaked");
            }
            assert!(!text.contains(STEADY_NAME));
        }
        for c in [&client, &listener] {
            c.close().await;
        }
        edge.close().await;
        running.shutdown();
        running.join().unwrap();
    })
    .await
    .expect("test timed out");
}

/// Scrapes until `series` reads `want` (failing after 20 s); returns that scrape.
async fn scrape_until(addr: SocketAddr, series: &str, want: f64) -> String {
    scrape_until_with(addr, series, &want.to_string(), |v| v == want).await
}

/// Scrapes until `series` is present and its value passes `ok` (failing after 20 s,
/// saying it was not `wanted`); returns that scrape.
pub(crate) async fn scrape_until_with(
    addr: SocketAddr,
    series: &str,
    wanted: &str,
    ok: impl Fn(f64) -> bool,
) -> String {
    // Generous: on a loaded 2-core CI machine, with the other tests of this binary
    // running beside it, the server's answer to the edge can take seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = tokio::task::spawn_blocking(move || scrape(addr))
            .await
            .unwrap();
        let got = value(&parse(&text), series);
        if got.is_some_and(&ok) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {got:?}, not {wanted}, after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server with metrics on a free loopback port, and its metrics address.
fn metrics_server(dir: &std::path::Path) -> (courier::serve::Running, SocketAddr) {
    let mut profile = small_profile(1);
    profile.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let mut registry = Registry::default();
    registry
        .add(STEADY_NAME, Tier::Unlimited, 1000, &[7; 32])
        .unwrap();
    let running = server::start(
        &dir.join("data"),
        Setup {
            profile,
            registry,
            master_key: MasterKeyText::new(MASTER_HEX.as_bytes().to_vec()).unwrap(),
        },
    );
    let addr = running.metrics_addr().unwrap();
    (running, addr)
}

/// Sends `request` as it is and returns the status line of the answer.
fn status_of(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before it read all of an oversized request: then
    // the write fails, or the close comes as a reset after the answer. Keep what came.
    let _ = s.write_all(request);
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..1000 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    text.split("\r\n").next().unwrap_or_default().to_string()
}

/// Whether the server closed `s`: a read sees the end (or a reset) within 10 s, with no
/// answer sent. Fails when the read times out (the connection was left open).
fn closed_without_answer(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "answered instead of closed: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed by the server: {e}"),
    }
}

/// Issue 18: the old endpoint applied its 2 s timeout per read and served one connection
/// at a time, so a client trickling its request a byte at a time held it for ever and no
/// scrape got through. Now the deadline covers the whole request and a scrape is served
/// beside it.
#[test]
fn a_trickling_client_does_not_hold_up_a_scrape_and_is_closed_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (running, metrics) = metrics_server(dir.path());
    let mut slow = TcpStream::connect(metrics).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        .unwrap();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let trickler = std::thread::spawn(move || {
        // One byte each 100 ms, at most 200 of them (20 s, ten deadlines): the server
        // must close the connection long before.
        for i in 0..200 {
            if slow.write_all(b"a").is_err() {
                return (i, slow);
            }
            if i == 3 {
                let _ = sent_tx.send(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the trickling client was never closed");
    });
    sent_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the trickler started");
    // While it trickles (well inside its deadline), a scrape is answered.
    let text = scrape(metrics);
    assert!(!parse(&text).is_empty());
    assert!(
        !trickler.is_finished(),
        "the trickler was still sending during the scrape"
    );
    let (bytes, mut slow) = trickler.join().unwrap();
    assert!(bytes > 3, "closed after {bytes} bytes");
    closed_without_answer(&mut slow);
    running.shutdown();
    running.join().unwrap();
}

/// More idle connections than are served at once (they send nothing, or half a request):
/// each is closed at its deadline with no answer, and a scrape behind them is answered.
#[test]
fn idle_and_half_sent_connections_are_closed_and_a_scrape_still_gets_through() {
    let dir = tempfile::tempdir().unwrap();
    let (running, metrics) = metrics_server(dir.path());
    let mut idle: Vec<TcpStream> = (0..courier::metrics::CONNECTIONS_MAX + 4)
        .map(|i| {
            let mut s = TcpStream::connect(metrics).unwrap();
            if i % 2 == 0 {
                s.write_all(b"GET /metr").unwrap();
            }
            s
        })
        .collect();
    let text = scrape(metrics);
    assert!(text.contains("courier_shards 1"), "{text}");
    for s in &mut idle {
        closed_without_answer(s);
    }
    running.shutdown();
    running.join().unwrap();
}

/// What a bad request gets: a clear status, never the metrics, nothing echoed.
#[test]
fn bad_requests_get_clear_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (running, metrics) = metrics_server(dir.path());
    let (status, _, body) = http(metrics, "GET /metricsx HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert!(
        body.contains("GET /metrics") && !body.contains("metricsx"),
        "{body}"
    );
    for method in ["POST", "PUT", "DELETE"] {
        let (status, headers, body) = http(
            metrics,
            &format!("{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
        );
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed", "{method}");
        assert!(headers.contains("Allow: GET"), "{headers}");
        assert!(!body.contains("courier_"), "{body}");
    }
    // A request head over REQUEST_BYTES_MAX.
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.resize(courier::metrics::REQUEST_BYTES_MAX * 2, b'a');
    big.extend_from_slice(b"\r\n\r\n");
    assert_eq!(
        status_of(metrics, &big),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    // Not HTTP at all.
    assert_eq!(
        status_of(metrics, b"\x16\x03\x01 garbage\r\n\r\n"),
        "HTTP/1.1 400 Bad Request"
    );
    // Still serving.
    assert!(scrape(metrics).contains("courier_shards 1"));
    running.shutdown();
    running.join().unwrap();
}
