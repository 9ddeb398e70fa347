//! The process's allocator: mimalloc, called the way its own `malloc` is fastest.
//!
//! The `mimalloc` crate hands every Rust allocation to `mi_malloc_aligned`, alignment 1 and 8
//! included. In mimalloc 3 that call has a fast path only for blocks of at most 1 KiB whose
//! page has a free block at the right alignment; anything else (a larger block, a page that
//! just filled up) goes to its generic aligned path, which for a size class that is not a
//! power of two over-allocates by the alignment and marks the page as holding interior
//! pointers, so frees from that page take a slower path too. On the gateway's request path
//! that was ~11 allocations a request and ~4k instructions (callgrind, bench/README.md).
//! Every mimalloc block is at least word-aligned, so an alignment up to a word needs no
//! aligned call at all: `mi_malloc`, as the system allocator's `malloc` for the same case.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// What every mimalloc block is aligned to: a machine word (its smallest block size).
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc as the global allocator (`#[global_allocator]` in `main.rs`).
pub struct MiMalloc;

// SAFETY: every method forwards to mimalloc, which returns blocks of at least the requested
// size aligned to at least `layout.align()` (word alignment for its plain calls, which are
// only used when the layout asks for no more), or null; `dealloc` and `realloc` get pointers
// mimalloc returned (`mi_free` and `mi_realloc` take interior pointers of aligned blocks too).
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
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
        if layout.align() <= WORD {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

/// Hands what this thread's mimalloc heap holds free back to the OS, at most once a second
/// per thread. Called when a runtime thread parks (it ran out of work): mimalloc purges freed
/// pages (after its 1 s `purge_delay`) only from inside its own allocation calls, so after a
/// burst (10,000 requests in flight, bench/inflight.sh) a thread that goes quiet would
/// otherwise keep the burst's pages resident until its next allocation-heavy moment.
pub fn release_when_idle() {
    #[cfg(not(feature = "system-allocator"))]
    {
        use std::cell::Cell;
        use std::time::{Duration, Instant};
        thread_local! {
            static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
        }
        let now = Instant::now();
        let due = LAST.with(|last| match last.get() {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => false,
            _ => {
                last.set(Some(now));
                true
            }
        });
        if due {
            // SAFETY: mi_collect only frees and purges memory no live block uses; `false`
            // purges only pages whose purge delay has passed (not the aggressive mode).
            unsafe { mi::mi_collect(false) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(p: *mut u8, from: usize, to: usize) {
        for i in from..to {
            // SAFETY: the callers' blocks hold at least `to` bytes.
            unsafe { *p.add(i) = (i % 251) as u8 };
        }
    }

    fn holds_pattern(p: *const u8, len: usize) -> bool {
        // SAFETY: the callers' blocks hold at least `len` bytes.
        (0..len).all(|i| unsafe { *p.add(i) } == (i % 251) as u8)
    }

    /// Every alignment from 1 to 4 KiB and sizes across mimalloc's small, medium and large
    /// classes: aligned as asked, zeroed when asked, contents kept by `realloc` growing and
    /// shrinking.
    #[test]
    fn blocks_are_aligned_zeroed_and_kept_across_realloc() {
        let a = MiMalloc;
        let sizes = [1, 7, 8, 24, 100, 1000, 1025, 1500, 5_600, 70_000, 600_000];
        for shift in 0..=12 {
            let align = 1usize << shift;
            for &size in &sizes {
                let layout = Layout::from_size_align(size, align).unwrap();
                let big = size * 3 + 5;
                let small = size / 2 + 1;
                // SAFETY: each block is used within its size and freed once, with its layout.
                unsafe {
                    let p = a.alloc_zeroed(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0));
                    fill(p, 0, size);

                    let q = a.realloc(p, layout, big);
                    assert_eq!(q as usize % align, 0, "grow {size}->{big} align {align}");
                    assert!(holds_pattern(q, size), "grow {size}->{big} align {align}");
                    fill(q, size, big);

                    let r = a.realloc(q, Layout::from_size_align(big, align).unwrap(), small);
                    assert_eq!(r as usize % align, 0, "shrink {big}->{small} align {align}");
                    assert!(
                        holds_pattern(r, small),
                        "shrink {big}->{small} align {align}"
                    );
                    a.dealloc(r, Layout::from_size_align(small, align).unwrap());

                    let s = a.alloc(layout);
                    assert_eq!(s as usize % align, 0, "alloc {size} align {align}");
                    fill(s, 0, size);
                    assert!(holds_pattern(s, size));
                    a.dealloc(s, layout);
                }
            }
        }
    }
}
