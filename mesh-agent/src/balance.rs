//! Per-request load balancing: power of two choices over peak-EWMA latency, as Linkerd does.
//!
//! Each endpoint keeps an exponentially weighted moving average of its response latency that
//! jumps straight to any higher sample (a peak) and decays towards lower ones with a time
//! constant, plus the number of requests in flight. A request picks two distinct endpoints at
//! random and goes to the one with the lower cost, `max(latency, floor) × (in flight + 1)`. The
//! floor (5 ms) makes small latency differences (one cluster hop versus none) no reason to
//! prefer an endpoint: between equal costs the choice is random, so a keep-alive client's
//! requests spread evenly until an endpoint is really slower or busier.

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// Latency assumed for an endpoint before its first response.
const DEFAULT_RTT: Duration = Duration::from_millis(5);
/// Latencies below this count as this: between endpoints of one Service, a few milliseconds
/// more (another node, a busier CPU) is no reason to load the others more; in-flight counts
/// and really slow endpoints still steer.
const RTT_FLOOR: Duration = Duration::from_millis(5);
/// How fast a peak is forgotten: a one-off stall (a descheduled process, a GC pause) stops
/// counting against an endpoint within a few hundred milliseconds, while an endpoint that is
/// slow on every response keeps its estimate up.
const DECAY: Duration = Duration::from_millis(250);

/// The load of one endpoint, and its health as outlier detection sees it.
#[derive(Debug)]
pub struct EndpointLoad {
    pending: AtomicU32,
    /// (estimate in ns, when it was last updated).
    estimate: Mutex<(f64, Instant)>,
    outlier: Mutex<OutlierState>,
}

#[derive(Debug, Default)]
struct OutlierState {
    /// Consecutive 5xx answers (and failures to answer), and consecutive gateway errors.
    errors_5xx: u32,
    errors_gateway: u32,
    /// Until when it is ejected.
    ejected_until: Option<Instant>,
    /// How many times it has been ejected: each ejection lasts that many base times.
    ejections: u32,
}

impl Default for EndpointLoad {
    fn default() -> Self {
        Self {
            pending: AtomicU32::new(0),
            estimate: Mutex::new((DEFAULT_RTT.as_nanos() as f64, Instant::now())),
            outlier: Mutex::default(),
        }
    }
}

/// How requests are spread over a Service's endpoints: P2C over peak-EWMA (the default, as
/// Linkerd), or the simple policies of Istio's DestinationRule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    #[default]
    PeakEwma,
    RoundRobin,
    /// Istio's LEAST_REQUEST: two random choices, the fewer requests in flight.
    LeastRequest,
    Random,
}

/// Istio's `outlierDetection`: endpoints that fail in a row are left out for a while.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl Default for Outlier {
    /// Istio's defaults: 5 consecutive 5xx, 30 s, at most 10% (but always at least one).
    fn default() -> Self {
        Self {
            consecutive_5xx: Some(5),
            consecutive_gateway: None,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

impl EndpointLoad {
    /// Whether outlier detection has it ejected at `now`.
    fn ejected(&self, now: Instant) -> bool {
        self.outlier
            .lock()
            .is_ok_and(|o| o.ejected_until.is_some_and(|t| now < t))
    }

    /// How many times it has been ejected.
    pub fn ejections(&self) -> u32 {
        self.outlier.lock().map_or(0, |o| o.ejections)
    }
}

/// Records the answer of endpoint `i` of `loads` (`status`, or 503/502/504 for a failure to
/// answer); `true` when this ejected it.
pub fn observe_outcome(
    loads: &[Arc<EndpointLoad>],
    i: usize,
    status: u16,
    outlier: &Outlier,
    now: Instant,
) -> bool {
    let Some(load) = loads.get(i) else {
        return false;
    };
    let tripped = {
        let Ok(mut o) = load.outlier.lock() else {
            return false;
        };
        if (500..600).contains(&status) {
            o.errors_5xx += 1;
        } else {
            o.errors_5xx = 0;
        }
        if matches!(status, 502..=504) {
            o.errors_gateway += 1;
        } else {
            o.errors_gateway = 0;
        }
        let already = o.ejected_until.is_some_and(|t| now < t);
        !already
            && (outlier
                .consecutive_5xx
                .is_some_and(|n| n > 0 && o.errors_5xx >= n)
                || outlier
                    .consecutive_gateway
                    .is_some_and(|n| n > 0 && o.errors_gateway >= n))
    };
    if !tripped {
        return false;
    }
    // At most the share allowed, but always at least one endpoint.
    let ejected = loads.iter().filter(|l| l.ejected(now)).count();
    let allowed = (loads.len() * outlier.max_ejection_percent as usize / 100).max(1);
    if ejected >= allowed {
        return false;
    }
    let Ok(mut o) = load.outlier.lock() else {
        return false;
    };
    o.ejections += 1;
    o.ejected_until = Some(now + outlier.base_ejection * o.ejections);
    o.errors_5xx = 0;
    o.errors_gateway = 0;
    true
}

impl EndpointLoad {
    /// The estimate decayed to `now`.
    fn rtt_ns(&self, now: Instant) -> f64 {
        let Ok(e) = self.estimate.lock() else {
            return DEFAULT_RTT.as_nanos() as f64;
        };
        let elapsed = now.saturating_duration_since(e.1).as_secs_f64();
        e.0 * (-elapsed / DECAY.as_secs_f64()).exp()
    }

    fn cost(&self, now: Instant) -> f64 {
        let rtt = self.rtt_ns(now).max(RTT_FLOOR.as_nanos() as f64);
        rtt * f64::from(self.pending.load(Ordering::Relaxed).saturating_add(1))
    }

    /// Records the start of a request; the guard records its latency when told, and its end
    /// when dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            since: Instant::now(),
        }
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let decayed = self.rtt_ns(now);
        if let Ok(mut e) = self.estimate.lock() {
            // A peak is taken at once; a lower sample only pulls the estimate down gradually.
            let next = if sample > decayed {
                sample
            } else {
                let w = (-(now.saturating_duration_since(e.1).as_secs_f64()) / DECAY.as_secs_f64())
                    .exp();
                decayed * w + sample * (1.0 - w)
            };
            *e = (next, now);
        }
    }
}

/// A request in flight to one endpoint.
pub struct InFlight {
    load: Arc<EndpointLoad>,
    since: Instant,
}

impl InFlight {
    /// The response (its head) arrived now.
    pub fn responded(&self) {
        let now = Instant::now();
        self.load.observe(now - self.since, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoint (index of `loads`) for the next request under `policy`, leaving out ejected
/// endpoints (unless every one is) when `outliers` (outlier detection is on); `next` is the
/// round-robin counter.
pub fn pick_with(
    policy: Policy,
    loads: &[Arc<EndpointLoad>],
    next: &std::sync::atomic::AtomicUsize,
    outliers: bool,
) -> Option<usize> {
    if !outliers {
        return pick_among(policy, loads, next, None);
    }
    let now = Instant::now();
    let ejected: Vec<usize> = match loads.iter().any(|l| l.ejected(now)) {
        true => (0..loads.len())
            .filter(|&i| loads[i].ejected(now))
            .collect(),
        false => Vec::new(),
    };
    let eligible: Vec<usize> = match ejected.len() {
        // The common case: nothing ejected, every endpoint.
        0 => return pick_among(policy, loads, next, None),
        n if n == loads.len() => (0..loads.len()).collect(),
        _ => (0..loads.len()).filter(|i| !ejected.contains(i)).collect(),
    };
    pick_among(policy, loads, next, Some(&eligible))
}

fn pick_among(
    policy: Policy,
    loads: &[Arc<EndpointLoad>],
    next: &std::sync::atomic::AtomicUsize,
    only: Option<&[usize]>,
) -> Option<usize> {
    let n = only.map_or(loads.len(), <[usize]>::len);
    let at = |k: usize| only.map_or(Some(k), |o| o.get(k).copied());
    if n == 0 {
        return None;
    }
    match policy {
        Policy::RoundRobin => at(next.fetch_add(1, Ordering::Relaxed) % n),
        Policy::Random => at(random_below(n)),
        Policy::PeakEwma | Policy::LeastRequest if n == 1 => at(0),
        Policy::PeakEwma | Policy::LeastRequest => {
            let a = random_below(n);
            let b = (a + 1 + random_below(n - 1)) % n;
            let (a, b) = (at(a)?, at(b)?);
            let now = Instant::now();
            let cost = |i: usize| -> Option<f64> {
                let l = loads.get(i)?;
                Some(match policy {
                    Policy::LeastRequest => f64::from(l.pending.load(Ordering::Relaxed)),
                    _ => l.cost(now),
                })
            };
            Some(match cost(a)?.partial_cmp(&cost(b)?) {
                Some(std::cmp::Ordering::Greater) => b,
                _ => a,
            })
        }
    }
}

/// A uniform-enough random number in `0..n` (xorshift per thread, seeded from the std hasher's
/// per-process random keys).
fn random_below(n: usize) -> usize {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(&h as *const _ as usize);
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        // Multiply-shift: no modulo bias worth the name for small n.
        ((u128::from(x) * n as u128) >> 64) as usize
    })
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// The index of the endpoint (of `loads`) the next request should go to by P2C over
    /// peak-EWMA; `None` if empty.
    fn pick(loads: &[Arc<EndpointLoad>]) -> Option<usize> {
        pick_among(
            Policy::PeakEwma,
            loads,
            &std::sync::atomic::AtomicUsize::new(0),
            None,
        )
    }

    fn loads(n: usize) -> Vec<Arc<EndpointLoad>> {
        (0..n).map(|_| Arc::default()).collect()
    }

    #[test]
    fn equal_endpoints_share_evenly() {
        let l = loads(3);
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            let i = pick(&l).unwrap_or(9);
            let f = l[i].start();
            f.responded();
            counts[i] += 1;
        }
        for c in counts {
            assert!((850..=1150).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn a_slow_endpoint_gets_less_and_a_busy_one_too() {
        let l = loads(3);
        // Endpoint 0 just answered in 50 ms.
        l[0].observe(Duration::from_millis(50), Instant::now());
        let mut counts = [0u32; 3];
        for _ in 0..1000 {
            counts[pick(&l).unwrap_or(9)] += 1;
        }
        assert!(counts[0] < 50, "{counts:?}");
        // Endpoint 1 holds 10 requests in flight.
        let held: Vec<_> = (0..10).map(|_| l[1].start()).collect();
        let mut counts = [0u32; 3];
        for _ in 0..1000 {
            counts[pick(&l).unwrap_or(9)] += 1;
        }
        assert!(counts[2] > 600, "{counts:?}");
        drop(held);
        assert_eq!(l[1].pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_failing_endpoint_is_ejected_for_longer_each_time_within_the_cap() {
        let l = loads(3);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let outlier = Outlier {
            consecutive_5xx: Some(3),
            consecutive_gateway: None,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50,
        };
        let t0 = Instant::now();
        assert!(!observe_outcome(&l, 0, 500, &outlier, t0));
        assert!(
            !observe_outcome(&l, 0, 200, &outlier, t0),
            "a success resets the count"
        );
        let tripped: Vec<bool> = (0..3)
            .map(|_| observe_outcome(&l, 0, 503, &outlier, t0))
            .collect();
        assert_eq!(tripped, [false, false, true]);
        assert!(l[0].ejected(t0 + Duration::from_secs(9)));
        assert!(!l[0].ejected(t0 + Duration::from_secs(10)));
        // While ejected it gets nothing; round robin goes over the other two.
        let picks: Vec<usize> = (0..4)
            .map(|_| pick_with(Policy::RoundRobin, &l, &next, true).unwrap())
            .collect();
        assert!(picks.iter().all(|&i| i != 0), "{picks:?}");
        // 50% of 3 is one endpoint: a second one failing stays in.
        for _ in 0..3 {
            assert!(!observe_outcome(&l, 1, 503, &outlier, t0));
        }
        // Readmitted, it fails again: twice the base time.
        let t1 = t0 + Duration::from_secs(10);
        for _ in 0..3 {
            observe_outcome(&l, 0, 503, &outlier, t1);
        }
        assert!(l[0].ejected(t1 + Duration::from_secs(19)));
        assert!(!l[0].ejected(t1 + Duration::from_secs(20)));
        assert_eq!(l[0].ejections(), 2);
    }

    #[test]
    fn the_simple_policies() {
        let l = loads(3);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let rr: Vec<usize> = (0..6)
            .map(|_| pick_with(Policy::RoundRobin, &l, &next, true).unwrap())
            .collect();
        assert_eq!(rr, [0, 1, 2, 0, 1, 2]);
        let held: Vec<_> = (0..5).map(|_| l[0].start()).collect();
        let mut counts = [0u32; 3];
        for _ in 0..300 {
            counts[pick_with(Policy::LeastRequest, &l, &next, true).unwrap()] += 1;
        }
        assert!(
            counts[0] < 120,
            "the busy endpoint loses every comparison: {counts:?}"
        );
        drop(held);
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            counts[pick_with(Policy::Random, &l, &next, true).unwrap()] += 1;
        }
        assert!(
            counts.iter().all(|c| (850..=1150).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn peaks_decay() {
        let l = Arc::new(EndpointLoad::default());
        let t0 = Instant::now();
        l.observe(Duration::from_millis(100), t0);
        let later = t0 + Duration::from_millis(500);
        let rtt = l.rtt_ns(later) / 1e6;
        assert!((12.0..15.0).contains(&rtt), "{rtt}");
        assert_eq!(pick(&[]), None);
        assert_eq!(pick(&loads(1)), Some(0));
    }
}
