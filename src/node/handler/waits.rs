//! Planned handlings waiting out their time ([`crate::work::Handler::planned`]): one bucket per
//! [`BUCKET_US`] of due time, in a `BTreeMap`.
//!
//! Why not a timer per message, or `tokio_util`'s `DelayQueue`: with the task's handler a copy
//! holds 50k–150k waits at once, and the `DelayQueue`'s slab and wheel links cost about a quarter
//! of the copies' CPU in the 1M run (perf, 2026-11-29). Here an insert is one map lookup among at
//! most `timeout / BUCKET_US` keys and a push onto a vector, the runner sleeps on one timer for
//! the earliest bucket, and everything due is taken at once, in one vector for the committer.
//!
//! Due times are rounded *up* to the bucket, so a wait never ends early (a planned handling of
//! `wait` is over at `start + wait` or up to one bucket after, plus the timer's own lateness:
//! tokio's timer fires on millisecond ticks).

use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// The width of a bucket: small beside tokio's 1 ms timer tick, so light traffic is not delayed
/// by the bucketing; under load a copy's ~1 s of waits spread over ~10,000 buckets.
pub(super) const BUCKET_US: u64 = 100;

/// Items waiting until their due bucket (counted from `origin`).
#[derive(Debug)]
pub(super) struct Waits<T> {
    origin: Instant,
    buckets: BTreeMap<u64, Vec<T>>,
    len: usize,
}

impl<T> Waits<T> {
    /// Empty; due times are counted from now.
    pub(super) fn new() -> Waits<T> {
        Waits {
            origin: Instant::now(),
            buckets: BTreeMap::new(),
            len: 0,
        }
    }

    /// How many items wait.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing waits.
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `item` is due at `due` (or within the bucket after it).
    pub(super) fn insert(&mut self, due: Instant, item: T) {
        let us = due.saturating_duration_since(self.origin).as_micros() as u64;
        self.buckets
            .entry(us.div_ceil(BUCKET_US))
            .or_default()
            .push(item);
        self.len += 1;
    }

    /// Drops every item; returns how many there were.
    pub(super) fn clear(&mut self) -> usize {
        self.buckets.clear();
        std::mem::take(&mut self.len)
    }

    /// When the earliest bucket is due, if any item waits.
    pub(super) fn next_due(&self) -> Option<Instant> {
        let (&bucket, _) = self.buckets.first_key_value()?;
        Some(self.origin + Duration::from_micros(bucket * BUCKET_US))
    }

    /// Moves every item due at `now` or before into `out` (earliest bucket first), after
    /// `each_bucket` has seen each bucket's items with the bucket's due time (so a caller can
    /// tell how late the timer woke it).
    pub(super) fn take_due(
        &mut self,
        now: Instant,
        out: &mut Vec<T>,
        mut each_bucket: impl FnMut(Instant, &mut [T]),
    ) {
        let now_bucket = now.saturating_duration_since(self.origin).as_micros() as u64 / BUCKET_US;
        while let Some(entry) = self.buckets.first_entry() {
            if *entry.key() > now_bucket {
                break;
            }
            let due = self.origin + Duration::from_micros(*entry.key() * BUCKET_US);
            let mut items = entry.remove();
            self.len -= items.len();
            each_bucket(due, &mut items);
            out.extend(items);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_taken_before_its_due_time_and_everything_due_is_taken_in_due_order() {
        let mut waits = Waits::new();
        let t0 = waits.origin;
        // Inserted out of order, two sharing a millisecond.
        for (i, us) in [
            (0, 5_300u64),
            (1, 1_200),
            (2, 900_000),
            (3, 1_700),
            (4, 5_000),
        ] {
            waits.insert(t0 + Duration::from_micros(us), i);
        }
        assert_eq!(waits.len(), 5);
        let mut out = Vec::new();
        // Not due at 1 ms (due at 1.2 ms).
        waits.take_due(t0 + Duration::from_micros(1_000), &mut out, |_, _| {});
        assert!(out.is_empty(), "taken early: {out:?}");
        // Each bucket is shown with its due time: the due times rounded up to 100 µs.
        let mut dues = Vec::new();
        waits.take_due(t0 + Duration::from_micros(6_000), &mut out, |due, items| {
            dues.push((due.duration_since(t0).as_micros() as u64, items.to_vec()))
        });
        assert_eq!(out, vec![1, 3, 4, 0]);
        assert_eq!(
            dues,
            vec![
                (1_200, vec![1]),
                (1_700, vec![3]),
                (5_000, vec![4]),
                (5_300, vec![0])
            ]
        );
        assert_eq!(waits.len(), 1);
        let next = waits.next_due().expect("one left");
        assert_eq!(next, t0 + Duration::from_millis(900));
        waits.take_due(next, &mut out, |_, _| {});
        assert_eq!(out, vec![1, 3, 4, 0, 2]);
        assert!(waits.is_empty());
        assert_eq!(waits.next_due(), None);
    }

    #[test]
    fn a_due_time_in_the_past_is_due_at_once() {
        let mut waits = Waits::new();
        let now = Instant::now();
        waits.insert(now - Duration::from_secs(1), 'a');
        let mut out = Vec::new();
        waits.take_due(now, &mut out, |_, _| {});
        assert_eq!(out, vec!['a']);
    }
}
