//! Keeps large scratch buffers (packed panels, private accumulators) alive between kernel
//! calls. A fresh multi-megabyte `Vec` is a fresh `mmap`: every page faults and is zeroed
//! by the kernel on first touch, which cost ~5% of a T=512 attention call. Pooled buffers
//! keep their pages; the pool retains at most [`MAX_BYTES`] per element type.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};

/// Upper bound on what the pool of one element type keeps between calls.
pub const MAX_BYTES: usize = 256 << 20;
/// Buffers smaller than this come from the allocator's arenas anyway; not worth pooling.
const MIN_BYTES: usize = 64 << 10;

/// Element types with a pool.
pub trait Poolable: Copy + Send + 'static {
    fn pool() -> &'static Mutex<Vec<Vec<Self>>>;
}

static POOL_F32: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
static POOL_F64: Mutex<Vec<Vec<f64>>> = Mutex::new(Vec::new());

impl Poolable for f32 {
    fn pool() -> &'static Mutex<Vec<Vec<f32>>> {
        &POOL_F32
    }
}
impl Poolable for f64 {
    fn pool() -> &'static Mutex<Vec<Vec<f64>>> {
        &POOL_F64
    }
}

/// An empty `Vec` (with whatever capacity the pool had) that goes back to the pool on drop.
pub struct PoolVec<T: Poolable>(Vec<T>);

/// Takes the smallest pooled buffer with capacity ≥ `capacity` (else the largest one, which
/// the caller will grow), cleared.
pub fn take<T: Poolable>(capacity: usize) -> PoolVec<T> {
    let mut v = take_filled(capacity);
    v.clear();
    v
}

/// [`take`], but keeping the values the buffer held (its length is whatever its last user
/// left): callers that overwrite what they read then only pay for zeroing growth, not for
/// clearing megabytes on every call.
pub fn take_filled<T: Poolable>(capacity: usize) -> PoolVec<T> {
    let mut pool = T::pool().lock().unwrap_or_else(|e| e.into_inner());
    let fit = pool
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= capacity)
        .min_by_key(|(_, v)| v.capacity())
        .or_else(|| pool.iter().enumerate().max_by_key(|(_, v)| v.capacity()))
        .map(|(i, _)| i);
    let mut v = fit.map(|i| pool.swap_remove(i)).unwrap_or_default();
    drop(pool);
    v.reserve(capacity.saturating_sub(v.len()));
    PoolVec(v)
}

impl<T: Poolable> Drop for PoolVec<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        let bytes = v.capacity() * std::mem::size_of::<T>();
        if bytes < MIN_BYTES {
            return;
        }
        let mut pool = T::pool().lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = pool
            .iter()
            .map(|b| b.capacity() * std::mem::size_of::<T>())
            .sum();
        if held + bytes <= MAX_BYTES {
            pool.push(v);
        }
    }
}

impl<T: Poolable + Default> PoolVec<T> {
    /// Makes the buffer at least `len` long, keeping the values it held: a buffer too
    /// small goes back to the pool for the pool's best fit (so a scratch taken empty does
    /// not grow, copy and fault in pages on every call), and only growth past the length is
    /// zeroed.
    pub fn fit(&mut self, len: usize) {
        if self.0.capacity() < len {
            let small = std::mem::replace(self, take_filled(len));
            drop(small);
        }
        if self.0.len() < len {
            self.0.resize(len, T::default());
        }
    }
}

/// An empty buffer holding nothing from the pool (for scratch filled on first use).
impl<T: Poolable> Default for PoolVec<T> {
    fn default() -> Self {
        PoolVec(Vec::new())
    }
}

impl<T: Poolable> Deref for PoolVec<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.0
    }
}

impl<T: Poolable> DerefMut for PoolVec<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.0
    }
}

/// Every pool's lock, held: while a [`Locked`] lives no thread can be inside a pool
/// operation. A process that forks holds one across `fork()` (the binding's `pthread_atfork`
/// handlers), so the child never inherits a lock taken by a thread that does not exist there.
pub struct Locked {
    _f32: MutexGuard<'static, Vec<Vec<f32>>>,
    _f64: MutexGuard<'static, Vec<Vec<f64>>>,
}

/// Waits for every pool operation in flight (each holds its lock for microseconds) and locks
/// the pools until the returned value is dropped. Always in this order, the only place that
/// holds more than one pool lock.
pub fn lock_all() -> Locked {
    Locked {
        _f32: POOL_F32.lock().unwrap_or_else(|e| e.into_inner()),
        _f64: POOL_F64.lock().unwrap_or_else(|e| e.into_inner()),
    }
}

/// Frees every pooled buffer (e.g. after one unusually large call).
pub fn release_all() {
    POOL_F32.lock().unwrap_or_else(|e| e.into_inner()).clear();
    POOL_F64.lock().unwrap_or_else(|e| e.into_inner()).clear();
}
