//! Spec 9.9: what Tollgate remembers of Slack profiles and user-group
//! memberships, and when it must ask Slack again. Pure: the caller passes
//! `now`, makes the calls and waits; this decides.
//!
//! Two needs:
//! - `Need::Recent` (a command, `/access clusters`, the modal, card copies):
//!   an answer younger than `FRESH_FOR` is used without a call.
//! - `Need::FreshSince(t)` (an approval click, a grant, offboarding): only
//!   an answer Slack gave to a call started at or after `t` counts, so a
//!   deactivation or a removal from a group is seen at once; the cache
//!   never keeps power alive. Several callers that ask at once share one
//!   call (single-flight): a call that starts after they asked answers
//!   all of them.
//!
//! Either way, while Slack's `Retry-After` runs the last good answer stands
//! in if it is at most `STAND_IN_FOR` old; with none that young the caller
//! waits for the `Retry-After` to pass and asks then.

use std::time::Duration;
use time::OffsetDateTime;

/// An answer this young serves a command without a call.
pub const FRESH_FOR: Duration = Duration::from_secs(60);
/// The oldest answer that stands in while Slack rate-limits (spec 9.9).
pub const STAND_IN_FOR: Duration = Duration::from_secs(10 * 60);

/// What the caller's decision needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Recent,
    /// An answer from a call started after this instant (strictly: a call
    /// that started at the same instant may have read Slack just before
    /// the change the caller must see).
    FreshSince(OffsetDateTime),
}

/// What is remembered of one id (a user or a user group).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry<T> {
    /// The last good answer and when the call that got it started.
    pub known: Option<(T, OffsetDateTime)>,
    /// Slack said not to ask before this (`Retry-After`).
    pub quiet_until: Option<OffsetDateTime>,
}

impl<T> Default for Entry<T> {
    fn default() -> Self {
        Entry {
            known: None,
            quiet_until: None,
        }
    }
}

/// What to do now.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan<T> {
    /// This answer will do; no call.
    Use(T),
    /// Ask Slack now.
    Ask,
    /// Slack's `Retry-After` runs and no answer may stand in: wait until
    /// then and plan again.
    WaitUntil(OffsetDateTime),
}

fn age(since: OffsetDateTime, now: OffsetDateTime) -> Duration {
    Duration::try_from(now - since).unwrap_or(Duration::ZERO)
}

impl<T: Clone> Entry<T> {
    pub fn plan(&self, need: Need, now: OffsetDateTime) -> Plan<T> {
        if let Some((value, at)) = &self.known {
            let good = match need {
                Need::Recent => age(*at, now) < FRESH_FOR,
                Need::FreshSince(asked) => *at > asked,
            };
            if good {
                return Plan::Use(value.clone());
            }
        }
        match self.quiet_until {
            Some(until) if until > now => match &self.known {
                Some((value, at)) if age(*at, now) <= STAND_IN_FOR => Plan::Use(value.clone()),
                _ => Plan::WaitUntil(until),
            },
            _ => Plan::Ask,
        }
    }

    /// Slack answered a call started at `asked`.
    pub fn answered(&mut self, value: T, asked: OffsetDateTime) {
        let newer = self.known.as_ref().is_none_or(|(_, at)| asked >= *at);
        if newer {
            self.known = Some((value, asked));
        }
        self.quiet_until = None;
    }

    /// Slack answered 429: it is not asked again for `retry_after`; what
    /// the caller does meanwhile is `plan` again.
    pub fn rate_limited(&mut self, retry_after: Duration, now: OffsetDateTime) {
        // At least a second: Slack's `Retry-After` is whole seconds, and
        // zero would spin. At most an hour: a larger one would overflow.
        let until = now + retry_after.clamp(Duration::from_secs(1), Duration::from_secs(3600));
        self.quiet_until = Some(self.quiet_until.map_or(until, |u| u.max(until)));
    }

    /// Whether the entry still holds anything worth keeping at `now`.
    pub fn worth_keeping(&self, now: OffsetDateTime) -> bool {
        self.quiet_until.is_some_and(|u| u > now)
            || self
                .known
                .as_ref()
                .is_some_and(|(_, at)| age(*at, now) <= STAND_IN_FOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 12:00 UTC);
    const SEC: Duration = Duration::from_secs(1);

    fn known(at: OffsetDateTime) -> Entry<&'static str> {
        let mut e = Entry::default();
        e.answered("alice", at);
        e
    }

    #[test]
    fn nothing_known_means_ask() {
        let e: Entry<&str> = Entry::default();
        assert_eq!(e.plan(Need::Recent, T0), Plan::Ask);
        assert_eq!(e.plan(Need::FreshSince(T0), T0), Plan::Ask);
    }

    #[test]
    fn a_recent_answer_serves_commands_until_it_is_a_minute_old() {
        let e = known(T0);
        assert_eq!(e.plan(Need::Recent, T0 + 59 * SEC), Plan::Use("alice"));
        assert_eq!(e.plan(Need::Recent, T0 + 60 * SEC), Plan::Ask);
    }

    #[test]
    fn a_fresh_need_is_only_met_by_a_call_started_after_it_was_asked() {
        let e = known(T0);
        // A second old is still too old for an approval asked after it,
        // and so is an answer from a call that started the same instant.
        assert_eq!(e.plan(Need::FreshSince(T0 + SEC), T0 + SEC), Plan::Ask);
        assert_eq!(e.plan(Need::FreshSince(T0), T0 + SEC), Plan::Ask);
        // A call that started after the approval asked answers it: that is
        // how callers queued on one id share one call.
        assert_eq!(
            e.plan(Need::FreshSince(T0 - SEC), T0 + SEC),
            Plan::Use("alice")
        );
    }

    #[test]
    fn while_rate_limited_the_last_good_answer_stands_in_for_ten_minutes() {
        let mut e = known(T0);
        let now = T0 + 9 * 60 * SEC;
        e.rate_limited(30 * SEC, now);
        assert_eq!(e.plan(Need::FreshSince(now), now), Plan::Use("alice"));
        assert_eq!(e.plan(Need::Recent, now), Plan::Use("alice"));
        // Older than ten minutes: the step waits for Retry-After.
        let later = T0 + 10 * 60 * SEC + SEC;
        e.rate_limited(30 * SEC, later);
        assert_eq!(
            e.plan(Need::FreshSince(later), later),
            Plan::WaitUntil(later + 30 * SEC)
        );
    }

    #[test]
    fn rate_limited_with_nothing_known_waits_then_asks() {
        let mut e: Entry<&str> = Entry::default();
        e.rate_limited(20 * SEC, T0);
        assert_eq!(e.plan(Need::Recent, T0), Plan::WaitUntil(T0 + 20 * SEC));
        assert_eq!(e.plan(Need::Recent, T0 + 20 * SEC), Plan::Ask);
        // A zero Retry-After still keeps Slack quiet for a second.
        let mut z: Entry<&str> = Entry::default();
        z.rate_limited(Duration::ZERO, T0);
        assert_eq!(z.plan(Need::Recent, T0), Plan::WaitUntil(T0 + SEC));
    }

    #[test]
    fn a_later_retry_after_is_never_shortened_and_an_answer_clears_it() {
        let mut e: Entry<&str> = Entry::default();
        e.rate_limited(30 * SEC, T0);
        e.rate_limited(5 * SEC, T0 + SEC);
        assert_eq!(e.quiet_until, Some(T0 + 30 * SEC));
        e.answered("alice", T0 + 31 * SEC);
        assert_eq!(e.quiet_until, None);
    }

    #[test]
    fn an_older_call_answering_late_does_not_replace_a_newer_answer() {
        let mut e = known(T0 + 10 * SEC);
        e.answered("stale", T0);
        assert_eq!(e.known, Some(("alice", T0 + 10 * SEC)));
    }

    #[test]
    fn entries_are_dropped_once_nothing_in_them_can_serve() {
        let e = known(T0);
        assert!(e.worth_keeping(T0 + 10 * 60 * SEC));
        assert!(!e.worth_keeping(T0 + 10 * 60 * SEC + SEC));
        let mut q: Entry<&str> = Entry::default();
        q.rate_limited(30 * SEC, T0);
        assert!(q.worth_keeping(T0 + 29 * SEC));
        assert!(!q.worth_keeping(T0 + 30 * SEC));
    }
}
