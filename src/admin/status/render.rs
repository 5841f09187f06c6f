//! `app status` for people: the text rendering and the print-once-or-watch loop. The data comes
//! from [`super::gather`]; `--json` prints the same [`super::Status`] serialized.

use super::{gather, Status};
use crate::conn::Conn;
use crate::error::Error;
use crate::protocol::keys::Keys;
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The status for people: a few labelled lines and a table of instances.
pub fn render_text(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "namespace   {}   (Redis time {})",
        s.namespace,
        crate::admin::errors::rfc3339_utc(s.redis_time_us)
    );
    // A halt comes first: after a FLUSHALL or an empty restart the halt marker may be all the
    // namespace holds, and "no data yet" would hide that copies stopped (issue 23).
    if s.empty && s.halted.is_none() {
        let _ = writeln!(
            out,
            "no data yet: no copy of app has run against this Redis under this namespace"
        );
        return out;
    }
    if let Some(why) = &s.halted {
        let _ = writeln!(
            out,
            "HALTED      Redis lost data: {why}\n            nothing is generated or recorded; see README, \"When Redis forgets\""
        );
    }
    match &s.generator {
        Some(g) => {
            let gone = s
                .instances
                .iter()
                .any(|i| i.instance == g.instance && i.state == "gone");
            let _ = writeln!(
                out,
                "generator   {}   epoch {}   lease {} ms left{}",
                g.instance,
                g.epoch,
                g.lease_ms_left,
                if gone {
                    "   (its connection is gone: a running copy takes over within a poll)"
                } else {
                    ""
                }
            );
        }
        None => {
            let _ = writeln!(
                out,
                "generator   none (the lease is free; a running copy takes it within a poll)"
            );
        }
    }
    if let Some(why) = &s.generation_stopped {
        let _ = writeln!(out, "generation  stopped: {why}");
    }
    let live = s.instances.iter().filter(|i| i.alive).count();
    let _ = writeln!(
        out,
        "instances   {live} live, {} dead or gone",
        s.instances.len() - live
    );
    if !s.instances.is_empty() {
        let mut rows = vec![[
            "INSTANCE".to_string(),
            "STATE".into(),
            "ROLE".into(),
            "EPOCH".into(),
            "IN-FLIGHT".into(),
            "LAST-SEEN".into(),
            "UP".into(),
            "HANDLER-ID".into(),
        ]];
        for i in &s.instances {
            let up_s = s.redis_time_us.saturating_sub(i.started_us) as f64 / 1e6;
            rows.push([
                i.instance.clone(),
                i.state.clone(),
                i.role.clone(),
                if i.epoch > 0 {
                    i.epoch.to_string()
                } else {
                    "-".into()
                },
                i.in_flight.to_string(),
                format!("{:.1} s ago", i.seen_ms_ago as f64 / 1e3),
                // A dead copy's uptime ends where it was last seen, not now.
                if i.started_us > 0 && i.alive {
                    format!("{up_s:.0} s")
                } else if i.started_us > 0 {
                    format!(
                        "{:.0} s",
                        i.seen_us.saturating_sub(i.started_us) as f64 / 1e6
                    )
                } else {
                    "-".into()
                },
                i.handler.clone(),
            ]);
        }
        let widths: Vec<usize> = (0..8)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            let mut line = String::from("  ");
            for (c, cell) in r.iter().enumerate() {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    if s.reclaimed_waiting > 0 {
        let _ = writeln!(
            out,
            "queue       {} messages (+{} reclaimed from dead handlers, waiting to run again)",
            s.queue_depth, s.reclaimed_waiting
        );
    } else {
        let _ = writeln!(out, "queue       {} messages", s.queue_depth);
    }
    let _ = writeln!(
        out,
        "errors      {} in the store, {} being drained by getErrors",
        s.error_store, s.error_draining
    );
    for shard in &s.shards {
        let _ = writeln!(
            out,
            "  shard {:<3} queue {}   reclaimed waiting {}   error store {} ({} draining)   generated {}   processed {}   errors {}",
            shard.shard,
            shard.queue_depth,
            shard.reclaimed_waiting,
            shard.error_store,
            shard.error_draining,
            shard.counters.generated,
            shard.counters.processed,
            shard.counters.errors
        );
    }
    let c = &s.counters;
    let _ = writeln!(
        out,
        "counters    generated {}   processed {}   errors {} ({} timeouts)   poisoned {}   duplicates {}   reclaimed {}   handed back {}",
        c.generated, c.processed, c.errors, c.timeouts, c.poisoned, c.duplicates, c.reclaimed, c.handed_back
    );
    match &s.rates {
        Some(r) => {
            let _ = write!(
                out,
                "rates       generated {:.1}/s   processed {:.1}/s   errors {:.1}/s   duplicates {:.1}/s   reclaimed {:.1}/s   (over {:.1} s",
                r.generated_per_s,
                r.processed_per_s,
                r.errors_per_s,
                r.duplicates_per_s,
                r.reclaimed_per_s,
                r.window_s
            );
            let _ = writeln!(out, ", newest sample {:.1} s old)", r.age_s);
        }
        None => {
            let _ = writeln!(
                out,
                "rates       not yet (the generator samples the counters once a second)"
            );
        }
    }
    if let Some(m) = &s.memory {
        let mb = |b: u64| b as f64 / 1_048_576.0;
        let _ = match (m.max_bytes, m.full) {
            (0, _) => writeln!(out, "memory      {:.1} MB used (no maxmemory)", mb(m.used_bytes)),
            (max, false) => writeln!(out, "memory      {:.1} MB used of maxmemory {:.1} MB", mb(m.used_bytes), mb(max)),
            (max, true) => writeln!(
                out,
                "memory      FULL: {:.1} MB used of maxmemory {:.1} MB; Redis refuses writes (or is about to), nothing progresses. Drain the error store (app getErrors) or raise maxmemory",
                mb(m.used_bytes),
                mb(max)
            ),
        };
    }
    for w in &s.warnings {
        let _ = writeln!(out, "warning     {w}");
    }
    out
}

/// How `app status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShowOptions {
    /// One compact JSON object a line instead of text.
    pub json: bool,
    /// Refresh at this interval until stopped (`--watch`); `None` prints once.
    pub watch_every: Option<Duration>,
    /// Clear the screen before each text refresh (only when stdout is a terminal).
    pub clear_screen: bool,
}

/// Prints the status once, or every `watch_every` until `stop`. While watching, a failed read
/// is printed and retried at the next refresh (Redis may be restarting: that is when people
/// watch); printing once returns the error.
pub async fn show(
    con: &mut Conn,
    keys: &Keys,
    options: ShowOptions,
    stop: &CancellationToken,
    out: &mut impl Write,
) -> Result<(), Error> {
    loop {
        match gather(con, keys).await {
            Ok(status) => {
                if options.json {
                    let line = serde_json::to_string(&status)
                        .map_err(|e| Error::Output(std::io::Error::other(e)))?;
                    writeln!(out, "{line}")?;
                } else {
                    if options.watch_every.is_some() {
                        if options.clear_screen {
                            write!(out, "\x1b[2J\x1b[H")?;
                        } else {
                            writeln!(out)?;
                        }
                    }
                    write!(out, "{}", render_text(&status))?;
                }
            }
            Err(e) if options.watch_every.is_some() => {
                writeln!(out, "status: {e} (retrying)")?;
            }
            Err(e) => return Err(e),
        }
        out.flush()?;
        let Some(every) = options.watch_every else {
            return Ok(());
        };
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{instance, GeneratorStatus, Totals};
    use super::*;

    #[test]
    fn text_shows_a_halt_and_the_poisoned() {
        let s = Status {
            namespace: "app".into(),
            halted: Some("a saw: next_id went back from 9 to 3".into()),
            counters: Totals {
                poisoned: 2,
                timeouts: 5,
                ..Totals::default()
            },
            ..Status::default()
        };
        let text = render_text(&s);
        assert!(
            text.contains("HALTED      Redis lost data: a saw: next_id went back"),
            "{text}"
        );
        assert!(text.contains("poisoned 2"), "{text}");
        assert!(text.contains("(5 timeouts)"), "{text}");
    }

    #[test]
    fn text_says_when_there_is_no_data() {
        let s = Status {
            namespace: "app".into(),
            empty: true,
            ..Status::default()
        };
        assert!(render_text(&s).contains("no data yet"));
        // Issue 23: wiped, then halted by the copies that saw it: HALTED, not "no data yet".
        let halted = Status {
            halted: Some("app1 saw: redis lost data: {app}:incarnation is gone".into()),
            ..s
        };
        let text = render_text(&halted);
        assert!(
            text.contains("HALTED") && !text.contains("no data yet"),
            "{text}"
        );
    }

    #[test]
    fn text_shows_every_section() {
        let now = 50_000_000;
        let s = Status {
            namespace: "app".into(),
            redis_time_us: now,
            generator: Some(GeneratorStatus {
                instance: "a".into(),
                epoch: 3,
                lease_ms_left: 400,
            }),
            instances: vec![instance(
                "a",
                r#"{"role":"generator","epoch":3,"in_flight":0,"started_us":1,"handler":"a.0","heartbeat_ms":1000,"seen_us":49900000}"#,
                now,
            )],
            queue_depth: 12,
            reclaimed_waiting: 0,
            error_store: 5,
            counters: Totals {
                generated: 100,
                ..Totals::default()
            },
            ..Status::default()
        };
        let text = render_text(&s);
        for needle in [
            "generator   a   epoch 3   lease 400 ms left",
            "1 live, 0 dead or gone",
            "queue       12 messages",
            "5 in the store",
            "generated 100",
            "rates       not yet",
        ] {
            assert!(text.contains(needle), "{needle:?} in\n{text}");
        }
    }
}
