//! A custom handler: each message's id is appended, as one line, to a file; ids ending in 9 fail
//! with a reason of the handler's own. Three copies run in this process (any number could run on
//! other machines against the same Redis): one becomes the generator, the others handle.
//!
//! ```text
//! cargo run --example append_to_file -- redis://127.0.0.1:6379 demo /tmp/out.txt 2000
//! ```
//!
//! When every message has its outcome it stops the copies (each drains and commits what it
//! holds), takes the error store with the library's `getErrors`, and checks exactly-once: every
//! id that succeeded is in the file once, every id that failed is in the error store once, with
//! its reason. Exit code 0 when that holds, 1 when it does not.

use leaderq::admin::errors::{self, DrainConfig, ErrorEntry};
use leaderq::{conn, Failure, Handler, Keys, Message, Node};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Appends the id of every message it handles to a file.
struct AppendToFile {
    file: Mutex<std::fs::File>,
    calls: Arc<AtomicU64>,
}

impl Handler for AppendToFile {
    async fn handle(&self, message: Message) -> Result<(), Failure> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if message.id % 10 == 9 {
            return Err(Failure::new(format!("id {} ends in 9", message.id)));
        }
        // One write(2) per line on an O_APPEND file, so lines from the three copies (each with
        // its own handle) never interleave; a short write under a std mutex, where slow work
        // would go to spawn_blocking.
        let line = format!("{}\n", message.id);
        let mut file = self.file.lock().expect("file lock");
        file.write_all(line.as_bytes())
            .map_err(|e| Failure::new(e.to_string()))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, namespace, out, count] = &args[..] else {
        anyhow::bail!("usage: append_to_file REDIS_URL NAMESPACE OUT_FILE COUNT");
    };
    let count: u64 = count.parse()?;
    let calls = Arc::new(AtomicU64::new(0));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)?;
    let stop = CancellationToken::new();
    let mut copies = Vec::new();
    for i in 0..3 {
        let handler = AppendToFile {
            file: Mutex::new(file.try_clone()?),
            calls: calls.clone(),
        };
        let node = Node::builder(url.as_str())
            .namespace(namespace.as_str())
            .instance_id(format!("example-{i}"))
            .interval_ms(0)
            .max_messages(count)
            .handler(handler)
            .build()?;
        copies.push(tokio::spawn(node.run(stop.clone())));
    }
    // Bounded wait: every message handled once, or give up after a minute.
    for _ in 0..1200 {
        if calls.load(Ordering::Relaxed) >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    for copy in copies {
        copy.await??;
    }

    let keys = Keys::new(namespace)?;
    let mut con = conn::connect(url, 5000).await?;
    let config = DrainConfig {
        chunk: 500,
        lock_ms: 5000,
        token: "append_to_file".into(),
        retry_for: Duration::from_secs(10),
    };
    let mut failed: Vec<ErrorEntry> = Vec::new();
    errors::drain(&mut con, &keys, &config, &mut failed).await?;

    let mut seen = vec![0u32; count as usize];
    for line in std::fs::read_to_string(out)?.lines() {
        seen[line.parse::<usize>()?] += 1;
    }
    let mut problems = 0;
    for entry in &failed {
        let id: usize = entry.line().parse()?;
        if entry.reason != format!("id {id} ends in 9") {
            eprintln!("id {id}: unexpected reason {:?}", entry.reason);
            problems += 1;
        }
        seen[id] += 1;
    }
    for (id, n) in seen.iter().enumerate().filter(|(_, n)| **n != 1) {
        eprintln!("id {id} has {n} outcomes");
        problems += 1;
    }
    println!(
        "append_to_file: {count} messages, {} in {out}, {} failed with their reason, {problems} problems",
        count as usize - failed.len(),
        failed.len()
    );
    if problems > 0 {
        std::process::exit(1);
    }
    Ok(())
}
