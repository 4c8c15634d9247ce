//! Page-size hints for large output buffers.
//!
//! A large tensor the caller has just allocated (every call from Python) is a fresh
//! anonymous mapping: each 4 KiB page faults and is zeroed by the OS on its first write,
//! inside the kernel's timed loop. At T=16384 (a 32 MiB output) those faults made the
//! linear-attention forward ~45% slower than into a reused buffer. Asking for transparent
//! huge pages first turns 512 faults into one and spares TLB misses on the strided writes.

/// Asks the OS to back the whole 2 MiB extents inside `buf` with huge pages, where it
/// supports that (Linux, in the `madvise` or `always` THP modes); otherwise does nothing.
/// Only an advice: contents are unchanged, and extents are only those `buf` covers fully,
/// so nothing outside it changes and no memory is added beyond what writing it would use.
pub fn prefer_huge<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        // Linux's MADV_HUGEPAGE.
        const MADV_HUGEPAGE: i32 = 14;
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if b > a {
            // SAFETY: the range lies inside `buf`, which we borrow mutably; the advice does
            // not change its contents. A failure (e.g. a mapping that cannot take huge
            // pages) only means the advice is not taken.
            unsafe { madvise(a as *mut std::ffi::c_void, b - a, MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Below this, faulting pages in as the kernel writes them costs little.
const PREFAULT_MIN_BYTES: usize = 4 << 20;

/// [`prefer_huge`], then has the pool's threads first-touch disjoint halves (by address)
/// of a large output, writing `fill` once per 4 KiB (the kernel overwrites every value).
/// Left to the kernel's own writes, both threads would fault on the same huge pages at
/// once (tasks split heads, and every row holds all heads): the OS zeroes each racing
/// copy and discards the loser's, with both threads stalled.
pub fn prepare_output<T: Copy + Send + Sync>(buf: &mut [T], fill: T) {
    use rayon::prelude::*;
    prefer_huge(buf);
    let bytes = std::mem::size_of_val(buf);
    if bytes < PREFAULT_MIN_BYTES {
        return;
    }
    let page = (4096 / std::mem::size_of::<T>().max(1)).max(1);
    let part = buf.len().div_ceil(rayon::current_num_threads().max(1));
    buf.par_chunks_mut(part.max(1)).for_each(|c| {
        for i in (0..c.len()).step_by(page) {
            // SAFETY: `i` is in bounds; volatile so the store is not folded into the
            // kernel's later overwrite.
            unsafe { std::ptr::write_volatile(&mut c[i], fill) };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{prefer_huge, prepare_output};

    /// A large output gets `fill` at the start of every 4 KiB and nothing else changes; a
    /// small one is left alone.
    #[test]
    fn prepare_touches_one_value_per_page() {
        for n in [1000usize, (5 << 20) / 4 + 3] {
            let mut v: Vec<f32> = (0..n).map(|i| i as f32).collect();
            prepare_output(&mut v, -1.0);
            let big = n * 4 >= super::PREFAULT_MIN_BYTES;
            let touched = v.iter().filter(|&&x| x == -1.0).count();
            assert_eq!(touched > 0, big, "{n}");
            // at most one per page and per thread's part
            assert!(
                touched <= n / 1024 + 1 + rayon::current_num_threads(),
                "{n}"
            );
            for (i, &x) in v.iter().enumerate() {
                assert!(x == -1.0 || x == i as f32, "{n}: [{i}] = {x}");
            }
        }
    }

    /// The advice must leave contents alone (a wrong advice such as "don't need" would zero
    /// them), on buffers with and without whole 2 MiB extents.
    #[test]
    fn advice_keeps_contents() {
        for n in [0usize, 3, 1 << 20, 5 << 20] {
            let mut v: Vec<u32> = (0..n as u32).collect();
            prefer_huge(&mut v);
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32), "{n}");
        }
    }
}
