//! Issue 19, audited access: every run of `courier log verify`, `audit` and `expire` (the
//! commands that decrypt stored data) appends one line to `DATA_DIR/access.log`, mode
//! 0600: who (user, uid), what (the command and its arguments), when, over which range
//! (shards, segment ids, log indexes) and with which counts, and nothing else: never
//! content, a number or a key.

use std::os::unix::fs::PermissionsExt;

use courier_testkit::logkit::PAYLOAD_MARKER;

use crate::retention::{
    courier, old_accepted, path, stopped_across_the_deadline, MASTER_HEX, RECIPIENT,
};

fn lines(data: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(data.join("access.log")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn count(line: &serde_json::Value, name: &str) -> u64 {
    line["counts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == name)
        .unwrap_or_else(|| panic!("no count {name}: {line}"))[1]
        .as_u64()
        .unwrap()
}

#[test]
fn every_decrypting_log_command_leaves_one_access_line() {
    let dir = tempfile::tempdir().unwrap();
    let (files, old) = stopped_across_the_deadline(dir.path());
    let data = path(&files.data);
    let key = path(&files.key_file);
    assert!(lines(&files.data).is_empty());

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let out = courier(&["log", "verify", data, "--master-key-file", key]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l = lines(&files.data);
    assert_eq!(l.len(), 1, "one line per run");
    let v = &l[0];
    assert_eq!(v["command"], "log verify");
    assert_eq!(v["outcome"], "ok");
    let uid = std::fs::metadata(&files.data).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(v["uid"].as_u64(), Some(u64::from(uid.uid())), "{v}");
    assert!(v["user"].as_str().is_some_and(|u| !u.is_empty()), "{v}");
    assert!(v["at_unix_ms"].as_u64().unwrap() >= before);
    assert!(v["pid"].as_u64().is_some());
    assert_eq!(v["args"][0], serde_json::json!(["dir", data]));
    assert_eq!(v["args"][1], serde_json::json!(["master_key_file", key]));
    // Over which range: shard 0, both segments, log indexes 0..3 (three messages).
    let r = &v["ranges"][0];
    assert_eq!(r["shard"], 0);
    assert_eq!(r["segments"].as_array().unwrap().len(), 2);
    assert_eq!(r["segments"][0], old);
    assert_eq!(
        (r["first_index"].as_u64(), r["end_index"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(count(v, "records"), 3);
    assert_eq!(count(v, "problems"), 0);
    let mode = std::fs::metadata(files.data.join("access.log"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // audit: the listed positions.
    let csv = old_accepted(dir.path());
    courier(&[
        "log",
        "audit",
        "--accepted",
        path(&csv),
        data,
        "--master-key-file",
        key,
    ]);
    // expire: the dropped segment.
    let out = courier(&["log", "expire", data, "--master-key-file", key]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A refused run leaves its trace too (the master key file is missing).
    let out = courier(&[
        "log",
        "verify",
        data,
        "--master-key-file",
        "/nonexistent/key",
    ]);
    assert!(!out.status.success());

    let l = lines(&files.data);
    assert_eq!(l.len(), 4, "appended, never rewritten: {l:?}");
    assert_eq!(l[0], *v, "the first line is unchanged");
    assert_eq!(l[1]["command"], "log audit");
    assert_eq!(l[1]["ranges"][0]["first_index"], 0);
    assert_eq!(l[1]["ranges"][0]["end_index"], 2);
    assert_eq!(count(&l[1], "listed"), 2);
    assert_eq!(l[2]["command"], "log expire");
    assert_eq!(l[2]["ranges"][0]["segments"], serde_json::json!([old]));
    assert_eq!(count(&l[2], "segments_dropped"), 1);
    assert_eq!(count(&l[2], "records_dropped"), 2);
    assert_eq!(count(&l[2], "expired_statuses"), 2);
    assert_eq!(l[3]["outcome"], "failed");

    // Ids and counts only.
    let text = std::fs::read_to_string(files.data.join("access.log")).unwrap();
    assert!(!text.contains(PAYLOAD_MARKER), "{text}");
    assert!(!text.contains(&RECIPIENT[1..]), "{text}");
    assert!(!text.contains(MASTER_HEX), "{text}");
}
