//! When to sync: kube-proxy's bounded-frequency policy (`async.BoundedFrequencyRunner`
//! with its minimum interval), without timers of its own.
//!
//! A sync runs at once when the last one is older than `min_sync`, else as
//! soon as it becomes so; changes that arrive meanwhile ride along. A failed
//! sync is retried after `retry` (a full map must not spin) and makes the
//! next one a full diff, as does a periodic resync.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct SyncRunner {
    min_sync: Duration,
    retry: Duration,
    /// A sync is owed for a reason other than input changes: a resync, a
    /// failure.
    owed: bool,
    /// The next sync must diff everything (first sync, after a resync or a
    /// failed write); otherwise only the frontends that changed.
    full: bool,
    last: Option<Instant>,
    retry_at: Option<Instant>,
}

impl SyncRunner {
    pub fn new(min_sync: Duration, retry: Duration) -> Self {
        Self {
            min_sync,
            retry,
            owed: false,
            full: true,
            last: None,
            retry_at: None,
        }
    }

    /// When the next sync may run, if one is owed: `ready` says the inputs
    /// are complete enough to sync, `changed` that some are not in the maps.
    pub fn due(&self, ready: bool, changed: bool) -> Option<Instant> {
        if !ready || !(self.owed || changed) {
            return None;
        }
        let earliest = self.last.map(|t| t + self.min_sync);
        Some(
            [earliest, self.retry_at]
                .into_iter()
                .flatten()
                .fold(Instant::now(), Instant::max),
        )
    }

    /// A sync starts now; whether it must diff everything.
    pub fn begin(&mut self) -> bool {
        self.last = Some(Instant::now());
        std::mem::replace(&mut self.full, false)
    }

    /// The sync's writes are all in the maps.
    pub fn succeeded(&mut self) {
        self.owed = false;
        self.retry_at = None;
    }

    /// The sync stopped part way (every prefix of a plan is consistent):
    /// retry later, with a full diff.
    pub fn failed(&mut self) {
        self.owed = true;
        self.full = true;
        self.retry_at = Some(Instant::now() + self.retry);
    }

    /// The maps were re-read: diff everything at the next opportunity.
    pub fn resync(&mut self) {
        self.owed = true;
        self.full = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const RETRY: Duration = Duration::from_secs(5);

    fn after(d: Duration) -> Instant {
        Instant::now() + d
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_due_until_the_inputs_are_ready_and_something_changed() {
        let r = SyncRunner::new(MIN, RETRY);
        assert_eq!(r.due(false, true), None);
        assert_eq!(r.due(true, false), None);
        assert_eq!(r.due(true, true), Some(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_sync_is_full_and_the_next_ones_only_diff_changes() {
        let mut r = SyncRunner::new(MIN, RETRY);
        assert!(r.begin());
        r.succeeded();
        tokio::time::advance(MIN).await;
        assert!(!r.begin());
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_right_after_a_sync_waits_for_the_minimum_interval_and_later_ones_ride_along()
    {
        let mut r = SyncRunner::new(MIN, RETRY);
        r.begin();
        r.succeeded();
        let due = after(MIN);
        assert_eq!(r.due(true, true), Some(due));
        tokio::time::advance(Duration::from_millis(400)).await;
        // A second change meanwhile: the same deadline, one sync for both.
        assert_eq!(r.due(true, true), Some(due));
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(r.due(true, true), Some(Instant::now()));
        // Long after the last sync, a change is synced at once.
        r.begin();
        r.succeeded();
        tokio::time::advance(MIN * 10).await;
        assert_eq!(r.due(true, true), Some(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_sync_is_retried_after_the_retry_delay_with_a_full_diff() {
        let mut r = SyncRunner::new(MIN, RETRY);
        r.begin();
        r.succeeded();
        tokio::time::advance(MIN).await;
        assert!(!r.begin());
        r.failed();
        // Owed even without new changes, but not before the retry delay.
        assert_eq!(r.due(true, false), Some(after(RETRY)));
        tokio::time::advance(RETRY).await;
        assert!(r.begin());
        r.succeeded();
        tokio::time::advance(MIN).await;
        assert_eq!(r.due(true, false), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resync_is_owed_at_once_and_diffs_everything() {
        let mut r = SyncRunner::new(MIN, RETRY);
        r.begin();
        r.succeeded();
        tokio::time::advance(MIN * 30).await;
        r.resync();
        assert_eq!(r.due(true, false), Some(Instant::now()));
        assert!(r.begin());
        r.succeeded();
        assert_eq!(r.due(true, false), None);
    }
}
