//! The business registry: who may send, with which limits, authenticated how.
//!
//! A registry is TOML text (the shell reads and writes the file):
//!
//! ```toml
//! [[business]]
//! id = 1
//! name = "Acme Deliveries"
//! token_sha256 = "9f86d0..."   # SHA-256 of the bearer token; the token itself is never stored
//! tier = "2000"                # unique recipients per rolling 24 h: 250, 2000, 10000, 100000, unlimited
//! mps = 80                     # messages per second
//! region = "eu"                # optional: kept at rest in this region's directory
//! ```
//!
//! Tokens have the form `c1.<business id>.<64 hex digits>` (32 random bytes). Verifying
//! one looks the business up by the id in the token, hashes the whole token and compares
//! the hashes in constant time, so neither the lookup nor the comparison leaks how much
//! of a guessed secret was right.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of every token of this format.
pub const TOKEN_PREFIX: &str = "c1";
/// Most businesses in one registry.
pub const BUSINESSES_MAX: usize = 1 << 20;
/// Longest business name, bytes.
pub const NAME_BYTES_MAX: usize = 200;

/// Unique recipients a business may message in a rolling 24 hours. Ordered smallest
/// first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// 250 recipients.
    T250,
    /// 2,000 recipients.
    T2k,
    /// 10,000 recipients.
    T10k,
    /// 100,000 recipients.
    T100k,
    /// No limit.
    Unlimited,
}

impl Tier {
    /// Every tier, smallest first.
    pub const ALL: [Tier; 5] = [
        Tier::T250,
        Tier::T2k,
        Tier::T10k,
        Tier::T100k,
        Tier::Unlimited,
    ];

    /// Unique recipients per 24 h; `None` for unlimited.
    pub fn recipients_per_day(self) -> Option<u64> {
        match self {
            Tier::T250 => Some(250),
            Tier::T2k => Some(2_000),
            Tier::T10k => Some(10_000),
            Tier::T100k => Some(100_000),
            Tier::Unlimited => None,
        }
    }

    /// The name used in the registry and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Tier::T250 => "250",
            Tier::T2k => "2000",
            Tier::T10k => "10000",
            Tier::T100k => "100000",
            Tier::Unlimited => "unlimited",
        }
    }

    /// Parses a tier name.
    pub fn parse(s: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.name() == s)
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One business as written in the registry file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBusiness {
    /// Stable id, > 0.
    pub id: u32,
    /// Display name.
    pub name: String,
    /// Hex SHA-256 of the token.
    pub token_sha256: String,
    /// Tier name.
    pub tier: String,
    /// Messages per second.
    pub mps: u32,
    /// Exempt from abnormal-sending detection (the platform's own load and test senders);
    /// absent means false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub exempt: bool,
    /// A platform credential: sends spam REPORTs, never messages; absent means false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub platform: bool,
    /// Distinct recipients per minute the business is known to reach; absent means 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub baseline_per_min: u32,
    /// The region whose directory keeps the business's data at rest (a `[regions.NAME]`
    /// of the profile); absent: the main data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Longest region name, bytes.
pub const REGION_NAME_BYTES_MAX: usize = 32;

/// Whether `name` may name a region: 1..=32 characters of `a-z`, `0-9` and `-` (it
/// appears in paths, profiles and commands, so nothing that needs quoting).
pub fn valid_region_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= REGION_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    /// Ids of erased businesses (`courier businesses erase`): never given out again, so
    /// that nothing left of an erased business (a billing count, a log record until it
    /// ages out) is ever taken for a new one's. Before `business`: TOML writes plain
    /// values before tables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    erased: Vec<u32>,
    #[serde(default)]
    business: Vec<RawBusiness>,
}

/// A validated business.
#[derive(Clone, PartialEq, Eq)]
pub struct Business {
    /// Stable id.
    pub id: u32,
    /// Display name.
    pub name: String,
    /// Unique-recipient tier.
    pub tier: Tier,
    /// Messages per second.
    pub mps: u32,
    /// Exempt from abnormal-sending detection: no unique-recipient, rate, same-recipient,
    /// surge or rating checks (billing counts still kept). For the platform's own load and
    /// test senders; never for customers.
    pub exempt: bool,
    /// A platform credential (the messaging platform's own service): its connections may
    /// send REPORT frames (spam reports that rate businesses) and no SUBMIT.
    pub platform: bool,
    /// Distinct recipients per minute the operator knows this business to reach (from its
    /// onboarding or history elsewhere): the fan-out surge check uses it until the
    /// business's own learned baseline is higher, so a large sender new to this relay is
    /// not taken for a blast. 0: learn from scratch.
    pub baseline_per_min: u32,
    /// The region whose directory keeps its data at rest; `None`: the main data
    /// directory. Served only by that region's server (`courier serve --region`).
    pub region: Option<String>,
    token_sha256: [u8; 32],
}

impl Business {
    /// Whether `other` authenticates the same token (a rotated token does not).
    pub fn same_token(&self, other: &Business) -> bool {
        self.token_sha256 == other.token_sha256
    }
}

impl std::fmt::Debug for Business {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Business")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("tier", &self.tier)
            .field("mps", &self.mps)
            .field("exempt", &self.exempt)
            .field("platform", &self.platform)
            .field("baseline_per_min", &self.baseline_per_min)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Why a registry could not be loaded or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// Not valid TOML, or unknown keys.
    #[error("registry does not parse: {0}")]
    Parse(String),
    /// An entry breaks a rule; names the entry by index and id.
    #[error("registry entry {index} (id {id}): {problem}")]
    Invalid {
        /// Position in the file.
        index: usize,
        /// Its id.
        id: u32,
        /// What is wrong.
        problem: String,
    },
    /// More businesses than [`BUSINESSES_MAX`].
    #[error("registry holds more than {BUSINESSES_MAX} businesses")]
    TooMany,
    /// No business has this id.
    #[error("no business with id {0}")]
    NotFound(u32),
}

/// Why a token was refused. Deliberately says nothing about which part was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown or invalid token")]
pub struct Unauthorized;

/// The set of businesses, indexed by id.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    by_id: HashMap<u32, Business>,
    order: Vec<u32>,
    erased: std::collections::BTreeSet<u32>,
}

/// SHA-256 of a token.
pub fn token_hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

fn check_region(region: &str, platform: bool) -> Result<(), String> {
    if platform {
        return Err("a platform credential is served in every region and takes none".into());
    }
    if !valid_region_name(region) {
        return Err(format!(
            "region {region:?}: a region's name is 1..={REGION_NAME_BYTES_MAX} characters of a-z, 0-9 and '-'"
        ));
    }
    Ok(())
}

/// Builds a token for `id` from 32 secret random bytes.
pub fn format_token(id: u32, secret: &[u8; 32]) -> String {
    format!("{TOKEN_PREFIX}.{id}.{}", hex::encode(secret))
}

fn token_business_id(token: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(token).ok()?;
    let mut parts = s.splitn(3, '.');
    if parts.next()? != TOKEN_PREFIX {
        return None;
    }
    let id = parts.next()?.parse().ok()?;
    let secret = parts.next()?;
    (secret.len() == 64).then_some(id)
}

impl Registry {
    /// Parses and validates registry text.
    pub fn from_toml(text: &str) -> Result<Registry, RegistryError> {
        let raw: RawRegistry =
            toml::from_str(text).map_err(|e| RegistryError::Parse(e.to_string()))?;
        if raw.business.len() > BUSINESSES_MAX {
            return Err(RegistryError::TooMany);
        }
        let mut reg = Registry::default();
        if raw.erased.len() > BUSINESSES_MAX {
            return Err(RegistryError::TooMany);
        }
        reg.erased.extend(raw.erased);
        for (index, b) in raw.business.into_iter().enumerate() {
            let id = b.id;
            reg.insert_raw(b)
                .map_err(|problem| RegistryError::Invalid { index, id, problem })?;
        }
        Ok(reg)
    }

    fn insert_raw(&mut self, b: RawBusiness) -> Result<(), String> {
        if b.id == 0 {
            return Err("id must be greater than 0".into());
        }
        if self.by_id.contains_key(&b.id) {
            return Err("duplicate id".into());
        }
        if self.erased.contains(&b.id) {
            return Err("this id belongs to an erased business and is never reused".into());
        }
        if b.name.is_empty() || b.name.len() > NAME_BYTES_MAX {
            return Err(format!("name must be 1..={NAME_BYTES_MAX} bytes"));
        }
        let tier = Tier::parse(&b.tier).ok_or_else(|| {
            format!(
                "tier {:?} is not one of 250, 2000, 10000, 100000, unlimited",
                b.tier
            )
        })?;
        if b.mps == 0 {
            return Err("mps must be greater than 0".into());
        }
        if let Some(r) = &b.region {
            check_region(r, b.platform)?;
        }
        let mut token_sha256 = [0u8; 32];
        hex::decode_to_slice(&b.token_sha256, &mut token_sha256)
            .map_err(|_| "token_sha256 must be 64 hex digits".to_string())?;
        self.order.push(b.id);
        self.by_id.insert(
            b.id,
            Business {
                id: b.id,
                name: b.name,
                tier,
                mps: b.mps,
                exempt: b.exempt,
                platform: b.platform,
                baseline_per_min: b.baseline_per_min,
                region: b.region,
                token_sha256,
            },
        );
        Ok(())
    }

    /// Adds a business with a fresh token built from `secret` (32 random bytes from the
    /// caller). Returns the token: the only time it exists in clear.
    pub fn add(
        &mut self,
        name: &str,
        tier: Tier,
        mps: u32,
        secret: &[u8; 32],
    ) -> Result<(u32, String), RegistryError> {
        if self.by_id.len() >= BUSINESSES_MAX {
            return Err(RegistryError::TooMany);
        }
        let id = self
            .by_id
            .keys()
            .chain(self.erased.iter())
            .max()
            .copied()
            .unwrap_or(0)
            + 1;
        let token = format_token(id, secret);
        let index = self.order.len();
        self.insert_raw(RawBusiness {
            id,
            name: name.to_string(),
            token_sha256: hex::encode(token_hash(token.as_bytes())),
            tier: tier.name().to_string(),
            mps,
            exempt: false,
            platform: false,
            baseline_per_min: 0,
            region: None,
        })
        .map_err(|problem| RegistryError::Invalid { index, id, problem })?;
        Ok((id, token))
    }

    /// Changes a business's tier and rate. A running server picks the change up without
    /// a restart (it re-reads the registry file).
    pub fn set_limits(&mut self, id: u32, tier: Tier, mps: u32) -> Result<(), RegistryError> {
        let index = self.order.iter().position(|&i| i == id);
        let (Some(index), Some(b)) = (index, self.by_id.get_mut(&id)) else {
            return Err(RegistryError::NotFound(id));
        };
        if mps == 0 {
            return Err(RegistryError::Invalid {
                index,
                id,
                problem: "mps must be greater than 0".into(),
            });
        }
        b.tier = tier;
        b.mps = mps;
        Ok(())
    }

    /// Marks a business exempt from detection (or not). False when there is no such
    /// business.
    pub fn set_exempt(&mut self, id: u32, exempt: bool) -> bool {
        self.by_id.get_mut(&id).map(|b| b.exempt = exempt).is_some()
    }

    /// Sets the distinct recipients per minute a business is known to reach (see
    /// [`Business::baseline_per_min`]). False when there is no such business.
    pub fn set_baseline(&mut self, id: u32, per_min: u32) -> bool {
        self.by_id
            .get_mut(&id)
            .map(|b| b.baseline_per_min = per_min)
            .is_some()
    }

    /// Makes a business a platform credential (or not). False when there is no such
    /// business.
    pub fn set_platform(&mut self, id: u32, platform: bool) -> bool {
        self.by_id
            .get_mut(&id)
            .map(|b| b.platform = platform)
            .is_some()
    }

    /// Places a business in a region (`None`: the main data directory). A running
    /// server picks the change up from the file: the connections of a business that left
    /// its region are closed, and it is served by its new region's server from then on;
    /// what it stored before stays where it was until retention or erasure removes it.
    pub fn set_region(&mut self, id: u32, region: Option<&str>) -> Result<(), RegistryError> {
        let index = self.order.iter().position(|&i| i == id);
        let (Some(index), Some(b)) = (index, self.by_id.get_mut(&id)) else {
            return Err(RegistryError::NotFound(id));
        };
        if let Some(r) = region {
            check_region(r, b.platform).map_err(|problem| RegistryError::Invalid {
                index,
                id,
                problem,
            })?;
        }
        b.region = region.map(str::to_string);
        Ok(())
    }

    /// The registry a server of `region` serves (`None`: the main server): the
    /// businesses placed there, and every platform credential (the platform's edge and
    /// reporters talk to every region's server).
    pub fn for_region(&self, region: Option<&str>) -> Registry {
        let mut out = Registry::default();
        for id in &self.order {
            let b = &self.by_id[id];
            if b.platform || b.region.as_deref() == region {
                out.order.push(*id);
                out.by_id.insert(*id, b.clone());
            }
        }
        out
    }

    /// Every region a business names, each once, sorted.
    pub fn regions(&self) -> Vec<&str> {
        let mut r: Vec<&str> = self
            .by_id
            .values()
            .filter_map(|b| b.region.as_deref())
            .collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// Removes business `id` for good (`courier businesses erase`): its id is remembered
    /// as erased and never given to another business.
    pub fn erase(&mut self, id: u32) -> Result<(), RegistryError> {
        if self.erased.len() >= BUSINESSES_MAX {
            return Err(RegistryError::TooMany);
        }
        self.by_id.remove(&id).ok_or(RegistryError::NotFound(id))?;
        self.order.retain(|&i| i != id);
        self.erased.insert(id);
        Ok(())
    }

    /// Whether `id` belongs to an erased business.
    pub fn is_erased(&self, id: u32) -> bool {
        self.erased.contains(&id)
    }

    /// The registry as TOML text, in insertion order.
    pub fn to_toml(&self) -> String {
        let raw = RawRegistry {
            erased: self.erased.iter().copied().collect(),
            business: self
                .order
                .iter()
                .map(|id| {
                    let b = &self.by_id[id];
                    RawBusiness {
                        id: b.id,
                        name: b.name.clone(),
                        token_sha256: hex::encode(b.token_sha256),
                        tier: b.tier.name().to_string(),
                        mps: b.mps,
                        exempt: b.exempt,
                        platform: b.platform,
                        baseline_per_min: b.baseline_per_min,
                        region: b.region.clone(),
                    }
                })
                .collect(),
        };
        toml::to_string(&raw).expect("registry serializes")
    }

    /// Finds the business a token belongs to, comparing hashes in constant time.
    pub fn authenticate(&self, token: &[u8]) -> Result<&Business, Unauthorized> {
        let id = token_business_id(token).ok_or(Unauthorized)?;
        let b = self.by_id.get(&id).ok_or(Unauthorized)?;
        let h = token_hash(token);
        if bool::from(h.ct_eq(&b.token_sha256)) {
            Ok(b)
        } else {
            Err(Unauthorized)
        }
    }

    /// The business with this id.
    pub fn get(&self, id: u32) -> Option<&Business> {
        self.by_id.get(&id)
    }

    /// Businesses in registry order.
    pub fn iter(&self) -> impl Iterator<Item = &Business> {
        self.order.iter().map(|id| &self.by_id[id])
    }

    /// Number of businesses.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True when no business is registered.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_survive_the_file_and_split_the_registry() {
        let mut reg = Registry::default();
        let (main, t_main) = reg.add("Main", Tier::T2k, 80, &[1u8; 32]).unwrap();
        let (eu, t_eu) = reg.add("Eu", Tier::T2k, 80, &[2u8; 32]).unwrap();
        let (edge, t_edge) = reg.add("Edge", Tier::T2k, 80, &[3u8; 32]).unwrap();
        assert!(reg.set_platform(edge, true));
        reg.set_region(eu, Some("eu-west")).unwrap();
        let reg = Registry::from_toml(&reg.to_toml()).unwrap();
        assert_eq!(reg.get(eu).unwrap().region.as_deref(), Some("eu-west"));
        assert_eq!(reg.get(main).unwrap().region, None);
        assert_eq!(reg.regions(), vec!["eu-west"]);
        let in_eu = reg.for_region(Some("eu-west"));
        assert!(in_eu.authenticate(t_eu.as_bytes()).is_ok());
        assert!(
            in_eu.authenticate(t_edge.as_bytes()).is_ok(),
            "platform everywhere"
        );
        assert!(in_eu.authenticate(t_main.as_bytes()).is_err());
        let in_main = reg.for_region(None);
        assert!(in_main.authenticate(t_main.as_bytes()).is_ok());
        assert!(in_main.authenticate(t_edge.as_bytes()).is_ok());
        assert!(in_main.authenticate(t_eu.as_bytes()).is_err());
        assert_eq!(reg.for_region(Some("us")).len(), 1, "only the platform");
    }

    #[test]
    fn bad_regions_are_refused_with_the_reason() {
        let mut reg = Registry::default();
        let (id, _) = reg.add("Main", Tier::T2k, 80, &[1u8; 32]).unwrap();
        for bad in ["", "EU", "eu west", "a/b", &"x".repeat(33)] {
            let e = reg.set_region(id, Some(bad)).unwrap_err().to_string();
            assert!(e.contains("region"), "{bad:?}: {e}");
        }
        assert!(matches!(
            reg.set_region(99, Some("eu")),
            Err(RegistryError::NotFound(99))
        ));
        let (edge, _) = reg.add("Edge", Tier::T2k, 80, &[3u8; 32]).unwrap();
        assert!(reg.set_platform(edge, true));
        let e = reg.set_region(edge, Some("eu")).unwrap_err().to_string();
        assert!(e.contains("platform"), "{e}");
        let text = reg
            .to_toml()
            .replace("name = \"Main\"", "name = \"Main\"\nregion = \"../x\"");
        let e = Registry::from_toml(&text).unwrap_err().to_string();
        assert!(e.contains("region"), "{e}");
    }

    #[test]
    fn add_authenticate_roundtrip_through_toml() {
        let mut reg = Registry::default();
        let (id, token) = reg.add("Acme", Tier::T2k, 80, &[7u8; 32]).unwrap();
        let (id2, token2) = reg.add("Beta", Tier::Unlimited, 1000, &[9u8; 32]).unwrap();
        assert_ne!(id, id2);
        let text = reg.to_toml();
        assert!(
            !text.contains(&token[5..]),
            "token must not be stored in clear"
        );
        let reg = Registry::from_toml(&text).unwrap();
        assert_eq!(reg.authenticate(token.as_bytes()).unwrap().id, id);
        assert_eq!(
            reg.authenticate(token2.as_bytes()).unwrap().tier,
            Tier::Unlimited
        );
    }

    #[test]
    fn limits_and_exemption_change_and_survive_the_file() {
        let mut reg = Registry::default();
        let (id, _) = reg.add("Acme", Tier::T250, 80, &[1u8; 32]).unwrap();
        assert!(!reg.get(id).unwrap().exempt);
        assert!(
            !reg.to_toml().contains("exempt"),
            "false is the default and not written"
        );
        reg.set_limits(id, Tier::T10k, 1000).unwrap();
        assert!(reg.set_exempt(id, true));
        assert!(reg.set_platform(id, true));
        assert!(reg.set_baseline(id, 6_000));
        assert!(!reg.set_exempt(99, true));
        assert!(matches!(
            reg.set_limits(99, Tier::T250, 1),
            Err(RegistryError::NotFound(99))
        ));
        assert!(matches!(
            reg.set_limits(id, Tier::T250, 0),
            Err(RegistryError::Invalid { .. })
        ));
        let back = Registry::from_toml(&reg.to_toml()).unwrap();
        let b = back.get(id).unwrap();
        assert_eq!(
            (b.tier, b.mps, b.exempt, b.platform, b.baseline_per_min),
            (Tier::T10k, 1000, true, true, 6_000)
        );
    }

    #[test]
    fn wrong_tokens_are_refused() {
        let mut reg = Registry::default();
        let (id, token) = reg.add("Acme", Tier::T250, 80, &[1u8; 32]).unwrap();
        let mut flipped = token.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(reg.authenticate(&flipped), Err(Unauthorized));
        // Right secret, other business id.
        let other = token.replace(&format!(".{id}."), ".99.");
        assert_eq!(reg.authenticate(other.as_bytes()), Err(Unauthorized));
        assert_eq!(reg.authenticate(b""), Err(Unauthorized));
        assert_eq!(reg.authenticate(b"c1.1.short"), Err(Unauthorized));
    }

    #[test]
    fn invalid_entries_name_the_problem() {
        let text = "[[business]]\nid = 3\nname = \"x\"\ntoken_sha256 = \"zz\"\ntier = \"2000\"\nmps = 80\n";
        match Registry::from_toml(text) {
            Err(RegistryError::Invalid { id: 3, problem, .. }) => {
                assert!(problem.contains("token_sha256"))
            }
            other => panic!("{other:?}"),
        }
        let text =
            "[[business]]\nid = 3\nname = \"x\"\ntoken_sha256 = \"00\"\ntier = \"5\"\nmps = 80\n";
        assert!(matches!(
            Registry::from_toml(text),
            Err(RegistryError::Invalid { .. })
        ));
    }

    #[test]
    fn an_erased_id_is_never_given_out_again_and_survives_the_file() {
        let mut reg = Registry::default();
        let (a, token_a) = reg.add("Acme", Tier::T250, 80, &[1u8; 32]).unwrap();
        let (b, _) = reg.add("Beta", Tier::T250, 80, &[2u8; 32]).unwrap();
        // The highest id goes: max + 1 alone would hand it out again.
        reg.erase(b).unwrap();
        assert_eq!(reg.erase(b), Err(RegistryError::NotFound(b)));
        let mut reg = Registry::from_toml(&reg.to_toml()).unwrap();
        assert!(reg.is_erased(b) && !reg.is_erased(a));
        assert!(reg.get(b).is_none());
        assert_eq!(reg.len(), 1);
        assert!(reg.authenticate(token_a.as_bytes()).is_ok());
        let (c, _) = reg.add("Gamma", Tier::T250, 80, &[3u8; 32]).unwrap();
        assert!(c > b, "erased id {b} given out again as {c}");
        // A hand-edited registry that brings an erased id back is refused by name.
        let text = reg
            .to_toml()
            .replace(&format!("id = {c}"), &format!("id = {b}"));
        let err = Registry::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("erased"), "{err}");
    }
}
