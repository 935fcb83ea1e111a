//! Checkpoint of a detector: versioned, CRC-framed, sketches and counters only.
//!
//! ```text
//! "CDET" | version:u16 | config fingerprint | sharded:u8 | count:u32 | count * business
//!        | crc32c:u32
//! ```
//!
//! Little endian throughout. A business holds its control (pause and limits with their
//! epochs, and the evidence of the last pause or rating change), rate bucket, recipient
//! window (exact tags with hours, or the 24 hourly HyperLogLogs), past-recipient filter
//! (with the start of each generation), same-recipient table, fan-out rings, short sketches and baseline, quality ring and
//! billing count. Recipients appear only as keyed hashes, so a checkpoint holds
//! no phone number (and is useless without the process secret, which it does not hold:
//! restore with the same secret). The interval counters of an unsent delta are not
//! kept: a restart loses at most one exchange interval of cross-shard news.
//!
//! Every structure in it ages by time (issue 19), and the shell writes a checkpoint only
//! after [`Detector::expire`] moved every business to its clock: so a checkpoint holds
//! no recipient hash older than `detect.recipient_memory_ms` (the log's retention), and
//! the shell writes it with mode 0600.

use super::business::{BusinessState, Control};
use super::fanout::{FAN_TICKS, SHORT_HLL_P};
use super::recipients::{ExactSet, HllRing, Recipients, HOURS};
use super::sketches::PastFilter;
use super::{
    get_or_create, DetectConfig, Detector, Evidence, Rating, Why, SKETCH_WIDTH_MAX,
    SKETCH_WIDTH_MIN,
};
use crate::registry::Tier;

const MAGIC: &[u8; 4] = b"CDET";
/// 4 (issue 19): the past-recipient filter carries the start of each generation and how
/// the old one was retired, so that it forgets by time (see `sketches::PastFilter`), and
/// the exact 24 h window the recipients it counts without their tags (`recipients`).
const VERSION: u16 = 4;
/// 3 (issue 14): the same-recipient count-min sketch became a tagged table (its size in
/// the fingerprint is `same_recipient_table_entries`), the fan-out rings are split into
/// this shard's and the peers' counts and come with their short HyperLogLogs, and the
/// control holds the evidence of its pause or rating change. Restored without its
/// past-recipient filter (see [`Detector::restore`]).
const VERSION_TABLE: u16 = 3;
/// 2: recipient hashes are SipHash-1-3 of the padded number (1: SipHash-2-4 of the
/// number) and the past-recipient filter has 256-bit blocks (1: 512-bit). Restored
/// without its same-recipient counts (a count-min sketch this build no longer keeps):
/// for at most two windows (20 s) a recipient may get up to twice its quota.
const VERSION_SKETCH: u16 = 2;
/// The layout of version 1 is version 2's; restoring one also drops what was derived
/// from recipient hashes (see [`Detector::restore`]).
const VERSION_OLD_HASH: u16 = 1;

/// Why a checkpoint was refused. Nothing of the detector is changed when it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// Shorter than its header and checksum.
    #[error("checkpoint is truncated")]
    Truncated,
    /// Not a detector checkpoint.
    #[error("not a detector checkpoint (bad magic)")]
    BadMagic,
    /// Written by a version this build does not read.
    #[error("checkpoint version {0} is not supported (this build reads 1 to {VERSION})")]
    Version(u16),
    /// The checksum does not match: the bytes were damaged.
    #[error("checkpoint checksum mismatch")]
    Checksum,
    /// Written under other sketch sizes; names the differing setting.
    #[error("checkpoint was written with a different detect.{0}")]
    Config(&'static str),
    /// A field is out of range; names it.
    #[error("checkpoint field {0} is invalid")]
    Corrupt(&'static str),
    /// Holds more businesses than `detect.businesses_max`.
    #[error("checkpoint holds more businesses than detect.businesses_max")]
    TooManyBusinesses,
}

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CheckpointError> {
        if self.0.len() < n {
            return Err(CheckpointError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, CheckpointError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CheckpointError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, CheckpointError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, CheckpointError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

fn tier_byte(t: Tier) -> u8 {
    Tier::ALL.iter().position(|x| *x == t).expect("tier") as u8
}

fn tier_of(b: u8) -> Result<Tier, CheckpointError> {
    Tier::ALL
        .get(usize::from(b))
        .copied()
        .ok_or(CheckpointError::Corrupt("tier"))
}

fn rating_of(b: u8) -> Result<Rating, CheckpointError> {
    [Rating::Green, Rating::Yellow, Rating::Red]
        .get(usize::from(b))
        .copied()
        .ok_or(CheckpointError::Corrupt("rating"))
}

fn fingerprint(w: &mut W, cfg: &DetectConfig) {
    w.u8(cfg.hll_precision);
    w.u32(cfg.exact_recipients_max);
    w.u32(cfg.past_filter_bytes);
    w.u32(cfg.same_recipient_table_entries);
    w.u32(cfg.same_recipient_window_ms);
}

/// Checks the sketch sizes a checkpoint was written with. Returns, for a version-1 or 2
/// checkpoint, the width of its count-min sketch (skipped when read).
fn check_fingerprint(
    r: &mut R<'_>,
    cfg: &DetectConfig,
    version: u16,
) -> Result<Option<usize>, CheckpointError> {
    if r.u8()? != cfg.hll_precision {
        return Err(CheckpointError::Config("hll_precision"));
    }
    if r.u32()? != cfg.exact_recipients_max {
        return Err(CheckpointError::Config("exact_recipients_max"));
    }
    if r.u32()? != cfg.past_filter_bytes {
        return Err(CheckpointError::Config("past_filter_bytes"));
    }
    let size = r.u32()?;
    let sketch_width = if version >= VERSION_TABLE {
        if size != cfg.same_recipient_table_entries {
            return Err(CheckpointError::Config("same_recipient_table_entries"));
        }
        None
    } else {
        // The old sketch's width (bounded as its profile key was): its cells are skipped.
        if !(size.is_power_of_two() && (SKETCH_WIDTH_MIN..=SKETCH_WIDTH_MAX).contains(&size)) {
            return Err(CheckpointError::Corrupt("same_recipient_sketch_width"));
        }
        Some(size as usize)
    };
    if r.u32()? != cfg.same_recipient_window_ms {
        return Err(CheckpointError::Config("same_recipient_window_ms"));
    }
    Ok(sketch_width)
}

fn write_evidence(w: &mut W, e: Option<Evidence>) {
    let mut v = [0u32; 8];
    let kind = match e {
        None => 0,
        Some(Evidence::FanOut {
            distinct_per_sec,
            new_pct,
            baseline_per_min,
            baseline_declared,
            threshold_per_sec,
            floor_per_sec,
            factor,
            new_pct_min,
        }) => {
            v = [
                distinct_per_sec,
                new_pct,
                baseline_per_min,
                u32::from(baseline_declared),
                threshold_per_sec,
                floor_per_sec,
                factor,
                new_pct_min,
            ];
            1
        }
        Some(Evidence::Quality {
            reports,
            delivered,
            threshold_ppm,
        }) => {
            v[..3].copy_from_slice(&[reports, delivered, threshold_ppm]);
            2
        }
    };
    w.u8(kind);
    for x in v {
        w.u32(x);
    }
}

fn read_evidence(r: &mut R<'_>) -> Result<Option<Evidence>, CheckpointError> {
    let kind = r.u8()?;
    let mut v = [0u32; 8];
    for x in &mut v {
        *x = r.u32()?;
    }
    Ok(match kind {
        0 => None,
        1 => Some(Evidence::FanOut {
            distinct_per_sec: v[0],
            new_pct: v[1],
            baseline_per_min: v[2],
            baseline_declared: match v[3] {
                0 => false,
                1 => true,
                _ => return Err(CheckpointError::Corrupt("evidence")),
            },
            threshold_per_sec: v[4],
            floor_per_sec: v[5],
            factor: v[6],
            new_pct_min: v[7],
        }),
        2 => Some(Evidence::Quality {
            reports: v[0],
            delivered: v[1],
            threshold_ppm: v[2],
        }),
        _ => return Err(CheckpointError::Corrupt("evidence")),
    })
}

fn write_business(w: &mut W, id: u32, st: &BusinessState) {
    w.u32(id);
    let c = &st.control;
    w.u32(c.pause_epoch);
    w.u8(u8::from(c.paused));
    w.u8(c.why.map_or(0, |x| x as u8));
    w.u32(c.limits_epoch);
    w.u8(c.demotions);
    match c.limits_override {
        Some((t, mps)) => {
            w.u8(1);
            w.u8(tier_byte(t));
            w.u32(mps);
        }
        None => {
            w.u8(0);
            w.u8(0);
            w.u32(0);
        }
    }
    write_evidence(w, c.evidence);
    w.u8(tier_byte(st.caller_limits.0));
    w.u32(st.caller_limits.1);
    w.u64(st.tokens as u64);
    w.u64(st.bucket_ms);
    w.u32(st.share_ppm);
    w.u32(st.hour);
    w.u32(st.overdraft);
    match &st.recipients {
        Recipients::Exact(e) => {
            w.u8(0);
            w.u32(e.latest_hour);
            w.u32(e.len as u32);
            for (t, h) in e.entries() {
                w.u32(t);
                w.u32(h);
            }
            w.u32(e.forgotten_below);
            for s in 0..HOURS {
                w.u32(e.anon.hour[s]);
                w.u32(e.anon.count[s]);
            }
        }
        Recipients::Sketch(h) => {
            w.u8(1);
            w.u32(h.latest_hour);
            for s in h.slot_hour {
                w.u32(s);
            }
            w.bytes(&h.regs);
        }
    }
    w.u32(st.filter.cur_items);
    for x in st.filter.generation_words() {
        w.u64(x);
    }
    w.u64(st.filter.cur_start_ms);
    w.u64(st.filter.old_start_ms);
    w.u8(u8::from(st.filter.old_by_time));
    w.u64(st.recent.window);
    for &x in &st.recent.slots {
        w.u64(x);
    }
    let f = &st.fanout;
    w.u64(f.tick);
    for i in 0..FAN_TICKS {
        w.u32(f.ring_local[i]);
        w.u32(f.ring_peer[i]);
        w.u32(f.ring_new[i]);
    }
    w.u64(f.second);
    w.u32(f.second_events);
    w.u8(u8::from(f.sketch_on));
    w.u8(u8::from(f.prev_sketch_on));
    for r in f.sketch_regs() {
        w.bytes(r);
    }
    w.u64(f.minute);
    w.u32(f.minute_distinct);
    w.u32(f.baseline_per_min.to_bits());
    for i in 0..HOURS {
        w.u32(st.q_hour[i]);
        w.u32(st.q_delivered[i]);
        w.u32(st.q_reports[i]);
    }
    w.u8(st.rating as u8);
    w.u32(st.day);
    w.u64(st.accepted_today);
}

/// Reads one business written by this build, or by version 3 (no generation starts: the
/// filter is dropped), or, with `sketch_width`, by version 1 or 2 (no evidence; a
/// count-min sketch of that width, skipped; one fan-out ring; the filter dropped).
fn read_business(
    r: &mut R<'_>,
    cfg: &DetectConfig,
    version: u16,
    sketch_width: Option<usize>,
) -> Result<(u32, BusinessState), CheckpointError> {
    let id = r.u32()?;
    let pause_epoch = r.u32()?;
    let paused = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(CheckpointError::Corrupt("paused")),
    };
    let why = match r.u8()? {
        0 => None,
        v => Some(Why::from_u8(v).ok_or(CheckpointError::Corrupt("why"))?),
    };
    let limits_epoch = r.u32()?;
    let demotions = r.u8()?;
    let has_override = r.u8()?;
    let o_tier = r.u8()?;
    let o_mps = r.u32()?;
    let limits_override = match has_override {
        0 => None,
        1 => Some((tier_of(o_tier)?, o_mps)),
        _ => return Err(CheckpointError::Corrupt("limits_override")),
    };
    let evidence = match sketch_width {
        None => read_evidence(r)?,
        Some(_) => None,
    };
    let caller_limits = (tier_of(r.u8()?)?, r.u32()?);
    let mut st = BusinessState::new(cfg, caller_limits);
    st.control = Control {
        pause_epoch,
        paused,
        why,
        limits_epoch,
        demotions,
        limits_override,
        evidence,
    };
    st.tokens = r.u64()? as i64;
    st.bucket_ms = r.u64()?;
    st.share_ppm = r.u32()?;
    st.hour = r.u32()?;
    st.overdraft = r.u32()?;
    st.recipients = match r.u8()? {
        0 => {
            let latest = r.u32()?;
            let n = r.u32()? as usize;
            if n > cfg.exact_recipients_max as usize {
                return Err(CheckpointError::Corrupt("exact recipients count"));
            }
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push((r.u32()?, r.u32()?));
            }
            let mut e = ExactSet::restore(cfg.exact_recipients_max as usize, latest, &v);
            if version == VERSION {
                let below = r.u32()?;
                let mut anon = [(0, 0); HOURS];
                for a in &mut anon {
                    *a = (r.u32()?, r.u32()?);
                }
                // The writer moves every tag older than `below` to the counts.
                if v.iter().any(|&(_, h)| h < below) || !e.restore_anon(below, &anon) {
                    return Err(CheckpointError::Corrupt("forgotten recipients"));
                }
            }
            Recipients::Exact(e)
        }
        1 => {
            let mut h = Box::new(HllRing::new(cfg.hll_precision));
            h.latest_hour = r.u32()?;
            for s in 0..HOURS {
                h.slot_hour[s] = r.u32()?;
            }
            let n = h.regs.len();
            h.regs.copy_from_slice(r.take(n)?);
            if h.regs.iter().any(|&x| x > 33) {
                return Err(CheckpointError::Corrupt("hll register"));
            }
            h.rebuild_union();
            Recipients::Sketch(h)
        }
        _ => return Err(CheckpointError::Corrupt("recipients mode")),
    };
    st.filter.cur_items = r.u32()?;
    if st.filter.cur_items as usize >= st.filter.items_max() {
        // The filter retires a generation at this count: never saved above it.
        return Err(CheckpointError::Corrupt("never-contacted filter count"));
    }
    for i in 0..st.filter.word_count() {
        st.filter.set_generation_word(i, r.u64()?);
    }
    if version == VERSION {
        st.filter.cur_start_ms = r.u64()?;
        st.filter.old_start_ms = r.u64()?;
        st.filter.old_by_time = match r.u8()? {
            0 => false,
            1 => true,
            _ => {
                return Err(CheckpointError::Corrupt(
                    "never-contacted filter retirement",
                ))
            }
        };
        if !st.filter.restored_consistent() {
            return Err(CheckpointError::Corrupt("never-contacted filter count"));
        }
    } else {
        // Written before issue 19: when its recipients were inserted is not known, so
        // the filter is not kept (it could hold numbers older than the retention).
        st.filter = PastFilter::new(cfg.past_filter_bytes as usize);
    }
    read_window_state(r, &mut st, sketch_width)?;
    for i in 0..HOURS {
        st.q_hour[i] = r.u32()?;
        st.q_delivered[i] = r.u32()?;
        st.q_reports[i] = r.u32()?;
    }
    st.rating = rating_of(r.u8()?)?;
    st.day = r.u32()?;
    st.accepted_today = r.u64()?;
    Ok((id, st))
}

/// The same-recipient table and the fan-out state of one business.
fn read_window_state(
    r: &mut R<'_>,
    st: &mut BusinessState,
    sketch_width: Option<usize>,
) -> Result<(), CheckpointError> {
    let window = r.u64()?;
    let f = &mut st.fanout;
    if let Some(width) = sketch_width {
        // Two rows of `width` (current, previous) counter pairs: not kept (see
        // VERSION_SKETCH); the table starts empty in the checkpoint's window.
        r.take(2 * width * 2)?;
        if !st.recent.set_window(window) {
            return Err(CheckpointError::Corrupt("same-recipient window"));
        }
        f.tick = r.u64()?;
        for i in 0..FAN_TICKS {
            f.ring_local[i] = r.u32()?;
            f.ring_new[i] = r.u32()?;
        }
    } else {
        if !st.recent.set_window(window) {
            return Err(CheckpointError::Corrupt("same-recipient window"));
        }
        for x in &mut st.recent.slots {
            *x = r.u64()?;
        }
        f.tick = r.u64()?;
        for i in 0..FAN_TICKS {
            f.ring_local[i] = r.u32()?;
            f.ring_peer[i] = r.u32()?;
            f.ring_new[i] = r.u32()?;
        }
        f.second = r.u64()?;
        f.second_events = r.u32()?;
        let flag = |v: u8| match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(CheckpointError::Corrupt("short sketch flag")),
        };
        f.sketch_on = flag(r.u8()?)?;
        f.prev_sketch_on = flag(r.u8()?)?;
        let m = 1usize << SHORT_HLL_P;
        let regs = [r.take(m)?, r.take(m)?];
        if !f.set_sketch_regs(regs) {
            return Err(CheckpointError::Corrupt("short sketch register"));
        }
    }
    if !f.resum() {
        return Err(CheckpointError::Corrupt("fan-out ring"));
    }
    f.minute = r.u64()?;
    f.minute_distinct = r.u32()?;
    if f.minute_distinct > super::fanout::RESTORED_COUNT_MAX {
        return Err(CheckpointError::Corrupt("fan-out minute count"));
    }
    f.baseline_per_min = f32::from_bits(r.u32()?);
    if !f.baseline_per_min.is_finite() || f.baseline_per_min < 0.0 {
        return Err(CheckpointError::Corrupt("baseline"));
    }
    f.relearn();
    Ok(())
}

impl Detector {
    /// The whole detector state as bytes: sketches and counters, no phone numbers.
    pub fn checkpoint(&self) -> Vec<u8> {
        let mut w = W(Vec::new());
        w.bytes(MAGIC);
        w.u16(VERSION);
        fingerprint(&mut w, &self.cfg);
        w.u8(u8::from(self.exporting));
        let mut ids: Vec<u32> = self.businesses.keys().copied().collect();
        ids.sort_unstable();
        w.u32(ids.len() as u32);
        for id in ids {
            write_business(&mut w, id, &self.businesses[&id]);
        }
        let crc = super::keyed::crc32c(&w.0);
        w.u32(crc);
        w.0
    }

    /// Forgets everything derived from recipient hashes, in every business (24 h
    /// recipient window, past-recipient filter, same-recipient table), keeping pauses,
    /// limits, rate buckets, fan-out baselines, quality ratings and billing counts: what a
    /// checkpoint keeps when the secret its hashes were keyed with is gone (a master key
    /// rotation by `courier businesses erase`, as for a version-1 checkpoint).
    pub fn forget_recipient_hashes(&mut self) {
        for st in self.businesses.values_mut() {
            st.forget_recipient_hashes(&self.cfg);
        }
    }

    /// Replaces this detector's business state with a checkpoint's. On error nothing
    /// changes. Queued signals and the unsent delta are kept. The shell then calls
    /// [`expire`](Self::expire) with its clock: a checkpoint from before a long stop
    /// holds recipients the retention has since passed.
    ///
    /// A checkpoint of version 1 to 3 (before issue 19) is restored without its
    /// past-recipient filter: it does not say when its recipients were inserted, so it
    /// could hold numbers older than the retention. For up to the retention after the
    /// upgrade, the fan-out check then counts as never contacted recipients that were
    /// (a surge needs a jump of distinct recipients over the baseline besides).
    ///
    /// A version-2 checkpoint (before issue 14) is restored without its same-recipient
    /// counts (a count-min sketch), the evidence of its pauses and the split of its
    /// fan-out ring; everything else is kept. A version-1 checkpoint (written before the
    /// recipient hash changed) is restored without what its hashes built too: each
    /// business's 24 h recipient window and past-recipient filter start empty; its
    /// pause, limits, rate bucket, fan-out baseline, quality rating and billing count are
    /// kept, so an upgrade lifts no pause and loses no billing.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), CheckpointError> {
        if bytes.len() < MAGIC.len() + 2 + 4 {
            return Err(CheckpointError::Truncated);
        }
        if &bytes[..4] != MAGIC {
            return Err(CheckpointError::BadMagic);
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let mut r = R(&body[4..]);
        let version = r.u16()?;
        if ![VERSION, VERSION_TABLE, VERSION_SKETCH, VERSION_OLD_HASH].contains(&version) {
            return Err(CheckpointError::Version(version));
        }
        if super::keyed::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4")) {
            return Err(CheckpointError::Checksum);
        }
        let sketch_width = check_fingerprint(&mut r, &self.cfg, version)?;
        let exporting = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(CheckpointError::Corrupt("sharded flag")),
        };
        let n = r.u32()?;
        if n > self.cfg.businesses_max {
            return Err(CheckpointError::TooManyBusinesses);
        }
        let mut states = Vec::with_capacity(n as usize);
        for _ in 0..n {
            states.push(read_business(&mut r, &self.cfg, version, sketch_width)?);
        }
        if !r.0.is_empty() {
            return Err(CheckpointError::Corrupt("trailing bytes"));
        }
        if version == VERSION_OLD_HASH {
            for (_, st) in &mut states {
                st.forget_recipient_hashes(&self.cfg);
            }
        }
        self.businesses.clear();
        for (id, st) in states {
            let slot = get_or_create(&mut self.businesses, &self.cfg, id, st.caller_limits)
                .expect("count checked against businesses_max");
            *slot = st;
        }
        self.dirty.clear();
        self.exporting |= exporting;
        Ok(())
    }
}
