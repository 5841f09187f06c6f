//! A faithful port of the task's `eventHandler`: wait a uniform integer delay in `0..delay_max_ms`,
//! then fail with probability `error_rate`.
//!
//! With a seed, both draws are a pure function of `(seed, id)` (SplitMix64, written out here so the
//! mapping never changes with a crate upgrade): any handler, in any process, after any number of
//! re-deliveries, computes the same outcome for the same message, and `sim` can predict the exact
//! error set of a run. Without a seed each draw comes from the thread's RNG, like `Math.random()`.

use rand::Rng;

/// What `eventHandler` decided for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// How long the handler "works" before calling back.
    pub delay_ms: u64,
    /// `true` when the callback gets an error (the message goes to the error store).
    pub failed: bool,
}

/// The knobs of `eventHandler`; the task's own values are the defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutcomeModel {
    /// `Some(seed)`: outcomes are a pure function of `(seed, id)`.
    pub seed: Option<u64>,
    /// Probability of an error, in `[0, 1]` (task: `Math.random() > 0.85`, i.e. 0.15).
    pub error_rate: f64,
    /// Delays are uniform integers in `0..delay_max_ms` (task: `Math.floor(Math.random()*1000)`).
    pub delay_max_ms: u64,
}

impl Default for OutcomeModel {
    fn default() -> Self {
        OutcomeModel {
            seed: None,
            error_rate: 0.15,
            delay_max_ms: 1000,
        }
    }
}

impl OutcomeModel {
    /// The outcome for message `id`: deterministic with a seed, random without.
    pub fn decide(&self, id: u64) -> Outcome {
        match self.seed {
            Some(seed) => seeded(seed, id, self.error_rate, self.delay_max_ms),
            None => {
                let mut rng = rand::rng();
                let u: f64 = rng.random();
                let r: u64 = rng.random();
                Outcome {
                    delay_ms: scale(r, self.delay_max_ms),
                    failed: u < self.error_rate,
                }
            }
        }
    }
}

/// The seeded outcome of message `id`; `sim` calls this to predict the error set.
pub fn seeded(seed: u64, id: u64, error_rate: f64, delay_max_ms: u64) -> Outcome {
    let a = splitmix64(seed ^ splitmix64(id));
    let b = splitmix64(a);
    // 53 random bits as a float in [0, 1), like Math.random().
    let u = (b >> 11) as f64 / (1u64 << 53) as f64;
    Outcome {
        delay_ms: scale(a, delay_max_ms),
        failed: u < error_rate,
    }
}

/// Maps a uniform `u64` onto `0..max` without modulo bias worth the name (Lemire's multiply-shift).
fn scale(r: u64, max: u64) -> u64 {
    ((r as u128 * max as u128) >> 64) as u64
}

/// SplitMix64 (Steele, Lea, Flood 2014): a fast, well-mixed 64-bit finaliser.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_outcomes_are_a_function_of_seed_and_id() {
        let a = seeded(7, 12345, 0.15, 1000);
        assert_eq!(a, seeded(7, 12345, 0.15, 1000));
        let differs = (0..100).any(|id| seeded(7, id, 0.15, 1000) != seeded(8, id, 0.15, 1000));
        assert!(differs, "another seed must give other outcomes");
    }

    #[test]
    fn seeded_outcomes_follow_the_task_distribution() {
        let n = 200_000u64;
        let mut failed = 0u64;
        let mut delay_sum = 0u64;
        let mut delay_max = 0u64;
        for id in 0..n {
            let o = seeded(42, id, 0.15, 1000);
            failed += o.failed as u64;
            delay_sum += o.delay_ms;
            delay_max = delay_max.max(o.delay_ms);
        }
        let rate = failed as f64 / n as f64;
        assert!((rate - 0.15).abs() < 0.005, "error rate {rate}");
        let mean = delay_sum as f64 / n as f64;
        assert!((mean - 499.5).abs() < 5.0, "mean delay {mean}");
        assert_eq!(delay_max, 999, "delays are integers in 0..1000");
    }

    #[test]
    fn edge_rates_and_zero_delay() {
        for id in 0..1000 {
            assert!(!seeded(1, id, 0.0, 0).failed);
            assert!(seeded(1, id, 1.0, 0).failed);
            assert_eq!(seeded(1, id, 0.5, 0).delay_ms, 0);
        }
        let m = OutcomeModel {
            seed: None,
            error_rate: 0.0,
            delay_max_ms: 5,
        };
        for id in 0..1000 {
            let o = m.decide(id);
            assert!(!o.failed && o.delay_ms < 5);
        }
    }
}
