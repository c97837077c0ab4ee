//! Graceful drain on SIGTERM: the listeners stop accepting, HTTP connections finish the
//! request they are on and close (HTTP/2 ones, HBONE peers among them, get a GOAWAY), and the
//! agent waits for what it still carries, up to `--drain-timeout`.
//!
//! [`Drain`] is the agent's side: it starts the drain and waits for it to finish. Each
//! listener and connection holds a [`Watch`]: it hears that the drain started, and a
//! connection counts itself in flight with [`Watch::hold`] for as long as it lives.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use tokio::sync::{watch, Notify};

/// Starts the drain and waits for it.
pub struct Drain {
    started: watch::Sender<bool>,
    in_flight: Arc<InFlight>,
}

/// What listeners and connections hold: whether the drain started, and the count they
/// add themselves to.
#[derive(Clone)]
pub struct Watch {
    started: watch::Receiver<bool>,
    in_flight: Arc<InFlight>,
}

#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    /// Woken when the count drops to zero.
    idle: Notify,
}

/// One connection in flight; it leaves the count when dropped.
#[must_use = "the connection counts as in flight only while this is held"]
pub struct Held(Arc<InFlight>);

impl Drop for Held {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    pub fn new() -> (Drain, Watch) {
        let (started, rx) = watch::channel(false);
        let in_flight = Arc::new(InFlight::default());
        let watch = Watch {
            started: rx,
            in_flight: in_flight.clone(),
        };
        (Drain { started, in_flight }, watch)
    }

    /// Tells every listener and connection that the agent is draining.
    pub fn start(&self) {
        self.started.send_replace(true);
    }

    /// Connections still in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.count.load(Ordering::Acquire)
    }

    /// Resolves once no connection is in flight.
    pub async fn finished(&self) {
        loop {
            let idle = self.in_flight.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Watch {
    /// Counts a connection as in flight until the returned guard is dropped.
    pub fn hold(&self) -> Held {
        self.in_flight.count.fetch_add(1, Ordering::AcqRel);
        Held(self.in_flight.clone())
    }

    pub fn is_draining(&self) -> bool {
        *self.started.borrow()
    }

    /// Resolves once the drain has started (at once if it has).
    pub async fn draining(&self) {
        let mut started = self.started.clone();
        // An error means the `Drain` is gone: the agent is stopping anyway.
        let _ = started.wait_for(|s| *s).await;
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::expect_used, reason = "tests")]
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_drain_finishes_when_the_last_connection_ends() {
        let (drain, watch) = Drain::new();
        let first = watch.hold();
        let second = watch.hold();
        assert!(!watch.is_draining());
        drain.start();
        assert!(watch.is_draining());
        tokio::time::timeout(Duration::from_millis(100), watch.draining())
            .await
            .expect("a started drain is heard at once");
        drop(first);
        assert_eq!(drain.in_flight(), 1);
        let waited = tokio::time::timeout(Duration::from_millis(50), drain.finished()).await;
        assert!(waited.is_err(), "one connection is still in flight");
        let finished = tokio::spawn(async move { drain.finished().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(second);
        tokio::time::timeout(Duration::from_millis(100), finished)
            .await
            .expect("finished once the last connection ended")
            .expect("task");
    }
}
