//! Issue 19, erasing a business: `courier businesses erase --id N` makes the business's
//! stored messages unreadable (payloads and its users' numbers), in the data directory and
//! in a copy of it taken before, by destroying its key and rotating the master key; the
//! other business stays readable and served; a stop at any step of the rotation is
//! finished (forward past the commit point, back before it) by the next start; bad input
//! is refused with nothing changed; and nothing the command prints or records holds a
//! number, a payload or a key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use courier::erase::{EraseError, EraseRequest, Interrupted, Step};
use courier::store::MasterKeyText;
use courier_client::{Client, ClientConfig, OutgoingMessage, ServerTrust};
use courier_pipeline::log::format::SegmentHeader;
use courier_pipeline::log::{
    FieldKeys, Keyring, LogConfig, MasterKey, Record, RecordHeader, RecordKind, SegmentCodec,
    RECORD_PAYLOAD_BYTES_LIMIT,
};
use courier_pipeline::profile::Profile;
use courier_pipeline::registry::Registry;
use courier_pipeline::seal::keys::{DerivedKeys, RecipientKey, RecipientKeys, WrappedRootKey};
use courier_pipeline::wire::{Recipient, Status};
use courier_pipeline::ShardId;
use courier_testkit::spawn::{self, Files, Serve};
use rustls::pki_types::CertificateDer;

const MASTER_HEX: &str = "6a1e5c2b9d3f4a7e8c0b1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6";
/// Business 1 is erased, business 2 stays.
const ERASED: u32 = 1;
const KEPT: u32 = 2;

fn courier(args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(crate::courier_bin())
        .current_dir(super::retention::root())
        .args(args)
        .env_remove("COURIER_MASTER_KEY_FILE")
        .env("COURIER_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("courier runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().expect("courier ends")
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The number and payload of message `i` of `business`: distinctive, to be searched for.
fn message(business: u32, i: u64) -> (Recipient, String) {
    let number = format!("+4479{}{:07}", business, 1_234_500 + i * 7);
    let payload = format!("ERASE-TEST-B{business}-PAYLOAD-{i}-code-{}", 9_100 + i);
    (Recipient::parse(number.as_bytes()).unwrap(), payload)
}

fn digits(r: &Recipient) -> String {
    r.as_str()[1..].to_string()
}

/// Everything that can be read out of data directories with the given master keys,
/// trying every key found in them: every keyring's data keys (any shard, matched to
/// segments by id), every business root key of every `business-keys` file, each under
/// every master key that unwraps it. Records' recipients, raw payloads and payloads
/// opened with any recipient key derivable.
#[derive(Debug, Default)]
struct Found {
    numbers: BTreeSet<String>,
    texts: Vec<Vec<u8>>,
    records: u64,
    hidden: u64,
}

impl Found {
    fn has_text(&self, needle: &str) -> bool {
        self.texts
            .iter()
            .any(|t| t.windows(needle.len()).any(|w| w == needle.as_bytes()))
    }
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn read_everything(dirs: &[&Path], masters: &[&str]) -> Found {
    let masters: Vec<MasterKey> = masters
        .iter()
        .map(|m| MasterKey::parse(m.as_bytes()).unwrap())
        .collect();
    let mut all = Vec::new();
    for d in dirs {
        files_under(d, &mut all);
    }
    // Every root key that unwraps under some master key.
    let mut roots = DerivedKeys::new();
    for f in all.iter().filter(|f| f.ends_with("business-keys")) {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let (id, hexed) = line.split_once(' ').unwrap();
            let mut bytes = [0u8; courier_pipeline::seal::keys::WRAPPED_ROOT_KEY_BYTES];
            hex::decode_to_slice(hexed, &mut bytes).unwrap();
            let w = WrappedRootKey::from_bytes(bytes);
            for m in &masters {
                let mk = key_bytes(m);
                let _ = roots.insert_wrapped(&mk, id.parse().unwrap(), &w);
            }
        }
    }
    let roots = Arc::new(roots);
    let keyrings: Vec<Keyring> = all
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n == "keyring"))
        .map(|f| Keyring::from_bytes(&std::fs::read(f).unwrap()).unwrap())
        .collect();
    let mut found = Found::default();
    for f in all
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "seg"))
    {
        let bytes = std::fs::read(f).unwrap();
        let Ok(header) = SegmentHeader::decode(&bytes) else {
            continue;
        };
        for ring in &keyrings {
            for m in &masters {
                let Ok(key) = ring.data_key(m, header.data_key_id) else {
                    continue;
                };
                let fields: Arc<dyn FieldKeys> = roots.clone();
                let codec = SegmentCodec::new(header, key, RECORD_PAYLOAD_BYTES_LIMIT)
                    .with_field_keys(Some(fields));
                codec.scan_visiting(&bytes, &mut |_, rec| {
                    found.records += 1;
                    found.hidden += u64::from(rec.fields_hidden);
                    found.texts.push(rec.payload.clone());
                    let Some(r) = rec.header.recipient else {
                        return;
                    };
                    found.numbers.insert(digits(&r));
                    let mut k = RecipientKey::zeroed();
                    let b = rec.header.business_id;
                    if rec.header.kind == RecordKind::Message
                        && roots.recipient_key(b, &r, &mut k).is_ok()
                    {
                        let mut out = Vec::new();
                        let opened = courier_pipeline::seal::open(
                            &k,
                            b,
                            &r,
                            rec.header.client_id,
                            &rec.payload,
                            &mut out,
                        );
                        if let Ok(plain) = opened {
                            found.texts.push(plain.to_vec());
                        }
                    }
                });
            }
        }
    }
    found
}

fn key_bytes(m: &MasterKey) -> [u8; 32] {
    let text = m.to_file_text();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&text.trim().as_bytes()[..64], &mut out).unwrap();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else if e.file_name() != "lock" {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

async fn send(addr: std::net::SocketAddr, data: &Path, token: &str, business: u32, ids: &[u64]) {
    let cert = CertificateDer::from(std::fs::read(data.join("tls/cert.der")).unwrap());
    let cfg = ClientConfig {
        server: addr,
        server_name: "localhost".into(),
        token: token.to_string(),
        trust: ServerTrust::Pinned(cert),
        streams: 1,
        batches_in_flight_per_stream: 1,
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        let client = Client::connect(&cfg).await.unwrap();
        assert_eq!(client.welcome().business_id, business);
        let batch = ids
            .iter()
            .map(|&i| {
                let (recipient, payload) = message(business, i);
                OutgoingMessage {
                    client_id: i,
                    recipient,
                    payload: Bytes::from(payload.into_bytes()),
                }
            })
            .collect();
        for s in client.submit(batch).await.unwrap() {
            assert!(matches!(s, Status::Accepted(_)), "{s:?}");
        }
    })
    .await
    .expect("sending timed out");
}

/// The acceptance test of issue 19 item 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_business_is_unreadable_in_the_live_directory_and_in_a_copy_taken_before() {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path(), MASTER_HEX);
    let bin = crate::courier_bin();
    let extra = ["--tier", "unlimited", "--mps", "100000", "--exempt"];
    let token_a = spawn::add_business(bin, &files.registry, "erased", &extra);
    let token_b = spawn::add_business(bin, &files.registry, "kept", &extra);
    let addr = spawn::free_port();
    let mut server = Serve::new(bin, &files, addr, &dir.path().join("serve1.log")).spawn();
    let ids: Vec<u64> = (1..=12).collect();
    send(addr, &files.data, &token_a, ERASED, &ids).await;
    send(addr, &files.data, &token_b, KEPT, &ids).await;
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(20)).success());

    // The reader sees both businesses before the erase (so it could fail below).
    let before = read_everything(&[&files.data], &[MASTER_HEX]);
    for b in [ERASED, KEPT] {
        for &i in &ids {
            let (r, payload) = message(b, i);
            assert!(before.numbers.contains(&digits(&r)), "b{b} {i}: number");
            assert!(before.has_text(&payload), "b{b} {i}: payload");
        }
    }
    assert_eq!(before.hidden, 0);

    let copy = dir.path().join("copy-before-erase");
    copy_dir(&files.data, &copy);
    let out = courier(
        &[
            "businesses",
            "erase",
            "--id",
            &ERASED.to_string(),
            "--data-dir",
            p(&files.data),
            "--registry",
            p(&files.registry),
            "--profile",
            "tuning/small.toml",
            "--master-key-file",
            p(&files.key_file),
            "--yes",
        ],
        "",
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("business 1 erased"), "{stdout}");
    assert!(
        !stdout.contains("format version 2"),
        "every segment is version 3: {stdout}"
    );
    assert!(
        stderr.contains("business erased"),
        "logged at INFO: {stderr}"
    );
    let new_master = std::fs::read_to_string(&files.key_file).unwrap();
    let new_master = new_master.trim();
    assert_ne!(new_master, MASTER_HEX, "the master key was rotated");
    let registry = Registry::from_toml(&std::fs::read_to_string(&files.registry).unwrap()).unwrap();
    assert!(registry.get(ERASED).is_none() && registry.is_erased(ERASED));
    assert!(registry.get(KEPT).is_some());

    // With the new master key and every key in the copy and in the live directory:
    // nothing of the erased business, in either; the kept one still reads from the live
    // directory.
    for (what, dirs) in [
        ("the copy", vec![copy.as_path()]),
        ("the live directory", vec![files.data.as_path()]),
        ("both", vec![copy.as_path(), files.data.as_path()]),
    ] {
        let after = read_everything(&dirs, &[new_master]);
        for &i in &ids {
            let (r, payload) = message(ERASED, i);
            assert!(
                !after.numbers.contains(&digits(&r)),
                "{what}: a number of the erased business"
            );
            assert!(
                !after.has_text(&payload),
                "{what}: a payload of the erased business"
            );
        }
        if what != "the copy" {
            assert!(after.hidden >= ids.len() as u64, "{what}: {after:?}");
            for &i in &ids {
                let (r, payload) = message(KEPT, i);
                assert!(after.numbers.contains(&digits(&r)), "{what}: kept number");
                assert!(after.has_text(&payload), "{what}: kept payload");
            }
        } else {
            assert_eq!(
                after.records, 0,
                "nothing in the copy opens under the new key"
            );
        }
    }
    // Nor does anything lie in the clear in any file.
    let mut all = Vec::new();
    files_under(&copy, &mut all);
    files_under(&files.data, &mut all);
    for f in &all {
        let bytes = std::fs::read(f).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("ERASE-TEST-"), "{}", f.display());
        for &i in &ids {
            assert!(
                !text.contains(&digits(&message(ERASED, i).0)),
                "{}",
                f.display()
            );
        }
    }

    // The access log has the run; nothing printed or recorded holds a number, a payload
    // or a key.
    let access = std::fs::read_to_string(files.data.join("access.log")).unwrap();
    assert!(access.contains("\"businesses erase\""), "{access}");
    let said = format!("{stdout}{stderr}{access}");
    for b in [ERASED, KEPT] {
        for &i in &ids {
            let (r, payload) = message(b, i);
            assert!(!said.contains(&digits(&r)) && !said.contains(&payload));
        }
    }
    assert!(
        !said.contains(MASTER_HEX) && !said.contains(new_master),
        "a key leaked"
    );

    // The server starts again with the new key and serves the kept business only.
    let log2 = dir.path().join("serve2.log");
    let mut server = Serve::new(bin, &files, addr, &log2).spawn();
    send(addr, &files.data, &token_b, KEPT, &[100, 101]).await;
    let cert = CertificateDer::from(std::fs::read(files.data.join("tls/cert.der")).unwrap());
    let refused = tokio::time::timeout(Duration::from_secs(30), async {
        let cfg = ClientConfig {
            server: addr,
            server_name: "localhost".into(),
            token: token_a.clone(),
            trust: ServerTrust::Pinned(cert),
            streams: 1,
            batches_in_flight_per_stream: 1,
        };
        Client::connect(&cfg).await.is_err()
    })
    .await
    .expect("connecting timed out");
    assert!(refused, "the erased business's token still authenticates");
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(20)).success());
    let served = std::fs::read_to_string(&log2).unwrap();
    assert!(!served.contains(MASTER_HEX) && !served.contains(new_master));
    for &i in &ids {
        assert!(!served.contains(&digits(&message(ERASED, i).0)));
    }
}

/// A data directory written through the library as the server writes it: businesses 1
/// and 2 with root keys, one shard's log holding a message of each.
fn library_setup(dir: &Path) -> (Files, Profile) {
    let files = Files::new(dir, MASTER_HEX);
    std::fs::create_dir_all(&files.data).unwrap();
    let bin = crate::courier_bin();
    spawn::add_business(bin, &files.registry, "erased", &[]);
    spawn::add_business(bin, &files.registry, "kept", &[]);
    let text =
        std::fs::read_to_string(format!("{}/tuning/small.toml", super::retention::root())).unwrap();
    let profile = Profile::from_toml(&text).unwrap();
    let master = MasterKeyText::read(&files.key_file).unwrap();
    let registry = Registry::from_toml(&std::fs::read_to_string(&files.registry).unwrap()).unwrap();
    let keys = courier::business_keys::load_or_create(&files.data, &master, &registry).unwrap();
    let cfg = LogConfig::new(&profile.log, profile.limits.payload_bytes_max);
    let fields: Arc<dyn FieldKeys> = keys;
    let (mut store, mut log) = courier::store::ShardStore::open_with_field_keys(
        &files.data,
        ShardId::new(0),
        &master,
        Some(fields),
        cfg,
        &mut |_, _| {},
    )
    .unwrap();
    let now = super::retention::now_ms();
    let payloads: Vec<(Recipient, String)> = [ERASED, KEPT].map(|b| message(b, 1)).to_vec();
    let records: Vec<Record<'_>> = [ERASED, KEPT]
        .iter()
        .zip(&payloads)
        .map(|(&b, (r, payload))| Record {
            header: RecordHeader::message(b, now, 1, *r, now + 3_600_000),
            payload: payload.as_bytes(),
        })
        .collect();
    super::retention::append_durably(&mut store, &mut log, now, &records);
    (files, profile)
}

/// The request that erases business [`ERASED`] of a [`library_setup`] directory.
fn erase_request<'a>(files: &'a Files, profile: &'a Profile) -> EraseRequest<'a> {
    EraseRequest {
        data_dir: &files.data,
        master_key_file: &files.key_file,
        registry: &files.registry,
        detect: &profile.detect,
        business_id: ERASED,
    }
}

fn staged_files(files: &Files) -> Vec<PathBuf> {
    let mut all = Vec::new();
    files_under(&files.data, &mut all);
    files_under(files.key_file.parent().unwrap(), &mut all);
    all.sort();
    all.dedup();
    all.into_iter()
        .filter(|f| {
            let name = f.file_name().unwrap().to_string_lossy();
            name.ends_with(".next") || name == courier::erase::JOURNAL
        })
        .collect()
}

/// A stop after each step of the rotation, as a crash: the next start rolls back before
/// the commit point (the business is not erased, the old key still opens everything, and
/// the erase can run again) and forward after it (erased, as if never stopped).
#[test]
fn a_stop_at_every_step_of_the_rotation_is_finished_by_the_next_start() {
    for step in [Step::Journaled, Step::Staged, Step::Committed] {
        let dir = tempfile::tempdir().unwrap();
        let (files, profile) = library_setup(dir.path());
        let req = erase_request(&files, &profile);
        let err = courier::erase::erase(&req, Some(step)).unwrap_err();
        assert!(matches!(err, EraseError::Stopped(s) if s == step), "{err}");
        assert!(
            !staged_files(&files).is_empty(),
            "{step:?}: the journal is left"
        );
        let done = courier::erase::finish_interrupted(&files.data).unwrap();
        assert!(
            staged_files(&files).is_empty(),
            "{step:?}: {:?}",
            staged_files(&files)
        );
        let master = std::fs::read_to_string(&files.key_file).unwrap();
        let registry =
            Registry::from_toml(&std::fs::read_to_string(&files.registry).unwrap()).unwrap();
        let found = read_everything(&[&files.data], &[master.trim()]);
        let (erased_number, erased_payload) = message(ERASED, 1);
        let (kept_number, kept_payload) = message(KEPT, 1);
        assert!(found.numbers.contains(&digits(&kept_number)), "{step:?}");
        assert!(found.has_text(&kept_payload), "{step:?}");
        match step {
            Step::Journaled | Step::Staged => {
                assert_eq!(
                    done,
                    Some(Interrupted::RolledBack {
                        business_id: ERASED
                    })
                );
                assert_eq!(master.trim(), MASTER_HEX, "{step:?}: the old key stays");
                assert!(registry.get(ERASED).is_some());
                assert!(found.numbers.contains(&digits(&erased_number)));
                assert!(found.has_text(&erased_payload));
                // And it can run again.
                courier::erase::erase(&req, None).unwrap();
            }
            Step::Committed => {
                assert_eq!(
                    done,
                    Some(Interrupted::Completed {
                        business_id: ERASED
                    })
                );
                assert_ne!(master.trim(), MASTER_HEX);
                assert!(registry.is_erased(ERASED) && registry.get(ERASED).is_none());
                assert!(!found.numbers.contains(&digits(&erased_number)));
                assert!(!found.has_text(&erased_payload));
                assert_eq!(found.hidden, 1);
            }
        }
        // Whatever happened, the directory opens with the key file's key, as a server
        // would open it, and a second finish finds nothing to do.
        assert_eq!(
            courier::erase::finish_interrupted(&files.data).unwrap(),
            None
        );
        let master = MasterKeyText::read(&files.key_file).unwrap();
        let cfg = LogConfig::new(&profile.log, profile.limits.payload_bytes_max);
        courier::store::ShardStore::open(
            &files.data,
            ShardId::new(0),
            &master,
            cfg,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(
            read_everything(&[&files.data], &[MASTER_HEX]).records,
            0,
            "{step:?}: the old key opens nothing once erased"
        );
    }
}

/// An unknown id, an erased one, a running server, no confirmation, no master key: each
/// is refused with a clear message and nothing changed.
#[test]
fn bad_erase_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (files, _) = library_setup(dir.path());
    // A second data directory where the business stored too (a region it left), with a
    // master key of its own.
    let other = tempfile::tempdir().unwrap();
    let other_files = Files::new(other.path(), &"ab".repeat(32));
    std::fs::create_dir_all(&other_files.data).unwrap();
    {
        let master = MasterKeyText::read(&other_files.key_file).unwrap();
        let registry =
            Registry::from_toml(&std::fs::read_to_string(&files.registry).unwrap()).unwrap();
        courier::business_keys::load_or_create(&other_files.data, &master, &registry).unwrap();
    }
    let snapshot = || {
        let mut all = Vec::new();
        files_under(dir.path(), &mut all);
        all.retain(|f| !f.ends_with("access.log") && !f.ends_with("lock"));
        all.sort();
        all.into_iter()
            .map(|f| (f.clone(), std::fs::read(&f).unwrap()))
            .collect::<Vec<_>>()
    };
    let before = snapshot();
    // Erasing `id` in the data directory and with the master key of `at`.
    let erase_in = |id: &str, at: &Files| {
        vec![
            "businesses".to_string(),
            "erase".into(),
            "--id".into(),
            id.into(),
            "--data-dir".into(),
            p(&at.data).into(),
            "--registry".into(),
            p(&files.registry).into(),
            "--master-key-file".into(),
            p(&at.key_file).into(),
        ]
    };
    let base = |id: &str| erase_in(id, &files);
    let run = |args: &[String], stdin: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = courier(&args, stdin);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let mut unknown = base("9");
    unknown.push("--yes".into());
    let err = run(&unknown, "");
    assert!(err.contains("no business with id 9"), "{err}");

    let err = run(&base("1"), "2\n");
    assert!(err.contains("not confirmed"), "{err}");
    let err = run(&base("1"), "");
    assert!(err.contains("not confirmed"), "{err}");

    let mut no_key = base("1");
    no_key.truncate(8);
    no_key.push("--yes".into());
    let err = run(&no_key, "");
    assert!(err.contains("no master key"), "{err}");

    let lock = courier::store::DataDirLock::acquire(&files.data).unwrap();
    let mut yes = base("1");
    yes.push("--yes".into());
    let err = run(&yes, "");
    assert!(
        err.contains("is locked") && err.contains("stopped server"),
        "{err}"
    );
    drop(lock);
    assert_eq!(snapshot(), before, "a refused erase changed a file");

    // Confirmed by typing the id, it runs; then the id is refused as erased.
    let out = courier(
        &base("1").iter().map(String::as_str).collect::<Vec<_>>(),
        "1\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = run(&yes, "");
    assert!(err.contains("already erased"), "{err}");
    // In the other directory its root key is still there: erasing it there goes ahead
    // (and rotates that directory's key), then that directory is done too.
    let mut there = erase_in("1", &other_files);
    there.push("--yes".into());
    let key_before = std::fs::read(&other_files.key_file).unwrap();
    let out = courier(&there.iter().map(String::as_str).collect::<Vec<_>>(), "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(std::fs::read(&other_files.key_file).unwrap(), key_before);
    let left = std::fs::read_to_string(other_files.data.join("business-keys")).unwrap();
    assert!(left.lines().all(|l| !l.starts_with("1 ")), "{left}");
    assert!(left.lines().any(|l| l.starts_with("2 ")), "{left}");
    let err = run(&there, "");
    assert!(err.contains("already erased"), "{err}");
    let access = std::fs::read_to_string(files.data.join("access.log")).unwrap();
    assert!(
        access.lines().any(|l| l.contains("\"outcome\":\"ok\"")),
        "{access}"
    );
}

/// `courier serve` finishes an interrupted erase before it reads the registry and the
/// keys: forward past the commit point, back before it, saying which at start-up.
#[test]
fn serve_finishes_an_interrupted_erase_before_it_serves() {
    for (step, said) in [
        (Step::Committed, "completed an interrupted erase"),
        (Step::Staged, "rolled back an interrupted erase"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (files, profile) = library_setup(dir.path());
        let req = erase_request(&files, &profile);
        courier::erase::erase(&req, Some(step)).unwrap_err();
        let log = dir.path().join("serve.log");
        let mut server = Serve::new(crate::courier_bin(), &files, spawn::free_port(), &log).spawn();
        server.terminate();
        assert!(server.wait_exit(Duration::from_secs(20)).success());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(said), "{step:?}: {text}");
        assert!(staged_files(&files).is_empty(), "{step:?}");
        let registry =
            Registry::from_toml(&std::fs::read_to_string(&files.registry).unwrap()).unwrap();
        assert_eq!(registry.is_erased(ERASED), step == Step::Committed);
        let master = std::fs::read_to_string(&files.key_file).unwrap();
        assert!(!text.contains(master.trim()) && !text.contains(MASTER_HEX));
    }
}

/// Segments written before per-business field keys (format version 2) keep their
/// records' numbers under their data keys until retention: the erase counts them, so the
/// operator is told.
#[test]
fn an_erase_counts_the_segments_of_the_older_format() {
    let dir = tempfile::tempdir().unwrap();
    let (files, profile) = library_setup(dir.path());
    let shard = courier_testkit::logkit::shard_dir(&files.data, 0);
    let segs = courier_testkit::logkit::segments(&files.data, 0);
    assert_eq!(segs.len(), 1);
    // A header naming version 2, as an older build wrote it.
    let header = SegmentHeader::decode(&std::fs::read(&segs[0]).unwrap()).unwrap();
    let mut bytes = Vec::new();
    SegmentHeader {
        version: 2,
        ..header
    }
    .encode(&mut bytes);
    std::fs::write(shard.join(format!("{:020}.seg", 999)), &bytes).unwrap();
    let req = erase_request(&files, &profile);
    let erased = courier::erase::erase(&req, None).unwrap();
    assert_eq!(erased.old_format_segments, 1, "{erased:?}");
    assert!(erased.root_key_destroyed);
    assert_eq!((erased.keyrings, erased.root_keys_rewrapped), (1, 1));
}
