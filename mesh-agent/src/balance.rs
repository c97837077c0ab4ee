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

/// The load of one endpoint.
#[derive(Debug)]
pub struct EndpointLoad {
    pending: AtomicU32,
    /// (estimate in ns, when it was last updated).
    estimate: Mutex<(f64, Instant)>,
}

impl Default for EndpointLoad {
    fn default() -> Self {
        Self {
            pending: AtomicU32::new(0),
            estimate: Mutex::new((DEFAULT_RTT.as_nanos() as f64, Instant::now())),
        }
    }
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

/// The index of the endpoint (of `loads`) the next request should go to; `None` if empty.
pub fn pick(loads: &[Arc<EndpointLoad>]) -> Option<usize> {
    match loads.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = random_below(n);
            // A second, distinct endpoint.
            let b = (a + 1 + random_below(n - 1)) % n;
            let now = Instant::now();
            let (ca, cb) = (loads.get(a)?.cost(now), loads.get(b)?.cost(now));
            Some(match ca.partial_cmp(&cb) {
                Some(std::cmp::Ordering::Less) => a,
                Some(std::cmp::Ordering::Greater) => b,
                // Equal: `a` was as random as `b`.
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
    use super::*;

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
