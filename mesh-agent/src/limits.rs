//! Counted capacity for what a peer can make the agent hold: a pod's proxied connections, an
//! HBONE connection's streams. A [`Slot`] is one unit held; it goes back when dropped.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

/// How many slots are held right now.
#[derive(Debug, Default, Clone)]
pub struct Gauge(Arc<AtomicUsize>);

/// One held unit of a [`Gauge`]; released on drop.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

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
}
