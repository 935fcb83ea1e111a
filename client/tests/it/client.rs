//! The client against a tiny test-only quinn server (tests/common), all on loopback.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_client::ServerTrust;
use courier_client::{Client, ClientConfig, ClientError, OutgoingMessage, Retried};
use courier_pipeline::wire::{code, LogPosition, Reason, Recipient, Status};
use courier_testkit::fake::{Options, TestServer, POISON, RETRY_AFTER_MS, TOKEN};

const TEST_TIMEOUT: Duration = Duration::from_secs(20);

async fn bounded<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .expect("test body timed out")
}

fn config(server: &TestServer, token: &str, streams: usize, in_flight: usize) -> ClientConfig {
    ClientConfig {
        server: server.addr,
        server_name: "localhost".into(),
        token: token.into(),
        trust: ServerTrust::Pinned(server.cert.clone()),
        streams,
        batches_in_flight_per_stream: in_flight,
    }
}

fn msg(client_id: u64, payload: &'static [u8]) -> OutgoingMessage {
    OutgoingMessage {
        client_id,
        recipient: Recipient::parse(b"+15550001234").unwrap(),
        payload: Bytes::from_static(payload),
    }
}

#[tokio::test]
async fn authenticates_with_pinned_certificate_and_keeps_welcome() {
    bounded(async {
        let server = TestServer::start(Options::default());
        let client = Client::connect(&config(&server, TOKEN, 2, 2))
            .await
            .unwrap();
        assert_eq!(client.welcome(), Options::default().welcome);
        let statuses = client.submit(vec![msg(1, b"hello")]).await.unwrap();
        assert!(
            matches!(statuses[..], [Status::Accepted(_)]),
            "{statuses:?}"
        );
        client.close().await;
        assert!(matches!(
            client.submit(vec![msg(2, b"x")]).await,
            Err(ClientError::Closed)
        ));
    })
    .await
}

#[tokio::test]
async fn insecure_loopback_trust_connects() {
    bounded(async {
        let server = TestServer::start(Options::default());
        let mut cfg = config(&server, TOKEN, 1, 1);
        cfg.trust = ServerTrust::InsecureLoopback;
        let client = Client::connect(&cfg).await.unwrap();
        client.close().await;
    })
    .await
}

#[tokio::test]
async fn a_different_pinned_certificate_is_refused() {
    bounded(async {
        let server = TestServer::start(Options::default());
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .unwrap()
            .cert
            .der()
            .clone();
        let mut cfg = config(&server, TOKEN, 1, 1);
        cfg.trust = ServerTrust::Pinned(other);
        let err = Client::connect(&cfg).await.unwrap_err();
        assert!(matches!(err, ClientError::ConnectionLost(_)), "{err:?}");
    })
    .await
}

#[tokio::test]
async fn bad_token_is_unauthorized_and_not_shown() {
    bounded(async {
        let server = TestServer::start(Options::default());
        let err = Client::connect(&config(&server, "c1.1.wrong-secret", 1, 1))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Unauthorized), "{err:?}");
        assert!(!format!("{err} {err:?}").contains("wrong-secret"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_pipelined_batches_resolve_with_their_own_statuses() {
    bounded(async {
        let server = TestServer::start(Options::default());
        let client = Arc::new(
            Client::connect(&config(&server, TOKEN, 4, 8))
                .await
                .unwrap(),
        );
        let mut tasks = tokio::task::JoinSet::new();
        for b in 0..200u64 {
            let client = client.clone();
            tasks.spawn(async move {
                // Every 7th message has an empty payload, which the server rejects.
                let batch: Vec<OutgoingMessage> = (0..5)
                    .map(|k| b * 10 + k)
                    .map(|id| msg(id, if id % 7 == 0 { b"" } else { b"payload" }))
                    .collect();
                let ids: Vec<u64> = batch.iter().map(|m| m.client_id).collect();
                (ids, client.submit(batch).await)
            });
        }
        let mut positions = HashSet::new();
        let mut resolved = 0;
        while let Some(done) = tasks.join_next().await {
            let (ids, result) = done.unwrap();
            let statuses = result.unwrap();
            assert_eq!(statuses.len(), ids.len());
            for (id, status) in ids.iter().zip(&statuses) {
                if id % 7 == 0 {
                    assert_eq!(
                        *status,
                        Status::Rejected(Reason::PayloadTooLarge),
                        "id {id}"
                    );
                } else {
                    let expected = server.state.positions.lock().unwrap()[id];
                    assert_eq!(*status, Status::Accepted(LogPosition(expected)), "id {id}");
                    assert!(
                        positions.insert(expected),
                        "position {expected} given twice"
                    );
                }
            }
            resolved += 1;
        }
        assert_eq!(resolved, 200);
        assert_eq!(server.state.submits(), 200);
        // Batches were spread over several streams, not funnelled through one.
        let streams: HashSet<u64> = server
            .state
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.stream)
            .collect();
        assert_eq!(streams.len(), 4, "{streams:?}");
        client.close().await;
    })
    .await
}

#[tokio::test]
async fn submit_with_retry_turns_throttled_into_accepted() {
    bounded(async {
        let server = TestServer::start(Options {
            throttle_first: true,
            ..Options::default()
        });
        let client = Client::connect(&config(&server, TOKEN, 1, 2))
            .await
            .unwrap();
        // Plain submit shows the throttling.
        let first = client.submit(vec![msg(1, b"a")]).await.unwrap();
        assert_eq!(
            first,
            vec![Status::Throttled {
                retry_after_ms: RETRY_AFTER_MS
            }]
        );
        // id 1 is known now (accepted at once); 2..=4 are throttled once, then accepted.
        let batch = vec![msg(2, b"b"), msg(1, b"a"), msg(3, b"c"), msg(4, b"")];
        let t0 = Instant::now();
        let statuses = client.submit_with_retry(batch, 3).await.unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(RETRY_AFTER_MS.into()));
        let positions = server.state.positions.lock().unwrap().clone();
        assert_eq!(
            statuses,
            vec![
                Status::Accepted(LogPosition(positions[&2])),
                Status::Accepted(LogPosition(positions[&1])),
                Status::Accepted(LogPosition(positions[&3])),
                Status::Rejected(Reason::PayloadTooLarge),
            ]
        );
        // One plain submit, then two rounds of the retrying one.
        assert_eq!(server.state.submits(), 3);
        // A single attempt leaves the throttled status in place.
        let once = client
            .submit_with_retry(vec![msg(9, b"z")], 1)
            .await
            .unwrap();
        assert!(matches!(once[..], [Status::Throttled { .. }]));
        // The rounds say which messages were throttled before their last status.
        let rounds = client
            .submit_with_retry_rounds(vec![msg(10, b"y"), msg(2, b"b")], 3)
            .await
            .unwrap();
        let positions = server.state.positions.lock().unwrap().clone();
        assert_eq!(
            rounds,
            vec![
                Retried {
                    status: Status::Accepted(LogPosition(positions[&10])),
                    rounds: 2
                },
                Retried {
                    status: Status::Accepted(LogPosition(positions[&2])),
                    rounds: 1
                },
            ]
        );
        client.close().await;
    })
    .await
}

#[tokio::test]
async fn batches_over_the_welcome_bounds_are_refused_before_sending() {
    bounded(async {
        let server = TestServer::start(Options::default());
        let client = Client::connect(&config(&server, TOKEN, 1, 1))
            .await
            .unwrap();
        let w = client.welcome();
        let too_many: Vec<_> = (0..u64::from(w.batch_messages_max) + 1)
            .map(|i| msg(i, b"x"))
            .collect();
        assert!(matches!(
            client.submit(too_many).await,
            Err(ClientError::BatchTooLarge { count: 65, max: 64 })
        ));
        let big = OutgoingMessage {
            payload: Bytes::from(vec![0u8; w.payload_bytes_max as usize + 1]),
            ..msg(1, b"")
        };
        assert!(matches!(
            client.submit(vec![msg(0, b"ok"), big]).await,
            Err(ClientError::PayloadTooLarge { index: 1, .. })
        ));
        assert!(matches!(
            client.submit(vec![]).await,
            Err(ClientError::EmptyBatch)
        ));
        assert_eq!(server.state.submits(), 0, "nothing reached the server");
        // The client is still usable.
        assert!(client.submit(vec![msg(5, b"ok")]).await.is_ok());
        assert_eq!(server.state.submits(), 1);
        client.close().await;
    })
    .await
}

#[tokio::test]
async fn a_stream_reset_fails_only_that_streams_pending_batches() {
    bounded(async {
        // All six SUBMITs reach the server before it answers any, so each one's stream
        // is on record when the poisoned stream is reset.
        let server = TestServer::start(Options {
            barrier: Some(6),
            ..Options::default()
        });
        let client = Client::connect(&config(&server, TOKEN, 2, 4))
            .await
            .unwrap();
        let b = |id: u64| vec![msg(id, b"x")];
        let (r0, r1, r2, r3, r4, r5) = tokio::join!(
            client.submit(vec![msg(POISON, b"x")]),
            client.submit(b(1)),
            client.submit(b(2)),
            client.submit(b(3)),
            client.submit(b(4)),
            client.submit(b(5)),
        );
        let results = [r0, r1, r2, r3, r4, r5];
        let ids = [POISON, 1, 2, 3, 4, 5];
        let arrivals = server.state.arrivals.lock().unwrap().clone();
        let stream_of = |id: u64| {
            arrivals
                .iter()
                .find(|a| a.client_ids == [id])
                .map(|a| a.stream)
                .expect("every batch arrived")
        };
        let poisoned = stream_of(POISON);
        let first_on_poisoned = arrivals.iter().find(|a| a.stream == poisoned).unwrap();
        assert_eq!(first_on_poisoned.client_ids, [POISON], "precondition");
        let mut failed_with_poison = 0;
        let mut ok_elsewhere = 0;
        for (id, result) in ids.iter().zip(&results) {
            if stream_of(*id) == poisoned {
                match result {
                    Err(ClientError::StreamReset { code: c }) => {
                        assert_eq!(*c, u64::from(code::MALFORMED_FRAME));
                    }
                    other => panic!("batch {id} on the reset stream: {other:?}"),
                }
                failed_with_poison += 1;
            } else {
                assert!(
                    matches!(result.as_deref(), Ok([Status::Accepted(_)])),
                    "batch {id} elsewhere: {result:?}"
                );
                ok_elsewhere += 1;
            }
        }
        assert!(
            failed_with_poison >= 2,
            "a batch besides the poison was pending there"
        );
        assert!(ok_elsewhere >= 2);
        // The stream was replaced: submits keep working on every lane.
        let (a, b2, c, d) = tokio::join!(
            client.submit(b(10)),
            client.submit(b(11)),
            client.submit(b(12)),
            client.submit(b(13)),
        );
        for r in [a, b2, c, d] {
            assert!(matches!(r.as_deref(), Ok([Status::Accepted(_)])), "{r:?}");
        }
        let streams: HashSet<u64> = server
            .state
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.stream)
            .collect();
        assert_eq!(streams.len(), 3, "two first streams and one replacement");
        client.close().await;
    })
    .await
}
