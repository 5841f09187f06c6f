//! A custom source and handler: the generator turns each line of a JSON-lines file into one
//! message (the line is the payload, sent through Redis byte for byte); handlers parse it, add
//! up the amounts, and fail an order with a negative amount with a reason of their own. Three
//! copies run in this process (any number could run on other machines).
//!
//! ```text
//! printf '{"order":1,"amount":5}\n{"order":2,"amount":-1}\n' > /tmp/orders.jsonl
//! cargo run --example json_lines -- redis://127.0.0.1:6379 demo /tmp/orders.jsonl
//! ```
//!
//! When every line has its outcome it stops the copies, takes the error store, and checks
//! exactly-once: the handled amounts add up to the file's non-negative amounts, and every negative
//! one is in the error store once with its reason. Exit code 0 when that holds, 1 when it does not.

use leaderq::admin::errors::{self, DrainConfig, ErrorEntry};
use leaderq::{conn, Batch, Failure, Handler, Keys, Message, Node, Source};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Message `i` is line `i` of the file. A function of the id, as a source must be: asked again
/// for the same ids (after a failover), it gives the same bytes.
struct Lines {
    lines: Arc<Vec<Vec<u8>>>,
}

impl Source for Lines {
    async fn batch(&self, first_id: u64, count: usize) -> Result<Batch, Failure> {
        let from = (first_id as usize).min(self.lines.len());
        let to = (from + count).min(self.lines.len());
        // Past the last line: an empty batch, nothing more to generate.
        Ok(Batch::Payloads(self.lines[from..to].to_vec()))
    }
}

/// Parses an order and adds its amount to a total.
struct Orders {
    total: Arc<AtomicI64>,
    calls: Arc<AtomicU64>,
}

impl Handler for Orders {
    async fn handle(&self, message: Message) -> Result<(), Failure> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let order: serde_json::Value = serde_json::from_slice(&message.payload)
            .map_err(|e| Failure::new(format!("not JSON: {e}")))?;
        let amount = order["amount"]
            .as_i64()
            .ok_or_else(|| Failure::new("no integer amount"))?;
        if amount < 0 {
            return Err(Failure::new(format!("negative amount {amount}")));
        }
        self.total.fetch_add(amount, Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, namespace, input] = &args[..] else {
        anyhow::bail!("usage: json_lines REDIS_URL NAMESPACE INPUT.jsonl");
    };
    let text = std::fs::read(input)?;
    let lines: Vec<Vec<u8>> = text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let lines = Arc::new(lines);
    let count = lines.len() as u64;
    let (total, calls) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = CancellationToken::new();
    let mut copies = Vec::new();
    for i in 0..3 {
        let node = Node::builder(url.as_str())
            .namespace(namespace.as_str())
            .instance_id(format!("orders-{i}"))
            .interval_ms(0)
            .max_messages(count)
            .source(Lines {
                lines: lines.clone(),
            })
            .handler(Orders {
                total: total.clone(),
                calls: calls.clone(),
            })
            .build()?;
        copies.push(tokio::spawn(node.run(stop.clone())));
    }
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
        token: "json_lines".into(),
        retry_for: Duration::from_secs(10),
    };
    let mut failed: Vec<ErrorEntry> = Vec::new();
    errors::drain(&mut con, &keys, &config, &mut failed).await?;

    let amounts: Vec<i64> = lines
        .iter()
        .map(|l| serde_json::from_slice::<serde_json::Value>(l).map(|v| v["amount"].as_i64()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|a| a.unwrap_or(-1))
        .collect();
    let expected_total: i64 = amounts.iter().filter(|a| **a >= 0).sum();
    let mut problems = 0;
    let mut failed_ids: Vec<u64> = Vec::new();
    for entry in &failed {
        let json = entry.json();
        let id = json["id"].as_u64().unwrap_or(u64::MAX);
        let amount = amounts.get(id as usize).copied().unwrap_or(0);
        if entry.reason != format!("negative amount {amount}") {
            eprintln!("id {id}: unexpected reason {:?}", entry.reason);
            problems += 1;
        }
        if json["data"].as_str().map(str::as_bytes) != lines.get(id as usize).map(|l| &l[..]) {
            eprintln!("id {id}: the error store holds other data than line {id}");
            problems += 1;
        }
        failed_ids.push(id);
    }
    failed_ids.sort_unstable();
    let negative: Vec<u64> = (0..count).filter(|&i| amounts[i as usize] < 0).collect();
    if failed_ids != negative {
        eprintln!("failed ids {failed_ids:?}, negative amounts at {negative:?}");
        problems += 1;
    }
    let total = total.load(Ordering::Relaxed);
    if total != expected_total {
        eprintln!(
            "handled total {total}, the file's non-negative amounts add up to {expected_total}"
        );
        problems += 1;
    }
    println!(
        "json_lines: {count} orders, total {total} (expected {expected_total}), {} failed with their reason, {problems} problems",
        failed.len()
    );
    if problems > 0 {
        std::process::exit(1);
    }
    Ok(())
}
