//! Fork safety. A forked child has only the thread that called `fork()`: the rayon pool's
//! workers are gone while the pool handle stays, so the child's first parallel call would
//! wait forever for them, and a lock held by any other thread at the moment of the fork
//! (the pool slot, the scratch pools) would stay locked there forever.
//!
//! `pthread_atfork` handlers close both holes: before the fork the calling thread takes every
//! lock the kernels use (each is held for microseconds, never across a kernel call), the
//! parent releases them, and the child releases them after forgetting the parent's pool, so
//! its first call builds a pool of its own. The SIMD setting is an atomic and survives as is.

use crate::runtime;
use fastattn_kernels::buffer_pool;
use std::cell::RefCell;
use std::sync::{Arc, MutexGuard, Once};

type PoolSlot = Option<(usize, Arc<rayon::ThreadPool>)>;

/// The locks held across one fork, by the forking thread.
struct Held {
    pool: MutexGuard<'static, PoolSlot>,
    _buffers: buffer_pool::Locked,
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

extern "C" fn prepare() {
    let held = Held {
        pool: runtime::pool_slot(),
        _buffers: buffer_pool::lock_all(),
    };
    HELD.with(|h| *h.borrow_mut() = Some(held));
}

extern "C" fn parent() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}

extern "C" fn child() {
    HELD.with(|h| {
        if let Some(mut held) = h.borrow_mut().take() {
            // Its workers do not exist here: dropping it would signal threads that are not
            // there, so it is leaked (one pool's bookkeeping, once per fork).
            if let Some(old) = held.pool.take() {
                std::mem::forget(old);
            }
        }
    });
}

#[cfg(unix)]
extern "C" {
    fn pthread_atfork(
        prepare: Option<extern "C" fn()>,
        parent: Option<extern "C" fn()>,
        child: Option<extern "C" fn()>,
    ) -> std::os::raw::c_int;
}

/// Registers the handlers once per process (module import; a re-import registers nothing).
pub fn install() -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut rc = 0;
    ONCE.call_once(|| {
        #[cfg(unix)]
        {
            // SAFETY: the handlers are plain functions that live as long as the process
            // (the extension is never unloaded by CPython).
            rc = unsafe { pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        }
    });
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("pthread_atfork failed (error {rc})"))
    }
}
