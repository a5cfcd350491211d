//! `[slack] commands_per_minute` (spec 9.9): how many slash commands one
//! user may send in any sixty seconds. A sliding window, so a burst at the
//! end of one minute and the start of the next is still one burst.

use std::collections::{HashMap, VecDeque};
use time::{Duration, OffsetDateTime};

const WINDOW: Duration = Duration::minutes(1);
/// Past this many users in the map, users with nothing in the window are
/// dropped, so the map follows the users active in the last minute.
const PRUNE_ABOVE: usize = 4096;

pub struct PerMinute {
    limit: usize,
    seen: HashMap<String, VecDeque<OffsetDateTime>>,
}

impl PerMinute {
    pub fn new(limit: u32) -> Self {
        PerMinute {
            limit: limit.max(1) as usize,
            seen: HashMap::new(),
        }
    }

    /// Counts a command of `user` at `now`, or says how long until one
    /// more is allowed (a refused command is not counted).
    pub fn admit(&mut self, user: &str, now: OffsetDateTime) -> Result<(), std::time::Duration> {
        if self.seen.len() > PRUNE_ABOVE {
            self.seen
                .retain(|_, times| times.back().is_some_and(|last| *last + WINDOW > now));
        }
        let times = self.seen.entry(user.to_string()).or_default();
        while times.front().is_some_and(|t| *t + WINDOW <= now) {
            times.pop_front();
        }
        if times.len() >= self.limit {
            let oldest = times.front().copied().unwrap_or(now);
            let wait = (oldest + WINDOW - now).max(Duration::ZERO);
            // Whole seconds, rounded up: "wait 0s" would invite a retry
            // that is refused again.
            let secs = (wait.whole_milliseconds() as u64).div_ceil(1000).max(1);
            return Err(std::time::Duration::from_secs(secs));
        }
        times.push_back(now);
        Ok(())
    }

    pub fn users(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-12-07 10:00 UTC);

    #[test]
    fn the_limit_is_per_user_over_any_sixty_seconds() {
        let mut rate = PerMinute::new(3);
        for s in [0, 10, 20] {
            assert!(rate.admit("U1", T0 + Duration::seconds(s)).is_ok());
        }
        assert_eq!(
            rate.admit("U1", T0 + Duration::seconds(30)),
            Err(std::time::Duration::from_secs(30)),
            "the first command leaves the window at 60s"
        );
        assert!(
            rate.admit("U2", T0 + Duration::seconds(30)).is_ok(),
            "per user"
        );
        // A refused command is not counted: at 60s the first has left.
        assert!(rate.admit("U1", T0 + Duration::seconds(60)).is_ok());
        assert!(rate.admit("U1", T0 + Duration::seconds(61)).is_err());
        assert_eq!(
            rate.admit("U1", T0 + Duration::milliseconds(69_500)),
            Err(std::time::Duration::from_secs(1)),
            "rounded up, never zero"
        );
    }

    #[test]
    fn idle_users_are_forgotten() {
        let mut rate = PerMinute::new(1);
        for n in 0..=PRUNE_ABOVE {
            rate.admit(&format!("U{n}"), T0).unwrap();
        }
        rate.admit("late", T0 + Duration::minutes(2)).unwrap();
        assert_eq!(rate.users(), 1);
    }
}
