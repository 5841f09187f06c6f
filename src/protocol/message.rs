//! The message envelope: `"<id>:<epoch>:<generated_us>"` in ASCII decimal, then
//! `":<reclaims>"` once a dead handler's message has been given back (reclaimed), then
//! `":<data>"` when the source gave the message bytes (`<reclaims>` is `0` on a fresh one). The
//! data may be any bytes, colons and newlines included: it is everything after the fourth field.
//!
//! The id is the task's `getMessage()` value; the epoch says which generator (fencing token) made
//! it; the generation time comes from Redis `TIME`, so latencies never compare two machines' clocks;
//! the reclaim count lets reclaim.lua set aside a poison message (one every handler dies holding)
//! after a bounded number of deliveries. Lua builds envelopes (generate.lua, reclaim.lua) and Rust
//! only parses them; both read a fourth field only when it is all digits.

/// A parsed envelope; the data stays in the payload bytes ([`Envelope::parse`] says where).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Envelope {
    /// `getMessage()`'s value: 0, 1, 2, … across every generator.
    pub id: u64,
    /// Fencing epoch of the generator that produced it.
    pub epoch: u64,
    /// Redis `TIME` at generation, in microseconds since the Unix epoch.
    pub generated_us: u64,
    /// How many times it was reclaimed from a handler that died holding it.
    pub reclaims: u64,
}

/// Largest id a Redis bitmap can index (`SETBIT` offsets are below 2^32).
pub const ID_MAX: u64 = (1 << 32) - 1;

impl Envelope {
    /// Parses a payload: the envelope, and the offset where its data begins (the payload's length
    /// when it carries none). Or says what is wrong with it (the reason goes to the error store).
    pub fn parse(payload: &[u8]) -> Result<(Envelope, usize), String> {
        let mut at = 0usize;
        let mut field = |name: &str, last: bool| -> Result<Option<u64>, String> {
            if at > payload.len() {
                return if last {
                    Ok(None)
                } else {
                    Err(format!("missing field {name}"))
                };
            }
            let rest = &payload[at..];
            let end = rest.iter().position(|&b| b == b':').unwrap_or(rest.len());
            let raw = &rest[..end];
            at += end + 1;
            let text = std::str::from_utf8(raw).unwrap_or("");
            let ok = !raw.is_empty() && raw.iter().all(u8::is_ascii_digit);
            match text.parse::<u64>() {
                Ok(n) if ok => Ok(Some(n)),
                _ => Err(format!(
                    "field {name} is not a non-negative integer: {:?}",
                    String::from_utf8_lossy(raw)
                )),
            }
        };
        let id = field("id", false)?.unwrap_or(0);
        let epoch = field("epoch", false)?.unwrap_or(0);
        let generated_us = field("generated_us", false)?.unwrap_or(0);
        let reclaims = field("reclaims", true)?.unwrap_or(0);
        if id > ID_MAX {
            return Err(format!("id {id} exceeds {ID_MAX}"));
        }
        let envelope = Envelope {
            id,
            epoch,
            generated_us,
            reclaims,
        };
        Ok((envelope, at.min(payload.len())))
    }

    /// The payload form, as generate.lua and reclaim.lua write it (for tests and benches).
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut out = match (self.reclaims, data.is_empty()) {
            (0, true) => format!("{}:{}:{}", self.id, self.epoch, self.generated_us),
            (n, _) => format!("{}:{}:{}:{n}", self.id, self.epoch, self.generated_us),
        }
        .into_bytes();
        if !data.is_empty() {
            out.push(b':');
            out.extend_from_slice(data);
        }
        out
    }
}

/// A batch of fresh messages without data, ids `first_id .. first_id + count`, as fetch.lua hands
/// it out (`"<first_id>:<count>:<epoch>:<generated_us>"`, the queue entry without its `*`): the
/// handler owns it through its batch record, and makes each message's envelope itself, so no
/// per-message string crosses the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchEntry {
    /// The first id.
    pub first_id: u64,
    /// How many messages (ids `first_id ..`), at least 1.
    pub count: u64,
    /// Fencing epoch of the generator that produced it.
    pub epoch: u64,
    /// Redis `TIME` at generation, µs.
    pub generated_us: u64,
}

impl BatchEntry {
    /// Parses `"<first_id>:<count>:<epoch>:<generated_us>"`.
    pub fn parse(raw: &[u8]) -> Result<BatchEntry, String> {
        let text = std::str::from_utf8(raw).map_err(|_| "batch entry is not UTF-8".to_string())?;
        let mut fields = text.split(':').map(|f| {
            (!f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
                .then(|| f.parse::<u64>().ok())
                .flatten()
        });
        match (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) {
            (
                Some(Some(first_id)),
                Some(Some(count)),
                Some(Some(epoch)),
                Some(Some(generated_us)),
                None,
            ) if count >= 1 && first_id + count <= ID_MAX + 1 => Ok(BatchEntry {
                first_id,
                count,
                epoch,
                generated_us,
            }),
            _ => Err(format!("not a batch entry: {text:?}")),
        }
    }

    /// The envelope of message `first_id + index`.
    pub fn envelope(&self, index: u64) -> Envelope {
        Envelope {
            id: self.first_id + index,
            epoch: self.epoch,
            generated_us: self.generated_us,
            reclaims: 0,
        }
    }
}

/// How many messages a queue holds, from its entry count, its head entry and the next id:
/// fresh ids are queued in order and taken from the head (a batch entry may lose its head part),
/// so that is `next_id` minus the head's first id; the entry count when the head is not a
/// message (garbage someone pushed). As generate.lua's `queued_messages` reckons it.
pub fn queued_messages(entries: u64, head: Option<&[u8]>, next_id: u64) -> u64 {
    let Some(head) = head else { return 0 };
    let first = match head.strip_prefix(b"*") {
        Some(batch) => BatchEntry::parse(batch).ok().map(|b| b.first_id),
        None => Envelope::parse(head).ok().map(|(e, _)| e.id),
    };
    match first {
        Some(first) if first <= next_id => next_id - first,
        _ => entries,
    }
}

/// The open count at the head of a batch record (`"<open>:…"`), 0 when unreadable: what a
/// reconciliation and a snapshot sum without parsing the mask.
pub fn record_open_count(record: &[u8]) -> u64 {
    let head = record.split(|&b| b == b':').next().unwrap_or_default();
    std::str::from_utf8(head)
        .ok()
        .and_then(|o| o.parse().ok())
        .unwrap_or(0)
}

/// A batch record of a handler's `{ns}:batches:<handler>` hash, as fetch.lua and commit.lua keep
/// it: `"<open>:<count>:<epoch>:<generated_us>:<mask>"`. Returns the batch (its first id is the
/// field) and the indexes still open, or says what is wrong.
pub fn parse_batch_record(first_id: u64, raw: &[u8]) -> Result<(BatchEntry, Vec<u64>), String> {
    let mut at = 0;
    let mut numbers = [0u64; 4];
    for n in numbers.iter_mut() {
        let rest = &raw[at.min(raw.len())..];
        let end = rest
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| "batch record lacks a field".to_string())?;
        let field = &rest[..end];
        if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
            return Err("batch record field is not a number".into());
        }
        *n = std::str::from_utf8(field)
            .ok()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| "batch record field out of range".to_string())?;
        at += end + 1;
    }
    let [_, count, epoch, generated_us] = numbers;
    let mask = &raw[at.min(raw.len())..];
    let open = (0..count.min(mask.len() as u64 * 8))
        .filter(|&i| mask[(i / 8) as usize] & (0x80 >> (i % 8)) != 0)
        .collect();
    let entry = BatchEntry {
        first_id,
        count,
        epoch,
        generated_us,
    };
    Ok((entry, open))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = Envelope {
            id: 7,
            epoch: 3,
            generated_us: 1_700_000_000_000_000,
            reclaims: 0,
        };
        assert_eq!(m.encode(b""), b"7:3:1700000000000000");
        assert_eq!(Envelope::parse(&m.encode(b"")), Ok((m, 20)));
        let r = Envelope { reclaims: 2, ..m };
        assert_eq!(r.encode(b""), b"7:3:1700000000000000:2");
        assert_eq!(Envelope::parse(&r.encode(b"")), Ok((r, 22)));
        let data = b"a:b\n\x00\xff";
        let with = m.encode(data);
        assert_eq!(&with[..23], b"7:3:1700000000000000:0:");
        let (parsed, at) = Envelope::parse(&with).unwrap();
        assert_eq!((parsed, &with[at..]), (m, &data[..]));
    }

    #[test]
    fn batch_entries_and_records() {
        let b = BatchEntry::parse(b"10:3:2:1700").unwrap();
        assert_eq!(
            (b.first_id, b.count, b.epoch, b.generated_us),
            (10, 3, 2, 1700)
        );
        assert_eq!(b.envelope(2).id, 12);
        for bad in [
            &b""[..],
            b"1:0:1:1",
            b"1:2:3",
            b"1:2:3:4:5",
            b"x:1:1:1",
            b"4294967295:2:1:1",
        ] {
            assert!(
                BatchEntry::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Indexes 0, 2 and 9 open of 10 (mask 1010_0000 0100_0000).
        let (e, open) = parse_batch_record(10, b"3:10:2:1700:\xa0\x40").unwrap();
        assert_eq!((e.first_id, e.count, open), (10, 10, vec![0, 2, 9]));
        assert!(parse_batch_record(0, b"3:10:2").is_err());
        assert_eq!(queued_messages(2, Some(b"*10:5:1:1"), 40), 30);
        assert_eq!(queued_messages(2, Some(b"10:1:1:0:data"), 12), 2);
        assert_eq!(queued_messages(3, Some(b"hello"), 12), 3);
        assert_eq!(queued_messages(0, None, 12), 0);
    }

    #[test]
    fn garbage_is_explained() {
        for bad in [
            &b""[..],
            b"x",
            b"1:2",
            b"1:2:3:",
            b"1:2:3:x",
            b"1:2:3:4x:data",
            b"-1:2:3",
            b"1:x:3",
            b"4294967296:1:1",
            b"1.5:1:1",
            b"+1:1:1",
        ] {
            assert!(
                Envelope::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
