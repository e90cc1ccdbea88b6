//! Restart back-off: exponential from a base to a cap, reset after a
//! long-enough run (the Kubernetes crash-loop shape: 1s, 2s, 4s … 60s).

use std::time::Duration;

/// The delay before the next restart of one instance.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    /// Delays handed out since the last reset.
    attempts: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            // A cap below the base would make the first delay the largest.
            max: max.max(base),
            attempts: 0,
        }
    }

    /// The next delay: `base * 2^n`, at most `max`.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempts.min(31)).unwrap_or(u32::MAX);
        self.attempts = self.attempts.saturating_add(1);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Starts over at `base` (the instance ran long enough to count as
    /// healthy, or its spec changed).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// A duration the way an operator reads it in a message: `100ms`, `4s`,
/// `1m30s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if !ms.is_multiple_of(1000) && ms < 10_000 {
        return format!("{:.1}s", d.as_secs_f64());
    }
    let secs = d.as_secs();
    if secs < 60 {
        format!("{secs}s")
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let got: Vec<u64> = (0..6).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 10, 10]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(100)), "100ms");
        assert_eq!(human(Duration::from_millis(1600)), "1.6s");
        assert_eq!(human(Duration::from_secs(4)), "4s");
        assert_eq!(human(Duration::from_secs(60)), "1m");
        assert_eq!(human(Duration::from_secs(90)), "1m30s");
    }
}
