//! Tuning profiles: a raw serde struct (unknown keys refused) validated once into a typed
//! [`Profile`] whose every bound has been checked.
//!
//! Every queue, table and buffer in courier takes its bound from the profile, so memory
//! use is a function of the profile and not of traffic. The profile only composes: each
//! section is the configuration type of the component that owns it, which names its
//! bounds and checks its keys, so that no bound is written twice:
//!
//! | section | type and bounds | checks |
//! |---|---|---|
//! | `[server]` | [`RawServer`], [`SHARDS_MAX`] (`shard_id`) | here |
//! | `[limits]`, `[quic]` | [`crate::server::Limits`], [`crate::server::Quic`]; `server/config.rs`, ceilings from [`crate::wire`] | `server/config.rs` |
//! | `[io]` | [`Io`] and the io_uring ring's bounds (`profile/io.rs`, which `src/uring` reads) | `profile/io.rs` |
//! | `[log]` | [`LogSettings`] (`log/settings.rs`), record and seal overheads from [`crate::log`] | `log/settings.rs` |
//! | `[detect]` | [`crate::detect::DetectConfig`] (`detect/config.rs`) | `detect/config.rs` |
//! | `[delivery]` | [`crate::node::DeliveryConfig`] | `node/delivery.rs` |
//! | `[e2e]` | [`crate::node::E2eConfig`] (carried in `delivery.e2e`) | `node/devices.rs` |
//! | `[regions.NAME]` | [`Region`]: a region's data directory, address, master key (`profile/region.rs`) | `profile/region.rs` |
//!
//! Validation returns every error it finds, each naming the key and the bound it broke.

mod check;
mod io;
mod region;

use std::net::SocketAddr;

use serde::Deserialize;

use crate::detect::{DetectConfig, LegacyDetectKeys};

pub use crate::log::LogSettings;
pub use crate::server::{Limits, Quic};
pub use crate::shard_id::SHARDS_MAX;
pub(crate) use check::Checker;
pub use io::*;
pub use region::{RawRegion, Region};

/// The built-in default profile (`tuning/default.toml`), compiled into the binary.
pub const DEFAULT_PROFILE_TOML: &str = include_str!("../../tuning/default.toml");

/// One problem found while loading a profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ProfileIssue {
    /// The dotted key, e.g. `limits.frame_bytes_max`.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Why a profile could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// The text is not valid TOML or has an unknown key or a wrong type.
    #[error("profile does not parse: {0}")]
    Parse(String),
    /// Keys parse but break their bounds; every broken key is listed. A key set by an
    /// environment override names its variable.
    #[error("profile is invalid:\n{}", .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ProfileIssue>),
    /// `COURIER_<SECTION>__<KEY>` variables that name no profile key or hold a value of
    /// the wrong type; every bad variable is listed.
    #[error("environment overrides are invalid:\n{}", .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Env(Vec<EnvIssue>),
}

/// One bad `COURIER_<SECTION>__<KEY>` environment variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct EnvIssue {
    /// The variable's name.
    pub var: String,
    /// What is wrong with it.
    pub problem: String,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// UDP address to listen on.
    pub listen: String,
    /// Number of shards; 0 means one per available CPU.
    pub shards: u32,
    /// TCP address of the Prometheus metrics endpoint; "" disables it.
    pub metrics_listen: String,
}

/// A profile as written in TOML. Every section but `[server]` deserializes straight into
/// the configuration type of the component that owns it, which also owns its bounds and
/// its checks; a `Profile` itself only comes out of [`Profile::validate`], so its sections
/// have always been checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    /// `[server]`
    pub server: RawServer,
    /// `[limits]`
    pub limits: Limits,
    /// `[quic]`
    pub quic: Quic,
    /// `[io]`
    pub io: Io,
    /// `[log]`
    pub log: LogSettings,
    /// `[delivery]`
    pub delivery: crate::node::DeliveryConfig,
    /// `[e2e]` (off when absent: profiles from before it keep working)
    #[serde(default)]
    pub e2e: crate::node::E2eConfig,
    /// `[detect]`
    pub detect: DetectConfig,
    /// `[regions.NAME]`: regions and their data directories (none when absent).
    #[serde(default)]
    pub regions: std::collections::BTreeMap<String, RawRegion>,
    /// Keys of `[detect]` in their form from before issue 14, taken out of the table
    /// before it was deserialized (see [`RawProfile::from_table`]).
    #[serde(skip)]
    pub legacy_detect: LegacyDetectKeys,
}

impl RawProfile {
    /// Deserializes a parsed profile document, reading the older keys of `[detect]` as
    /// today's first.
    pub fn from_table(mut doc: toml::Table) -> Result<RawProfile, toml::de::Error> {
        let legacy = match doc.get_mut("detect").and_then(|d| d.as_table_mut()) {
            Some(detect) => LegacyDetectKeys::take(detect).map_err(serde::de::Error::custom)?,
            None => LegacyDetectKeys::default(),
        };
        let mut raw = RawProfile::deserialize(doc)?;
        raw.legacy_detect = legacy;
        Ok(raw)
    }

    /// Parses TOML text. A profile without older keys is deserialized from its text, so
    /// that a parse error points at its line.
    pub fn from_toml(text: &str) -> Result<RawProfile, ProfileError> {
        let parse = |e: toml::de::Error| ProfileError::Parse(e.to_string());
        let doc: toml::Table = toml::from_str(text).map_err(parse)?;
        let raw = RawProfile::from_table(doc).map_err(parse)?;
        if raw.legacy_detect != LegacyDetectKeys::default() {
            return Ok(raw);
        }
        toml::from_str(text).map_err(parse)
    }
}

/// A validated profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Listen address.
    pub listen: SocketAddr,
    /// Shards; 0 = one per CPU (resolved by the shell).
    pub shards: u32,
    /// Where `GET /metrics` is served (TCP); `None` when disabled.
    pub metrics_listen: Option<SocketAddr>,
    /// Ingest limits.
    pub limits: Limits,
    /// QUIC settings.
    pub quic: Quic,
    /// IO settings.
    pub io: Io,
    /// Log settings.
    pub log: LogSettings,
    /// Detector bounds and thresholds.
    pub detect: DetectConfig,
    /// Delivery bounds.
    pub delivery: crate::node::DeliveryConfig,
    /// Regions by name: each one's data directory, served by `courier serve --region`.
    pub regions: std::collections::BTreeMap<String, Region>,
}

/// Environment variables whose name starts with this and holds `__` override profile keys.
pub const ENV_PREFIX: &str = "COURIER_";

/// One profile key set from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvOverride {
    /// The variable, e.g. `COURIER_SERVER__SHARDS`.
    pub var: String,
    /// The dotted key it set, e.g. `server.shards`.
    pub key: String,
    /// The value as written in the environment (profile values are not secret).
    pub value: String,
}

/// Applies `COURIER_<SECTION>__<KEY>=VALUE` variables of `env` to a parsed profile
/// document, before it is deserialized and validated.
///
/// The name after the prefix is split at its first `__`: the section and the key, both
/// upper-case in the name and lower-case in the profile (`COURIER_LOG__RETENTION_SECS`
/// sets `log.retention_secs`). The value is read as a TOML scalar (an integer such as
/// `4` or `1_048_576`, a float, `true`/`false`, a quoted string), else taken as a plain
/// string; it must have the type the key has in the built-in default profile. Variables
/// without `__` (`COURIER_LOG`, `COURIER_MASTER_KEY_FILE`, ...) are not overrides and are
/// ignored. Every variable that names no profile key, is not upper-case or holds a value
/// of the wrong type is an error; all of them are listed. Returns the overrides applied,
/// sorted by variable name.
///
/// Sans-IO: the caller passes the environment (`std::env::vars()` in the binary).
pub fn apply_env_overrides<I, K, V>(
    doc: &mut toml::Table,
    env: I,
) -> Result<Vec<EnvOverride>, ProfileError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let schema: toml::Table =
        toml::from_str(DEFAULT_PROFILE_TOML).expect("built-in default profile parses");
    let mut issues = Vec::new();
    let mut applied = Vec::new();
    for (name, value) in env {
        let (name, value) = (name.as_ref(), value.as_ref());
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let fail = |problem: String| EnvIssue {
            var: name.to_string(),
            problem,
        };
        let (section_lc, key_lc) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let dotted = format!("{section_lc}.{key_lc}");
        let expected = schema
            .get(&section_lc)
            .and_then(|s| s.as_table())
            .and_then(|t| t.get(&key_lc));
        let Some(expected) = expected else {
            let known = match schema.get(&section_lc).and_then(|s| s.as_table()) {
                Some(t) => format!(
                    "keys of [{section_lc}]: {}",
                    t.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
                None => format!(
                    "sections: {}",
                    schema.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            };
            issues.push(fail(format!(
                "names no profile key ({dotted}); the form is COURIER_<SECTION>__<KEY>, known {known}"
            )));
            continue;
        };
        if section != section.to_ascii_uppercase() || key != key.to_ascii_uppercase() {
            issues.push(fail(format!(
                "write it upper-case: {ENV_PREFIX}{}__{} (sets {dotted})",
                section.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            )));
            continue;
        }
        let parsed = match expected {
            // A string key takes the text as it is (an address needs no quotes).
            toml::Value::String(_) => toml::Value::String(value.to_string()),
            _ => scalar(value),
        };
        if parsed.type_str() != expected.type_str() {
            issues.push(fail(format!(
                "{dotted} takes {} {}, not {value:?}",
                article(expected.type_str()),
                expected.type_str()
            )));
            continue;
        }
        let table = doc
            .entry(section_lc)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(table) = table.as_table_mut() else {
            issues.push(fail(format!("the profile's {section} is not a section")));
            continue;
        };
        table.insert(key_lc, parsed);
        applied.push(EnvOverride {
            var: name.to_string(),
            key: dotted,
            value: value.to_string(),
        });
    }
    if !issues.is_empty() {
        issues.sort_by(|a, b| a.var.cmp(&b.var));
        return Err(ProfileError::Env(issues));
    }
    applied.sort_by(|a, b| a.var.cmp(&b.var));
    Ok(applied)
}

/// A value from the environment read as a TOML scalar, else as a plain string.
fn scalar(text: &str) -> toml::Value {
    let wrapped = format!("v = {text}");
    if let Ok(mut t) = toml::from_str::<toml::Table>(&wrapped) {
        if t.len() == 1 {
            if let Some(v) = t.remove("v") {
                if !matches!(v, toml::Value::Table(_) | toml::Value::Array(_)) {
                    return v;
                }
            }
        }
    }
    toml::Value::String(text.to_string())
}

fn article(type_name: &str) -> &'static str {
    if type_name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

impl Profile {
    /// The built-in default profile.
    pub fn default_profile() -> Profile {
        Profile::from_toml(DEFAULT_PROFILE_TOML).expect("built-in default profile is valid")
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Profile, ProfileError> {
        Profile::validate(RawProfile::from_toml(text)?)
    }

    /// Parses TOML text, applies the `COURIER_<SECTION>__<KEY>` overrides found in `env`
    /// (see [`apply_env_overrides`]) and validates the result, so that a value from the
    /// environment meets exactly the checks a value from the file meets. A broken bound
    /// of an overridden key names the variable. Returns the overrides applied.
    pub fn from_toml_with_env<I, K, V>(
        text: &str,
        env: I,
    ) -> Result<(Profile, Vec<EnvOverride>), ProfileError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| ProfileError::Parse(e.to_string()))?;
        let applied = apply_env_overrides(&mut doc, env)?;
        let raw = RawProfile::from_table(doc).map_err(|e| {
            // A value of the right TOML type can still miss its Rust type (300 for a u8);
            // the error names the key, and this names the variable that set it.
            let mut msg = e.to_string().trim_end().to_string();
            let named: Vec<String> = applied
                .iter()
                .filter(|o| msg.contains(&format!("`{}`", o.key)))
                .map(|o| format!("{} was set by {}={}", o.key, o.var, o.value))
                .collect();
            if !named.is_empty() {
                msg.push_str(&format!(" ({})", named.join("; ")));
            } else if !applied.is_empty() {
                let vars: Vec<&str> = applied.iter().map(|o| o.var.as_str()).collect();
                msg.push_str(&format!(" (environment overrides: {})", vars.join(", ")));
            }
            ProfileError::Parse(msg)
        })?;
        match Profile::validate(raw) {
            Ok(p) => Ok((p, applied)),
            Err(ProfileError::Invalid(mut issues)) => {
                for issue in &mut issues {
                    if let Some(o) = applied.iter().find(|o| o.key == issue.key) {
                        issue
                            .problem
                            .push_str(&format!(" (set by {}={})", o.var, o.value));
                    }
                }
                Err(ProfileError::Invalid(issues))
            }
            Err(e) => Err(e),
        }
    }

    /// Checks every bound; lists every broken key. Each section's owner checks its own
    /// keys; the relations between sections are checked by the section that depends on
    /// the other (`[io]` on `[quic]`'s MTU, `[log]` on `[limits]`' batches).
    pub fn validate(raw: RawProfile) -> Result<Profile, ProfileError> {
        let mut c = Checker::default();
        let (listen, metrics_listen) = raw.server.validate(&mut c);
        raw.limits.validate(&mut c);
        raw.quic.validate(&mut c);
        raw.io.validate(&raw.quic, &mut c);
        raw.log.validate(&raw.limits, &mut c);
        raw.detect.validate(&mut c);
        raw.legacy_detect.validate(&mut c);
        c.extend(raw.delivery.issues());
        c.extend(raw.e2e.issues());
        let regions = region::validate(&raw.regions, listen, &mut c);
        let mut delivery = raw.delivery;
        delivery.e2e = raw.e2e;
        delivery.clamp_to_retention(raw.log.retention_secs);
        let mut detect = raw.detect;
        detect.remember_recipients_for(raw.log.retention_secs);

        let issues = c.into_issues();
        if !issues.is_empty() {
            return Err(ProfileError::Invalid(issues));
        }
        Ok(Profile {
            listen: listen.expect("an unparsed server.listen is an issue"),
            shards: raw.server.shards,
            metrics_listen,
            limits: raw.limits,
            quic: raw.quic,
            io: raw.io,
            log: raw.log,
            detect,
            delivery,
            regions,
        })
    }
}

impl RawServer {
    /// Checks `[server]`; returns the listen address (`None` when it does not parse, an
    /// issue then) and the metrics address (`None` when disabled or broken).
    fn validate(&self, c: &mut Checker) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let listen = match self.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                c.fail(
                    "server.listen",
                    format!("{:?} is not an IP:port address", self.listen),
                );
                None
            }
        };
        c.range("server.shards", self.shards, 0, SHARDS_MAX);
        // Any address that parses is allowed (an operator may expose it on purpose); the
        // default is loopback.
        let metrics_listen = match self.metrics_listen.as_str() {
            "" => None,
            text => match text.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    c.fail(
                        "server.metrics_listen",
                        format!("{text:?} is not an IP:port address (\"\" disables metrics)"),
                    );
                    None
                }
            },
        };
        (listen, metrics_listen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_is_valid() {
        let p = Profile::default_profile();
        assert!(p.limits.frame_bytes_max >= p.limits.payload_bytes_max);
    }

    #[test]
    fn unknown_key_is_refused() {
        let text = DEFAULT_PROFILE_TOML.replace("[limits]", "[limits]\nframe_bytes_mx = 5");
        match Profile::from_toml(&text) {
            Err(ProfileError::Parse(e)) => assert!(e.contains("frame_bytes_mx"), "{e}"),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn every_broken_key_is_named() {
        let text = DEFAULT_PROFILE_TOML
            .replace("ring_entries = 1024", "ring_entries = 1000")
            .replace("listen = \"127.0.0.1:7443\"", "listen = \"nowhere\"");
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&text) else {
            panic!("expected invalid");
        };
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert!(keys.contains(&"io.ring_entries"), "{keys:?}");
        assert!(keys.contains(&"server.listen"), "{keys:?}");
    }

    #[test]
    fn metrics_listen_parses_or_is_disabled() {
        let p = Profile::default_profile();
        assert_eq!(p.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        let off = DEFAULT_PROFILE_TOML.replace(
            "metrics_listen = \"127.0.0.1:9464\"",
            "metrics_listen = \"\"",
        );
        assert_eq!(Profile::from_toml(&off).unwrap().metrics_listen, None);
        let bad = DEFAULT_PROFILE_TOML.replace(
            "metrics_listen = \"127.0.0.1:9464\"",
            "metrics_listen = \"localhost\"",
        );
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&bad) else {
            panic!("expected invalid");
        };
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "server.metrics_listen");
        assert!(issues[0].problem.contains("localhost"), "{issues:?}");
    }

    #[test]
    fn log_keys_are_validated_by_name() {
        let text = DEFAULT_PROFILE_TOML
            .replace(
                "segment_age_max_secs = 86400",
                "segment_age_max_secs = 9999999",
            )
            .replace(
                "group_commit_records_max = 4096",
                "group_commit_records_max = 2",
            );
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&text) else {
            panic!("expected invalid");
        };
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert!(keys.contains(&"log.segment_age_max_secs"), "{keys:?}");
        assert!(keys.contains(&"log.group_commit_records_max"), "{keys:?}");
        let p = Profile::default_profile();
        assert_eq!(p.log.retention_secs, 30 * 86_400);
        assert_eq!(p.log.segment_age_max_secs, p.log.retention_secs / 30);
    }

    #[test]
    fn detect_state_over_budget_names_the_key() {
        let text = DEFAULT_PROFILE_TOML.replace("hll_precision = 11", "hll_precision = 12");
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&text) else {
            panic!("expected invalid");
        };
        assert!(
            issues
                .iter()
                .any(|i| i.key == "detect.business_state_bytes_max"),
            "{issues:?}"
        );
    }

    /// Issue 14 replaced the same-recipient count-min sketch with a table: a profile
    /// written before still loads (the width as the same bytes of table), one that gives
    /// both keys does not.
    #[test]
    fn the_old_same_recipient_sketch_width_still_loads() {
        let old = DEFAULT_PROFILE_TOML.replace(
            "same_recipient_table_entries = 512",
            "same_recipient_sketch_width = 1024",
        );
        assert_ne!(old, DEFAULT_PROFILE_TOML);
        let p = Profile::from_toml(&old).unwrap();
        assert_eq!(p.detect.same_recipient_table_entries, 512);
        assert_eq!(p.detect, Profile::default_profile().detect);
        let both = DEFAULT_PROFILE_TOML.replace(
            "same_recipient_table_entries = 512",
            "same_recipient_table_entries = 512\nsame_recipient_sketch_width = 1024",
        );
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&both) else {
            panic!("expected invalid");
        };
        assert!(
            issues
                .iter()
                .any(|i| i.key == "detect.same_recipient_sketch_width"),
            "{issues:?}"
        );
        let odd = DEFAULT_PROFILE_TOML.replace(
            "same_recipient_table_entries = 512",
            "same_recipient_table_entries = 500",
        );
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&odd) else {
            panic!("expected invalid");
        };
        assert!(
            issues
                .iter()
                .any(|i| i.key == "detect.same_recipient_table_entries"),
            "{issues:?}"
        );
    }

    #[test]
    fn default_detect_section_matches_the_code_defaults() {
        let p = Profile::default_profile();
        assert_eq!(p.detect, DetectConfig::default());
    }

    /// Issue 18's fair shares: a share larger than the table, or a business bound of
    /// zero, is refused and named.
    #[test]
    fn fair_share_keys_are_validated_by_name() {
        let text = DEFAULT_PROFILE_TOML
            .replace(
                "idempotency_ids_per_business_max = 1000000",
                "idempotency_ids_per_business_max = 5000000",
            )
            .replace(
                "batches_in_flight_per_business_max = 256",
                "batches_in_flight_per_business_max = 0",
            );
        let Err(ProfileError::Invalid(issues)) = Profile::from_toml(&text) else {
            panic!("expected invalid");
        };
        let share = issues
            .iter()
            .find(|i| i.key == "limits.idempotency_ids_per_business_max")
            .expect("the share is named");
        assert!(
            share.problem.contains("limits.idempotency_ids_max"),
            "{share:?}"
        );
        assert!(
            issues
                .iter()
                .any(|i| i.key == "limits.batches_in_flight_per_business_max"),
            "{issues:?}"
        );
        let p = Profile::default_profile();
        assert!(p.limits.idempotency_ids_per_business_max <= p.limits.idempotency_ids_max);
    }
}
