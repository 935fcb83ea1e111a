//! What a run reports: the JSON contract (`courier-loadgen --json`), the final table and
//! the side-by-side comparison of two runs.
//!
//! The fields of loadgen v1 (`sent` … `latency_us`) keep their names and meaning; every
//! field added since has a serde default, so v1 files still load (for `--compare`).

use std::collections::BTreeMap;
use std::io::Write;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::scenario::Label;
use crate::tracking::DeliveryReport;

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// 99.99th percentile.
    #[serde(default)]
    pub p9999: u64,
    /// Largest recorded.
    pub max: u64,
}

impl Percentiles {
    /// Reads the percentiles of `h` (all zero when it is empty).
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            p9999: h.value_at_quantile(0.9999),
            max: h.max(),
        }
    }
}

/// The latency at a percentile, for plotting the whole distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PercentilePoint {
    /// Percentile, 0 to 100.
    pub percentile: f64,
    /// Latency there, microseconds.
    pub latency_us: u64,
}

/// Percentiles at which the curve is sampled: 0, 10, …, 90, 99, 99.9, … up to 99.9999.
const CURVE_POINTS: &[f64] = &[
    0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 75.0, 80.0, 85.0, 90.0, 92.5, 95.0, 97.5, 99.0,
    99.5, 99.75, 99.9, 99.95, 99.99, 99.995, 99.999, 99.9999, 100.0,
];

/// The latency curve of `h` at fixed percentiles (empty when `h` is).
pub fn curve(h: &Histogram<u64>) -> Vec<PercentilePoint> {
    if h.is_empty() {
        return Vec::new();
    }
    CURVE_POINTS
        .iter()
        .map(|&p| PercentilePoint {
            percentile: p,
            latency_us: if p >= 100.0 {
                h.max()
            } else {
                h.value_at_percentile(p)
            },
        })
        .collect()
}

/// One second of the run, as the progress line showed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since the start at the end of this interval.
    pub t_secs: f64,
    /// Messages sent in the interval.
    pub sent: u64,
    /// Messages acked as accepted in the interval.
    pub accepted: u64,
    /// Messages answered otherwise (duplicate, throttled, rejected).
    pub not_accepted: u64,
    /// Messages whose batch failed.
    pub errors: u64,
    /// Latency of the messages answered in the interval.
    pub p50_us: u64,
    /// 99th percentile of the same.
    pub p99_us: u64,
    /// Largest of the same.
    pub max_us: u64,
}

/// How one simulated sender fared; scores the detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SenderReport {
    /// From the scenario.
    pub name: String,
    /// What the detector should conclude.
    pub label: Label,
    /// The business its token belongs to (from WELCOME).
    pub business_id: u32,
    /// Target rate, messages per second (0: closed loop).
    pub rate: f64,
    /// Onset, seconds after the start.
    pub start_secs: f64,
    /// Messages sent.
    pub sent: u64,
    /// Accepted.
    pub accepted: u64,
    /// Throttled.
    pub throttled: u64,
    /// Rejected.
    pub rejected: u64,
    /// Failed batches' messages.
    pub errors: u64,
    /// Seconds from its onset to its first `rejected` or `throttled`; `None`: never.
    pub first_flag_after_onset_secs: Option<f64>,
    /// Its rejected messages by reason name (`Reason::name`), so that a pause
    /// (`sender_paused`) is told apart from a limit.
    #[serde(default)]
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Latency of its answered messages, as for the whole run.
    #[serde(default)]
    pub latency_us: Percentiles,
}

impl SenderReport {
    /// Whether the detector flagged it (any rejected or throttled answer).
    pub fn flagged(&self) -> bool {
        self.throttled + self.rejected > 0
    }
}

/// The detector's score over senders: "flagged" means any rejected or throttled answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Senders labelled abusive.
    pub abusive: u64,
    /// Senders labelled normal.
    pub normal: u64,
    /// Abusive and flagged.
    pub true_positives: u64,
    /// Normal and flagged.
    pub false_positives: u64,
    /// Abusive and not flagged.
    pub false_negatives: u64,
    /// TP / (TP + FP); `None` when nothing was flagged (undefined).
    pub precision: Option<f64>,
    /// TP / (TP + FN); `None` when no sender is abusive (undefined).
    pub recall: Option<f64>,
    /// Median seconds from onset to first flag over flagged abusive senders.
    pub median_time_to_flag_secs: Option<f64>,
}

impl Detection {
    /// Scores `senders`.
    pub fn score(senders: &[SenderReport]) -> Detection {
        let mut d = Detection::default();
        let mut times = Vec::new();
        for s in senders {
            match (s.label, s.flagged()) {
                (Label::Abusive, true) => {
                    d.true_positives += 1;
                    times.extend(s.first_flag_after_onset_secs);
                }
                (Label::Abusive, false) => d.false_negatives += 1,
                (Label::Normal, true) => d.false_positives += 1,
                (Label::Normal, false) => {}
            }
            match s.label {
                Label::Abusive => d.abusive += 1,
                Label::Normal => d.normal += 1,
            }
        }
        let tp = d.true_positives as f64;
        d.precision = (d.true_positives + d.false_positives > 0)
            .then(|| tp / (d.true_positives + d.false_positives) as f64);
        d.recall = (d.abusive > 0).then(|| tp / d.abusive as f64);
        times.sort_by(f64::total_cmp);
        d.median_time_to_flag_secs = times.get(times.len() / 2).copied();
        d
    }
}

/// Messages resent on purpose with an already-accepted client id (`--duplicate-rate`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Duplicates {
    /// Resent.
    pub sent: u64,
    /// Answered `duplicate`: the server recognised them.
    pub detected: u64,
    /// Answered `accepted` again: the server stored them twice.
    pub not_detected: u64,
    /// Answered otherwise (throttled, rejected) or failed.
    pub other: u64,
}

/// REPORT frames (spam reports) sent by report-storm senders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reports {
    /// REPORT frames sent.
    pub sent: u64,
    /// Entries in them.
    pub entries: u64,
    /// Frames whose stream the server refused, by stream error code (`0x17` is
    /// UNEXPECTED_FRAME: a business connection may not send REPORT in wire v1).
    pub refused_by_code: BTreeMap<String, u64>,
    /// Frames the server took without refusing.
    pub taken: u64,
    /// Frames that got no answer (connection lost, timeout).
    pub errors: u64,
}

/// CPU time of the generator and of the server during the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cpu {
    /// CPU seconds (user + system) the generator used while sending.
    pub generator_secs: f64,
    /// Of the same, per message sent, microseconds.
    pub generator_us_per_msg: f64,
    /// CPU seconds of the server, when it could be read.
    pub server_secs: Option<f64>,
    /// Of the same, per message sent, microseconds.
    pub server_us_per_msg: Option<f64>,
    /// Where the server's figure comes from ("in-process shard threads", "pid N").
    pub server_source: Option<String>,
}

/// The outcome of a run; its JSON form is what `courier-loadgen --json` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Messages sent.
    pub sent: u64,
    /// Messages acknowledged as accepted.
    pub accepted: u64,
    /// Messages acknowledged as duplicates.
    pub duplicate: u64,
    /// Messages throttled (not retried by the driver).
    pub throttled: u64,
    /// Messages rejected.
    pub rejected: u64,
    /// Messages whose batch got no ACK (stream reset, connection lost, drain timeout).
    pub errors: u64,
    /// Seconds from the first send to the last ACK (the drain included).
    pub duration_secs: f64,
    /// Accepted messages per second over `duration_secs`.
    pub msgs_per_sec: f64,
    /// Payload bytes of accepted messages per second over `duration_secs`.
    pub payload_bytes_per_sec: f64,
    /// Latency per message: ACK time minus its intended send time (open loop) or the
    /// send time of its batch (closed loop).
    pub latency_us: Percentiles,
    /// Rejected messages by reason name (`Reason::name`).
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// `open` (fixed rate, latency from intended send times), `closed` (full speed), or
    /// `mixed` (some senders of each; `target_rate` is the open-loop senders').
    #[serde(default)]
    pub mode: String,
    /// Target rate summed over senders, messages per second (0 for closed loop).
    #[serde(default)]
    pub target_rate: f64,
    /// Messages sent at least `LATE_AFTER` after their intended time because the
    /// in-flight bound was reached (the server fell behind).
    #[serde(default)]
    pub late: u64,
    /// Most messages due and not yet sent at one time, on one connection.
    #[serde(default)]
    pub backlog_peak: u64,
    /// Messages never sent because the backlog passed its bound (`backlog_secs_max` of
    /// the schedule) or the run ended first. Not in `sent` and not in the latencies.
    #[serde(default)]
    pub backlog_dropped: u64,
    /// Whether the run was cut short (Ctrl-C).
    #[serde(default)]
    pub interrupted: bool,
    /// Latency by percentile, for plots.
    #[serde(default)]
    pub latency_curve: Vec<PercentilePoint>,
    /// One entry per second.
    #[serde(default)]
    pub timeline: Vec<Second>,
    /// Per simulated sender.
    #[serde(default)]
    pub senders: Vec<SenderReport>,
    /// The detector's score over senders.
    #[serde(default)]
    pub detection: Detection,
    /// Resent duplicates and how they came back.
    #[serde(default)]
    pub duplicates: Duplicates,
    /// Spam reports sent and how they came back.
    #[serde(default)]
    pub reports: Reports,
    /// CPU time of generator and server.
    #[serde(default)]
    pub cpu: Cpu,
    /// Delivery through the simulated edge (`--deliver`): statuses, retransmissions,
    /// replies, latencies and the checks.
    #[serde(default)]
    pub delivery: Option<DeliveryReport>,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.digits$}"))
}

impl LoadReport {
    /// Writes the report as a human-readable table.
    pub fn print_table(&self, w: &mut impl Write) -> std::io::Result<()> {
        let l = &self.latency_us;
        if self.interrupted {
            writeln!(w, "INTERRUPTED: partial report")?;
        }
        if !self.mode.is_empty() {
            let rate = if self.target_rate > 0.0 {
                format!(" at {:.0} msgs/s target", self.target_rate)
            } else {
                String::new()
            };
            writeln!(w, "mode           {:>12}{rate}", self.mode)?;
        }
        writeln!(w, "duration       {:>12.2} s", self.duration_secs)?;
        writeln!(w, "throughput     {:>12.0} msgs/s", self.msgs_per_sec)?;
        writeln!(
            w,
            "payload        {:>12.2} MB/s",
            self.payload_bytes_per_sec / 1e6
        )?;
        writeln!(
            w,
            "latency (us)   p50 {}  p90 {}  p99 {}  p99.9 {}  p99.99 {}  max {}",
            l.p50, l.p90, l.p99, l.p999, l.p9999, l.max
        )?;
        writeln!(w, "sent           {:>12}", self.sent)?;
        writeln!(w, "accepted       {:>12}", self.accepted)?;
        writeln!(w, "duplicate      {:>12}", self.duplicate)?;
        writeln!(w, "throttled      {:>12}", self.throttled)?;
        writeln!(w, "rejected       {:>12}", self.rejected)?;
        for (reason, n) in &self.rejected_by_reason {
            writeln!(w, "  {reason:<27} {n:>12}")?;
        }
        writeln!(w, "errors         {:>12}", self.errors)?;
        if self.mode == "open" || self.mode == "mixed" {
            writeln!(
                w,
                "late/backlog   {:>12} late  (peak backlog {}, dropped {})",
                self.late, self.backlog_peak, self.backlog_dropped
            )?;
        }
        let d = &self.duplicates;
        if d.sent > 0 {
            writeln!(
                w,
                "duplicates     {:>12} resent: {} detected, duplicates not detected: {}, other {}",
                d.sent, d.detected, d.not_detected, d.other
            )?;
        }
        let r = &self.reports;
        if r.sent > 0 {
            let refused: Vec<String> = r
                .refused_by_code
                .iter()
                .map(|(c, n)| format!("{n} refused with {c}"))
                .collect();
            writeln!(
                w,
                "reports        {:>12} REPORT frames ({} entries): {}; {} taken, {} errors",
                r.sent,
                r.entries,
                if refused.is_empty() {
                    "none refused".to_string()
                } else {
                    refused.join(", ")
                },
                r.taken,
                r.errors
            )?;
        }
        // One unlabelled-normal sender (the flag-built run) has nothing to score.
        let scored =
            self.senders.len() > 1 || self.senders.iter().any(|s| s.label == Label::Abusive);
        if scored {
            writeln!(w, "senders")?;
            writeln!(
                w,
                "  {:<16} {:<8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>12}",
                "name", "label", "rate", "sent", "accepted", "throttled", "rejected", "flag after"
            )?;
            for s in &self.senders {
                let label = match s.label {
                    Label::Normal => "normal",
                    Label::Abusive => "abusive",
                };
                writeln!(
                    w,
                    "  {:<16} {:<8} {:>9.0} {:>9} {:>9} {:>9} {:>7} {:>12}",
                    s.name,
                    label,
                    s.rate,
                    s.sent,
                    s.accepted,
                    s.throttled,
                    s.rejected,
                    s.first_flag_after_onset_secs
                        .map_or_else(|| "never".into(), |t| format!("{t:.3} s"))
                )?;
            }
            let d = &self.detection;
            writeln!(
                w,
                "detection      precision {}  recall {}  (abusive {}, normal {}; TP {} FP {} FN {}; median time to flag {} s)",
                opt(d.precision, 2),
                opt(d.recall, 2),
                d.abusive,
                d.normal,
                d.true_positives,
                d.false_positives,
                d.false_negatives,
                opt(d.median_time_to_flag_secs, 3)
            )?;
            if d.true_positives + d.false_positives == 0 {
                writeln!(
                    w,
                    "               nothing was rejected or throttled: every sender was admitted"
                )?;
            }
        }
        if let Some(d) = &self.delivery {
            print_delivery(d, w)?;
        }
        let c = &self.cpu;
        writeln!(
            w,
            "cpu            generator {:.2} s = {:.2} us/msg; server {}",
            c.generator_secs,
            c.generator_us_per_msg,
            match (c.server_secs, c.server_us_per_msg, &c.server_source) {
                (Some(s), Some(u), Some(src)) => format!("{s:.2} s = {u:.2} us/msg ({src})"),
                _ => "n/a (no in-process shards and no --server-pid)".to_string(),
            }
        )?;
        Ok(())
    }
}

/// The delivery part of the table.
fn print_delivery(d: &DeliveryReport, w: &mut impl Write) -> std::io::Result<()> {
    let lat = |p: &Percentiles| {
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            p.p50, p.p90, p.p99, p.p999, p.max
        )
    };
    writeln!(w, "delivery")?;
    writeln!(w, "  delivered    {:>12}  (read {})", d.delivered, d.read)?;
    writeln!(w, "  failed       {:>12}", d.failed)?;
    for (reason, n) in &d.failed_by_reason {
        writeln!(w, "    {reason:<25} {n:>12}")?;
    }
    writeln!(w, "  expired      {:>12}", d.expired)?;
    writeln!(
        w,
        "  hand-offs    {:>12}  (retransmissions {}, retry_later {}, ONLINE {})",
        d.handoffs, d.retransmissions, d.retry_later, d.online
    )?;
    writeln!(
        w,
        "  inbound      {:>12}  accepted by the relay; {} heard by businesses, {} throttled, {} lost, {} misrouted",
        d.inbound, d.inbound_received, d.inbound_throttled, d.inbound_lost, d.inbound_misrouted
    )?;
    writeln!(
        w,
        "  submit → delivered (us)   {}",
        lat(&d.submit_to_delivered_us)
    )?;
    writeln!(
        w,
        "  delivered → STATUS (us)   {}",
        lat(&d.delivered_to_status_us)
    )?;
    if d.online_to_delivered_us.max > 0 {
        writeln!(
            w,
            "  ONLINE → delivered (us)   {}",
            lat(&d.online_to_delivered_us)
        )?;
    }
    if let Some(e) = &d.e2e {
        writeln!(
            w,
            "  e2e          {:>12}  opened on every device ({} copies, {} sessions, {} bundle lists, {} replies sealed); {} failed to open, {} wrong content, {} of {} cross-device tries opened",
            e.messages_opened,
            e.copies_opened,
            e.sessions_accepted,
            e.bundles_published,
            e.replies_sealed,
            e.open_failures,
            e.content_mismatch,
            e.cross_device_opened,
            e.cross_device_checks
        )?;
    }
    writeln!(
        w,
        "  check        {}: {} accepted message(s) tracked, {} without a final status after {:.1} s of settling, {} extra final, {} out of order ({} event copies dropped{})",
        if d.passed() { "PASS" } else { "FAIL" },
        d.tracked,
        d.unresolved,
        d.settle_secs,
        d.extra_finals,
        d.order_violations,
        d.events_duplicate,
        if d.untracked > 0 {
            format!("; {} not tracked", d.untracked)
        } else {
            String::new()
        }
    )
}

/// A delivery figure of a run, NaN (shown `n/a`) when it did not deliver.
fn dv(r: &LoadReport, f: impl Fn(&DeliveryReport) -> u64) -> f64 {
    r.delivery.as_ref().map_or(f64::NAN, |d| f(d) as f64)
}

/// Prints two runs side by side with the ratio B/A of every figure.
pub fn compare(a: &LoadReport, b: &LoadReport, w: &mut impl Write) -> std::io::Result<()> {
    let rows: Vec<(&str, f64, f64)> = vec![
        ("msgs/s", a.msgs_per_sec, b.msgs_per_sec),
        (
            "payload MB/s",
            a.payload_bytes_per_sec / 1e6,
            b.payload_bytes_per_sec / 1e6,
        ),
        ("p50 us", a.latency_us.p50 as f64, b.latency_us.p50 as f64),
        ("p90 us", a.latency_us.p90 as f64, b.latency_us.p90 as f64),
        ("p99 us", a.latency_us.p99 as f64, b.latency_us.p99 as f64),
        (
            "p99.9 us",
            a.latency_us.p999 as f64,
            b.latency_us.p999 as f64,
        ),
        (
            "p99.99 us",
            a.latency_us.p9999 as f64,
            b.latency_us.p9999 as f64,
        ),
        ("max us", a.latency_us.max as f64, b.latency_us.max as f64),
        ("sent", a.sent as f64, b.sent as f64),
        ("accepted", a.accepted as f64, b.accepted as f64),
        ("duplicate", a.duplicate as f64, b.duplicate as f64),
        ("throttled", a.throttled as f64, b.throttled as f64),
        ("rejected", a.rejected as f64, b.rejected as f64),
        ("errors", a.errors as f64, b.errors as f64),
        ("late", a.late as f64, b.late as f64),
        ("duration s", a.duration_secs, b.duration_secs),
        (
            "gen us/msg",
            a.cpu.generator_us_per_msg,
            b.cpu.generator_us_per_msg,
        ),
        ("delivered", dv(a, |d| d.delivered), dv(b, |d| d.delivered)),
        ("failed", dv(a, |d| d.failed), dv(b, |d| d.failed)),
        ("expired", dv(a, |d| d.expired), dv(b, |d| d.expired)),
        (
            "retransmit",
            dv(a, |d| d.retransmissions),
            dv(b, |d| d.retransmissions),
        ),
        ("inbound", dv(a, |d| d.inbound), dv(b, |d| d.inbound)),
        (
            "sub→del p99 us",
            dv(a, |d| d.submit_to_delivered_us.p99),
            dv(b, |d| d.submit_to_delivered_us.p99),
        ),
        (
            "del→st p99 us",
            dv(a, |d| d.delivered_to_status_us.p99),
            dv(b, |d| d.delivered_to_status_us.p99),
        ),
        (
            "server us/msg",
            a.cpu.server_us_per_msg.unwrap_or(f64::NAN),
            b.cpu.server_us_per_msg.unwrap_or(f64::NAN),
        ),
    ];
    writeln!(w, "{:<14} {:>14} {:>14} {:>8}", "", "A", "B", "B/A")?;
    for (name, x, y) in rows {
        let ratio = if x != 0.0 && x.is_finite() && y.is_finite() {
            format!("{:.3}", y / x)
        } else {
            "n/a".to_string()
        };
        let fmt = |v: f64| {
            if v.is_finite() {
                format!("{v:.2}")
            } else {
                "n/a".to_string()
            }
        };
        writeln!(w, "{name:<14} {:>14} {:>14} {ratio:>8}", fmt(x), fmt(y))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(label: Label, throttled: u64, first: Option<f64>) -> SenderReport {
        SenderReport {
            name: "s".into(),
            label,
            business_id: 1,
            rate: 10.0,
            start_secs: 0.0,
            sent: 10,
            accepted: 10 - throttled,
            throttled,
            rejected: 0,
            errors: 0,
            first_flag_after_onset_secs: first,
            rejected_by_reason: BTreeMap::new(),
            latency_us: Percentiles::default(),
        }
    }

    #[test]
    fn detection_scores_are_undefined_not_faked_when_nothing_is_flagged() {
        let d = Detection::score(&[
            sender(Label::Normal, 0, None),
            sender(Label::Abusive, 0, None),
        ]);
        assert_eq!((d.precision, d.recall), (None, Some(0.0)));
        assert_eq!(d.false_negatives, 1);
        let d = Detection::score(&[
            sender(Label::Normal, 1, Some(0.1)),
            sender(Label::Abusive, 2, Some(0.5)),
            sender(Label::Abusive, 0, None),
        ]);
        assert_eq!((d.precision, d.recall), (Some(0.5), Some(0.5)));
        assert_eq!(d.median_time_to_flag_secs, Some(0.5));
    }
}
