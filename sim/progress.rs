//! What `sim` shows while it runs: a bar on a terminal, a plain line every 2 s otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// A progress bar on a terminal, a plain line every 2 s otherwise, nothing with --quiet.
pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    total: u64,
    last_line: std::cell::Cell<Option<Instant>>,
}

impl Progress {
    pub fn new(total: u64, quiet: bool) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = (!quiet && terminal).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} {per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        Progress {
            bar,
            plain: !quiet && !terminal,
            total,
            last_line: std::cell::Cell::new(None),
        }
    }

    pub fn update(&self, done: u64, kills_done: usize, kills: usize) {
        if let Some(b) = &self.bar {
            b.set_position(done);
            b.set_message(format!("faults {kills_done}/{kills}"));
        } else if self.plain
            && self
                .last_line
                .get()
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
        {
            self.last_line.set(Some(Instant::now()));
            eprintln!(
                "sim: {done}/{} outcomes, faults {kills_done}/{kills}",
                self.total
            );
        }
    }

    pub fn note(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(format!("sim: {msg}")),
            None if self.plain => eprintln!("sim: {msg}"),
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
