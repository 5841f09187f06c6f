//! The message payload: `"<id>:<epoch>:<generated_us>"` in ASCII decimal, plus `":<reclaims>"`
//! once a dead handler's message has been given back (reclaimed).
//!
//! The id is the task's `getMessage()` value; the epoch says which generator (fencing token) made
//! it; the generation time comes from Redis `TIME`, so latencies never compare two machines' clocks;
//! the reclaim count lets reclaim.lua set aside a poison message (one every handler dies holding)
//! after a bounded number of deliveries. Lua builds payloads (generate.lua, reclaim.lua) and Rust
//! only parses them.

/// A parsed message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Message {
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

impl Message {
    /// Parses a payload, or says what is wrong with it (the reason goes to the error store).
    pub fn parse(payload: &str) -> Result<Message, String> {
        let mut parts = payload.split(':');
        let mut field = |name: &str| -> Result<u64, String> {
            let raw = parts
                .next()
                .ok_or_else(|| format!("missing field {name}"))?;
            raw.parse::<u64>()
                .map_err(|_| format!("field {name} is not a non-negative integer: {raw:?}"))
        };
        let id = field("id")?;
        let epoch = field("epoch")?;
        let generated_us = field("generated_us")?;
        let reclaims = match parts.next() {
            None => 0,
            Some(raw) => raw
                .parse::<u64>()
                .map_err(|_| format!("field reclaims is not a non-negative integer: {raw:?}"))?,
        };
        if parts.next().is_some() {
            return Err("more than four fields".into());
        }
        if id > ID_MAX {
            return Err(format!("id {id} exceeds {ID_MAX}"));
        }
        Ok(Message {
            id,
            epoch,
            generated_us,
            reclaims,
        })
    }

    /// The payload form, as generate.lua writes it (used by tests and benches).
    pub fn encode(&self) -> String {
        match self.reclaims {
            0 => format!("{}:{}:{}", self.id, self.epoch, self.generated_us),
            n => format!("{}:{}:{}:{n}", self.id, self.epoch, self.generated_us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = Message {
            id: 7,
            epoch: 3,
            generated_us: 1_700_000_000_000_000,
            reclaims: 0,
        };
        assert_eq!(m.encode(), "7:3:1700000000000000");
        assert_eq!(Message::parse(&m.encode()), Ok(m));
        let r = Message { reclaims: 2, ..m };
        assert_eq!(r.encode(), "7:3:1700000000000000:2");
        assert_eq!(Message::parse(&r.encode()), Ok(r));
    }

    #[test]
    fn garbage_is_explained() {
        for bad in [
            "",
            "x",
            "1:2",
            "1:2:3:4:5",
            "1:2:3:x",
            "-1:2:3",
            "1:x:3",
            "4294967296:1:1",
            "1.5:1:1",
        ] {
            assert!(Message::parse(bad).is_err(), "{bad:?}");
        }
    }
}
