//! `courier_client::send` against the fake server of courier-testkit (which can
//! throttle and reject on demand): retries, counts, the state file. (`courier send` as a
//! binary against a real server is tested in the root package.)

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use courier_client::send::{self, exit_code, SendOptions};
use courier_client::ClientConfig;
use courier_client::ServerTrust;
use courier_testkit::sendfile::{write_file, Msg};

fn state_ids(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

/// Against the throttling test server: messages throttled once are retried after the
/// retry-after and counted as throttled-then-accepted; with a single round they stay
/// throttled, are listed in the summary and kept out of the state file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_messages_are_retried_and_counted() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let server = courier_testkit::fake::TestServer::start(courier_testkit::fake::Options {
            throttle_first: true,
            ..courier_testkit::fake::Options::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.jsonl");
        let sent = write_file(&file, 10);
        let options = |attempts: u32, state: &str| SendOptions {
            file: file.clone(),
            state: dir.path().join(state),
            client: ClientConfig {
                server: server.addr,
                server_name: "localhost".into(),
                token: courier_testkit::fake::TOKEN.into(),
                trust: ServerTrust::Pinned(server.cert.clone()),
                streams: 2,
                batches_in_flight_per_stream: 2,
            },
            batch_messages_max: 3,
            attempts,
            quiet: true,
            delivery: None,
        };

        // One round only: every message comes back throttled and stays so.
        let once = send::send(&options(1, "once.acked")).await.unwrap();
        assert_eq!((once.still_throttled, once.accepted), (10, 0));
        assert_eq!(once.exit_code(), exit_code::NOT_ALL_ACCEPTED);
        assert_eq!(once.not_accepted.len(), 10);
        let listed: BTreeSet<u64> = once.not_accepted.iter().map(|n| n.id).collect();
        assert_eq!(listed, sent.keys().copied().collect());
        assert!(state_ids(&dir.path().join("once.acked")).is_empty());

        // Seen once now, so the next round takes them; a fresh file's ids would be
        // throttled first. Use a second file with new ids to see both at once.
        let file2 = dir.path().join("m2.jsonl");
        let text: String = (1..=10)
            .map(|i| {
                let mut m = Msg::new(i);
                m.id = Some(500 + i);
                m.line() + "\n"
            })
            .collect();
        std::fs::write(&file2, text).unwrap();
        let mut opts = options(5, "m2.acked");
        opts.file = file2;
        let retried = send::send(&opts).await.unwrap();
        assert_eq!(retried.accepted, 10, "{retried:?}");
        assert_eq!(retried.throttled_then_accepted, 10, "{retried:?}");
        assert_eq!(retried.exit_code(), exit_code::OK);
        let mut ids = state_ids(&dir.path().join("m2.acked"));
        ids.sort_unstable();
        assert_eq!(ids, (501..=510).collect::<Vec<u64>>());
        let mut out = Vec::new();
        retried.print(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == ["throttled_then_accepted", "10"]),
            "{text}"
        );
    })
    .await
    .expect("test timed out");
}

/// Against a test server that rejects some ids: they are counted by reason, listed by
/// line and id in the summary, kept out of the state file, and the exit status is 1; a
/// rerun sends only them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_messages_are_listed_not_recorded_and_resent_on_rerun() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let server = courier_testkit::fake::TestServer::start(courier_testkit::fake::Options {
            reject_from: Some(1000),
            ..courier_testkit::fake::Options::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.jsonl");
        // Every third message has id 1000 + line: those are rejected.
        let sent = write_file(&file, 12);
        let rejected: BTreeSet<u64> = sent.keys().copied().filter(|&id| id >= 1000).collect();
        assert_eq!(rejected.len(), 4);
        let opts = SendOptions {
            file: file.clone(),
            state: send::default_state_path(&file),
            client: ClientConfig {
                server: server.addr,
                server_name: "localhost".into(),
                token: courier_testkit::fake::TOKEN.into(),
                trust: ServerTrust::Pinned(server.cert.clone()),
                streams: 1,
                batches_in_flight_per_stream: 3,
            },
            batch_messages_max: 5,
            attempts: 3,
            quiet: true,
            delivery: None,
        };
        let s = send::send(&opts).await.unwrap();
        assert_eq!((s.accepted, s.rejected_total()), (8, 4), "{s:?}");
        assert_eq!(s.rejected.get("sender_paused"), Some(&4));
        assert_eq!(s.exit_code(), exit_code::NOT_ALL_ACCEPTED);
        let listed: BTreeSet<u64> = s.not_accepted.iter().map(|n| n.id).collect();
        assert_eq!(listed, rejected);
        // The file has a blank line after line 5: message 9 is on line 10 (id 1010).
        assert!(s.not_accepted.iter().any(|n| n.line == 10 && n.id == 1010));
        let state: BTreeSet<u64> = state_ids(&opts.state).into_iter().collect();
        assert_eq!(state.len(), 8);
        assert!(state.is_disjoint(&rejected));
        let mut out = Vec::new();
        s.print(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("not accepted: line 10 id 1010: rejected (sender_paused)"),
            "{text}"
        );

        // A rerun sends only the rejected ones again.
        let before = server.state.arrivals.lock().unwrap().len();
        let again = send::send(&opts).await.unwrap();
        assert_eq!((again.skipped, again.to_send), (8, 4));
        let resent: BTreeSet<u64> = server.state.arrivals.lock().unwrap()[before..]
            .iter()
            .flat_map(|a| a.client_ids.clone())
            .collect();
        assert_eq!(resent, rejected);
    })
    .await
    .expect("test timed out");
}
