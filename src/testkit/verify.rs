//! The verdict: compares what a run left in Redis against what must be true of an exactly-once run.
//!
//! Pure (no I/O), so every rule is unit-tested on synthetic runs. `sim` and the integration tests
//! both judge with it; the drivers only gather what Redis recorded.

use crate::outcome::seeded;
pub use crate::protocol::epoch_log::{parse_epoch_batch, EpochBatch};
pub use crate::stats::Counters;
use crate::testkit::snapshot::Snapshot;
use serde::Serialize;

/// Violation messages kept verbatim; the rest are only counted, so a run with millions of
/// missing ids still yields a readable report.
const MAX_EXAMPLES: usize = 20;

/// Refuse absurd message counts instead of trying to allocate one counter per id.
const MAX_MESSAGES: u64 = 1 << 32;

/// Everything the checker looks at, gathered by the sim after the run has drained.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// N: the ids must be exactly `0..N`.
    pub messages: u64,
    /// The apps' `--seed`: outcomes are a function of it and the id.
    pub seed: u64,
    /// The apps' `--error-rate`.
    pub error_rate: f64,
    /// The apps' `--handler-delay-max-ms`.
    pub delay_max_ms: u64,
    /// The apps' `--handler-timeout-ms`: a message whose drawn delay reaches it fails with a
    /// timeout. 0 = no timeout.
    pub handler_timeout_ms: u64,
    /// Redis bitmap of successes: id `i` is bit `i`, MSB-first within each byte (SETBIT order).
    pub ok_bitmap: Vec<u8>,
    /// Ids whose success bit is set in two shards of a sharded namespace (merged in
    /// `ok_bitmap`): each is one more outcome for the id.
    pub ok_in_two_shards: Vec<u64>,
    /// Lines printed by every `app getErrors` that ran to completion (during the run and the
    /// final one): one decimal id per failed message.
    pub error_lines: Vec<String>,
    /// Lines printed by `getErrors` runs that were SIGKILLed mid-drain. An entry such a run
    /// printed but did not delete is printed again by the next: its id may appear twice, once
    /// here (counted as `reprinted`, not a violation). An entry it printed and deleted appears
    /// only here, and counts as the outcome.
    pub error_lines_killed: Vec<String>,
    /// One entry per generated batch, in append order.
    pub epoch_log: Vec<EpochBatch>,
    /// The namespace's stats counters.
    pub counters: Counters,
    /// Messages still queued (0 after a drained run).
    pub queue_len: u64,
    /// Messages still in any in-flight set (0 after a drained run).
    pub in_flight: u64,
    /// Handlers SIGKILLed by the sim; 0 means every message must have run exactly once.
    pub worker_kills: u64,
    /// Duplicate deliveries the sim planted on purpose: the app must have counted exactly this
    /// many duplicate outcomes (each detected and not recorded), no more, no fewer — except that
    /// once a handler's set was reclaimed (`counters.reclaimed > 0`) fewer is allowed: a planted
    /// copy and its original, both in sets of handlers that died, come back as one and the same
    /// retry-set member (the set keeps one), so it runs once and no duplicate is counted. More is
    /// never allowed.
    pub injected_duplicates: u64,
    /// The most generator epochs the run's faults can explain (each fault that can depose the
    /// generator at most twice, plus one); 0 = no bound. More means the lease changed hands
    /// on its own: two copies competing for it.
    pub epochs_max: u64,
}

impl Observed {
    /// Builds the checker's input from a namespace snapshot and the `getErrors` output.
    pub fn from_snapshot(
        snap: &Snapshot,
        messages: u64,
        seed: u64,
        error_rate: f64,
        delay_max_ms: u64,
        error_lines: Vec<String>,
        worker_kills: u64,
    ) -> Result<Observed, String> {
        Ok(Observed {
            messages,
            seed,
            error_rate,
            delay_max_ms,
            handler_timeout_ms: 0,
            ok_bitmap: snap.ok_bitmap.clone(),
            ok_in_two_shards: snap.ok_in_two_shards.clone(),
            error_lines,
            error_lines_killed: Vec::new(),
            epoch_log: snap
                .epoch_log
                .iter()
                .map(|e| parse_epoch_batch(e))
                .collect::<Result<_, _>>()?,
            counters: snap.counters,
            queue_len: snap.queue_len,
            in_flight: snap.in_flight,
            worker_kills,
            injected_duplicates: 0,
            epochs_max: 0,
        })
    }
}

/// The outcome of [`check`]: the counts go into the summary, `pass` into the exit code.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    /// Ok bits within `0..N`.
    pub processed: u64,
    /// Integer error lines within `0..N`.
    pub errors: u64,
    /// Ids in `0..N` with no outcome.
    pub missing: u64,
    /// Extra occurrences beyond the first (counted up to 255 per id).
    pub duplicates: u64,
    /// Error entries printed again after a killed `getErrors` (allowed: printed twice, never lost).
    pub reprinted: u64,
    /// Outcomes other than the seeded handler's (and error lines that are not ids).
    pub unexpected: u64,
    /// Outcomes for ids outside `0..N`.
    pub out_of_range: u64,
    /// `runs - messages`, saturating.
    pub reruns: u64,
    /// What broke, one line each (capped).
    pub violations: Vec<String>,
    /// No violations.
    pub pass: bool,
}

/// Collects violations, formatting only the first few so a broken run stays cheap to check.
#[derive(Default)]
struct Violations {
    kept: Vec<String>,
    dropped: u64,
}

impl Violations {
    fn push(&mut self, message: impl FnOnce() -> String) {
        if self.kept.len() < MAX_EXAMPLES {
            self.kept.push(message());
        } else {
            self.dropped += 1;
        }
    }

    fn finish(mut self) -> Vec<String> {
        if self.dropped > 0 {
            let more = format!("... and {} more violations", self.dropped);
            self.kept.push(more);
        }
        self.kept
    }
}

/// Bit `id` of a Redis bitmap (MSB-first); bytes past the end read as 0, like GETBIT.
fn bit(bitmap: &[u8], id: u64) -> bool {
    let byte = usize::try_from(id / 8).ok().and_then(|i| bitmap.get(i));
    byte.is_some_and(|b| b & (0x80 >> (id % 8)) != 0)
}

/// The occurrence counter of `id`, or `None` when `id` is outside `0..N` (`seen.len()` is N).
fn slot(seen: &mut [u8], id: u64) -> Option<&mut u8> {
    usize::try_from(id).ok().and_then(|i| seen.get_mut(i))
}

/// Whether message `id` of the run described by `o` must end in the error store: its seeded
/// handler fails, or its seeded delay reaches the handler timeout.
pub fn predicted_failure(o: &Observed, id: u64) -> bool {
    expected(o, id) == Expected::Fail
}

/// How close to the handler timeout a delay may be and still go either way: the timeout is judged
/// on the clock, and a handler whose timer fires within a scheduling delay of the deadline can be
/// seen finishing after it (never the reverse: a delay at or past the timeout always times out).
pub const TIMEOUT_RACE_MS: u64 = 50;

/// What message `id` of the run described by `o` must be recorded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Handled ok.
    Ok,
    /// In the error store: its seeded handler fails, or its delay reaches the timeout.
    Fail,
    /// Either: its handler succeeds, but its delay is within [`TIMEOUT_RACE_MS`] below the timeout.
    Either,
}

/// The outcome the verdict demands for message `id`.
pub fn expected(o: &Observed, id: u64) -> Expected {
    let outcome = seeded(o.seed, id, o.error_rate, o.delay_max_ms);
    let t = o.handler_timeout_ms;
    if outcome.failed || (t > 0 && outcome.delay_ms >= t) {
        Expected::Fail
    } else if t > 0 && outcome.delay_ms + TIMEOUT_RACE_MS >= t {
        Expected::Either
    } else {
        Expected::Ok
    }
}

/// Applies every rule of an exactly-once run to `o`; see the module tests for one case per rule.
pub fn check(o: &Observed) -> Verdict {
    let n = o.messages;
    let mut v = Violations::default();
    let mut r = Verdict::default();
    let must_fail = |id: u64| expected(o, id) == Expected::Fail;
    let must_succeed = |id: u64| expected(o, id) == Expected::Ok;

    // Occurrences per id (5 MB for 5 M messages); empty when N is over the limit.
    let mut seen: Vec<u8> = Vec::new();
    if n > MAX_MESSAGES {
        v.push(|| format!("messages = {n} is over the checker's limit {MAX_MESSAGES}"));
    } else {
        seen = vec![0; n as usize];
    }

    // Rules 1–2: successes from the bitmap, bounded by its length.
    for (i, &byte) in o.ok_bitmap.iter().enumerate().filter(|(_, b)| **b != 0) {
        let set_bits = (0..8u64).filter(|j| byte & (0x80 >> j) != 0);
        for id in set_bits.map(|j| i as u64 * 8 + j) {
            if let Some(count) = slot(&mut seen, id) {
                r.processed += 1;
                *count = count.saturating_add(1);
            } else {
                r.out_of_range += 1;
                v.push(|| format!("ok bitmap has id {id} outside 0..{n}"));
            }
        }
    }

    // A success recorded in two shards is two outcomes, though the merged bitmap shows one.
    for &id in &o.ok_in_two_shards {
        if let Some(count) = slot(&mut seen, id) {
            r.processed += 1;
            *count = count.saturating_add(1);
        }
    }

    // Rules 1–3: failures from `getErrors`; blank lines (trailing newlines) are not entries.
    // Lines of completed drains first, then of killed ones: a killed drain's line is the id's
    // outcome only when no other line or ok bit gave it one, otherwise a reprint.
    let complete = o.error_lines.iter().map(|l| (l.trim(), false));
    let killed = o.error_lines_killed.iter().map(|l| (l.trim(), true));
    for (line, from_killed) in complete.chain(killed).filter(|(l, _)| !l.is_empty()) {
        let Ok(id) = line.parse::<u64>() else {
            r.unexpected += 1;
            v.push(|| format!("unexpected error entry {line:?}"));
            continue;
        };
        let ok = bit(&o.ok_bitmap, id);
        let Some(count) = slot(&mut seen, id) else {
            r.out_of_range += 1;
            v.push(|| format!("error store has id {id} outside 0..{n}"));
            continue;
        };
        if from_killed && *count > 0 && !ok {
            r.reprinted += 1;
            continue;
        }
        *count = count.saturating_add(1);
        r.errors += 1;
        if must_succeed(id) {
            r.unexpected += 1;
            v.push(|| format!("id {id} is in the error store but its handler succeeds"));
        }
    }

    // Rules 1 and 3: every id exactly once, and predicted failures never recorded as ok.
    for (id, &count) in (0u64..).zip(&seen) {
        if count == 0 {
            r.missing += 1;
            v.push(|| format!("id {id} has no outcome (missing)"));
        } else if count > 1 {
            r.duplicates += u64::from(count - 1);
            v.push(|| format!("id {id} has {count} outcomes (duplicate)"));
        }
        if bit(&o.ok_bitmap, id) && must_fail(id) {
            r.unexpected += 1;
            v.push(|| format!("id {id} is recorded ok but its handler fails"));
        }
    }

    check_epoch_log(o, &mut v);

    // Rules 5–6: a drained queue and consistent counters.
    let (c, q, f) = (&o.counters, o.queue_len, o.in_flight);
    if q != 0 || f != 0 {
        v.push(|| format!("not drained: queue_len = {q}, in_flight = {f}"));
    }
    let merged_allowed = c.reclaimed > 0 && c.duplicates < o.injected_duplicates;
    if c.duplicates != o.injected_duplicates && !merged_allowed {
        let injected = o.injected_duplicates;
        v.push(|| {
            format!(
                "app counted {} duplicate outcomes, {injected} duplicate deliveries were planted",
                c.duplicates
            )
        });
    }
    let (ok, failed, runs) = (c.processed, c.errors + c.poisoned, c.runs);
    if ok.saturating_add(failed) != n {
        v.push(|| {
            format!("app counted {ok} processed + {failed} errors (poison included), not {n}")
        });
    }
    if o.worker_kills == 0 && runs != n {
        v.push(|| format!("{runs} handler runs for {n} messages, no handler killed"));
    }

    r.reruns = runs.saturating_sub(n);
    r.violations = v.finish();
    r.pass = r.violations.is_empty();
    r
}

/// Rule 4: the batches tile `0..N` with one fenced generator at a time.
fn check_epoch_log(o: &Observed, v: &mut Violations) {
    let (n, generated) = (o.messages, o.counters.generated);
    let mut batches = o.epoch_log.clone();
    batches.sort_by_key(|b| b.first_id); // stable: ties keep append order
    let (mut next_id, mut max_epoch, mut total) = (0u64, 0u64, 0u64);
    for b in &batches {
        let (epoch, first, count) = (b.epoch, b.first_id, b.count);
        let end = first.saturating_add(count);
        total = total.saturating_add(count);
        if count == 0 {
            v.push(|| format!("empty batch at id {first} (epoch {epoch})"));
        }
        if first > next_id {
            v.push(|| format!("ids {next_id}..{first} were never generated (gap)"));
        } else if first < next_id && count > 0 {
            let to = end.min(next_id);
            v.push(|| format!("ids {first}..{to} generated twice (overlap, epoch {epoch})"));
        }
        if epoch < max_epoch {
            v.push(|| format!("epoch {epoch} at id {first} after epoch {max_epoch}: interleaved"));
        }
        max_epoch = max_epoch.max(epoch);
        next_id = next_id.max(end);
    }
    if next_id != n {
        v.push(|| format!("the epoch log covers ids 0..{next_id}, not 0..{n}"));
    }
    let epochs: std::collections::BTreeSet<u64> = batches.iter().map(|b| b.epoch).collect();
    if o.epochs_max > 0 && epochs.len() as u64 > o.epochs_max {
        let (count, most) = (epochs.len(), o.epochs_max);
        v.push(|| {
            format!("{count} generator epochs, but this run's faults explain at most {most}: the lease changes hands by itself")
        });
    }
    if total != n {
        v.push(|| format!("the epoch log generated {total} ids, not {n}"));
    }
    if generated != n {
        v.push(|| format!("app counted {generated} generated, not {n}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: u64 = 1000;

    /// A run where everything went right: outcomes as predicted, epochs 1, 2, 2, 3 over 4 batches.
    fn clean() -> Observed {
        let mut o = Observed::default();
        (o.messages, o.seed, o.error_rate) = (N, 9, 0.2);
        o.ok_bitmap = vec![0; N.div_ceil(8) as usize];
        for id in 0..N {
            if predicted(&o, id) {
                o.error_lines.push(id.to_string());
            } else {
                set_ok(&mut o, id, true);
            }
        }
        o.error_lines.push(String::new()); // a trailing newline is not an entry
        let errors = o.error_lines.len() as u64 - 1;
        o.epoch_log = [(1, 0, 250), (2, 250, 250), (2, 500, 300), (3, 800, 200)]
            .map(batch)
            .into();
        let c = &mut o.counters;
        (c.generated, c.processed, c.errors, c.runs) = (N, N - errors, errors, N);
        o
    }

    fn batch((epoch, first_id, count): (u64, u64, u64)) -> EpochBatch {
        parse_epoch_batch(&format!("{epoch}:{first_id}:{count}:7")).expect("valid entry")
    }

    fn predicted(o: &Observed, id: u64) -> bool {
        predicted_failure(o, id)
    }

    fn set_ok(o: &mut Observed, id: u64, ok: bool) {
        let (byte, mask) = ((id / 8) as usize, 0x80 >> (id % 8));
        o.ok_bitmap[byte] &= !mask;
        o.ok_bitmap[byte] |= if ok { mask } else { 0 };
    }

    fn first_ok(o: &Observed) -> u64 {
        (0..N).find(|&id| !predicted(o, id)).unwrap_or(0)
    }

    fn first_failed(o: &Observed) -> u64 {
        (0..N).find(|&id| predicted(o, id)).unwrap_or(0)
    }

    fn err(o: &mut Observed, line: impl ToString) {
        o.error_lines.push(line.to_string());
    }

    fn ok_to_error(o: &mut Observed) {
        let id = first_ok(o);
        set_ok(o, id, false);
        err(o, id);
    }

    fn error_to_ok(o: &mut Observed) {
        let id = first_failed(o);
        set_ok(o, id, true);
        o.error_lines.retain(|l| l != &id.to_string());
    }

    #[test]
    fn clean_run_passes_and_reruns_need_kills() {
        let mut o = clean();
        let v = check(&o);
        assert!(v.pass, "{:?}", v.violations);
        assert!(v.errors > 100 && v.errors < 300 && v.processed + v.errors == N);
        o.counters.runs = N + 2;
        assert!(!check(&o).pass, "a re-run without a handler kill");
        o.worker_kills = 1;
        let v = check(&o);
        assert!(v.pass && v.reruns == 2, "{v:?}");
    }

    #[test]
    fn an_ok_recorded_in_two_shards_is_a_duplicate() {
        let mut o = clean();
        o.ok_in_two_shards.push(first_ok(&o));
        let v = check(&o);
        assert!(!v.pass && v.duplicates == 1, "{v:?}");
        assert!(
            v.violations.iter().any(|l| l.contains("2 outcomes")),
            "{v:?}"
        );
    }

    /// One fault per row: what it breaks, the message expected, and
    /// `[missing, duplicates, unexpected, out_of_range]`.
    #[test]
    fn every_fault_is_caught() {
        type Fault = (&'static str, [u64; 4], fn(&mut Observed));
        let faults: [Fault; 20] = [
            ("missing", [1, 0, 0, 0], |o| set_ok(o, first_ok(o), false)),
            ("duplicate", [0, 1, 1, 0], |o| err(o, first_ok(o))),
            ("duplicate", [0, 1, 0, 0], |o| err(o, first_failed(o))),
            ("handler succeeds", [0, 0, 1, 0], ok_to_error),
            ("handler fails", [0, 0, 1, 0], error_to_ok),
            ("unexpected error entry", [0, 0, 1, 0], |o| err(o, "(nil)")),
            ("outside", [0, 0, 0, 1], |o| err(o, N)),
            ("outside", [0, 0, 0, 1], |o| o.ok_bitmap.push(1)),
            ("interleaved", [0; 4], |o| o.epoch_log[2].epoch = 1),
            ("twice", [0; 4], |o| o.epoch_log.push(batch((3, 900, 50)))),
            ("gap", [0; 4], |o| o.epoch_log[1].first_id = 260),
            ("empty batch", [0; 4], |o| {
                o.epoch_log.push(batch((3, N, 0)))
            }),
            ("not drained", [0; 4], |o| o.queue_len = 3),
            ("not drained", [0; 4], |o| o.in_flight = 1),
            ("duplicate outcomes", [0; 4], |o| o.counters.duplicates = 1),
            ("2 duplicate deliveries were planted", [0; 4], |o| {
                o.injected_duplicates = 2;
                o.counters.duplicates = 1
            }),
            // Reclaims may merge a planted copy with its original, never add a duplicate.
            ("2 duplicate deliveries were planted", [0; 4], |o| {
                o.injected_duplicates = 2;
                o.counters.reclaimed = 5;
                o.counters.duplicates = 3
            }),
            ("changes hands by itself", [0; 4], |o| o.epochs_max = 2),
            ("no handler killed", [0; 4], |o| o.counters.runs += 1),
            // A killed drain may reprint an error entry, never print one for a success.
            ("duplicate", [0, 1, 1, 0], |o| {
                let id = first_ok(o);
                o.error_lines_killed.push(id.to_string())
            }),
        ];
        for (needle, counts, break_it) in faults {
            let mut o = clean();
            break_it(&mut o);
            let v = check(&o);
            let caught = v.violations.iter().any(|m| m.contains(needle));
            assert!(!v.pass && caught, "{needle}: {v:?}");
            let got = [v.missing, v.duplicates, v.unexpected, v.out_of_range];
            assert_eq!(got, counts, "{needle}");
        }
    }

    /// Seen in the soak (`all`, seed 27): with handlers reclaimed, a planted copy and its
    /// original can merge in the retry set; fewer counted duplicates than planted then pass.
    #[test]
    fn planted_duplicates_may_merge_only_after_reclaims() {
        let mut o = clean();
        o.injected_duplicates = 1;
        assert!(
            !check(&o).pass,
            "none counted, no reclaim: a missed duplicate"
        );
        o.counters.reclaimed = 1666;
        assert!(check(&o).pass, "{:?}", check(&o).violations);
    }

    #[test]
    fn a_handler_timeout_predicts_failures_by_delay() {
        let mut o = clean();
        o.delay_max_ms = 1000;
        let slow = (0..N)
            .find(|&id| {
                let s = seeded(o.seed, id, o.error_rate, o.delay_max_ms);
                !s.failed && s.delay_ms >= 500
            })
            .expect("some message succeeds slowly");
        assert!(!predicted_failure(&o, slow), "no timeout: it succeeds");
        o.handler_timeout_ms = 500;
        assert!(predicted_failure(&o, slow), "its delay reaches the timeout");
        o.handler_timeout_ms = 1000;
        assert!(!predicted_failure(&o, slow), "delays stay below 1000");
        let delay = seeded(o.seed, slow, o.error_rate, o.delay_max_ms).delay_ms;
        o.handler_timeout_ms = delay + 1;
        assert_eq!(
            expected(&o, slow),
            Expected::Either,
            "1 ms short of the timeout"
        );
        o.handler_timeout_ms = delay + TIMEOUT_RACE_MS + 1;
        assert_eq!(expected(&o, slow), Expected::Ok, "clear of the race");
    }

    #[test]
    fn a_message_racing_the_timeout_may_go_either_way_but_not_one_past_it() {
        let mut o = clean();
        (o.delay_max_ms, o.handler_timeout_ms) = (1000, 500);
        let record = |o: &mut Observed, fails: &dyn Fn(u64) -> bool| {
            o.error_lines.clear();
            for id in 0..N {
                set_ok(o, id, !fails(id));
                if fails(id) {
                    o.error_lines.push(id.to_string());
                }
            }
            let errors = o.error_lines.len() as u64;
            (o.counters.processed, o.counters.errors) = (N - errors, errors);
        };
        let o2 = o.clone();
        let must_fail = move |id| expected(&o2, id) == Expected::Fail;
        record(&mut o, &must_fail);
        assert!(
            check(&o).violations.is_empty(),
            "{:?}",
            check(&o).violations
        );
        let racing = (0..N)
            .find(|&id| expected(&o, id) == Expected::Either)
            .expect("some delay in 450..500");
        let o3 = o.clone();
        record(&mut o, &|id| {
            id == racing || expected(&o3, id) == Expected::Fail
        });
        assert!(
            check(&o).violations.is_empty(),
            "timed out while racing: fine"
        );
        let late = (0..N)
            .find(|&id| {
                let s = seeded(o.seed, id, o.error_rate, o.delay_max_ms);
                !s.failed && s.delay_ms >= 500
            })
            .expect("some delay past 500");
        record(&mut o, &|id| {
            id != late && expected(&o3, id) == Expected::Fail
        });
        let v = check(&o).violations;
        assert!(
            v.iter()
                .any(|m| m.contains(&format!("id {late} is recorded ok"))),
            "{v:?}"
        );
    }

    #[test]
    fn a_killed_drain_may_reprint_an_entry_or_hold_its_only_copy() {
        let mut o = clean();
        let failed = first_failed(&o);
        o.error_lines_killed.push(failed.to_string());
        let v = check(&o);
        assert!(v.pass && v.reprinted == 1, "{v:?}");
        // Printed and deleted by the killed drain only: still its one outcome.
        o.error_lines.retain(|l| l != &failed.to_string());
        let v = check(&o);
        assert!(v.pass && v.reprinted == 0 && v.missing == 0, "{v:?}");
        // Printed by no drain at all: missing.
        o.error_lines_killed.clear();
        assert_eq!(check(&o).missing, 1);
        // Twice by completed drains: a duplicate, killed or not.
        let mut o = clean();
        o.error_lines.push(failed.to_string());
        assert_eq!(check(&o).duplicates, 1);
    }

    #[test]
    fn violations_are_capped() {
        let mut o = clean();
        o.ok_bitmap.clear();
        o.error_lines.clear();
        let v = check(&o);
        assert_eq!((v.missing, v.violations.len()), (N, MAX_EXAMPLES + 1));
        assert!(v.violations[MAX_EXAMPLES].contains("more violations"));
    }

    #[test]
    fn parses_epoch_batches_and_reads_bits_msb_first() {
        let b = parse_epoch_batch(" 3:1000:500:1700000000123\n").expect("valid entry");
        let fields = (b.epoch, b.first_id, b.count, b.time_us);
        assert_eq!(fields, (3, 1000, 500, 1_700_000_000_123));
        for bad in ["", "1:2:3", "1:2:3:4:5", "a:2:3:4", "1:-2:3:4", "1::3:4"] {
            assert!(parse_epoch_batch(bad).is_err(), "{bad:?} must be rejected");
        }
        let set: Vec<u64> = (0..24)
            .filter(|&id| bit(&[0b1000_0001, 0b0100_0000], id))
            .collect();
        assert_eq!(set, vec![0, 7, 9]);
    }
}
