//! `courier_client::send` against the fake server of courier-testkit (which can
//! throttle and reject on demand): retries, counts, the state file. (`courier send` as a
//! binary against a real server is tested in the root package.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use courier_client::send::{self, exit_code, SendOptions};
use courier_client::ClientConfig;
use courier_client::ServerTrust;

/// Every payload in these files starts with it; it must never show in any output.
const MARKER: &str = "SECRET-BODY-";

#[derive(Debug, Clone)]
struct Msg {
    id: Option<u64>,
    recipient: String,
    payload: Vec<u8>,
    base64: bool,
}

impl Msg {
    fn new(i: u64) -> Msg {
        Msg {
            id: None,
            // Distinct recipients, fewer than the small profile's surge threshold.
            recipient: format!("+4930{:07}", 2_718_281 + i * 37),
            payload: format!("{MARKER}{i}-meet at the back door").into_bytes(),
            base64: false,
        }
    }

    fn line(&self) -> String {
        let id = self
            .id
            .map_or(String::new(), |id| format!(r#""id": {id}, "#));
        let payload = if self.base64 {
            format!(r#""payload_b64": "{}""#, b64(&self.payload))
        } else {
            format!(
                r#""payload": "{}""#,
                std::str::from_utf8(&self.payload).unwrap()
            )
        };
        format!(r#"{{{id}"recipient": "{}", {payload}}}"#, self.recipient)
    }
}

/// Standard base64 with padding (a test-side encoder, so the test does not trust the
/// decoder it checks).
fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let v = u32::from(chunk[0]) << 16
            | u32::from(*chunk.get(1).unwrap_or(&0)) << 8
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= n {
                out.push(A[(v >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A file of `n` messages: every third with an explicit id (1000 + line), every fourth
/// in base64 with bytes that are not UTF-8, a blank line after the fifth. Returns the
/// messages by client id.
fn write_file(path: &Path, n: u64) -> BTreeMap<u64, Msg> {
    let mut text = String::new();
    let mut by_id = BTreeMap::new();
    let mut line = 0;
    for i in 1..=n {
        line += 1;
        let mut m = Msg::new(i);
        if i % 3 == 0 {
            m.id = Some(1000 + line);
        }
        if i % 4 == 0 {
            m.base64 = true;
            m.payload.extend_from_slice(&[0, 0xff, 0xfe, b'\n']);
        }
        text.push_str(&m.line());
        text.push('\n');
        by_id.insert(m.id.unwrap_or(line), m);
        if i == 5 {
            text.push_str("   \n");
            line += 1;
        }
    }
    std::fs::write(path, text).unwrap();
    by_id
}

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
