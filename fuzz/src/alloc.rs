//! Allocation accounting: a global allocator that adds up what the current thread asks for
//! while [`measure`] runs, so a target can bound what one decode allocates.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Forwards to `System`, counting the bytes requested on this thread while measuring.
pub struct Counting;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static REQUESTED: Cell<usize> = const { Cell::new(0) };
}

fn note(bytes: usize) {
    // `try_with`: the allocator may run while this thread's locals are being torn down.
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            let _ = REQUESTED.try_with(|r| r.set(r.get().saturating_add(bytes)));
        }
    });
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the bookkeeping only touches const-initialised `Cell`s, which neither
// allocate nor register destructors.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract, which is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size.saturating_sub(layout.size()));
        // SAFETY: `ptr` and `layout` come from this allocator, that is from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` come from this allocator, that is from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the bytes it allocated on this thread.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    /// Ends the measurement even when `f` panics, which the fuzzer catches and reports.
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = MEASURING.try_with(|m| m.set(false));
        }
    }
    REQUESTED.with(|r| r.set(0));
    MEASURING.with(|m| m.set(true));
    let stop = Stop;
    let out = f();
    drop(stop);
    (out, REQUESTED.with(|r| r.get()))
}

/// Most a decode of a `body_len`-byte body may allocate: the value holds at most the body's
/// bytes, widened by in-memory padding (a `(u64, u32)` discard range takes 16 bytes for 12 on
/// the wire), plus a constant for the at most 64 blocks and error texts.
pub fn decode_bound(body_len: usize) -> usize {
    body_len + body_len / 3 + 8192
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_this_thread_allocates() {
        let (v, bytes) = measure(|| vec![0u8; 1000]);
        assert_eq!(v.len(), 1000);
        assert!((1000..2000).contains(&bytes), "{bytes}");
        let ((), none) = measure(|| ());
        assert_eq!(none, 0);
    }
}
