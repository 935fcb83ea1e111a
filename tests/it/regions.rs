//! Regions ("local storage", issue 19) through the real binary: one profile defines two
//! regions, `eu` (its own master key) and `us` (the main key); three `courier serve`
//! processes (the main one and one per region) carry messages, statuses and users'
//! replies of one business each. Afterwards every file under each directory is scanned
//! for the other sites' numbers and payload markers, and each directory's log is read
//! back with its master key: every record belongs to that directory's business. A region
//! server restarts from its own log (a resend is `duplicate`), `courier log verify` reads
//! a region's directory with the region's key, and the start-up errors (unknown region,
//! missing directory, a business naming a region the profile lacks) are clear.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use courier_client::{Client, ClientConfig, OutgoingMessage, ServerTrust};
use courier_pipeline::log::{
    Keyring, MasterKey, OwnedRecord, RecordKind, SegmentCodec, SegmentHeader,
};
use courier_pipeline::wire::delivery::{BusinessEvent, InboundEntry, Outcome, OutcomeEntry};
use courier_pipeline::wire::{Recipient, Status};
use courier_testkit::spawn::{self, Files, Serve, Spawned};
use rustls::pki_types::CertificateDer;

use super::delivery_kit::{device_world, DeviceEdge};

const MAIN_HEX: &str = "5a1e3c7b9d2f4a6c8e0b1d3f5a7c9e2b4d6f8a0c1e3b5d7f9a2c4e6b8d0f1a3c";
const EU_HEX: &str = "e7c5a3f1d9b7e5c3a1f9d7b5e3c1a9f7d5b3e1c9a7f5d3b1e9c7a5f3d1b9e7c5";
const MESSAGES: u64 = 6;
const REPLIES: u64 = 2;

/// One server of the run: where it keeps its data and what its business sends.
struct Site {
    name: &'static str,
    data: PathBuf,
    key_hex: &'static str,
    addr: std::net::SocketAddr,
    token: String,
    business_id: u32,
    numbers: Vec<Recipient>,
    repliers: Vec<Recipient>,
    marker: String,
}

impl Site {
    fn new(name: &'static str, data: PathBuf, key_hex: &'static str, prefix: &str) -> Site {
        let number =
            |i: u64| Recipient::parse(format!("{prefix}{:08}", 31_415_926 + i * 2_718).as_bytes());
        Site {
            name,
            data,
            key_hex,
            addr: spawn::free_port(),
            token: String::new(),
            business_id: 0,
            numbers: (0..MESSAGES).map(|i| number(i).unwrap()).collect(),
            repliers: (0..REPLIES).map(|i| number(100 + i).unwrap()).collect(),
            marker: format!("MARK-{}-SITE", name.to_uppercase()),
        }
    }

    fn cfg(&self, token: &str) -> ClientConfig {
        let cert = std::fs::read(self.data.join("tls/cert.der")).unwrap();
        ClientConfig {
            server: self.addr,
            server_name: "localhost".into(),
            token: token.to_string(),
            trust: ServerTrust::Pinned(CertificateDer::from(cert)),
            streams: 1,
            batches_in_flight_per_stream: 2,
        }
    }

    fn serve(&self, files: &Files, profile: &Path, log: &Path) -> Serve {
        let serve = Serve::with_profile(super::courier_bin(), files, self.addr, log, profile);
        match self.name {
            "main" => serve,
            region => serve.args(&["--region", region]),
        }
    }
}

/// The small profile with `[regions.eu]` (own key) and `[regions.us]`.
fn write_profile(dir: &Path, eu: &Site, us: &Site, eu_key: &Path) -> PathBuf {
    let small =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/small.toml")).unwrap();
    let text = format!(
        "{small}\n[regions.eu]\ndata_dir = {:?}\nlisten = \"{}\"\nmaster_key_file = {:?}\n\
         \n[regions.us]\ndata_dir = {:?}\nlisten = \"{}\"\n",
        eu.data.display().to_string(),
        eu.addr,
        eu_key.display().to_string(),
        us.data.display().to_string(),
        us.addr,
    );
    let path = dir.join("profile.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Messages to the site's numbers delivered (and read), statuses heard and acknowledged,
/// users' replies handed over and heard.
async fn traffic(site: &Site, edge_token: &str, seed: u64) {
    let world = device_world(seed);
    let (client, mut events) = Client::connect_with_events(&site.cfg(&site.token), 8)
        .await
        .unwrap();
    let (edge, mut deliveries) = DeviceEdge::connect(&site.cfg(edge_token), 64, world)
        .await
        .unwrap();
    assert_eq!(client.welcome().business_id, site.business_id);
    let batch: Vec<OutgoingMessage> = site
        .numbers
        .iter()
        .enumerate()
        .map(|(i, r)| OutgoingMessage {
            client_id: i as u64,
            recipient: *r,
            payload: Bytes::from(format!("{}-PAYLOAD-{i}", site.marker)),
        })
        .collect();
    let statuses = client.submit(batch).await.unwrap();
    assert!(
        statuses.iter().all(|s| matches!(s, Status::Accepted(_))),
        "{}: {statuses:?}",
        site.name
    );
    for _ in 0..MESSAGES {
        let d = deliveries.recv().await.unwrap();
        assert!(
            d.payload.starts_with(site.marker.as_bytes()),
            "{}: a message of this site, opened on its device",
            site.name
        );
        let outcome = if d.client_id % 2 == 0 {
            Outcome::Read
        } else {
            Outcome::Delivered
        };
        edge.outcomes(&[OutcomeEntry {
            message: d.message,
            outcome,
        }])
        .await
        .unwrap();
    }
    let replies: Vec<InboundEntry> = site
        .repliers
        .iter()
        .enumerate()
        .map(|(i, r)| InboundEntry {
            id: i as u64,
            business_id: site.business_id,
            sender: *r,
            payload: Bytes::from(format!("{}-REPLY-{i}", site.marker)),
        })
        .collect();
    let answers = edge.inbound(replies).await.unwrap();
    assert!(
        answers.iter().all(|s| matches!(s, Status::Accepted(_))),
        "{}: {answers:?}",
        site.name
    );
    let (mut finals, mut inbound) = (std::collections::BTreeSet::new(), 0);
    // Bounded: each event is acknowledged, and the whole traffic runs under a timeout.
    while finals.len() < MESSAGES as usize || inbound < REPLIES {
        let e = events.recv().await.unwrap();
        client.ack_events(&[e.event()]).await.unwrap();
        match &e {
            BusinessEvent::Status(s) if matches!(s.kind.name(), "delivered" | "read") => {
                finals.insert(s.client_id);
            }
            BusinessEvent::Inbound(_) => inbound += 1,
            BusinessEvent::Status(_) => {}
        }
    }
    client.close().await;
    edge.close().await;
}

/// Every record of every shard's log under `data`, read with `key_hex`.
fn read_logs(data: &Path, key_hex: &str) -> Vec<OwnedRecord> {
    let master = MasterKey::parse(key_hex.as_bytes()).unwrap();
    // The directory's business keys too: a record's user fields are under them (log
    // format v3, issue 19 erase).
    let text = courier::store::MasterKeyText::new(key_hex.as_bytes().to_vec()).unwrap();
    let fields: std::sync::Arc<dyn courier_pipeline::log::FieldKeys> =
        courier::business_keys::load(data, &text).unwrap();
    let mut records = Vec::new();
    for shard in 0..2 {
        let dir = data.join(format!("log/shard-{shard}"));
        let segments = courier::store::list_segments(&dir).unwrap();
        if segments.is_empty() {
            continue;
        }
        let keyring = Keyring::from_bytes(&std::fs::read(dir.join("keyring")).unwrap()).unwrap();
        for seg in segments {
            let bytes = std::fs::read(dir.join(format!("{seg:020}.seg"))).unwrap();
            let header = SegmentHeader::decode(&bytes).unwrap();
            let key = keyring.data_key(&master, header.data_key_id).unwrap();
            let codec =
                SegmentCodec::new(header, key, 1 << 20).with_field_keys(Some(fields.clone()));
            records.extend(codec.records(&bytes).map(|r| r.unwrap().1));
        }
    }
    records
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn stop(mut s: Spawned) {
    s.terminate();
    assert!(
        s.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        s.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_region_directory_holds_only_its_businesses_data() {
    let dir = tempfile::tempdir().unwrap();
    let bin = super::courier_bin();
    let files = Files::new(dir.path(), MAIN_HEX);
    let eu_key = dir.path().join("eu.key");
    courier_testkit::write_secret(&eu_key, format!("{EU_HEX}\n"));
    let mut sites = [
        Site::new("main", files.data.clone(), MAIN_HEX, "+4479"),
        Site::new("eu", dir.path().join("eu-store"), EU_HEX, "+3361"),
        Site::new("us", dir.path().join("us-store"), MAIN_HEX, "+1555"),
    ];
    std::fs::create_dir(&sites[1].data).unwrap();
    std::fs::create_dir(&sites[2].data).unwrap();
    let profile = write_profile(dir.path(), &sites[1], &sites[2], &eu_key);
    let exempt = ["--tier", "unlimited", "--mps", "100000", "--exempt"];
    for site in sites.iter_mut() {
        let mut args = exempt.to_vec();
        if site.name != "main" {
            args.extend(["--region", site.name]);
        }
        site.token = spawn::add_business(bin, &files.registry, site.name, &args);
        site.business_id = site.token.split('.').nth(1).unwrap().parse().unwrap();
    }
    let edge_token = spawn::add_business(bin, &files.registry, "edge", &["--platform"]);

    let servers: Vec<Spawned> = sites
        .iter()
        .map(|s| {
            s.serve(
                &files,
                &profile,
                &dir.path().join(format!("{}.log", s.name)),
            )
            .spawn()
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(120), async {
        for (seed, site) in sites.iter().enumerate() {
            traffic(site, &edge_token, seed as u64 + 1).await;
        }
        // A user's reply to the eu business handed to the main server is refused there,
        // never stored (its business is not in that server's registry).
        let (edge, _rx) = DeviceEdge::connect(&sites[0].cfg(&edge_token), 8, device_world(9))
            .await
            .unwrap();
        let answers = edge
            .inbound(vec![InboundEntry {
                id: 99,
                business_id: sites[1].business_id,
                sender: sites[1].repliers[0],
                payload: Bytes::from(format!("{}-REPLY-STRAY", sites[1].marker)),
            }])
            .await
            .unwrap();
        assert!(matches!(answers[0], Status::Rejected(_)), "{answers:?}");
        edge.close().await;
        // A business is served by its region's server only.
        for (site, other) in [
            (&sites[0], &sites[1]),
            (&sites[1], &sites[2]),
            (&sites[2], &sites[0]),
        ] {
            assert!(
                Client::connect(&site.cfg(&other.token)).await.is_err(),
                "{}'s business was admitted by the {} server",
                other.name,
                site.name
            );
        }
    })
    .await
    .expect("traffic timed out");
    let mut output = String::new();
    for s in servers {
        let log = s.log.clone();
        stop(s);
        output.push_str(&std::fs::read_to_string(log).unwrap());
    }

    // The eu region's log recovers on its own: a resend is answered `duplicate`.
    let eu = &sites[1];
    let again = eu
        .serve(&files, &profile, &dir.path().join("eu-again.log"))
        .spawn();
    tokio::time::timeout(Duration::from_secs(30), async {
        let client = Client::connect(&eu.cfg(&eu.token)).await.unwrap();
        let statuses = client
            .submit(vec![OutgoingMessage {
                client_id: 0,
                recipient: eu.numbers[0],
                payload: Bytes::from(format!("{}-PAYLOAD-0", eu.marker)),
            }])
            .await
            .unwrap();
        assert!(matches!(statuses[0], Status::Duplicate(_)), "{statuses:?}");
        client.close().await;
    })
    .await
    .expect("resend timed out");
    let log = again.log.clone();
    stop(again);
    output.push_str(&std::fs::read_to_string(log).unwrap());
    // The servers' output holds no number, content, token or key of any site (the
    // privacy rule, for region servers too).
    assert!(output.contains("eu-store") && output.contains("courier serving"));
    for site in &sites {
        for r in site.numbers.iter().chain(&site.repliers) {
            assert!(!output.contains(&r.as_str()[1..]), "a number in the output");
        }
        assert!(!output.contains(&site.marker), "content in the output");
        assert!(!output.contains(&site.token[5..]), "a token in the output");
    }
    assert!(
        !output.contains(MAIN_HEX) && !output.contains(EU_HEX),
        "a key in the output"
    );

    // No file of a directory holds another site's numbers or payload markers.
    for site in &sites {
        let files_here = files_under(&site.data);
        assert!(files_here
            .iter()
            .any(|(p, _)| p.extension().is_some_and(|e| e == "seg")));
        for other in sites.iter().filter(|o| o.name != site.name) {
            for (path, bytes) in &files_here {
                for r in other.numbers.iter().chain(&other.repliers) {
                    assert!(
                        !contains(bytes, &r.as_str().as_bytes()[1..]),
                        "{} number in {}",
                        other.name,
                        path.display()
                    );
                }
                assert!(
                    !contains(bytes, other.marker.as_bytes()),
                    "{} content in {}",
                    other.name,
                    path.display()
                );
            }
        }
        // Read back with its own key: every record is its business's, every number its.
        let records = read_logs(&site.data, site.key_hex);
        let count = |k: RecordKind| records.iter().filter(|r| r.header.kind == k).count() as u64;
        assert_eq!(count(RecordKind::Message), MESSAGES, "{}", site.name);
        assert_eq!(count(RecordKind::Inbound), REPLIES, "{}", site.name);
        assert!(count(RecordKind::Status) >= MESSAGES, "{}", site.name);
        for r in &records {
            assert_eq!(r.header.business_id, site.business_id, "{}", site.name);
            if let Some(n) = r.header.recipient {
                assert!(
                    site.numbers.contains(&n) || site.repliers.contains(&n),
                    "{}: a number of another site",
                    site.name
                );
            }
            if r.header.kind == RecordKind::Inbound {
                assert!(
                    contains(&r.payload, site.marker.as_bytes()),
                    "{}",
                    site.name
                );
            }
        }
    }

    // Offline commands take a region's directory, with the region's key (and refuse the
    // main key there: the eu region's data keys are wrapped by its own).
    let verify = |data: &Path, key: &Path| {
        std::process::Command::new(bin)
            .args(["log", "verify"])
            .arg(data)
            .arg("--master-key-file")
            .arg(key)
            .output()
            .unwrap()
    };
    let ok = verify(&sites[1].data, &eu_key);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        sites[1].data.join("access.log").exists(),
        "the access is traced in the region"
    );
    assert!(!verify(&sites[1].data, &files.key_file).status.success());
    let ok = verify(&sites[2].data, &files.key_file);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

/// Runs `courier serve` expecting it to refuse to start; returns its log.
fn refused(serve: Serve) -> String {
    let mut s = serve.spawn_unready();
    let status = s.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "the server started: {}", s.log_text());
    s.log_text()
}

#[test]
fn bad_region_setups_stop_start_up_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bin = super::courier_bin();
    let files = Files::new(dir.path(), MAIN_HEX);
    let eu = Site::new("eu", dir.path().join("eu-store"), MAIN_HEX, "+3361");
    let us = Site::new("us", dir.path().join("us-store"), MAIN_HEX, "+1555");
    let profile = write_profile(dir.path(), &eu, &us, &files.key_file);
    spawn::add_business(bin, &files.registry, "shop", &["--region", "eu"]);
    let log = dir.path().join("serve.log");

    // The region's directory does not exist: refused, and not created.
    let text = refused(eu.serve(&files, &profile, &log));
    assert!(
        text.contains("eu-store") && text.contains("not created by courier"),
        "{text}"
    );
    assert!(!eu.data.exists());
    // A path that is a file, not a directory.
    std::fs::write(&eu.data, b"not a dir").unwrap();
    let text = refused(eu.serve(&files, &profile, &log));
    assert!(text.contains("is not a directory"), "{text}");
    std::fs::remove_file(&eu.data).unwrap();

    // A region the profile does not define.
    let text = refused(
        Serve::with_profile(bin, &files, spawn::free_port(), &log, &profile)
            .args(&["--region", "ap-south"]),
    );
    assert!(
        text.contains("ap-south") && text.contains("eu, us"),
        "{text}"
    );

    // A business naming a region the profile lacks stops every server of the profile.
    std::fs::create_dir(&eu.data).unwrap();
    spawn::add_business(bin, &files.registry, "lost", &["--region", "mars"]);
    for serve in [
        Serve::with_profile(bin, &files, spawn::free_port(), &log, &profile),
        eu.serve(&files, &profile, &log),
    ] {
        let text = refused(serve);
        assert!(text.contains("names region \"mars\""), "{text}");
    }

    // A malformed region name is refused by the registry tool itself.
    let out = std::process::Command::new(bin)
        .args([
            "businesses",
            "add",
            "--name",
            "bad",
            "--region",
            "EU/1",
            "--registry",
        ])
        .arg(&files.registry)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("region"));
}

/// A business moved to a region while both servers run: its connection to the main
/// server is closed, and the region's server admits it within a few seconds; what it
/// sends from then on is stored in the region's directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_moved_to_a_region_is_served_there() {
    let dir = tempfile::tempdir().unwrap();
    let bin = super::courier_bin();
    let files = Files::new(dir.path(), MAIN_HEX);
    let mut main = Site::new("main", files.data.clone(), MAIN_HEX, "+4479");
    let eu = Site::new("eu", dir.path().join("eu-store"), MAIN_HEX, "+3361");
    let us = Site::new("us", dir.path().join("us-store"), MAIN_HEX, "+1555");
    std::fs::create_dir(&eu.data).unwrap();
    let profile = write_profile(dir.path(), &eu, &us, &files.key_file);
    let args = ["--tier", "unlimited", "--mps", "100000", "--exempt"];
    main.token = spawn::add_business(bin, &files.registry, "mover", &args);
    main.business_id = main.token.split('.').nth(1).unwrap().parse().unwrap();
    let servers = [
        main.serve(&files, &profile, &dir.path().join("main.log"))
            .spawn(),
        eu.serve(&files, &profile, &dir.path().join("eu.log"))
            .spawn(),
    ];
    let one = |site: &Site, i: u64| OutgoingMessage {
        client_id: i,
        recipient: site.numbers[0],
        payload: Bytes::from(format!("{}-PAYLOAD-{i}", site.marker)),
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        let client = Client::connect(&main.cfg(&main.token)).await.unwrap();
        let st = client.submit(vec![one(&main, 0)]).await.unwrap();
        assert!(matches!(st[0], Status::Accepted(_)), "{st:?}");
        assert!(Client::connect(&eu.cfg(&main.token)).await.is_err());
        let out = std::process::Command::new(bin)
            .args(["businesses", "set", "--id", &main.business_id.to_string()])
            .args(["--region", "eu", "--registry"])
            .arg(&files.registry)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Each server re-reads the registry about once a second; 100 tries of 100 ms.
        let mut moved = None;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(c) = Client::connect(&eu.cfg(&main.token)).await {
                moved = Some(c);
                break;
            }
        }
        let moved = moved.expect("the region's server admits the moved business");
        let st = moved.submit(vec![one(&eu, 1)]).await.unwrap();
        assert!(matches!(st[0], Status::Accepted(_)), "{st:?}");
        moved.close().await;
        // The old connection was closed (credential revoked there): nothing more is
        // stored in the main directory.
        let mut refused = false;
        for _ in 0..100 {
            if client.submit(vec![one(&main, 2)]).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(refused, "the main server kept serving the moved business");
        assert!(Client::connect(&main.cfg(&main.token)).await.is_err());
    })
    .await
    .expect("the move timed out");
    for s in servers {
        stop(s);
    }
    let ids = |data: &Path| -> Vec<u64> {
        read_logs(data, MAIN_HEX)
            .iter()
            .filter(|r| r.header.kind == RecordKind::Message)
            .map(|r| r.header.client_id)
            .collect()
    };
    assert_eq!(
        ids(&main.data),
        vec![0],
        "before the move: the main directory"
    );
    assert_eq!(ids(&eu.data), vec![1], "after it: the region's");
}
