//! Protocol v2's batch path, script by script against a real Redis: a generated batch is one queue
//! entry, a fetch splits it, a commit records any subset of its messages once each (a retried
//! commit records nothing twice), reclaim gives back exactly the open messages of a dead
//! handler's batches, and a planted copy of a batch message is counted as a duplicate.

mod common;

use common::Fixture;
use leaderq::conn::Conn;
use leaderq::node::handler::{self, Done, Verdict};
use leaderq::node::incarnation::Incarnation;
use leaderq::node::{generator, lease, liveness};
use leaderq::stats::Counters;
use leaderq::Keys;
use std::sync::Arc;

const HEARTBEAT_MS: u64 = 60_000;

/// A fixture's Redis with a joined incarnation and a held lease.
struct Setup {
    fx: Fixture,
    con: Conn,
    keys: Keys,
    inc: Incarnation,
    lease: leaderq::node::lease::Lease,
}

async fn setup() -> Setup {
    let fx = Fixture::new();
    let mut con = fx.con().await;
    let keys = fx.keys.clone();
    let inc = Incarnation::join(&mut con, &keys, false).await.unwrap();
    let lease = lease::try_acquire(&mut con, &keys, "gen", 600_000, &inc)
        .await
        .unwrap()
        .expect("the lease is free");
    Setup {
        fx,
        con,
        keys,
        inc,
        lease,
    }
}

impl Setup {
    async fn generate(&mut self, n: u64) {
        let r = generator::generate(
            &mut self.con,
            &self.keys,
            &self.lease,
            n,
            1 << 30,
            &self.inc,
            None,
        )
        .await
        .unwrap();
        assert!(
            matches!(r, generator::Generated::Batch { count, .. } if count == n),
            "{r:?}"
        );
    }

    async fn fetch(&mut self, owner: &Arc<str>, n: u64) -> Vec<Done> {
        handler::fetch(&mut self.con, &self.keys, owner, n, HEARTBEAT_MS, &self.inc)
            .await
            .unwrap()
            .into_items(owner)
    }

    async fn commit(&mut self, items: &[Done]) -> Vec<usize> {
        handler::commit(&mut self.con, &self.keys, items, &self.inc)
            .await
            .unwrap()
            .1
    }

    async fn queue(&mut self) -> Vec<String> {
        let key = self.keys.queue();
        self.list(&key).await
    }

    async fn errors(&mut self) -> Vec<String> {
        let key = self.keys.errors();
        self.list(&key).await
    }

    async fn list(&mut self, key: &str) -> Vec<String> {
        redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query_async(&mut self.con)
            .await
            .unwrap()
    }

    async fn bit(&mut self, key: &str, id: u64) -> u8 {
        redis::cmd("GETBIT")
            .arg(key)
            .arg(id)
            .query_async(&mut self.con)
            .await
            .unwrap()
    }

    async fn counters(&mut self) -> Counters {
        Counters::read(&mut self.con, &self.keys).await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_queue_entry_and_a_fetch_splits_it() {
    let mut s = setup().await;
    s.generate(10).await;
    let q = s.queue().await;
    assert_eq!(q.len(), 1, "one entry for the batch: {q:?}");
    assert!(q[0].starts_with("*0:10:"), "{q:?}");
    let snap = leaderq::testkit::snapshot::snapshot(&mut s.con, &s.keys)
        .await
        .unwrap();
    assert_eq!(snap.queue_len, 10, "the queue counts messages, not entries");

    let owner: Arc<str> = Arc::from("h.0");
    let items = s.fetch(&owner, 4).await;
    let ids: Vec<u64> = items.iter().map(|d| d.envelope.id).collect();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    assert!(items
        .iter()
        .all(|d| d.batch == Some(0) && d.payload.is_empty()));
    let q = s.queue().await;
    assert!(
        q.len() == 1 && q[0].starts_with("*4:6:"),
        "the rest stays queued: {q:?}"
    );
    let held = leaderq::testkit::snapshot::in_flight_matching(&mut s.con, &s.keys, "h.0")
        .await
        .unwrap();
    assert_eq!(held, 4);

    // Two batches queued: a fetch takes the rest of the first and the head of the second.
    s.generate(5).await;
    let items = s.fetch(&owner, 8).await;
    let ids: Vec<u64> = items.iter().map(|d| d.envelope.id).collect();
    assert_eq!(ids, (4..12).collect::<Vec<_>>());
    let q = s.queue().await;
    assert!(q.len() == 1 && q[0].starts_with("*12:3:"), "{q:?}");
    drop(s.fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_records_each_batch_message_once() {
    let mut s = setup().await;
    let owner: Arc<str> = Arc::from("h.0");
    // Three first, so the batch under test starts at id 3: its bits straddle bitmap bytes.
    s.generate(3).await;
    let head = s.fetch(&owner, 3).await;
    assert!(s.commit(&head).await.is_empty());
    s.generate(20).await;
    let mut items = s.fetch(&owner, 20).await;
    assert_eq!(items[0].envelope.id, 3);
    items[3].verdict = Verdict::Failed("disk full".into());
    items[4].verdict = Verdict::Failed(leaderq::work::HANDLER_ERROR.into());
    items[5].verdict = Verdict::TimedOut;
    // Half of them, out of order.
    let mut first: Vec<Done> = items[..10].to_vec();
    first.reverse();
    assert!(s.commit(&first).await.is_empty());
    // The same commit again (a retry after a lost reply): every one refused, nothing twice.
    let refused = s.commit(&first).await;
    assert_eq!(refused, (0..10).collect::<Vec<_>>());
    let c = s.counters().await;
    assert_eq!(
        (c.processed, c.errors, c.timeouts, c.duplicates, c.refused),
        (10, 3, 1, 0, 10)
    );
    let held = leaderq::testkit::snapshot::in_flight_matching(&mut s.con, &s.keys, "h.0")
        .await
        .unwrap();
    assert_eq!(held, 10, "the record keeps the 10 open messages");
    assert!(s.commit(&items[10..]).await.is_empty());
    let records: u64 = redis::cmd("EXISTS")
        .arg(s.keys.batches("h.0"))
        .query_async(&mut s.con)
        .await
        .unwrap();
    assert_eq!(records, 0, "the record goes with its last open message");
    for id in 0..23 {
        assert_eq!(s.bit(&s.keys.done(), id).await, 1, "done {id}");
        let ok = s.bit(&s.keys.ok(), id).await;
        assert_eq!(ok, u8::from(!(6..=8).contains(&id)), "ok {id}");
    }
    for id in 23..40 {
        assert_eq!(s.bit(&s.keys.done(), id).await, 0, "done {id} untouched");
    }
    let errors = s.errors().await;
    let reasons: Vec<(&str, &str)> = errors
        .iter()
        .map(|e| {
            let mut f = e.split('\t');
            (f.next().unwrap(), f.next().unwrap())
        })
        .collect();
    assert_eq!(reasons.len(), 3, "{errors:?}");
    let epoch = s.lease.epoch;
    for (id, why) in [
        (8, "handler timeout"),
        (7, "handler error"),
        (6, "disk full"),
    ] {
        assert!(
            reasons
                .iter()
                .any(|(p, r)| p.starts_with(&format!("{id}:{epoch}:")) && *r == why),
            "{id}: {why} in {errors:?}"
        );
    }
    drop(s.fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_gives_back_only_the_open_messages_of_a_dead_handlers_batches() {
    let mut s = setup().await;
    s.generate(30).await;
    let owner: Arc<str> = Arc::from("dead.0");
    let items = s.fetch(&owner, 30).await;
    // Committed: ids 0..10 and 20; open: 10..20 and 21..30.
    let mut committed: Vec<Done> = items[..10].to_vec();
    committed.push(items[20].clone());
    assert!(s.commit(&committed).await.is_empty());
    redis::cmd("DEL")
        .arg(s.keys.heartbeat("dead.0"))
        .query_async::<()>(&mut s.con)
        .await
        .unwrap();
    let (dead, moved) = liveness::reclaim(&mut s.con, &s.keys, &s.inc)
        .await
        .unwrap();
    assert_eq!((dead, moved), (1, 19));
    let mut retry: Vec<String> = redis::cmd("SMEMBERS")
        .arg(s.keys.retry())
        .query_async(&mut s.con)
        .await
        .unwrap();
    retry.sort_by_key(|p| p.split(':').next().unwrap().parse::<u64>().unwrap());
    let ids: Vec<u64> = retry
        .iter()
        .map(|p| p.split(':').next().unwrap().parse().unwrap())
        .collect();
    let expected: Vec<u64> = (10..20).chain(21..30).collect();
    assert_eq!(ids, expected);
    assert!(
        retry.iter().all(|p| p.ends_with(":1")),
        "reclaimed once: {retry:?}"
    );
    // Another handler runs them from the retry set; the dead one's late commit is refused.
    let other: Arc<str> = Arc::from("live.0");
    let mut again = Vec::new();
    // A fetch samples at most a tenth of its count from the retry set.
    for _ in 0..10 {
        again.extend(s.fetch(&other, 20).await);
    }
    assert_eq!(again.len(), 19);
    assert!(s.commit(&again).await.is_empty());
    let late = s.commit(&items[10..20]).await;
    assert_eq!(late.len(), 10, "the dead handler's record is gone");
    let c = s.counters().await;
    assert_eq!(c.processed + c.errors, 30);
    assert_eq!(c.duplicates, 0);
    drop(s.fx);
}

/// Issue 22, item 5: a copy that becomes the generator gives its handler work back at once
/// (reclaim.lua's hand-back): its batch records move whole to `{ns}:returned` (their masks keep
/// which messages are still open), its payloads to the retry set unchanged, and another handler
/// takes them with its next fetch. Every message gets one outcome; the giver's late commit is
/// refused; nothing counts as reclaimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generator_hands_its_messages_back_and_they_are_handled_once() {
    let mut s = setup().await;
    s.generate(40).await;
    let giver: Arc<str> = Arc::from("giver.0");
    let items = s.fetch(&giver, 32).await;
    assert_eq!(items.len(), 32);
    // A reclaimed payload held too, as after a dead handler's reclaim.
    let payload = "100:1:1700000000000000:1";
    redis::cmd("SADD")
        .arg(s.keys.inflight("giver.0"))
        .arg(payload)
        .query_async::<()>(&mut s.con)
        .await
        .unwrap();
    // Committed: 0..10 and 20; open: 10..20 and 21..32, plus the payload.
    let mut committed: Vec<Done> = items[..10].to_vec();
    committed.push(items[20].clone());
    assert!(s.commit(&committed).await.is_empty());
    let given = liveness::hand_back(&mut s.con, &s.keys, &s.inc, "giver.0")
        .await
        .unwrap();
    assert_eq!(given, 22, "21 open batch messages and the payload");
    let again = liveness::hand_back(&mut s.con, &s.keys, &s.inc, "giver.0")
        .await
        .unwrap();
    assert_eq!(again, 0, "a repeated hand-back gives nothing more");
    let returned: Vec<String> = redis::cmd("HKEYS")
        .arg(s.keys.returned())
        .query_async(&mut s.con)
        .await
        .unwrap();
    assert_eq!(returned, vec!["0".to_string()], "the record moved whole");
    let retry: Vec<String> = redis::cmd("SMEMBERS")
        .arg(s.keys.retry())
        .query_async(&mut s.con)
        .await
        .unwrap();
    assert_eq!(retry, vec![payload.to_string()], "as it was held");
    let snap = leaderq::testkit::snapshot::snapshot(&mut s.con, &s.keys)
        .await
        .unwrap();
    assert_eq!(
        (snap.queue_len, snap.in_flight),
        (8 + 22, 0),
        "waiting: the 8 never fetched and the 22 given back"
    );

    let taker: Arc<str> = Arc::from("taker.0");
    let mut taken = Vec::new();
    for _ in 0..12 {
        taken.extend(s.fetch(&taker, 10).await);
    }
    let mut ids: Vec<u64> = taken.iter().map(|d| d.envelope.id).collect();
    ids.sort_unstable();
    let expected: Vec<u64> = (10..20).chain(21..40).chain([100]).collect();
    assert_eq!(
        ids, expected,
        "every open message once, and the rest of the queue"
    );
    assert!(s.commit(&taken).await.is_empty());
    let late = s.commit(&items[10..20]).await;
    assert_eq!(late.len(), 10, "the giver's late commit is refused");
    let c = s.counters().await;
    assert_eq!(c.processed + c.errors, 41, "40 ids and the payload's");
    assert_eq!((c.reclaimed, c.handed_back), (0, 22));
    drop(s.fx);
}

/// A returned record too large for a fetch is split at a byte of its mask: the taker gets the
/// open messages of its first bytes, the rest stays returned under its own first id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_record_too_large_for_a_fetch_is_split_at_a_byte() {
    let mut s = setup().await;
    s.generate(64).await;
    let giver: Arc<str> = Arc::from("giver.0");
    let items = s.fetch(&giver, 64).await;
    assert_eq!(items.len(), 64);
    liveness::hand_back(&mut s.con, &s.keys, &s.inc, "giver.0")
        .await
        .unwrap();
    let taker: Arc<str> = Arc::from("taker.0");
    let first = s.fetch(&taker, 20).await;
    let ids: Vec<u64> = first.iter().map(|d| d.envelope.id).collect();
    assert_eq!(
        ids,
        (0..16).collect::<Vec<u64>>(),
        "two whole bytes fit in 20"
    );
    let mut returned: Vec<String> = redis::cmd("HKEYS")
        .arg(s.keys.returned())
        .query_async(&mut s.con)
        .await
        .unwrap();
    returned.sort();
    assert_eq!(returned, vec!["16".to_string()]);
    let mut rest = Vec::new();
    for _ in 0..4 {
        rest.extend(s.fetch(&taker, 20).await);
    }
    let mut all: Vec<u64> = first.iter().chain(&rest).map(|d| d.envelope.id).collect();
    all.sort_unstable();
    assert_eq!(all, (0..64).collect::<Vec<u64>>());
    assert!(s.commit(&first).await.is_empty());
    assert!(s.commit(&rest).await.is_empty());
    let c = s.counters().await;
    assert_eq!((c.processed + c.errors, c.duplicates), (64, 0));
    drop(s.fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_copy_of_a_batch_message_is_counted_as_a_duplicate() {
    let mut s = setup().await;
    s.generate(5).await;
    let owner: Arc<str> = Arc::from("a.0");
    let items = s.fetch(&owner, 5).await;
    let copy = items[2].envelope.encode(b"");
    redis::cmd("SADD")
        .arg(s.keys.inflight("b.0"))
        .arg(&copy)
        .query_async::<()>(&mut s.con)
        .await
        .unwrap();
    let planted = handler::Fetched {
        payloads: vec![copy.into()],
        ..Default::default()
    }
    .into_items(&Arc::from("b.0"));
    assert!(s.commit(&planted).await.is_empty());
    assert!(s.commit(&items).await.is_empty());
    let c = s.counters().await;
    assert_eq!((c.processed + c.errors, c.duplicates), (5, 1));
    drop(s.fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_split_leaves_the_rest_starting_on_a_multiple_of_8() {
    let mut s = setup().await;
    s.generate(20).await;
    let owner: Arc<str> = Arc::from("h.0");
    // 12 asked: 8 taken, so the rest starts at id 8 (commit.lua's bitmaps then need no shift).
    let ids: Vec<u64> = s
        .fetch(&owner, 12)
        .await
        .iter()
        .map(|d| d.envelope.id)
        .collect();
    assert_eq!(ids, (0..8).collect::<Vec<_>>());
    let q = s.queue().await;
    assert!(q.len() == 1 && q[0].starts_with("*8:12:"), "{q:?}");
    // Fewer than 8 asked: taken as asked (nothing to cut at).
    let ids: Vec<u64> = s
        .fetch(&owner, 3)
        .await
        .iter()
        .map(|d| d.envelope.id)
        .collect();
    assert_eq!(ids, vec![8, 9, 10]);
    drop(s.fx);
}

/// One commit over batches of every shape: aligned ones side by side (one span), one whose first
/// id is not a multiple of 8 (its own span, shifted), one whose record is gone (refused), and a
/// message whose done bit is already set (a duplicate, not recorded again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_commit_records_many_batches_of_every_shape() {
    let mut s = setup().await;
    let owner: Arc<str> = Arc::from("h.0");
    // Batches 0..16, 16..32, 32..37, 37..50: two aligned, one aligned but short, one not aligned.
    for n in [16, 16, 5, 13] {
        s.generate(n).await;
    }
    let items = s.fetch(&owner, 50).await;
    assert_eq!(items.len(), 50);
    let mut items: Vec<Done> = items;
    for (i, d) in items.iter_mut().enumerate() {
        d.verdict = match i % 5 {
            0 => Verdict::Failed(leaderq::work::HANDLER_ERROR.into()),
            1 => Verdict::Failed(format!("reason {i}")),
            2 => Verdict::TimedOut,
            _ => Verdict::Ok,
        };
    }
    // Batch 16..32's record goes (as a reclaim takes it), and id 40's done bit is set already.
    redis::cmd("HDEL")
        .arg(s.keys.batches("h.0"))
        .arg("16")
        .query_async::<()>(&mut s.con)
        .await
        .unwrap();
    redis::cmd("SETBIT")
        .arg(s.keys.done())
        .arg(40)
        .arg(1)
        .query_async::<()>(&mut s.con)
        .await
        .unwrap();
    let refused = s.commit(&items).await;
    assert_eq!(refused, (16..32).collect::<Vec<usize>>());
    let c = s.counters().await;
    assert_eq!((c.duplicates, c.refused, c.runs), (1, 16, 50));
    let recorded: Vec<usize> = (0..50)
        .filter(|i| !(16..32).contains(i) && *i != 40)
        .collect();
    let oks = recorded.iter().filter(|i| *i % 5 >= 3).count() as u64;
    assert_eq!((c.processed, c.errors), (oks, recorded.len() as u64 - oks));
    for id in 0..56u64 {
        let i = id as usize;
        let done = s.bit(&s.keys.done(), id).await;
        let ok = s.bit(&s.keys.ok(), id).await;
        let want_done = u8::from(recorded.contains(&i) || id == 40);
        let want_ok = u8::from(recorded.contains(&i) && i % 5 >= 3);
        assert_eq!((done, ok), (want_done, want_ok), "id {id}");
    }
    let errors = s.errors().await;
    let mut ids: Vec<usize> = errors
        .iter()
        .map(|e| e.split(':').next().unwrap().parse().unwrap())
        .collect();
    ids.sort_unstable();
    let want: Vec<usize> = recorded.iter().copied().filter(|i| i % 5 < 3).collect();
    assert_eq!(ids, want, "{errors:?}");
    for e in &errors {
        let id: usize = e.split(':').next().unwrap().parse().unwrap();
        let reason = e.split('\t').nth(1).unwrap();
        let expected = match id % 5 {
            0 => "handler error".to_string(),
            1 => format!("reason {id}"),
            _ => "handler timeout".to_string(),
        };
        assert_eq!(reason, expected, "{e}");
    }
    // Every record that took part is gone (no bit left), and no scratch key is left behind.
    let records: u64 = redis::cmd("HLEN")
        .arg(s.keys.batches("h.0"))
        .query_async(&mut s.con)
        .await
        .unwrap();
    assert_eq!(records, 0);
    let scratch: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*scratch*", s.keys.prefix()))
        .query_async(&mut s.con)
        .await
        .unwrap();
    assert!(scratch.is_empty(), "{scratch:?}");
    drop(s.fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_outcome_for_a_message_in_the_same_commit_is_refused() {
    let mut s = setup().await;
    s.generate(8).await;
    let owner: Arc<str> = Arc::from("h.0");
    let items = s.fetch(&owner, 8).await;
    let mut twice = items.clone();
    let mut again = items[3].clone();
    again.verdict = Verdict::TimedOut;
    twice.push(again);
    assert_eq!(s.commit(&twice).await, vec![8]);
    let c = s.counters().await;
    assert_eq!((c.processed + c.errors, c.refused, c.duplicates), (8, 0, 0));
    drop(s.fx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_past_the_end_of_its_batch_is_refused_and_not_recorded() {
    let mut s = setup().await;
    s.generate(5).await;
    let owner: Arc<str> = Arc::from("h.0");
    let mut items = s.fetch(&owner, 5).await;
    // Index 12 of a 5-message batch: past its mask's last byte, so the only outcome refused.
    let mut past = items[0].clone();
    past.envelope.id = 12;
    past.verdict = Verdict::Failed("made up".into());
    items.push(past.clone());
    assert_eq!(s.commit(&items).await, vec![5]);
    // Index 6: in the mask's last byte, past the batch's end.
    past.envelope.id = 6;
    assert_eq!(s.commit(&[past]).await, vec![0]);
    let c = s.counters().await;
    assert_eq!((c.processed + c.errors, c.refused), (5, 2));
    let errors: u64 = redis::cmd("LLEN")
        .arg(s.keys.errors())
        .query_async(&mut s.con)
        .await
        .unwrap();
    assert_eq!(errors, c.errors, "no error entry for a refused outcome");
    drop(s.fx);
}
