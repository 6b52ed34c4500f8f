//! The serving binaries' global allocator: mimalloc, entered by its plain `malloc` where the
//! alignment asked for is one every mimalloc block has.
//!
//! The `mimalloc` crate's allocator calls `mi_malloc_aligned` for every allocation. For an
//! alignment of 1, 2, 4 or 8 that is the same memory by a longer road: each of its blocks is at
//! least word-aligned, yet a block over 1 KiB whose size is not a power of two takes
//! `mi_malloc_aligned`'s over-allocating fallback. A one-row REST infer request makes about 35
//! Rust allocations, 8 of them over 1 KiB (hyper's read buffer, the response body, ...).
//! Larger alignments (tokio's cache-padded task cells) still go through the aligned calls.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment of every block mimalloc hands out: a machine word (its size classes are whole
/// words, and pages start at least 16-byte aligned).
const WORD_ALIGN: usize = std::mem::size_of::<usize>();

/// mimalloc as Rust's global allocator (`#[global_allocator] static A: MiMalloc = MiMalloc;`).
#[derive(Debug, Clone, Copy, Default)]
pub struct MiMalloc;

// SAFETY: every call hands mimalloc a size and, where the block needs more than word
// alignment, that alignment (a power of two, as `Layout` guarantees); blocks are freed and
// reallocated only by mimalloc, which owns them. `mi_free` and `mi_realloc` take a block from
// either kind of allocation.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl's comment.
        unsafe {
            if layout.align() <= WORD_ALIGN {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl's comment.
        unsafe {
            if layout.align() <= WORD_ALIGN {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (GlobalAlloc's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (GlobalAlloc's contract).
        unsafe {
            if layout.align() <= WORD_ALIGN {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

/// Returns memory freed on this thread to the system now. mimalloc purges freed pages after a
/// delay, but only when later allocations run its purge: an idle server kept a model load's
/// freed buffers resident (MiniLM, one replica: 215 MB RSS instead of 139 MB).
pub fn purge_freed_memory() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe { mi::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size class a request's allocations fall in (small, medium past 1 KiB, large past
    /// mimalloc's page sizes), at every alignment from 1 to 4 KiB: the block is aligned, holds
    /// its bytes through a grow and a shrink, and zeroed blocks are zero.
    #[test]
    fn blocks_are_aligned_and_keep_their_bytes() {
        let a = MiMalloc;
        let sizes = [1, 3, 7, 8, 9, 24, 40, 100, 1000, 1025, 1500, 4097, 70_000, 300_001, 5 << 20];
        for &size in &sizes {
            for shift in 0..=12 {
                let align = 1usize << shift;
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; each block is written within its size, then freed once
                // with the layout it was allocated with.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null(), "size {size} align {align}");
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    for i in 0..size {
                        *p.add(i) = (i % 251) as u8;
                    }
                    let grown = a.realloc(p, layout, size * 3 + 5);
                    assert_eq!(grown as usize % align, 0, "grown: size {size} align {align}");
                    assert!(
                        (0..size).all(|i| *grown.add(i) == (i % 251) as u8),
                        "grown: size {size} align {align}"
                    );
                    let grown_layout = Layout::from_size_align(size * 3 + 5, align).unwrap();
                    let keep = size.div_ceil(2);
                    let shrunk = a.realloc(grown, grown_layout, keep);
                    assert_eq!(shrunk as usize % align, 0, "shrunk: size {size} align {align}");
                    assert!(
                        (0..keep).all(|i| *shrunk.add(i) == (i % 251) as u8),
                        "shrunk: size {size} align {align}"
                    );
                    a.dealloc(shrunk, Layout::from_size_align(keep, align).unwrap());

                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed: size {size} align {align}");
                    assert!((0..size).all(|i| *z.add(i) == 0), "zeroed: size {size} align {align}");
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
