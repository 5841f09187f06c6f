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
