//! Every profile shipped in `tuning/` loads and validates.

use courier_pipeline::profile::Profile;

#[test]
fn every_tuning_profile_is_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tuning");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).expect("tuning/ exists") {
        let path = entry.expect("readable dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable profile");
        if let Err(e) = Profile::from_toml(&text) {
            panic!("{}: {e}", path.display());
        }
        names.push(path.file_stem().unwrap().to_string_lossy().into_owned());
    }
    names.sort();
    assert_eq!(
        names,
        [
            "default",
            "latency",
            "short-retention",
            "small",
            "throughput"
        ],
        "the profiles ARCHITECTURE.md names"
    );
}

// COURIER_<SECTION>__<KEY> environment overrides.

use courier_pipeline::profile::{ProfileError, DEFAULT_PROFILE_TOML};

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn env_overrides_set_keys_of_every_type() {
    let (p, applied) = Profile::from_toml_with_env(
        DEFAULT_PROFILE_TOML,
        env(&[
            ("COURIER_SERVER__SHARDS", "4"),
            ("COURIER_SERVER__LISTEN", "[::1]:9000"),
            ("COURIER_LOG__SEGMENT_BYTES_MAX", "16_777_216"),
            ("COURIER_IO__PIN_THREADS", "false"),
            ("PATH", "/usr/bin"),
        ]),
    )
    .unwrap();
    assert_eq!(p.shards, 4);
    assert_eq!(p.listen, "[::1]:9000".parse().unwrap());
    assert_eq!(p.log.segment_bytes_max, 16 << 20);
    assert!(!p.io.pin_threads);
    let keys: Vec<(&str, &str)> = applied
        .iter()
        .map(|o| (o.var.as_str(), o.key.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("COURIER_IO__PIN_THREADS", "io.pin_threads"),
            ("COURIER_LOG__SEGMENT_BYTES_MAX", "log.segment_bytes_max"),
            ("COURIER_SERVER__LISTEN", "server.listen"),
            ("COURIER_SERVER__SHARDS", "server.shards"),
        ]
    );
    // Untouched keys keep the file's values.
    let base = Profile::default_profile();
    assert_eq!(p.limits, base.limits);
    assert_eq!(p.detect, base.detect);
}

#[test]
fn other_courier_variables_are_not_overrides() {
    let (p, applied) = Profile::from_toml_with_env(
        DEFAULT_PROFILE_TOML,
        env(&[
            ("COURIER_LOG", "trace"),
            ("COURIER_TOKEN", "c1.1.abcd"),
            ("COURIER_MASTER_KEY_FILE", "/tmp/k"),
            ("COURIER_LOG_FORMAT", "json"),
            ("NOT_COURIER_SERVER__SHARDS", "7"),
        ]),
    )
    .unwrap();
    assert!(applied.is_empty(), "{applied:?}");
    assert_eq!(p, Profile::default_profile());
}

#[test]
fn an_override_out_of_bounds_names_the_variable_the_key_and_the_bound() {
    let e = Profile::from_toml_with_env(
        DEFAULT_PROFILE_TOML,
        env(&[("COURIER_SERVER__SHARDS", "5000")]),
    )
    .unwrap_err();
    let ProfileError::Invalid(issues) = &e else {
        panic!("expected invalid, got {e:?}");
    };
    assert_eq!(issues.len(), 1, "{issues:?}");
    let text = issues[0].to_string();
    assert!(text.starts_with("server.shards:"), "{text}");
    assert!(text.contains("0..=256"), "{text}");
    assert!(text.contains("COURIER_SERVER__SHARDS=5000"), "{text}");
}

#[test]
fn an_override_meets_the_cross_key_checks_too() {
    // Valid alone, but below limits.batch_messages_max: the same check as in a file.
    let e = Profile::from_toml_with_env(
        DEFAULT_PROFILE_TOML,
        env(&[("COURIER_LOG__GROUP_COMMIT_RECORDS_MAX", "2")]),
    )
    .unwrap_err();
    let ProfileError::Invalid(issues) = &e else {
        panic!("expected invalid, got {e:?}");
    };
    assert!(
        issues
            .iter()
            .any(|i| i.key == "log.group_commit_records_max"
                && i.problem.contains("COURIER_LOG__GROUP_COMMIT_RECORDS_MAX")),
        "{issues:?}"
    );
}

#[test]
fn unknown_keys_wrong_types_and_lower_case_are_refused_by_name() {
    let e = Profile::from_toml_with_env(
        DEFAULT_PROFILE_TOML,
        env(&[
            ("COURIER_SERVER__SHARDZ", "4"),
            ("COURIER_NOPE__SHARDS", "4"),
            ("COURIER_IO__GRO", "yes"),
            ("COURIER_LIMITS__HELLO_TIMEOUT_MS", "ten"),
            ("COURIER_server__shards", "4"),
            ("COURIER_SERVER__SHARDS", "2"),
        ]),
    )
    .unwrap_err();
    let ProfileError::Env(issues) = &e else {
        panic!("expected env issues, got {e:?}");
    };
    let vars: Vec<&str> = issues.iter().map(|i| i.var.as_str()).collect();
    assert_eq!(
        vars,
        [
            "COURIER_IO__GRO",
            "COURIER_LIMITS__HELLO_TIMEOUT_MS",
            "COURIER_NOPE__SHARDS",
            "COURIER_SERVER__SHARDZ",
            "COURIER_server__shards",
        ],
        "every bad variable, and only those"
    );
    let text = e.to_string();
    assert!(text.contains("server.shardz"), "{text}");
    assert!(
        text.contains("keys of [server]: listen, metrics_listen, shards"),
        "{text}"
    );
    assert!(text.contains("io.gro takes a boolean"), "{text}");
    assert!(
        text.contains("limits.hello_timeout_ms takes an integer"),
        "{text}"
    );
    assert!(text.contains("COURIER_SERVER__SHARDS (sets"), "{text}");
}

#[test]
fn an_integer_too_large_for_its_key_names_the_override() {
    let e = Profile::from_toml_with_env(
        DEFAULT_PROFILE_TOML,
        env(&[("COURIER_DETECT__HLL_PRECISION", "300")]),
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("detect.hll_precision was set by COURIER_DETECT__HLL_PRECISION=300"),
        "{text}"
    );
}

#[test]
fn an_override_can_supply_a_key_the_file_lacks() {
    let text = DEFAULT_PROFILE_TOML.replace("shards = 0\n", "");
    assert!(Profile::from_toml(&text).is_err(), "the key is required");
    let (p, _) =
        Profile::from_toml_with_env(&text, env(&[("COURIER_SERVER__SHARDS", "3")])).unwrap();
    assert_eq!(p.shards, 3);
}

// Issue 19: the retention the platform promises (30 days at most) and segments small
// enough that a whole-segment drop takes records at most a thirtieth of it early.

fn log_issue(text: &str, key: &str) -> String {
    let Err(ProfileError::Invalid(issues)) = Profile::from_toml(text) else {
        panic!("expected an invalid profile");
    };
    let issue = issues
        .iter()
        .find(|i| i.key == key)
        .unwrap_or_else(|| panic!("no issue names {key}: {issues:?}"));
    issue.problem.clone()
}

#[test]
fn retention_above_30_days_needs_the_explicit_allowance() {
    let over = DEFAULT_PROFILE_TOML.replace("retention_secs = 2592000", "retention_secs = 2592001");
    let problem = log_issue(&over, "log.retention_secs");
    assert!(problem.contains("30 days"), "{problem}");
    assert!(
        problem.contains("allow_retention_over_30_days = true"),
        "the error names the remedy: {problem}"
    );
    // Allowed explicitly, in the same section, it loads (the segment age still fits).
    let allowed = over.replace(
        "allow_retention_over_30_days = false",
        "allow_retention_over_30_days = true",
    );
    let p = Profile::from_toml(&allowed).unwrap();
    assert_eq!(p.log.retention_secs, 2_592_001);
    // Exactly 30 days needs nothing.
    assert!(Profile::from_toml(DEFAULT_PROFILE_TOML).is_ok());
    // The key is optional (profiles written before it still load) and false by default.
    let without = DEFAULT_PROFILE_TOML.replace("allow_retention_over_30_days = false\n", "");
    assert_ne!(without, DEFAULT_PROFILE_TOML);
    assert!(
        !Profile::from_toml(&without)
            .unwrap()
            .log
            .allow_retention_over_30_days
    );
    let over_without = without.replace("retention_secs = 2592000", "retention_secs = 3000000");
    log_issue(&over_without, "log.retention_secs");
    // The same from the environment.
    let err = Profile::from_toml_with_env(
        DEFAULT_PROFILE_TOML,
        env(&[("COURIER_LOG__RETENTION_SECS", "31536000")]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("log.retention_secs") && err.contains("30 days"),
        "{err}"
    );
    let (p, _) = Profile::from_toml_with_env(
        DEFAULT_PROFILE_TOML,
        env(&[
            ("COURIER_LOG__RETENTION_SECS", "31536000"),
            ("COURIER_LOG__ALLOW_RETENTION_OVER_30_DAYS", "true"),
        ]),
    )
    .unwrap();
    assert_eq!(p.log.retention_secs, 31_536_000);
}

#[test]
fn segment_age_above_a_thirtieth_of_retention_is_refused() {
    // 86401 > 2592000 / 30.
    let text = DEFAULT_PROFILE_TOML.replace(
        "segment_age_max_secs = 86400",
        "segment_age_max_secs = 86401",
    );
    let problem = log_issue(&text, "log.segment_age_max_secs");
    assert!(problem.contains("1..=86400"), "{problem}");
    assert!(problem.contains("retention_secs / 30"), "{problem}");
    // A shorter retention lowers the bound with it.
    let text = DEFAULT_PROFILE_TOML.replace("retention_secs = 2592000", "retention_secs = 3600");
    let problem = log_issue(&text, "log.segment_age_max_secs");
    assert!(problem.contains("1..=120"), "{problem}");
    let text = text.replace("segment_age_max_secs = 86400", "segment_age_max_secs = 120");
    assert!(Profile::from_toml(&text).is_ok());
}

#[test]
fn every_tuning_profile_keeps_the_retention_promise() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tuning");
    for entry in std::fs::read_dir(dir).expect("tuning/ exists") {
        let path = entry.expect("readable dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable profile");
        let p = Profile::from_toml(&text).unwrap();
        assert!(p.log.retention_secs <= 30 * 86_400, "{}", path.display());
        assert!(!p.log.allow_retention_over_30_days, "{}", path.display());
        assert!(
            p.log.segment_age_max_secs <= p.log.retention_secs / 30,
            "{}",
            path.display()
        );
    }
}

// Issue 17: zeros written ahead of the log's records.

#[test]
fn prepared_space_is_optional_whole_blocks_and_bounded() {
    let default = Profile::from_toml(DEFAULT_PROFILE_TOML).unwrap();
    assert_eq!(default.log.prepare_ahead_bytes, 2 << 20);
    // Optional: profiles written before the key load with the default.
    let without = DEFAULT_PROFILE_TOML.replace("prepare_ahead_bytes = 2097152\n", "");
    assert_ne!(without, DEFAULT_PROFILE_TOML);
    assert_eq!(
        Profile::from_toml(&without)
            .unwrap()
            .log
            .prepare_ahead_bytes,
        2 << 20
    );
    // 0 turns it off.
    let off =
        DEFAULT_PROFILE_TOML.replace("prepare_ahead_bytes = 2097152", "prepare_ahead_bytes = 0");
    assert_eq!(Profile::from_toml(&off).unwrap().log.prepare_ahead_bytes, 0);
    // Not whole blocks, or past the bound: named, with why.
    let odd = DEFAULT_PROFILE_TOML.replace(
        "prepare_ahead_bytes = 2097152",
        "prepare_ahead_bytes = 5000",
    );
    let problem = log_issue(&odd, "log.prepare_ahead_bytes");
    assert!(problem.contains("multiple of 4096"), "{problem}");
    let big = DEFAULT_PROFILE_TOML.replace(
        "prepare_ahead_bytes = 2097152",
        "prepare_ahead_bytes = 536870912",
    );
    log_issue(&big, "log.prepare_ahead_bytes");
    // From the environment, as every key.
    let (p, _) = Profile::from_toml_with_env(
        DEFAULT_PROFILE_TOML,
        env(&[("COURIER_LOG__PREPARE_AHEAD_BYTES", "0")]),
    )
    .unwrap();
    assert_eq!(p.log.prepare_ahead_bytes, 0);
}
