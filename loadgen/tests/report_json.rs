//! The JSON report is a contract with plotting scripts: exact field names, lossless
//! round trip.

use std::collections::{BTreeMap, BTreeSet};

use courier::load::{LoadReport, Percentiles};

fn sample() -> LoadReport {
    LoadReport {
        sent: 1000,
        accepted: 900,
        duplicate: 10,
        throttled: 40,
        rejected: 30,
        errors: 20,
        duration_secs: 10.5,
        msgs_per_sec: 900.0 / 10.5,
        payload_bytes_per_sec: 900.0 * 1024.0 / 10.5,
        latency_us: Percentiles {
            p50: 120,
            p90: 300,
            p99: 900,
            p999: 2000,
            max: 4100,
        },
        rejected_by_reason: BTreeMap::from([("sender_paused".to_string(), 30)]),
    }
}

fn keys(v: &serde_json::Value) -> BTreeSet<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

#[test]
fn report_json_has_exactly_the_documented_fields() {
    let v = serde_json::to_value(sample()).unwrap();
    assert_eq!(
        keys(&v),
        BTreeSet::from([
            "sent",
            "accepted",
            "duplicate",
            "throttled",
            "rejected",
            "errors",
            "duration_secs",
            "msgs_per_sec",
            "payload_bytes_per_sec",
            "latency_us",
            "rejected_by_reason",
        ])
    );
    assert_eq!(
        keys(&v["latency_us"]),
        BTreeSet::from(["p50", "p90", "p99", "p999", "max"])
    );
    assert_eq!(v["latency_us"]["p999"], 2000);
    assert_eq!(v["rejected_by_reason"]["sender_paused"], 30);
}

#[test]
fn report_json_round_trips() {
    let r = sample();
    let text = serde_json::to_string_pretty(&r).unwrap();
    let back: LoadReport = serde_json::from_str(&text).unwrap();
    assert_eq!(back, r);
}
