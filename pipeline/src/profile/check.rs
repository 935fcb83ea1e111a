//! [`Checker`]: what every section's validator reports its broken keys to.

use super::ProfileIssue;

/// Collects the problems of a profile, each naming its dotted key, so that loading
/// reports every broken key at once instead of the first.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    issues: Vec<ProfileIssue>,
}

impl Checker {
    /// `key`'s value `v` must lie in `lo..=hi`.
    pub(crate) fn range<T: PartialOrd + std::fmt::Display + Copy>(
        &mut self,
        key: &str,
        v: T,
        lo: T,
        hi: T,
    ) {
        if v < lo || v > hi {
            self.fail(key, format!("{v} is outside {lo}..={hi}"));
        }
    }

    /// `key`'s value `v` must be a power of two.
    pub(crate) fn pow2(&mut self, key: &str, v: u32) {
        if !v.is_power_of_two() {
            self.fail(key, format!("{v} is not a power of two"));
        }
    }

    /// `key` is wrong: `problem` says how.
    pub(crate) fn fail(&mut self, key: &str, problem: String) {
        self.issues.push(ProfileIssue {
            key: key.to_string(),
            problem,
        });
    }

    /// Problems a section found by itself.
    pub(crate) fn extend(&mut self, issues: impl IntoIterator<Item = ProfileIssue>) {
        self.issues.extend(issues);
    }

    /// Every problem reported, in the order found.
    pub(crate) fn into_issues(self) -> Vec<ProfileIssue> {
        self.issues
    }
}
