//! The JSON report is a contract with plotting scripts: exact field names, lossless
//! round trip, and loadgen v1's fields unchanged (a v1 file still loads, for --compare).

use std::collections::{BTreeMap, BTreeSet};

use courier_loadgen::report::{
    Cpu, Detection, Duplicates, PercentilePoint, Reports, Second, SenderReport,
};
use courier_loadgen::tracking::DeliveryReport;
use courier_loadgen::{Label, LoadReport, Percentiles};

fn sample() -> LoadReport {
    let senders = vec![SenderReport {
        name: "blaster".into(),
        label: Label::Abusive,
        business_id: 2,
        rate: 1000.0,
        start_secs: 5.0,
        sent: 500,
        accepted: 460,
        throttled: 40,
        rejected: 0,
        errors: 0,
        first_flag_after_onset_secs: Some(0.25),
        rejected_by_reason: BTreeMap::new(),
        latency_us: Percentiles::default(),
    }];
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
            p9999: 3000,
            max: 4100,
        },
        rejected_by_reason: BTreeMap::from([("sender_paused".to_string(), 30)]),
        mode: "open".into(),
        target_rate: 100.0,
        late: 3,
        backlog_peak: 7,
        backlog_dropped: 1,
        interrupted: false,
        latency_curve: vec![PercentilePoint {
            percentile: 99.0,
            latency_us: 900,
        }],
        timeline: vec![Second {
            t_secs: 1.0,
            sent: 100,
            accepted: 90,
            not_accepted: 8,
            errors: 2,
            p50_us: 120,
            p99_us: 900,
            max_us: 1000,
        }],
        detection: Detection::score(&senders),
        senders,
        duplicates: Duplicates {
            sent: 10,
            detected: 0,
            not_detected: 10,
            other: 0,
        },
        reports: Reports {
            sent: 5,
            entries: 5,
            refused_by_code: BTreeMap::from([("0x17".to_string(), 5)]),
            taken: 0,
            errors: 0,
        },
        cpu: Cpu {
            generator_secs: 0.5,
            generator_us_per_msg: 500.0,
            server_secs: Some(1.0),
            server_us_per_msg: Some(1000.0),
            server_source: Some("pid 1".into()),
        },
        delivery: Some(DeliveryReport {
            delivered: 850,
            read: 200,
            failed: 40,
            failed_by_reason: BTreeMap::from([("not_on_platform".to_string(), 40)]),
            expired: 10,
            sent: 890,
            handoffs: 1100,
            retransmissions: 200,
            retry_later: 180,
            online: 90,
            inbound: 60,
            inbound_received: 60,
            tracked: 900,
            submit_to_delivered_us: Percentiles {
                p50: 900,
                p99: 3000,
                ..Percentiles::default()
            },
            settle_secs: 1.5,
            ..DeliveryReport::default()
        }),
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
            // loadgen v1
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
            // issue 6
            "mode",
            "target_rate",
            "late",
            "backlog_peak",
            "backlog_dropped",
            "interrupted",
            "latency_curve",
            "timeline",
            "senders",
            "detection",
            "duplicates",
            "reports",
            "cpu",
            // issue 15
            "delivery",
        ])
    );
    assert_eq!(
        keys(&v["delivery"]),
        BTreeSet::from([
            "delivered",
            "read",
            "failed",
            "failed_by_reason",
            "expired",
            "sent",
            "handoffs",
            "retransmissions",
            "retry_later",
            "online",
            "inbound",
            "inbound_received",
            "inbound_misrouted",
            "inbound_throttled",
            "inbound_lost",
            "events_duplicate",
            "submit_to_delivered_us",
            "delivered_to_status_us",
            "online_to_delivered_us",
            "tracked",
            "untracked",
            "unresolved",
            "extra_finals",
            "order_violations",
            "settle_secs",
            // issue 16 (null when the relay does not seal for devices)
            "e2e",
        ])
    );
    assert_eq!(v["delivery"]["submit_to_delivered_us"]["p99"], 3000);
    assert_eq!(
        keys(&v["latency_us"]),
        BTreeSet::from(["p50", "p90", "p99", "p999", "p9999", "max"])
    );
    assert_eq!(v["latency_us"]["p999"], 2000);
    assert_eq!(v["rejected_by_reason"]["sender_paused"], 30);
    assert_eq!(v["detection"]["recall"], 1.0);
    assert_eq!(v["detection"]["precision"], 1.0);
    assert_eq!(v["senders"][0]["label"], "abusive");
    assert_eq!(v["reports"]["refused_by_code"]["0x17"], 5);
    assert_eq!(
        keys(&v["timeline"][0]),
        BTreeSet::from([
            "t_secs",
            "sent",
            "accepted",
            "not_accepted",
            "errors",
            "p50_us",
            "p99_us",
            "max_us"
        ])
    );
}

#[test]
fn report_json_round_trips() {
    let r = sample();
    let text = serde_json::to_string_pretty(&r).unwrap();
    let back: LoadReport = serde_json::from_str(&text).unwrap();
    assert_eq!(back, r);
}

#[test]
fn undefined_scores_are_null_not_invented() {
    let mut r = sample();
    r.senders[0].throttled = 0;
    r.senders[0].first_flag_after_onset_secs = None;
    r.detection = Detection::score(&r.senders);
    let v = serde_json::to_value(&r).unwrap();
    assert!(v["detection"]["precision"].is_null());
    assert_eq!(v["detection"]["recall"], 0.0);
    let mut table = Vec::new();
    r.print_table(&mut table).unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(table.contains("precision n/a  recall 0.00"), "{table}");
    assert!(table.contains("every sender was admitted"), "{table}");
    assert!(table.contains("p99.99 3000"), "{table}");
    assert!(
        table.contains("delivered             850  (read 200)"),
        "{table}"
    );
    assert!(table.contains("check        PASS"), "{table}");
}

#[test]
fn a_loadgen_v1_report_still_loads() {
    let v1 = r#"{"sent":10,"accepted":10,"duplicate":0,"throttled":0,"rejected":0,"errors":0,
        "duration_secs":1.0,"msgs_per_sec":10.0,"payload_bytes_per_sec":10240.0,
        "latency_us":{"p50":1,"p90":2,"p99":3,"p999":4,"max":5},"rejected_by_reason":{}}"#;
    let r: LoadReport = serde_json::from_str(v1).unwrap();
    assert_eq!((r.sent, r.latency_us.p999, r.latency_us.p9999), (10, 4, 0));
    assert!(r.timeline.is_empty() && r.mode.is_empty() && r.delivery.is_none());
    let mut out = Vec::new();
    courier_loadgen::report::compare(&r, &sample(), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("msgs/s") && out.contains("B/A"), "{out}");
    // sent: 1000 / 10.
    assert!(
        out.lines()
            .any(|l| l.starts_with("sent") && l.ends_with("100.000")),
        "{out}"
    );
}
