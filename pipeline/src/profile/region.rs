//! `[regions.NAME]`: where a region's businesses keep their data at rest ("local
//! storage", issue 19).
//!
//! A region is served by its own `courier serve --region NAME` process on its own
//! address, whose data directory is the region's: its log (keyrings and segments:
//! messages, delivery state, statuses, users' replies), its detector checkpoints, its
//! business keys, its access log and its TLS identity. That process admits only the
//! businesses the registry places in the region (and platform credentials), so nothing of
//! one region's businesses is written under another region's directory by construction,
//! and the default process (no `--region`) admits only businesses without a region.
//!
//! Why one process per region rather than one log per region in every shard: every piece
//! of per-message state (the log, group commit, recovery, retention, delivery cursors,
//! the detector's keyed hashes of numbers, idempotency claims) already lives in one
//! process's data directory; a process per region keeps all of it there with no change to
//! the hot path (the region is checked once, at HELLO, through the registry the process
//! holds) and with no state shared across regions that could carry a number between
//! them.
//!
//! Sans-IO: this checks the keys' shapes; whether the directory exists and is writable is
//! checked by the shell when the region's server starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::Checker;
use crate::registry::valid_region_name;

/// One `[regions.NAME]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegion {
    /// The region's data directory. It must exist and be writable when the region's
    /// server starts (it is never created: a missing mount must not send the region's
    /// data onto another disk).
    pub data_dir: String,
    /// UDP address the region's server listens on (not the main server's: shards share a
    /// port through SO_REUSEPORT, so two processes on one port would split its packets).
    pub listen: String,
    /// TCP address of the region's metrics endpoint; absent or "" disables it.
    #[serde(default)]
    pub metrics_listen: String,
    /// The region's own master key file; absent: the main one (`--master-key-file` or
    /// `COURIER_MASTER_KEY_FILE`).
    #[serde(default)]
    pub master_key_file: Option<String>,
}

/// A validated region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its server's UDP address.
    pub listen: SocketAddr,
    /// Its metrics endpoint (`None`: off).
    pub metrics_listen: Option<SocketAddr>,
    /// Its own master key file (`None`: the main one).
    pub master_key_file: Option<PathBuf>,
}

/// Checks every `[regions.NAME]`; returns the valid ones (an invalid one is an issue).
pub(crate) fn validate(
    raw: &BTreeMap<String, RawRegion>,
    main_listen: Option<SocketAddr>,
    c: &mut Checker,
) -> BTreeMap<String, Region> {
    let mut out = BTreeMap::new();
    let mut listens: Vec<(SocketAddr, String)> = main_listen
        .into_iter()
        .map(|a| (a, "server.listen".to_string()))
        .collect();
    for (name, r) in raw {
        let key = |k: &str| format!("regions.{name}.{k}");
        if !valid_region_name(name) {
            c.fail(
                &format!("regions.{name}"),
                "a region's name is 1..=32 characters of a-z, 0-9 and '-'".into(),
            );
            continue;
        }
        if r.data_dir.is_empty() {
            c.fail(&key("data_dir"), "must name a directory".into());
        }
        let listen = match r.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                c.fail(
                    &key("listen"),
                    format!("{:?} is not an IP:port address", r.listen),
                );
                None
            }
        };
        if let Some(a) = listen {
            if let Some((_, other)) = listens.iter().find(|(b, _)| *b == a && a.port() != 0) {
                c.fail(
                    &key("listen"),
                    format!("{a} is also {other}: each region's server needs its own address"),
                );
            }
            listens.push((a, key("listen")));
        }
        let metrics_listen = match r.metrics_listen.as_str() {
            "" => None,
            text => match text.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    c.fail(
                        &key("metrics_listen"),
                        format!("{text:?} is not an IP:port address (\"\" disables metrics)"),
                    );
                    None
                }
            },
        };
        if r.master_key_file.as_deref() == Some("") {
            c.fail(
                &key("master_key_file"),
                "must name a file (leave the key out to use the main master key)".into(),
            );
        }
        if let (Some(listen), false) = (listen, r.data_dir.is_empty()) {
            out.insert(
                name.clone(),
                Region {
                    data_dir: PathBuf::from(&r.data_dir),
                    listen,
                    metrics_listen,
                    master_key_file: r.master_key_file.as_ref().map(PathBuf::from),
                },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::profile::{Profile, ProfileError, DEFAULT_PROFILE_TOML};

    fn with(regions: &str) -> Result<Profile, ProfileError> {
        Profile::from_toml(&format!("{DEFAULT_PROFILE_TOML}\n{regions}"))
    }

    #[test]
    fn regions_load_with_their_directories_and_keys() {
        let p = with(
            "[regions.eu-west]\ndata_dir = \"/srv/eu\"\nlisten = \"127.0.0.1:7450\"\n\
             master_key_file = \"/etc/courier/eu.key\"\n\
             [regions.us]\ndata_dir = \"/srv/us\"\nlisten = \"127.0.0.1:7451\"\n\
             metrics_listen = \"127.0.0.1:9470\"\n",
        )
        .unwrap();
        assert_eq!(p.regions.len(), 2);
        let eu = &p.regions["eu-west"];
        assert_eq!(eu.data_dir, std::path::Path::new("/srv/eu"));
        assert_eq!(
            eu.master_key_file.as_deref(),
            Some(std::path::Path::new("/etc/courier/eu.key"))
        );
        assert_eq!(eu.metrics_listen, None);
        assert_eq!(p.regions["us"].metrics_listen.unwrap().port(), 9470);
        assert!(Profile::default_profile().regions.is_empty());
    }

    #[test]
    fn bad_regions_name_their_keys() {
        let Err(ProfileError::Invalid(issues)) = with(
            "[regions.EU]\ndata_dir = \"/a\"\nlisten = \"127.0.0.1:7450\"\n\
             [regions.us]\ndata_dir = \"\"\nlisten = \"127.0.0.1:7443\"\n\
             [regions.ap]\ndata_dir = \"/b\"\nlisten = \"nowhere\"\nmaster_key_file = \"\"\n",
        ) else {
            panic!("expected invalid");
        };
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        for k in [
            "regions.EU",
            "regions.us.data_dir",
            "regions.us.listen",
            "regions.ap.listen",
            "regions.ap.master_key_file",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn an_unknown_region_key_is_refused() {
        match with("[regions.eu]\ndata_dir = \"/a\"\nlisten = \"127.0.0.1:7450\"\ndir = \"/b\"\n") {
            Err(ProfileError::Parse(e)) => assert!(e.contains("dir"), "{e}"),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }
}
