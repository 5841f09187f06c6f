//! `getErrors` inside the verdict: the real `app getErrors`, run during the run while handlers
//! are still writing errors, some of them SIGKILLed mid-drain, sometimes two at once.
//!
//! Each drain prints `--json` (an entry's id, reason and time: its identity) and reports every
//! deletion on stderr (`getErrors: deleted output lines a-b`); everything it printed is kept with
//! what became of each entry (`verify::printed_by`): deleted, kept (printed again later), or,
//! after a killed drain's last report, unknown. The checker (`leaderq::testkit::verify`) then
//! demands one deleted entry per failed id, each with the reason its seeded handling gives; only
//! an entry a drain did not delete may be printed again.

use anyhow::Context;
use leaderq::testkit::verify::{self, Printed};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// How long a drain that was not killed may take to finish at the end of the run.
const FINISH_WAIT_MAX: Duration = Duration::from_secs(60);

/// One `app getErrors` process.
struct Drain {
    child: Child,
    /// Complete lines (ending in a newline) read from its stdout so far.
    lines: Arc<Mutex<Vec<String>>>,
    /// Its stderr, read to the end (the deletions it reported, its errors).
    stderr: JoinHandle<String>,
    /// Reads its stdout, and SIGKILLs it the moment it has printed its seeded number of lines:
    /// then it has flushed a chunk and, most likely, not yet deleted it (the window that
    /// matters), which a kill from the driver's 10 ms tick would almost always miss.
    reader: JoinHandle<()>,
}

/// What all drains of a run printed.
#[derive(Debug, Default)]
pub struct DrainOutput {
    /// Every line every drain printed, with what became of its entry.
    pub printed: Vec<Printed>,
    /// Drains started, killed, and failed (a non-killed drain that did not exit 0).
    pub started: u64,
    pub killed: u64,
    pub failures: Vec<String>,
}

/// The drains of one run.
pub struct Drains {
    app_bin: PathBuf,
    url: String,
    namespace: String,
    /// Its own stream, so drains do not move any other seeded decision.
    rng: ChaCha8Rng,
    running: Vec<Drain>,
    out: DrainOutput,
}

impl Drains {
    pub fn new(seed: u64, app_bin: &Path, url: &str, namespace: &str) -> Drains {
        Drains {
            app_bin: app_bin.to_path_buf(),
            url: url.to_string(),
            namespace: namespace.to_string(),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x6472_6169_6e73),
            running: Vec::new(),
            out: DrainOutput::default(),
        }
    }

    /// Starts a drain (a second one at the same time, one time in three), each with a seeded
    /// chunk size and, half the time, a seeded number of lines after which it is SIGKILLed.
    /// Returns what it started, for the progress notes.
    pub fn start(&mut self) -> anyhow::Result<String> {
        let twice = self.rng.random_bool(1.0 / 3.0);
        let mut notes = Vec::new();
        for _ in 0..if twice { 2 } else { 1 } {
            let chunk: u64 = self.rng.random_range(10..=1000);
            let kill_after_lines = self
                .rng
                .random_bool(0.5)
                .then(|| self.rng.random_range(1..=3 * chunk as usize));
            let mut child = Command::new(&self.app_bin)
                .args(["getErrors", "--json", "--namespace", &self.namespace])
                .args(["--chunk", &chunk.to_string()])
                .env("REDIS_URL", &self.url)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting app getErrors")?;
            let stdout = child.stdout.take().context("getErrors stdout")?;
            let mut stderr = child.stderr.take().context("getErrors stderr")?;
            let stderr = tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text).await;
                text
            });
            let lines = Arc::new(Mutex::new(Vec::new()));
            let pid = child.id().context("getErrors pid")?;
            let kill = kill_after_lines.map(|k| (k, pid));
            let reader = tokio::spawn(read_lines(stdout, lines.clone(), kill));
            notes.push(match kill_after_lines {
                Some(k) => format!("chunk {chunk}, SIGKILL after {k} lines"),
                None => format!("chunk {chunk}"),
            });
            self.running.push(Drain {
                child,
                lines,
                stderr,
                reader,
            });
            self.out.started += 1;
        }
        Ok(notes.join(" + "))
    }

    /// Waits (bounded) for every drain, and returns what they all printed.
    pub async fn finish(&mut self) -> DrainOutput {
        let deadline = Instant::now() + FINISH_WAIT_MAX;
        for mut d in self.running.drain(..) {
            let left = deadline.saturating_duration_since(Instant::now());
            let status = match tokio::time::timeout(left, d.child.wait()).await {
                Ok(Ok(s)) => Some(s),
                _ => {
                    let _ = d.child.kill().await;
                    None
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut d.reader).await;
            let lines = std::mem::take(&mut *d.lines.lock().expect("drain lines"));
            let stderr = tokio::time::timeout(Duration::from_secs(5), &mut d.stderr)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let killed = status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s))
                == Some(libc::SIGKILL);
            let succeeded = status.is_some_and(|s| s.success());
            if killed {
                self.out.killed += 1;
            } else if !succeeded {
                self.out.failures.push(format!(
                    "a getErrors that was not killed ended with {status:?}: {}",
                    stderr.trim()
                ));
            }
            // What a failed one printed counts as a killed one's: it may have deleted entries
            // after its last report.
            self.out
                .printed
                .extend(verify::printed_by(&lines, &stderr, !succeeded));
        }
        std::mem::take(&mut self.out)
    }
}

/// Collects complete lines from a drain's stdout; a last line without its newline (the process
/// was killed while writing it) is not an entry. With `kill = (k, pid)`, SIGKILLs the process as
/// soon as `k` lines are in.
async fn read_lines(
    stdout: tokio::process::ChildStdout,
    lines: Arc<Mutex<Vec<String>>>,
    kill: Option<(usize, u32)>,
) {
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) if buf.last() == Some(&b'\n') => {
                buf.pop();
                let line = String::from_utf8_lossy(&buf).into_owned();
                let mut all = lines.lock().expect("drain lines");
                all.push(line);
                if kill.is_some_and(|(k, _)| all.len() == k) {
                    let (_, pid) = kill.expect("checked");
                    let _ = leaderq::testkit::procs::signal(pid, libc::SIGKILL);
                }
            }
            Ok(_) => return, // cut off mid-line
        }
    }
}
