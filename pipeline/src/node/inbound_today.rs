//! Users' replies each business received today (UTC), on this shard: the business's
//! inbound figure, billed like its accepted messages. Counted when a reply's record is
//! durable, and rebuilt at start-up from the inbound records the log still holds, so a
//! restart loses nothing of the day. Ids and counts only.

use std::collections::BTreeMap;

const MS_PER_DAY: u64 = 86_400_000;

/// Per business: the UTC day counted and the replies of that day. Bounded by the
/// businesses that received a reply today (older days are dropped as they are seen).
#[derive(Debug, Default)]
pub(super) struct InboundToday {
    by_business: BTreeMap<u32, (u64, u64)>,
}

impl InboundToday {
    /// Counts one reply to `business_id` taken at `at_ms` (unix ms).
    pub(super) fn count(&mut self, business_id: u32, at_ms: u64) {
        let day = at_ms / MS_PER_DAY;
        let e = self.by_business.entry(business_id).or_insert((day, 0));
        match day.cmp(&e.0) {
            std::cmp::Ordering::Greater => *e = (day, 1),
            std::cmp::Ordering::Equal => e.1 += 1,
            // A reply of an earlier day (replayed before today's): not today's figure.
            std::cmp::Ordering::Less => {}
        }
    }

    /// Today's figures at `now_ms`, by business; earlier days are forgotten.
    pub(super) fn figures(&mut self, now_ms: u64) -> Vec<(u32, u64)> {
        let today = now_ms / MS_PER_DAY;
        self.by_business.retain(|_, (day, _)| *day >= today);
        self.by_business
            .iter()
            .filter(|(_, (day, _))| *day == today)
            .map(|(&b, &(_, n))| (b, n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_business_and_day_and_forgets_earlier_days() {
        let day = 20_000 * MS_PER_DAY;
        let mut t = InboundToday::default();
        t.count(7, day - 1); // yesterday
        t.count(7, day + 5);
        t.count(7, day + 6);
        t.count(7, day - 2); // yesterday's, replayed late: not today's
        t.count(9, day + 1);
        assert_eq!(t.figures(day + 10), [(7, 2), (9, 1)]);
        assert_eq!(t.figures(day + MS_PER_DAY), [], "a new day starts at zero");
        t.count(9, day + MS_PER_DAY + 3);
        assert_eq!(t.figures(day + MS_PER_DAY + 4), [(9, 1)]);
    }
}
