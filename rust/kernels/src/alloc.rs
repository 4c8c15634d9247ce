//! A global allocator that puts every heap block of 64 bytes or more on a 64-byte (cache
//! line) boundary, for the binaries that link the kernels (the Python extension, the
//! examples) to install with `#[global_allocator]`.
//!
//! The kernels' scratch (packed panels, transposed lines, score blocks) lives in `Vec`s,
//! which the system allocator aligns to 16 bytes only; then every full-width AVX-512 load
//! or store of a row splits two cache lines. Aligning the blocks made the small-window 2-D
//! forward ~10% faster.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of at least this many bytes are cache-line aligned.
const MIN_SIZE: usize = 64;
const LINE: usize = 64;

pub struct CacheLineAligned;

#[inline]
fn widen(layout: Layout) -> Layout {
    if layout.size() >= MIN_SIZE && layout.align() < LINE {
        // SAFETY: LINE is a power of two and the size is unchanged (a size valid with a
        // smaller alignment rounds up to at most isize::MAX - (LINE - 1) for any real block).
        unsafe { Layout::from_size_align_unchecked(layout.size(), LINE) }
    } else {
        layout
    }
}

// SAFETY: every block is allocated and freed by `System` with the same widened layout,
// which only ever has a larger alignment than asked for.
unsafe impl GlobalAlloc for CacheLineAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(widen(layout))
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(widen(layout))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, widen(layout))
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = widen(layout);
        // SAFETY: the caller guarantees `new_size` is valid with `layout.align()`.
        let new = widen(Layout::from_size_align_unchecked(new_size, layout.align()));
        if old.align() == new.align() {
            return System.realloc(ptr, old, new_size);
        }
        let p = System.alloc(new);
        if !p.is_null() {
            std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
            System.dealloc(ptr, old);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    // The unit-test binary installs `CacheLineAligned` (lib.rs), so plain `Vec`s here go
    // through it.

    #[test]
    fn blocks_of_a_line_or_more_are_line_aligned_and_keep_their_values() {
        for n in [16usize, 17, 100, 1000, 100_000, 3_000_000] {
            let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
            assert_eq!(v.as_ptr() as usize % 64, 0, "len {n}");
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
        }
        // Growing from below the threshold to above it moves the block to a line boundary
        // and keeps the values (the realloc path that changes alignment).
        let mut v: Vec<u8> = (0..40).collect();
        for target in [64usize, 65, 5000, 1 << 20] {
            v.extend((v.len()..target).map(|i| i as u8));
            assert_eq!(v.as_ptr() as usize % 64, 0, "len {target}");
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u8));
        }
        // Shrinking back below it keeps the values too.
        v.truncate(10);
        v.shrink_to_fit();
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u8));
        let z = vec![0f64; 4096];
        assert_eq!(z.as_ptr() as usize % 64, 0);
        assert!(z.iter().all(|&x| x == 0.0));
    }
}
