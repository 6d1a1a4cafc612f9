//! The binary's allocator: mimalloc.
//!
//! A proxied request makes about ten allocations (header values, buffers, the forward
//! future), and glibc malloc's slow paths are costly there (benches/RESULTS.md has the
//! figures, from `benches/callgrind.sh`). The `mimalloc` crate's allocator calls
//! `mi_malloc_aligned` for every layout, and for blocks over 1 KiB that takes mimalloc's
//! over-allocating aligned path even when the alignment asked for is the natural one; this
//! one asks for plain `mi_malloc` whenever that alignment is enough.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every block of `mi_malloc` has when it is at least this large (mimalloc's
/// `MI_MAX_ALIGN_SIZE`, as for the C `malloc` on 64-bit platforms).
const NATURAL_ALIGN: usize = 16;

/// mimalloc as a Rust global allocator (set in `main.rs`).
pub struct Mimalloc;

/// Whether plain `mi_malloc(size)` already gives the alignment `layout` asks for.
fn natural(size: usize, align: usize) -> bool {
    align <= NATURAL_ALIGN && align <= size
}

// SAFETY: every pointer returned comes from mimalloc with at least `layout.align()` alignment
// (plain allocations only when `natural` holds), and `mi_free`/`mi_realloc*` accept pointers
// from any of mimalloc's allocation functions.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if natural(layout.size(), layout.align()) {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if natural(layout.size(), layout.align()) {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if natural(new_size, layout.align()) {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_the_alignment_asked_for_and_survive_realloc() {
        let a = Mimalloc;
        for &(size, align) in &[
            (1, 1),
            (8, 8),
            (24, 16),
            (2000, 8),
            (8192, 16),
            (64, 64),
            (3000, 128),
            (8, 16),
        ] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: a non-zero-sized layout; the block is freed with the layout it has.
            unsafe {
                let p = a.alloc_zeroed(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "size {size} align {align}");
                assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0));
                p.write_bytes(0xab, size);
                let q = a.realloc(p, layout, size * 3);
                assert_eq!(q as usize % align, 0, "realloc: size {size} align {align}");
                assert!(std::slice::from_raw_parts(q, size)
                    .iter()
                    .all(|&b| b == 0xab));
                a.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
            }
        }
    }
}
