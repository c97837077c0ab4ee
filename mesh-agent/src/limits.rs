//! Counted capacity for what a peer can make the agent hold: a pod's proxied connections, an
//! HBONE connection's streams. A [`Slot`] is one unit held; it goes back when dropped.

use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc,
};

/// How many slots are held right now.
#[derive(Debug, Default, Clone)]
pub struct Gauge(Arc<AtomicUsize>);

/// One held unit of a [`Gauge`]; released on drop.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Whether this is a slot of `gauge`.
    pub fn of(&self, gauge: &Gauge) -> bool {
        Arc::ptr_eq(&self.0, &gauge.0)
    }
}

impl Gauge {
    /// Takes a slot, unless `limit` are already held.
    pub fn try_take(&self, limit: usize) -> Option<Slot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.0.clone()))
    }

    /// Takes a slot whatever the count (the first tunnel of a fresh connection).
    pub fn take(&self) -> Slot {
        self.0.fetch_add(1, Ordering::AcqRel);
        Slot(self.0.clone())
    }

    pub fn held(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Bytes of buffer the proxy may hold across all connections. What does not fit is not an
/// error: the connection keeps its small buffers and goes slower.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: Arc<AtomicUsize>,
    refused: AtomicU64,
}

/// Bytes held from a [`ByteBudget`]; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    used: Arc<AtomicUsize>,
    bytes: usize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: Arc::default(),
            refused: AtomicU64::new(0),
        }
    }

    /// Reserves `bytes`, unless that would pass the limit (counted as refused).
    pub fn try_reserve(&self, bytes: usize) -> Option<Reservation> {
        let ok = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(bytes).filter(|n| *n <= self.limit)
            })
            .is_ok();
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Reservation {
            used: self.used.clone(),
            bytes,
        })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Reservations refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_back() {
        let g = Gauge::default();
        let a = g.try_take(2);
        let b = g.try_take(2);
        assert!(a.is_some() && b.is_some());
        assert!(g.try_take(2).is_none());
        drop(a);
        assert_eq!(g.held(), 1);
        assert!(g.try_take(2).is_some());
    }

    #[test]
    fn budget_refuses_past_its_limit_and_recovers() {
        let b = ByteBudget::new(100);
        let a = b.try_reserve(60);
        assert!(a.is_some());
        assert!(b.try_reserve(60).is_none());
        assert_eq!((b.used(), b.refused()), (60, 1));
        drop(a);
        assert!(b.try_reserve(100).is_some());
    }
}
