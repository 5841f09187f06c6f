//! The epoch log's entry format (`{ns}:epochs`, written by generate.lua): which generator epoch
//! generated which ids, and when its first message was made. `app repair` and the checker read it.

/// One batch the generator appended to the epoch log: ids `first_id..first_id + count` under `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochBatch {
    /// The generator's fencing epoch.
    pub epoch: u64,
    /// The first id of the range.
    pub first_id: u64,
    /// How many ids the range holds.
    pub count: u64,
    /// Redis time of the range's first message, µs.
    pub time_us: u64,
}

/// Parse one entry of the Redis epoch log, format `epoch:first_id:count:time_us` (decimal).
pub fn parse_epoch_batch(s: &str) -> Result<EpochBatch, String> {
    let bad = |why: String| format!("epoch log entry {s:?}: {why}");
    let fields = s.trim().split(':').map(|f| f.parse::<u64>());
    let nums: Vec<u64> = fields
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let [epoch, first_id, count, time_us] = nums[..] else {
        return Err(bad("expected epoch:first_id:count:time_us".into()));
    };
    Ok(EpochBatch {
        epoch,
        first_id,
        count,
        time_us,
    })
}
