//! The simulated devices behind the delivery edge: who is on the platform, who is online
//! when, which messages are read and which get a reply. Pure functions of a seed, the
//! recipient and the time, so the edge keeps no per-device state and a run replays.
//!
//! ```text
//!  recipient ──hash(seed)──> phase in [0, 1), platform draw in [0, 1)
//!    not on the platform: platform draw < fail_rate          ──> failed(not_on_platform)
//!    offline at t: frac(t / period + phase) < offline_share   ──> retry_later; ONLINE at
//!                                                                 next_online(t)
//!    else ──> delivered; read (read_rate) and replied to (reply_rate) by the message's draw
//! ```
//!
//! So a share `offline_share` of the devices is offline at any moment, each for
//! `offline_share × period` seconds of every `period`, at its own phase.

use courier_pipeline::wire::{LogPosition, Recipient};

/// How the simulated devices behave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceModel {
    /// Seeds every draw.
    pub seed: u64,
    /// Share of devices offline at any moment, 0 ..= 0.95.
    pub offline_share: f64,
    /// Length of a device's online/offline cycle, seconds.
    pub period_secs: f64,
    /// Share of recipients not on the platform (their messages fail).
    pub fail_rate: f64,
    /// Share of delivered messages also read.
    pub read_rate: f64,
    /// Share of delivered messages whose recipient replies.
    pub reply_rate: f64,
}

/// What a device does with a message handed to it at some time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Not on the platform: the message fails.
    NotOnPlatform,
    /// Offline now: try later; it comes online after this many milliseconds.
    Offline {
        /// Milliseconds until it is online again (at least 1).
        online_in_ms: u64,
    },
    /// Delivered now.
    Delivered {
        /// Read too.
        read: bool,
        /// Its recipient replies.
        reply: bool,
    },
}

impl DeviceModel {
    /// The bounds of every share and of the period; names the one that is off.
    pub fn check(&self) -> Result<(), String> {
        let share = |name: &str, v: f64, max: f64| {
            if (0.0..=max).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be in 0..={max}"))
            }
        };
        share("offline share", self.offline_share, 0.95)?;
        share("fail rate", self.fail_rate, 1.0)?;
        share("read rate", self.read_rate, 1.0)?;
        share("reply rate", self.reply_rate, 1.0)?;
        if !(0.01..=86_400.0).contains(&self.period_secs) {
            return Err("the offline period must be in 0.01..=86400 seconds".into());
        }
        Ok(())
    }

    /// The fate of `message` to `recipient`, handed `t_secs` after the run's start.
    pub fn fate(&self, recipient: &Recipient, message: LogPosition, t_secs: f64) -> Fate {
        let h = mix(self.seed ^ fnv(recipient.as_bytes()));
        if unit(mix(h ^ 0x9e37_79b9_7f4a_7c15)) < self.fail_rate {
            return Fate::NotOnPlatform;
        }
        let phase = unit(mix(h));
        let at = (t_secs / self.period_secs + phase).fract();
        if at < self.offline_share {
            let secs = (self.offline_share - at) * self.period_secs;
            return Fate::Offline {
                online_in_ms: ((secs * 1000.0).ceil() as u64).max(1),
            };
        }
        let m = mix(self.seed.rotate_left(17) ^ message.0);
        Fate::Delivered {
            read: unit(m) < self.read_rate,
            reply: unit(mix(m)) < self.reply_rate,
        }
    }
}

/// FNV-1a of the number: spreads recipients that differ in one digit.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The top 53 bits as a fraction in [0, 1).
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::population_recipient;
    use courier_pipeline::ShardId;

    fn model() -> DeviceModel {
        DeviceModel {
            seed: 7,
            offline_share: 0.2,
            period_secs: 5.0,
            fail_rate: 0.05,
            read_rate: 0.3,
            reply_rate: 0.1,
        }
    }

    #[test]
    fn shares_come_out_near_their_settings_and_each_device_keeps_its_fate() {
        let m = model();
        let n = 20_000u64;
        let (mut failed, mut offline, mut read, mut reply) = (0, 0, 0, 0);
        for i in 0..n {
            let r = population_recipient(i);
            let f = m.fate(&r, LogPosition::new(ShardId::new(0), i), 12.3);
            assert_eq!(
                f,
                m.fate(&r, LogPosition::new(ShardId::new(0), i), 12.3),
                "deterministic"
            );
            match f {
                Fate::NotOnPlatform => failed += 1,
                Fate::Offline { online_in_ms } => {
                    assert!(online_in_ms <= 1000, "at most 0.2 x 5 s offline");
                    let back = 12.3 + online_in_ms as f64 / 1000.0 + 0.001;
                    assert!(
                        matches!(
                            m.fate(&r, LogPosition::new(ShardId::new(0), i), back),
                            Fate::Delivered { .. }
                        ),
                        "online again when it said"
                    );
                    offline += 1;
                }
                Fate::Delivered {
                    read: rd,
                    reply: rp,
                } => {
                    read += u64::from(rd);
                    reply += u64::from(rp);
                }
            }
        }
        let share = |k: u64, of: u64| k as f64 / of as f64;
        assert!((share(failed, n) - 0.05).abs() < 0.01, "{failed}");
        assert!((share(offline, n - failed) - 0.2).abs() < 0.02, "{offline}");
        let delivered = n - failed - offline;
        assert!((share(read, delivered) - 0.3).abs() < 0.02, "{read}");
        assert!((share(reply, delivered) - 0.1).abs() < 0.02, "{reply}");
        // Not on the platform is a property of the number, whatever the time.
        let r = (0..n)
            .map(population_recipient)
            .find(|r| m.fate(r, LogPosition(1), 0.0) == Fate::NotOnPlatform)
            .unwrap();
        assert_eq!(m.fate(&r, LogPosition(9), 99.9), Fate::NotOnPlatform);
    }

    #[test]
    fn all_online_and_bounds() {
        let m = DeviceModel {
            offline_share: 0.0,
            fail_rate: 0.0,
            ..model()
        };
        for i in 0..1000 {
            assert!(matches!(
                m.fate(&population_recipient(i), LogPosition(i), i as f64 * 0.37),
                Fate::Delivered { .. }
            ));
        }
        assert!(m.check().is_ok());
        assert!(DeviceModel {
            offline_share: 1.0,
            ..m
        }
        .check()
        .is_err());
        assert!(DeviceModel {
            period_secs: 0.0,
            ..m
        }
        .check()
        .is_err());
    }
}
