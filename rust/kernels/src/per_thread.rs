//! Per-worker state for a rayon parallel loop: one lazily built value per thread of the
//! current pool, so tasks reuse scratch buffers (and private accumulators) without
//! allocating per task. `for_each_init` would build one per split instead, which with
//! one-task splits means one per task.

use std::sync::Mutex;

pub struct PerThread<S> {
    slots: Vec<Mutex<Option<S>>>,
}

impl<S> PerThread<S> {
    /// One slot per thread of the pool the caller runs in (or will run its loop in).
    pub fn new() -> Self {
        let n = rayon::current_num_threads().max(1);
        PerThread {
            slots: (0..n).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Runs `f` on this worker's value, building it with `init` on first use. The lock is
    /// uncontended: a worker runs one task at a time, and `f` must not start nested rayon
    /// work (which could run another task on this thread while the slot is held).
    pub fn with<R>(&self, init: impl FnOnce() -> S, f: impl FnOnce(&mut S) -> R) -> R {
        let i = rayon::current_thread_index().unwrap_or(0) % self.slots.len();
        let mut slot = self.slots[i].lock().unwrap_or_else(|e| e.into_inner());
        f(slot.get_or_insert_with(init))
    }

    /// The values that were built.
    pub fn into_values(self) -> Vec<S> {
        self.slots
            .into_iter()
            .filter_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }
}

impl<S> Default for PerThread<S> {
    fn default() -> Self {
        Self::new()
    }
}
