//! Regions ("local storage", issue 19) in the shell: which businesses a server admits,
//! and the checks on a region's data directory.
//!
//! ```text
//!  profile [regions.NAME] ──> courier serve --region NAME
//!      data dir = regions.NAME.data_dir (must exist, be a writable directory)
//!      master key = regions.NAME.master_key_file, else the main one
//!  registry file (shared) ──RegionFilter::apply──> the businesses of NAME
//!      (+ platform credentials), at start and at every reload
//! ```
//!
//! Invariant: a server serves the businesses of exactly one region (the main server:
//! those without one), so every file it writes (log, checkpoints, business keys, access
//! log) holds only data of that region's businesses. A registry that names a region the
//! profile does not define is refused (at start: the server does not start; at a reload:
//! the previous registry stays in force), so a typo cannot leave a business unserved in
//! silence.

use std::collections::BTreeSet;
use std::path::Path;

use courier_pipeline::profile::Profile;
use courier_pipeline::registry::Registry;

/// Which businesses of the registry file one server admits.
#[derive(Debug, Clone)]
pub struct RegionFilter {
    /// The server's region (`None`: the main server).
    region: Option<String>,
    /// Every region the profile defines.
    known: BTreeSet<String>,
}

impl RegionFilter {
    /// The filter of a server of `region` under `profile`; an error when the profile
    /// does not define the region.
    pub fn new(profile: &Profile, region: Option<&str>) -> Result<RegionFilter, String> {
        let known: BTreeSet<String> = profile.regions.keys().cloned().collect();
        if let Some(r) = region {
            if !known.contains(r) {
                return Err(format!(
                    "region {r:?} is not defined by the profile (add a [regions.{r}] table with \
                     its data_dir and listen; defined: {})",
                    list(&known)
                ));
            }
        }
        Ok(RegionFilter {
            region: region.map(str::to_string),
            known,
        })
    }

    /// The server's region.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// The part of `registry` this server admits; an error naming every business whose
    /// region the profile does not define.
    pub fn apply(&self, registry: &Registry) -> Result<Registry, String> {
        let unknown: Vec<String> = registry
            .iter()
            .filter_map(|b| {
                let r = b.region.as_deref()?;
                (!self.known.contains(r)).then(|| format!("business {} names region {r:?}", b.id))
            })
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "{}, which the profile does not define (defined: {}); add a [regions.NAME] \
                 table or move the business with `courier businesses set --id N --region NAME`",
                unknown.join("; "),
                list(&self.known)
            ));
        }
        Ok(registry.for_region(self.region.as_deref()))
    }
}

fn list(known: &BTreeSet<String>) -> String {
    if known.is_empty() {
        return "none".into();
    }
    known.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// Checks a region's data directory before anything is written: it must exist (it is
/// never created, so a mount that is missing does not send the region's data onto the
/// disk below it), be a directory, and take a new file.
pub fn check_region_dir(region: &str, dir: &Path) -> Result<(), String> {
    let what = |problem: String| {
        format!(
            "region {region:?}: data directory {}: {problem}",
            dir.display()
        )
    };
    let meta = std::fs::metadata(dir).map_err(|e| {
        what(format!(
            "{e} (a region's directory is not created by courier: create it, or mount its \
             storage, and give it to the server's user)"
        ))
    })?;
    if !meta.is_dir() {
        return Err(what("is not a directory".into()));
    }
    let probe = dir.join(format!(
        ".courier-write-probe-{:016x}",
        rand::random::<u64>()
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| what(format!("is not writable by this server: {e}")))?;
    std::fs::remove_file(&probe).map_err(|e| what(format!("removing the write probe: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_pipeline::registry::Tier;

    fn profile() -> Profile {
        Profile::from_toml(&format!(
            "{}\n[regions.eu]\ndata_dir = \"/srv/eu\"\nlisten = \"127.0.0.1:7450\"\n",
            courier_pipeline::profile::DEFAULT_PROFILE_TOML
        ))
        .unwrap()
    }

    #[test]
    fn a_region_the_profile_lacks_is_refused_with_its_name() {
        let e = RegionFilter::new(&profile(), Some("us")).unwrap_err();
        assert!(e.contains("\"us\"") && e.contains("eu"), "{e}");
        let mut reg = Registry::default();
        let (id, _) = reg.add("A", Tier::T2k, 80, &[1; 32]).unwrap();
        reg.set_region(id, Some("us")).unwrap();
        let e = RegionFilter::new(&profile(), None)
            .unwrap()
            .apply(&reg)
            .unwrap_err();
        assert!(
            e.contains(&format!("business {id}")) && e.contains("\"us\""),
            "{e}"
        );
        reg.set_region(id, Some("eu")).unwrap();
        let eu = RegionFilter::new(&profile(), Some("eu")).unwrap();
        assert_eq!(eu.apply(&reg).unwrap().len(), 1);
        let main = RegionFilter::new(&profile(), None).unwrap();
        assert!(main.apply(&reg).unwrap().is_empty());
    }

    #[test]
    fn a_missing_or_unwritable_region_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("absent");
        let e = check_region_dir("eu", &missing).unwrap_err();
        assert!(e.contains("not created by courier"), "{e}");
        assert!(!missing.exists(), "never created");
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = check_region_dir("eu", &file).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
        check_region_dir("eu", tmp.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "probe removed"
        );
    }
}
