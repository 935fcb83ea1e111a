//! The `courier` binary as a user runs it: the README's commands.

use std::process::Command;

fn courier() -> Command {
    Command::new(env!("CARGO_BIN_EXE_courier"))
}

#[test]
fn demo_runs_and_reports_accepted_messages() {
    let out = courier()
        .args(["demo", "--seconds", "1", "--connections", "2"])
        .env("COURIER_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("throughput"), "{stdout}");
    let accepted: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("accepted"))
        .and_then(|v| v.trim().parse().ok())
        .expect("an `accepted` line");
    assert!(accepted > 0, "{stdout}");
    // The abusive sender is stopped by the detector, and the status says why.
    let detector = stdout
        .lines()
        .find(|l| l.starts_with("detector:"))
        .expect("a detector line");
    assert!(detector.contains("rejected as sender_paused"), "{detector}");
    assert!(stdout.contains("paused true (fan_out_surge)"), "{stdout}");
    // The bulk sender (exempt, delivery off in the demo) is never throttled or flagged:
    // the report's one flag is the abusive sender's.
    let bulk = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("bulk "))
        .expect("a bulk sender line");
    assert!(bulk.trim_end().ends_with("never"), "{bulk}");
    assert!(stdout.contains("FP 0"), "{stdout}");
}

#[test]
fn businesses_add_prints_a_token_once_and_stores_only_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry.toml");
    let add = |name: &str, tier: &str| {
        courier()
            .args([
                "businesses",
                "add",
                "--name",
                name,
                "--tier",
                tier,
                "--mps",
                "80",
            ])
            .arg("--registry")
            .arg(&reg)
            .output()
            .unwrap()
    };
    let out = add("Acme", "2000");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("c1.1."), "{token}");
    let stored = std::fs::read_to_string(&reg).unwrap();
    assert!(
        !stored.contains(&token[5..]),
        "the token must not be stored"
    );
    let registry = courier_pipeline::registry::Registry::from_toml(&stored).unwrap();
    assert_eq!(
        registry.authenticate(token.as_bytes()).unwrap().name,
        "Acme"
    );

    let out = add("Beta", "unlimited");
    assert!(out.status.success());
    let out = add("Gamma", "7");
    assert!(!out.status.success(), "an unknown tier is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tier"));

    let list = courier()
        .args(["businesses", "list", "--registry"])
        .arg(&reg)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&list.stdout);
    assert!(
        listing.contains("Acme") && listing.contains("Beta"),
        "{listing}"
    );
    assert!(!listing.contains(&token[5..]));
}

#[test]
fn config_check_accepts_shipped_profiles_and_names_broken_keys() {
    for name in [
        "default",
        "small",
        "throughput",
        "latency",
        "short-retention",
    ] {
        let out = courier()
            .args(["config", "check", &format!("tuning/{name}.toml")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string("tuning/default.toml")
        .unwrap()
        .replace("batch_messages_max = 1024", "batch_messages_max = 0");
    std::fs::write(&bad, text).unwrap();
    let out = courier()
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("limits.batch_messages_max"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serve_refuses_a_bad_profile_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten = 5\n").unwrap();
    let out = courier()
        .args(["serve", "--profile"])
        .arg(&bad)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("listen"), "{err}");
}

#[test]
fn keys_init_writes_a_private_key_once_and_serve_needs_one() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    let out = courier()
        .args(["keys", "init", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&key).unwrap();
    assert_eq!(text.trim().len(), 64, "64 hex characters");
    assert!(text.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The key is never printed.
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!printed.contains(text.trim()));

    // A second init refuses to overwrite it.
    let again = courier()
        .args(["keys", "init", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&key).unwrap(), text, "unchanged");

    // serve without a master key stops with a clear error and creates no log.
    let data = dir.path().join("data");
    let out = courier()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env_remove("COURIER_MASTER_KEY_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("master key"), "{err}");
    assert!(
        !data.join("log").exists(),
        "nothing touched before the key is known"
    );

    // A malformed key file is refused too.
    let bad = dir.path().join("bad.key");
    courier_testkit::write_secret(&bad, "not a key\n");
    let out = courier()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .arg("--master-key-file")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("master key"));
    assert!(!data.join("log").exists());
}

#[test]
fn config_check_applies_environment_overrides_and_names_a_bad_one() {
    let out = courier()
        .args(["config", "check", "tuning/small.toml"])
        .env("COURIER_SERVER__SHARDS", "3")
        .env("COURIER_LOG__RETENTION_SECS", "172800")
        // A segment at most a thirtieth of the retention old (issue 19).
        .env("COURIER_LOG__SEGMENT_AGE_MAX_SECS", "5760")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("override: server.shards = 3 (from COURIER_SERVER__SHARDS)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("override: log.retention_secs = 172800 (from COURIER_LOG__RETENTION_SECS)"),
        "{stdout}"
    );
    // The effective profile is TOML (what it says about it is comments), overrides in.
    let effective: toml::Table = toml::from_str(&stdout).expect("stdout is a TOML profile");
    assert_eq!(
        effective["server"]["shards"].as_integer(),
        Some(3),
        "{stdout}"
    );
    assert_eq!(
        effective["log"]["retention_secs"].as_integer(),
        Some(172800),
        "{stdout}"
    );
    courier_pipeline::profile::Profile::from_toml(&stdout).expect("it loads as a profile");

    // A variable that names no key, and one that breaks a bound.
    for (var, value, expect) in [
        ("COURIER_SERVER__SHARDZ", "3", "server.shardz"),
        ("COURIER_SERVER__SHARDS", "999", "0..=256"),
    ] {
        let out = courier()
            .args(["config", "check", "tuning/small.toml"])
            .env(var, value)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var) && err.contains(expect), "{err}");
    }
}

#[test]
fn json_log_format_writes_every_line_as_json_failures_included() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten = 5\n").unwrap();
    let out = courier()
        .args(["--log-format", "json", "serve", "--profile"])
        .arg(&bad)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let events: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let failure = events
        .iter()
        .find(|v| v.pointer("/fields/message") == Some(&"courier failed".into()))
        .unwrap_or_else(|| panic!("no failure event: {err}"));
    assert_eq!(failure["level"], "ERROR");
    let reason = failure["fields"]["error"].as_str().unwrap();
    assert!(
        reason.contains("bad.toml") && reason.contains("listen"),
        "{reason}"
    );

    // An unknown format is refused by name.
    let out = courier()
        .args(["config", "check", "tuning/small.toml"])
        .env("COURIER_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("xml") && err.contains("json"), "{err}");
}

#[test]
fn businesses_set_and_the_optional_add_flags_write_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry.toml");
    let run = |args: &[&str]| {
        courier()
            .args(args)
            .arg("--registry")
            .arg(&reg)
            .output()
            .unwrap()
    };
    let out = run(&[
        "businesses",
        "add",
        "--name",
        "Acme",
        "--tier",
        "2000",
        "--mps",
        "80",
    ]);
    assert!(out.status.success());
    let out = run(&[
        "businesses",
        "add",
        "--name",
        "platform",
        "--platform",
        "--exempt",
        "--baseline-per-min",
        "600",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("platform credential 2"));
    let out = run(&[
        "businesses",
        "set",
        "--id",
        "1",
        "--tier",
        "10000",
        "--mps",
        "1000",
        "--baseline-per-min",
        "3000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r =
        courier_pipeline::registry::Registry::from_toml(&std::fs::read_to_string(&reg).unwrap())
            .unwrap();
    let a = r.get(1).unwrap();
    assert_eq!(
        (
            a.tier.name(),
            a.mps,
            a.baseline_per_min,
            a.exempt,
            a.platform
        ),
        ("10000", 1000, 3000, false, false)
    );
    let p = r.get(2).unwrap();
    assert_eq!(
        (p.platform, p.exempt, p.baseline_per_min),
        (true, true, 600)
    );
    // Errors name what is wrong and change nothing.
    let out = run(&["businesses", "set", "--id", "9", "--mps", "5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no business with id 9"));
    let out = run(&["businesses", "set", "--id", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to change"));
    let out = run(&["businesses", "set", "--id", "1", "--mps", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("mps must be greater than 0"));
    let after =
        courier_pipeline::registry::Registry::from_toml(&std::fs::read_to_string(&reg).unwrap())
            .unwrap();
    assert_eq!(after.get(1).unwrap().mps, 1000);
}
