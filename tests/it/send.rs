//! `courier send FILE` as a sender runs it: the binary against a real server on
//! loopback (in process, io_uring shards, its log on disk), then the log read back with
//! the master key. (The library's retry accounting against the fake server is in
//! courier-client's tests.)

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use courier::serve::Running;
use courier_client::send::{self, exit_code};
use courier_pipeline::log::{Keyring, SegmentCodec, SegmentHeader};
use courier_pipeline::registry::Registry;
use courier_pipeline::seal::keys::{RecipientKey, RecipientKeys};
use courier_testkit::sendfile::{write_file, Msg, MARKER};
use courier_testkit::server::{self, Setup};

const KEY_SEED: u8 = 41;

struct Server {
    running: Option<Running>,
    registry: Registry,
    token: String,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let (registry, token) = courier_testkit::logkit::registry();
        let setup = Setup {
            master_key: courier_testkit::logkit::master_key(KEY_SEED),
            ..Setup::new(1, registry.clone())
        };
        let running = server::start(&dir.path().join("data"), setup);
        Server {
            running: Some(running),
            registry,
            token,
            dir,
        }
    }

    fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `courier send FILE --target ADDR --ca DATA/tls/cert.der --quiet EXTRA...`
    /// with the token in COURIER_TOKEN, as the README shows it.
    fn send(&self, file: &Path, extra: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_courier"))
            .arg("send")
            .arg(file)
            .arg("--target")
            .arg(self.running().local_addr().to_string())
            .arg("--ca")
            .arg(self.data().join("tls/cert.der"))
            .arg("--quiet")
            .args(extra)
            .env("COURIER_TOKEN", &self.token)
            .env("COURIER_LOG", "trace")
            .output()
            .unwrap();
        Run::new(out)
    }

    /// Every record of the log, opened: (client id, recipient, payload).
    fn log(&self) -> Vec<(u64, String, Vec<u8>)> {
        let master = courier_testkit::logkit::master_key(KEY_SEED);
        let keys =
            courier::business_keys::load_or_create(&self.data(), &master, &self.registry).unwrap();
        let business = self.registry.iter().next().unwrap().id;
        let shard = courier_testkit::logkit::shard_dir(&self.data(), 0);
        let keyring = Keyring::from_bytes(&std::fs::read(shard.join("keyring")).unwrap()).unwrap();
        let mut out = Vec::new();
        for seg in courier_testkit::logkit::segments(&self.data(), 0) {
            let bytes = std::fs::read(seg).unwrap();
            let header = SegmentHeader::decode(&bytes).unwrap();
            let key = keyring
                .data_key(&master.master_key(), header.data_key_id)
                .unwrap();
            // With the business's key: the record's user fields are under it (issue 19).
            let codec = SegmentCodec::new(header, key, courier::audit::PAYLOAD_BYTES_MAX)
                .with_field_keys(Some(
                    keys.clone() as std::sync::Arc<dyn courier_pipeline::log::FieldKeys>
                ));
            for r in codec.records(&bytes) {
                let (_, rec) = r.unwrap();
                if rec.header.kind != courier_pipeline::log::RecordKind::Message {
                    continue;
                }
                assert_eq!(rec.header.business_id, business);
                let recipient = rec.header.recipient.expect("a message has a recipient");
                let mut key = RecipientKey::zeroed();
                keys.recipient_key(business, &recipient, &mut key).unwrap();
                let mut opened = Vec::new();
                let payload = courier_pipeline::seal::open(
                    &key,
                    business,
                    &recipient,
                    rec.header.client_id,
                    &rec.payload,
                    &mut opened,
                )
                .unwrap()
                .to_vec();
                out.push((
                    rec.header.client_id,
                    recipient.as_str().to_string(),
                    payload,
                ));
            }
        }
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
            let _ = r.join();
        }
    }
}

/// A finished `courier send`.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn new(out: Output) -> Run {
        Run {
            code: out.status.code().expect("exited, not killed"),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The summary's `name value` rows.
    fn counts(&self) -> HashMap<String, u64> {
        self.stdout
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let (k, v) = (it.next()?, it.next()?);
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    fn count(&self, name: &str) -> u64 {
        *self
            .counts()
            .get(name)
            .unwrap_or_else(|| panic!("no `{name}` row in:\n{}", self.stdout))
    }

    /// Asserts that nothing from `msgs` (number digits, payload text) or the token is in
    /// the output.
    fn assert_private(&self, msgs: &[&Msg], token: &str) {
        let all = format!("{}{}", self.stdout, self.stderr);
        for m in msgs {
            assert!(
                !all.contains(&m.recipient[1..]),
                "a phone number leaked:\n{all}"
            );
        }
        assert!(!all.contains(MARKER), "a payload leaked:\n{all}");
        assert!(!all.contains(&token[5..]), "the token leaked");
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn state_ids(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

#[test]
fn a_file_is_sent_whole_into_the_log_and_a_rerun_sends_nothing() {
    let server = Server::start();
    let file = server.path("messages.jsonl");
    let sent = write_file(&file, 30);
    let run = server.send(&file, &[]);
    assert_eq!(run.code, 0, "{run}");
    for (name, want) in [
        ("messages", 30),
        ("skipped", 0),
        ("to_send", 30),
        ("accepted", 30),
        ("duplicate", 0),
        ("rejected", 0),
        ("still_throttled", 0),
        ("unacked", 0),
    ] {
        assert_eq!(run.count(name), want, "{name}: {run}");
    }
    run.assert_private(&sent.values().collect::<Vec<_>>(), &server.token);

    // The state file holds every id once; the log holds every message, intact.
    let state = send::default_state_path(&file);
    let mut ids = state_ids(&state);
    ids.sort_unstable();
    assert_eq!(ids, sent.keys().copied().collect::<Vec<_>>());
    let log = server.log();
    assert_eq!(log.len(), 30, "one record per message");
    for (id, recipient, payload) in &log {
        let m = &sent[id];
        assert_eq!(recipient, &m.recipient, "id {id}");
        assert_eq!(payload, &m.payload, "id {id}");
    }
    let batches = server.running().totals().batches;
    assert!(batches > 0);

    // A rerun skips everything and sends nothing.
    let again = server.send(&file, &[]);
    assert_eq!(again.code, 0, "{again}");
    assert_eq!(
        (
            again.count("skipped"),
            again.count("to_send"),
            again.count("accepted")
        ),
        (30, 0, 0),
        "{again}"
    );
    assert_eq!(server.running().totals().batches, batches, "no SUBMIT");
    assert_eq!(server.log().len(), 30);
    assert_eq!(state_ids(&state).len(), 30, "nothing appended");
}

#[test]
fn with_part_of_the_file_acked_only_the_rest_is_sent() {
    let server = Server::start();
    let file = server.path("messages.jsonl");
    let mut text = String::new();
    let mut all = Vec::new();
    for i in 1..=30 {
        let m = Msg::new(i);
        text.push_str(&m.line());
        text.push('\n');
        all.push(m);
    }
    std::fs::write(&file, text).unwrap();
    // A run killed after acking ids 13..=24, in the middle of writing id 25: the torn
    // `2` must not count as id 2.
    let state = server.path("progress.acked");
    let mut acked: String = (13..=24).map(|id| format!("{id}\n")).collect();
    acked.push('2');
    std::fs::write(&state, acked).unwrap();

    let run = server.send(&file, &["--state", state.to_str().unwrap(), "--batch", "4"]);
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(
        (
            run.count("messages"),
            run.count("skipped"),
            run.count("to_send")
        ),
        (30, 12, 18),
        "{run}"
    );
    assert_eq!(run.count("accepted"), 18, "{run}");
    run.assert_private(&all.iter().collect::<Vec<_>>(), &server.token);

    let logged: BTreeSet<u64> = server.log().iter().map(|(id, _, _)| *id).collect();
    let want: BTreeSet<u64> = (1..=12).chain(25..=30).collect();
    assert_eq!(logged, want, "only the ids not acked before");
    assert_eq!(server.log().len(), 18, "each once");
    let ids = state_ids(&state);
    assert_eq!(ids.len(), 30, "the torn tail was cut, not kept");
    assert_eq!(
        ids.iter().copied().collect::<BTreeSet<u64>>(),
        (1..=30).collect()
    );
}

#[test]
fn bad_lines_are_each_reported_by_number_and_nothing_is_sent() {
    let server = Server::start();
    let file = server.path("bad.jsonl");
    let good: Vec<Msg> = (1..=12).map(Msg::new).collect();
    let r = &good[0].recipient;
    let p = std::str::from_utf8(&good[0].payload).unwrap();
    let lines = [
        good[1].line(),                                                                // 1 ok
        format!(r#"{{"recipient": "{r}", "payload": "{p}""#), // 2 cut short
        format!(r#"{{"recipient": "{}", "payload": "{p}"}}"#, &r[1..]), // 3 no +
        format!(r#"{{"recipient": "{r}", "payload_b64": "{p}"}}"#), // 4 not base64
        good[2].line(),                                       // 5 ok
        format!(r#"{{"recipient": "{r}", "payload": "{p}", "payload_b64": "eA=="}}"#), // 6 both
        format!(r#"{{"recipient": "{r}"}}"#),                 // 7 neither
        format!(r#"{{"recipient": "{r}", "payload": "{p}", "to": "{r}"}}"#), // 8 unknown
        format!(r#"{{"recipient": "{r}", "payload": "{p}", "id": "{r}"}}"#), // 9 bad id
        format!(r#"["{r}", "{p}"]"#),                         // 10 not an object
        format!(r#"{{"recipient": "{r}", "payload": "{p}"}} {p}"#), // 11 trailing text
        good[3].line(),                                       // 12 ok
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let run = server.send(&file, &[]);
    assert_eq!(run.code, i32::from(exit_code::BAD_INPUT), "{run}");
    assert!(run.stderr.contains("9 bad line(s)"), "{run}");
    for (line, reason) in [
        (2, "cut short"),
        (3, "E.164"),
        (4, "base64"),
        (6, "exactly one"),
        (7, "no payload"),
        (8, "unknown field `to`"),
        (9, "`id`"),
        (10, "not a JSON object"),
        (11, "invalid JSON"),
    ] {
        let wanted = format!("line {line}: ");
        let row = run
            .stderr
            .lines()
            .find(|l| l.trim_start().starts_with(&wanted))
            .unwrap_or_else(|| panic!("line {line} not reported: {run}"));
        assert!(row.contains(reason), "line {line}: {row}");
    }
    for ok in [1, 5, 12] {
        assert!(
            !run.stderr.contains(&format!("line {ok}: ")),
            "good line {ok} reported: {run}"
        );
    }
    run.assert_private(&good.iter().collect::<Vec<_>>(), &server.token);
    let totals = server.running().totals();
    assert_eq!((totals.accepted, totals.batches), (0, 0), "nothing sent");
    assert!(
        !send::default_state_path(&file).exists(),
        "no state written"
    );
    assert!(server.log().is_empty());

    // `--check` finds the same without a server.
    let check = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["send", "--check"])
        .arg(&file)
        .output()
        .unwrap();
    let check = Run::new(check);
    assert_eq!(check.code, i32::from(exit_code::BAD_INPUT), "{check}");
    assert!(check.stderr.contains("9 bad line(s)"), "{check}");
}

#[test]
fn a_payload_over_the_servers_bound_is_refused_after_welcome_and_nothing_is_sent() {
    let server = Server::start();
    let file = server.path("big.jsonl");
    let mut big = Msg::new(3);
    // The small profile's payload_bytes_max is 65536; the widest bound allows it.
    big.payload.resize(70_000, b'x');
    let lines = [Msg::new(1).line(), Msg::new(2).line(), big.line()];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let run = server.send(&file, &[]);
    assert_eq!(run.code, i32::from(exit_code::BAD_INPUT), "{run}");
    assert!(
        run.stderr
            .contains("line 3: the payload is 70000 bytes, over the limit of 65536"),
        "{run}"
    );
    run.assert_private(&[&big], &server.token);
    assert_eq!(server.running().totals().batches, 0, "nothing sent");
    assert!(server.log().is_empty());
}

#[test]
fn duplicate_ids_are_an_error_naming_both_lines() {
    let server = Server::start();
    let file = server.path("dups.jsonl");
    let mut msgs: Vec<Msg> = (1..=6).map(Msg::new).collect();
    // Line 4 claims id 2, which line 2 has by default; line 6 repeats line 5's id.
    msgs[3].id = Some(2);
    msgs[4].id = Some(77);
    msgs[5].id = Some(77);
    let text: Vec<String> = msgs.iter().map(Msg::line).collect();
    std::fs::write(&file, text.join("\n")).unwrap();
    let run = server.send(&file, &[]);
    assert_eq!(run.code, i32::from(exit_code::BAD_INPUT), "{run}");
    assert!(
        run.stderr
            .contains("line 4: id 2 is already used on line 2"),
        "{run}"
    );
    assert!(
        run.stderr
            .contains("line 6: id 77 is already used on line 5"),
        "{run}"
    );
    run.assert_private(&msgs.iter().collect::<Vec<_>>(), &server.token);
    assert_eq!(server.running().totals().batches, 0, "nothing sent");
}

#[test]
fn a_wrong_token_is_exit_3_and_sends_nothing() {
    let server = Server::start();
    let file = server.path("m.jsonl");
    write_file(&file, 3);
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("send")
        .arg(&file)
        .arg("--target")
        .arg(server.running().local_addr().to_string())
        .arg("--quiet")
        .env("COURIER_TOKEN", "c1.1.not-the-token")
        .output()
        .unwrap();
    let run = Run::new(out);
    assert_eq!(run.code, i32::from(exit_code::NO_CONNECTION), "{run}");
    assert!(run.stderr.contains("refused the token"), "{run}");
    assert!(!run.stderr.contains("not-the-token"), "{run}");
    assert_eq!(server.running().totals().batches, 0);
}
