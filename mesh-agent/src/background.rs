//! Work that must not delay the data path: parsing the desired state and building snapshots.
//!
//! Such work runs on threads of its own, niced, and gives the CPU up after every [`SLICE`] of
//! work ([`checkpoint`]). Nice alone is not enough: the kernel's scheduler (EEVDF) lets a
//! running thread finish its slice before a thread it woke may run, whatever the running
//! thread's priority, so a proxy worker or a pod woken while a large apply runs waited for the
//! next scheduler tick (4 ms at `HZ=250`); measured in `cargo xtask bench --scale`. A thread
//! that yields lets them run within a slice; its share of the CPU under contention is still
//! the nice value's.

use std::{
    cell::Cell,
    time::{Duration, Instant},
};

/// The nice value of background threads.
pub const NICE: libc::c_int = 10;
/// The longest stretch of background work between two chances for another thread to run.
pub const SLICE: Duration = Duration::from_micros(250);

thread_local! {
    /// On a background thread: when it last gave the CPU up.
    static LAST_YIELD: Cell<Option<Instant>> = const { Cell::new(None) };
    /// How many times this thread gave the CPU up at a checkpoint.
    static YIELDS: Cell<u64> = const { Cell::new(0) };
}

/// Makes the calling thread a background thread: niced, and yielding at [`checkpoint`]s.
/// Threads it starts inherit the nice value, not the yielding: they call this themselves
/// (see [`is_background`]).
pub fn enter() {
    // SAFETY: plain syscalls on this thread.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE);
    }
    LAST_YIELD.set(Some(Instant::now()));
}

/// Whether the calling thread is a background thread.
pub fn is_background() -> bool {
    LAST_YIELD.get().is_some()
}

/// Called between small steps of long work (a document parsed, an object applied, a service
/// rebuilt): on a background thread that has worked for a [`SLICE`] since it last did, yields
/// the CPU to whatever else is ready to run. Anywhere else it does nothing.
#[inline]
pub fn checkpoint() {
    let Some(last) = LAST_YIELD.get() else { return };
    let now = Instant::now();
    if now.duration_since(last) >= SLICE {
        std::thread::yield_now();
        YIELDS.set(YIELDS.get() + 1);
        LAST_YIELD.set(Some(Instant::now()));
    }
}

/// How many times the calling thread yielded at a checkpoint.
pub fn yields() -> u64 {
    YIELDS.get()
}

/// Hands the memory a large apply or the agent's start-up freed (parse buffers, replaced
/// objects, the eBPF object's loading) back to the system: without it the allocator keeps that
/// peak in its free lists for good.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy_with_checkpoints(for_how_long: Duration) {
        let started = Instant::now();
        while started.elapsed() < for_how_long {
            checkpoint();
        }
    }

    #[test]
    fn a_background_thread_is_niced_and_yields_once_per_slice_of_work() {
        // On a thread of its own: it ends niced.
        let tested = std::thread::spawn(|| {
            busy_with_checkpoints(Duration::from_millis(5));
            assert_eq!(
                yields(),
                0,
                "an ordinary thread never yields at a checkpoint"
            );
            assert!(!is_background());

            enter();
            assert!(is_background());
            // SAFETY: a plain syscall.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as _) };
            assert_eq!(nice, NICE);
            let work = Duration::from_millis(20);
            busy_with_checkpoints(work);
            let most = (work.as_micros() / SLICE.as_micros()) as u64 + 1;
            // Fewer when the thread itself was kept off the CPU for a while.
            assert!(
                (1..=most).contains(&yields()),
                "{} yields in {work:?} of work",
                yields()
            );
        })
        .join();
        if let Err(panic) = tested {
            std::panic::resume_unwind(panic);
        }
    }
}
