//! A per-source-address limit on refused joins, against guessing tokens
//! and probing node names.
//!
//! Every refused `Join` (a token that is not valid, expired or used up, a
//! take-over of an existing node, a bad name or CSR) counts against the
//! address it came from. Once an address has `max_failures` refusals within
//! `window`, every join from it is refused, also with a good token, until
//! the window passes: a guesser learns nothing more. Successful joins cost
//! nothing (a token's own use count bounds them), so a rack provisioned
//! from one NAT address is not slowed down.
//!
//! Memory is bounded: at most [`MAX_TRACKED`] addresses are remembered;
//! past that the oldest windows are forgotten first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most addresses remembered at once.
pub const MAX_TRACKED: usize = 65_536;

struct Window {
    start: Instant,
    failures: u32,
}

pub struct JoinLimiter {
    max_failures: u32,
    window: Duration,
    seen: Mutex<HashMap<IpAddr, Window>>,
}

impl JoinLimiter {
    /// `max_failures` of 0 turns the limit off.
    pub fn new(max_failures: u32, window: Duration) -> JoinLimiter {
        JoinLimiter {
            max_failures,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` when `ip` has used up its refusals.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        self.check_at(ip, Instant::now())
    }

    /// Counts one refused join from `ip`.
    pub fn refused(&self, ip: IpAddr) {
        self.refused_at(ip, Instant::now())
    }

    fn check_at(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.max_failures == 0 {
            return Ok(());
        }
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get(&ip) {
            Some(w) if now.duration_since(w.start) < self.window => {
                if w.failures >= self.max_failures {
                    Err(self.window - now.duration_since(w.start))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    fn refused_at(&self, ip: IpAddr, now: Instant) {
        if self.max_failures == 0 {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= MAX_TRACKED && !seen.contains_key(&ip) {
            let window = self.window;
            seen.retain(|_, w| now.duration_since(w.start) < window);
            if seen.len() >= MAX_TRACKED {
                if let Some(oldest) = seen.iter().min_by_key(|(_, w)| w.start).map(|(k, _)| *k) {
                    seen.remove(&oldest);
                }
            }
        }
        let w = seen.entry(ip).or_insert(Window {
            start: now,
            failures: 0,
        });
        if now.duration_since(w.start) >= self.window {
            *w = Window {
                start: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_after_its_failures_until_the_window_passes() {
        let l = JoinLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check_at(a, t0).is_ok());
            l.refused_at(a, t0);
        }
        let wait = l.check_at(a, t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        // Another address is not affected.
        assert!(l.check_at(b, t0).is_ok());
        // After the window, a fresh start.
        assert!(l.check_at(a, t0 + Duration::from_secs(61)).is_ok());
        l.refused_at(a, t0 + Duration::from_secs(61));
        assert!(l.check_at(a, t0 + Duration::from_secs(62)).is_ok());
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let l = JoinLimiter::new(0, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..100 {
            l.refused(a);
        }
        assert!(l.check(a).is_ok());
    }

    #[test]
    fn memory_stays_bounded() {
        let l = JoinLimiter::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            l.refused_at(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(l.seen.lock().unwrap().len() <= MAX_TRACKED);
    }
}
