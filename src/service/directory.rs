//! Slack profiles and user-group memberships, remembered per id (spec 9.9).
//! `domain::directory` decides when an answer serves and when Slack is
//! asked; this holds the entries, makes the one call per id (single-flight:
//! whoever holds an id's slot asks, the others wait on the slot and are
//! answered by that call), and waits out Slack's `Retry-After`.
//!
//! A command's acknowledgement never waits out a rate limit: the moment a
//! command task would wait for Slack's `Retry-After`, `defer` tells the
//! HTTP handler, which answers "working on it" at once and lets the
//! outcome follow through the `response_url` (`slack::routes`). A call
//! Slack may answer at once (the first profile of someone new) is given
//! `ASK_BUDGET` in all before the same happens.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::clock::Clock;
use crate::domain::directory::{Entry, Need, Plan};
use crate::slack::{SlackError, SlackUser};

/// Past this many ids a table drops the entries nothing can use any more;
/// ids come only from signed Slack requests and the config, so the bound
/// is the workspace, but memory stays bounded regardless.
const PRUNE_ABOVE: usize = 10_000;

/// The longest a lookup waits on Slack's `Retry-After` in all before it
/// reports the rate limit as its error.
const PATIENCE: Duration = Duration::from_secs(5 * 60);

type Slot<T> = Arc<tokio::sync::Mutex<Entry<T>>>;

pub(super) struct Table<T> {
    method: &'static str,
    slots: Mutex<HashMap<String, Slot<T>>>,
}

#[derive(Default)]
pub(super) struct Directory {
    pub(super) users: Table<SlackUser>,
    pub(super) groups: Table<Vec<String>>,
}

impl Default for Table<SlackUser> {
    fn default() -> Self {
        Table::new("users.info")
    }
}

impl Default for Table<Vec<String>> {
    fn default() -> Self {
        Table::new("usergroups.users.list")
    }
}

impl<T: Clone + Send + 'static> Table<T> {
    fn new(method: &'static str) -> Self {
        Table {
            method,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, id: &str, clock: &dyn Clock) -> Slot<T> {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slots.len() > PRUNE_ABOVE {
            let now = clock.now();
            // A slot in use (locked) is kept: its holder is asking Slack.
            slots.retain(|_, slot| slot.try_lock().map_or(true, |e| e.worth_keeping(now)));
        }
        slots.entry(id.to_string()).or_default().clone()
    }

    /// The answer for `id` that `need` accepts: remembered, or asked of
    /// Slack through `ask` (one call per id at a time), waiting out a
    /// `Retry-After` when no remembered answer may stand in.
    pub(super) async fn get<F, Fut>(
        &self,
        id: &str,
        need: Need,
        clock: &dyn Clock,
        ask: F,
    ) -> Result<T, SlackError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SlackError>>,
    {
        let slot = self.slot(id, clock);
        let mut entry = match slot.clone().try_lock_owned() {
            Ok(entry) => entry,
            Err(_) => {
                // Another task is asking Slack about this id: its answer
                // is ours too, within the budget of a call.
                asking();
                slot.lock_owned().await
            }
        };
        let give_up = tokio::time::Instant::now() + PATIENCE;
        loop {
            let now = clock.now();
            match entry.plan(need, now) {
                Plan::Use(value) => return Ok(value),
                Plan::WaitUntil(until) => {
                    let wait = Duration::try_from(until - now).unwrap_or(Duration::ZERO);
                    if tokio::time::Instant::now() + wait > give_up {
                        return Err(SlackError::RateLimited {
                            method: self.method,
                            retry_after: wait,
                        });
                    }
                    defer();
                    tokio::time::sleep(wait).await;
                }
                Plan::Ask => {
                    asking();
                    match ask().await {
                        Ok(value) => {
                            entry.answered(value.clone(), now);
                            return Ok(value);
                        }
                        Err(SlackError::RateLimited { retry_after, .. }) => {
                            tracing::info!(
                                method = self.method,
                                retry_after_s = retry_after.as_secs(),
                                "Slack rate limit: last good answer or a wait"
                            );
                            entry.rate_limited(retry_after, clock.now());
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
}

tokio::task_local! {
    /// Set while a command's HTTP answer is still owed (`answering`).
    static ANSWERING: Arc<Ack>;
}

/// How long in all a command's answer may wait for Slack calls that are
/// not rate-limited: a healthy `users.info` answers in a fraction of it,
/// and the answer still leaves the store its time within Slack's three
/// seconds.
pub const ASK_BUDGET: Duration = Duration::from_millis(1500);

/// Tells the HTTP handler of a command when its task waits on Slack, so it
/// answers without it: at once for a rate limit, after `ASK_BUDGET` for a
/// call.
#[derive(Default)]
pub struct Ack {
    deferred: AtomicBool,
    asking: AtomicBool,
    notify: Notify,
}

impl Ack {
    fn defer(&self) {
        if !self.deferred.swap(true, Ordering::SeqCst) {
            // Stores a permit when nobody waits yet: `deferred` still ends.
            self.notify.notify_one();
        }
    }

    fn asking(&self) {
        if !self.asking.swap(true, Ordering::SeqCst) {
            self.notify.notify_one();
        }
    }

    /// Completes once the command's answer should no longer wait for its
    /// task: the task waits out a rate limit, or its Slack calls took
    /// `ASK_BUDGET`.
    pub async fn deferred(&self) {
        loop {
            if self.deferred.load(Ordering::SeqCst) {
                return;
            }
            if self.asking.load(Ordering::SeqCst) {
                // A rate limit met during the budget ends it early.
                let _ = tokio::time::timeout(ASK_BUDGET, async {
                    while !self.deferred.load(Ordering::SeqCst) {
                        self.notify.notified().await;
                    }
                })
                .await;
                return;
            }
            self.notify.notified().await;
        }
    }
}

/// Runs a command's work with `ack` told when it first waits on Slack.
/// Tasks it spawns (cards, follow-ups) are not part of the answer.
pub async fn answering<F: Future>(ack: Arc<Ack>, work: F) -> F::Output {
    ANSWERING.scope(ack, work).await
}

fn defer() {
    let _ = ANSWERING.try_with(|ack| ack.defer());
}

fn asking() {
    let _ = ANSWERING.try_with(|ack| ack.asking());
}
