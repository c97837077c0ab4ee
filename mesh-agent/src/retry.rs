//! Retries: which answers a request is tried again for, how many times, and the budget that
//! keeps retries from multiplying load on a struggling backend (Linkerd's model: retries may add
//! at most `ratio` of the requests, plus a floor per second, over a sliding window).
//!
//! Pure decisions; the proxy replays the request.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// When and how often a rule's requests are retried.
#[derive(Debug)]
pub struct RetryPolicy {
    pub on: RetryOn,
    /// Retries after the first attempt.
    pub limit: u32,
    /// Each attempt's own limit on the wait for a response head.
    pub per_try_timeout: Option<Duration>,
    pub budget: Budget,
}

/// The answers that are retried.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetryOn {
    /// HTTP statuses, as inclusive ranges (`5xx` is 500–599, `gateway-error` 502–504).
    pub statuses: Vec<(u16, u16)>,
    /// gRPC status codes (from trailers-only answers, where a failed call's status is).
    pub grpc: Vec<u32>,
    /// No answer at all: the endpoint could not be reached or reset the request.
    pub connect_failure: bool,
}

impl RetryOn {
    /// Whether an answer with `status` (and `grpc`, its gRPC status if any) is retried.
    pub fn status(&self, status: u16, grpc: Option<u32>) -> bool {
        self.statuses
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&status))
            || grpc.is_some_and(|g| self.grpc.contains(&g))
    }

    /// Linkerd's `retry.linkerd.io/http`: `5xx`, `gateway-error` and status codes or ranges
    /// (`500`, `502-504`), comma-separated.
    pub fn parse_http(text: &str) -> Result<RetryOn, String> {
        let mut on = RetryOn {
            connect_failure: true,
            ..RetryOn::default()
        };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let range = match part {
                "5xx" => (500, 599),
                "gateway-error" => (502, 504),
                _ => {
                    let code = |s: &str| {
                        s.trim()
                            .parse::<u16>()
                            .ok()
                            .filter(|c| (100..=599).contains(c))
                            .ok_or_else(|| {
                                format!("{part:?} is not 5xx, gateway-error, a status code or a range such as 502-504")
                            })
                    };
                    match part.split_once('-') {
                        Some((lo, hi)) => {
                            let (lo, hi) = (code(lo)?, code(hi)?);
                            if lo > hi {
                                return Err(format!("{part:?}: the range is empty"));
                            }
                            (lo, hi)
                        }
                        None => {
                            let c = code(part)?;
                            (c, c)
                        }
                    }
                }
            };
            on.statuses.push(range);
        }
        Ok(on)
    }

    /// Linkerd's `retry.linkerd.io/grpc` (and Istio's gRPC `retryOn` names): status names
    /// such as `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
    /// `unavailable`, comma-separated.
    pub fn parse_grpc(text: &str) -> Result<Vec<u32>, String> {
        text.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|name| {
                grpc_code(name).ok_or_else(|| format!("{name:?} is not a gRPC status name"))
            })
            .collect()
    }
}

/// A gRPC status code by its name (`deadline-exceeded`, `DEADLINE_EXCEEDED`).
pub fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "ok",
        "cancelled",
        "unknown",
        "invalid-argument",
        "deadline-exceeded",
        "not-found",
        "already-exists",
        "permission-denied",
        "resource-exhausted",
        "failed-precondition",
        "aborted",
        "out-of-range",
        "unimplemented",
        "internal",
        "unavailable",
        "data-loss",
        "unauthenticated",
    ];
    let name = name.to_ascii_lowercase().replace('_', "-");
    NAMES.iter().position(|n| *n == name).map(|i| i as u32)
}

/// How much retrying a rule may add: at most `ratio` of its requests over the last `window`,
/// plus `min_per_second` (so that a trickle of requests can still be retried).
#[derive(Debug)]
pub struct Budget {
    ratio: f64,
    min_per_second: u32,
    window: Duration,
    counts: Mutex<Window>,
}

/// Requests and retries per slot of a sliding window (ten slots).
#[derive(Debug)]
struct Window {
    /// When slot 0 began.
    start: Instant,
    /// Index of the slot `start` is in, counting from the first.
    current: u64,
    slots: [(u64, u64); SLOTS],
}

const SLOTS: usize = 10;

impl Default for Budget {
    /// Linkerd's default budget: 20% extra load, 10 retries a second, over 10 s.
    fn default() -> Self {
        Budget::new(0.2, 10, Duration::from_secs(10))
    }
}

impl Budget {
    pub fn new(ratio: f64, min_per_second: u32, window: Duration) -> Budget {
        Budget {
            ratio,
            min_per_second,
            window: window.max(Duration::from_millis(SLOTS as u64)),
            counts: Mutex::new(Window {
                start: Instant::now(),
                current: 0,
                slots: [(0, 0); SLOTS],
            }),
        }
    }

    /// Counts a request (a first attempt).
    pub fn request(&self, now: Instant) {
        self.with(now, |slot| slot.0 += 1);
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn try_retry(&self, now: Instant) -> bool {
        let Ok(mut w) = self.counts.lock() else {
            return false;
        };
        self.advance(&mut w, now);
        let (requests, retries) = w
            .slots
            .iter()
            .fold((0u64, 0u64), |(a, b), s| (a + s.0, b + s.1));
        let floor = f64::from(self.min_per_second) * self.window.as_secs_f64();
        let allowed = floor + self.ratio * requests as f64;
        if (retries as f64) < allowed {
            let i = (w.current % SLOTS as u64) as usize;
            w.slots[i].1 += 1;
            true
        } else {
            false
        }
    }

    fn with(&self, now: Instant, f: impl FnOnce(&mut (u64, u64))) {
        if let Ok(mut w) = self.counts.lock() {
            self.advance(&mut w, now);
            let i = (w.current % SLOTS as u64) as usize;
            f(&mut w.slots[i]);
        }
    }

    /// Moves the window to `now`, clearing the slots it leaves behind.
    fn advance(&self, w: &mut Window, now: Instant) {
        let slot = self.window / SLOTS as u32;
        let index =
            (now.saturating_duration_since(w.start).as_nanos() / slot.as_nanos().max(1)) as u64;
        let steps = index.saturating_sub(w.current).min(SLOTS as u64);
        for k in 1..=steps {
            let i = ((w.current + k) % SLOTS as u64) as usize;
            w.slots[i] = (0, 0);
        }
        w.current = w.current.max(index);
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn linkerd_retry_conditions() {
        let on = RetryOn::parse_http("5xx").unwrap();
        assert!(on.status(503, None) && on.status(500, None) && !on.status(404, None));
        let on = RetryOn::parse_http("gateway-error, 429").unwrap();
        assert!(on.status(502, None) && on.status(504, None) && on.status(429, None));
        assert!(!on.status(500, None));
        let on = RetryOn::parse_http("500-502").unwrap();
        assert!(on.status(501, None) && !on.status(503, None));
        assert!(RetryOn::parse_http("5xy").unwrap_err().contains("\"5xy\""));
        assert!(RetryOn::parse_http("504-502").is_err());
        assert_eq!(
            RetryOn::parse_grpc("cancelled,deadline-exceeded,UNAVAILABLE").unwrap(),
            [1, 4, 14]
        );
        assert!(RetryOn::parse_grpc("sometimes").is_err());
    }

    #[test]
    fn the_budget_allows_its_ratio_plus_its_floor_and_forgets_old_load() {
        let budget = Budget::new(0.2, 1, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..100 {
            budget.request(t0);
        }
        // 20% of 100, plus 1 a second over 10 s.
        let granted = (0..100).filter(|_| budget.try_retry(t0)).count();
        assert_eq!(granted, 30);
        // A window later, both the requests and the retries have aged out: the floor again.
        let later = t0 + Duration::from_secs(11);
        let granted = (0..100).filter(|_| budget.try_retry(later)).count();
        assert_eq!(granted, 10);
    }
}
