//! Big buffers: zeroed allocations that cost nothing until touched, backed by huge pages where
//! the kernel allows.
//!
//! A fresh 4 KiB page costs a page fault when first written — for SDXL's 10 GB of f32
//! weights, 2.5 million faults, more time than reading them from the page cache. Linux backs
//! 2 MiB-aligned parts of a range with one huge page per fault once the range is advised
//! (`MADV_HUGEPAGE`; the common `transparent_hugepage=madvise` setting requires the advice).

/// Plain data: the all-zero bit pattern is a valid value, with no padding.
///
/// # Safety
/// Implement only for such types.
pub unsafe trait Plain: Copy + Send + Sync + 'static {}
// SAFETY: each is a plain integer or float (half's types wrap a u16).
unsafe impl Plain for f32 {}
unsafe impl Plain for u16 {}
unsafe impl Plain for u32 {}
unsafe impl Plain for half::f16 {}
unsafe impl Plain for half::bf16 {}

/// `n` zeroes, allocated so that no page is touched (fresh memory from the system is zero
/// already) and advised for huge pages before anything writes to it.
pub fn zeroed_vec<T: Plain>(n: usize) -> Vec<T> {
    let Ok(layout) = std::alloc::Layout::array::<T>(n) else {
        // Larger than the address space: let Vec report it as it does.
        return Vec::with_capacity(n);
    };
    if layout.size() == 0 {
        return Vec::new();
    }
    // SAFETY: non-zero size; the pointer is checked; all-zero bits are a valid T (Plain), so
    // the n elements are initialised; the Vec frees it with the same layout (Global, array
    // of T with capacity n).
    let mut v = unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut T;
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(p, n, n)
    };
    advise_huge_pages(&mut v);
    v
}

/// Ask for huge pages on the 2 MiB-aligned part of `buf` (Linux; elsewhere nothing).
pub fn advise_huge_pages<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 2 << 20;
        // Buffers below this are left to the allocator as they are.
        const HUGE: usize = 4 << 20;
        let bytes = std::mem::size_of_val(buf);
        let start = buf.as_mut_ptr() as usize;
        let aligned = start.next_multiple_of(PAGE);
        let end = (start + bytes) / PAGE * PAGE;
        if bytes >= HUGE && end > aligned {
            // SAFETY: the range lies inside `buf`, which this call borrows mutably; the
            // advice changes how pages are backed, never their contents. A refusal (e.g. no
            // THP support) leaves ordinary pages: nothing to handle.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    end - aligned,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// The dmd2 binary's allocator: the system's, except that big blocks (≥ 4 MiB: weights,
/// activations) freed by the program are kept for the next allocation of the same size
/// class instead of going back to the kernel. A fresh block costs a page fault and the
/// kernel zeroing every page it touches; SDXL's layers come in a handful of shapes, so while
/// the model loads, each weight's buffer is the last one freed of its shape (the tensor a
/// packed weight was made from), and in the denoising loop every step's activations are the
/// previous step's. At most [`CACHE_BYTES`] are kept; [`release_cached`] returns them.
pub struct BlockCache;

/// Blocks below this go to the system allocator as they are.
const BIG: usize = 4 << 20;
/// Big blocks are allocated in multiples of this (one huge page), the size classes of reuse.
const CLASS: usize = 2 << 20;
/// Freed big blocks kept at most, in bytes and in number.
pub const CACHE_BYTES: usize = 512 << 20;
const SLOTS: usize = 64;

#[derive(Clone, Copy)]
struct Slot {
    ptr: usize,
    size: usize,
    align: usize,
    age: u64,
}

struct Cache {
    slots: [Slot; SLOTS],
    bytes: usize,
    clock: u64,
}

const EMPTY: Slot = Slot {
    ptr: 0,
    size: 0,
    align: 0,
    age: 0,
};

static CACHE: std::sync::Mutex<Cache> = std::sync::Mutex::new(Cache {
    slots: [EMPTY; SLOTS],
    bytes: 0,
    clock: 0,
});

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    // No code that can panic runs under the lock; a poisoned lock still holds valid slots.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The size class of a big allocation, or `None` for one the system allocator keeps.
fn class_of(layout: std::alloc::Layout) -> Option<usize> {
    (layout.size() >= BIG && layout.align() <= 4096).then(|| layout.size().next_multiple_of(CLASS))
}

/// # Safety
/// `size` is a class (non-zero, a multiple of [`CLASS`]) and `align` a valid alignment.
unsafe fn class_layout(size: usize, align: usize) -> std::alloc::Layout {
    // SAFETY: as the caller promises; the class never overflows isize (it came from a Layout
    // rounded up to 2 MiB, far below isize::MAX for any real allocation).
    unsafe { std::alloc::Layout::from_size_align_unchecked(size, align) }
}

impl Cache {
    /// A kept block of exactly this class and alignment.
    fn take(&mut self, size: usize, align: usize) -> Option<*mut u8> {
        let slot = self
            .slots
            .iter_mut()
            .filter(|s| s.ptr != 0 && s.size == size && s.align == align)
            .max_by_key(|s| s.age)?;
        let ptr = slot.ptr as *mut u8;
        *slot = EMPTY;
        self.bytes -= size;
        Some(ptr)
    }

    /// Keeps a block, evicting the oldest ones to make room; false when it cannot be kept.
    fn put(&mut self, ptr: *mut u8, size: usize, align: usize) -> bool {
        if size > CACHE_BYTES {
            return false;
        }
        loop {
            let full = self.bytes + size > CACHE_BYTES;
            let free = self.slots.iter().position(|s| s.ptr == 0);
            match (full, free) {
                (false, Some(i)) => {
                    self.clock += 1;
                    self.slots[i] = Slot {
                        ptr: ptr as usize,
                        size,
                        align,
                        age: self.clock,
                    };
                    self.bytes += size;
                    return true;
                }
                _ => self.evict_oldest(),
            }
        }
    }

    fn evict_oldest(&mut self) {
        let Some(slot) = self
            .slots
            .iter_mut()
            .filter(|s| s.ptr != 0)
            .min_by_key(|s| s.age)
        else {
            return;
        };
        let s = std::mem::replace(slot, EMPTY);
        self.bytes -= s.size;
        // SAFETY: the slot held a block the system allocator gave with this class layout.
        unsafe {
            std::alloc::GlobalAlloc::dealloc(
                &std::alloc::System,
                s.ptr as *mut u8,
                class_layout(s.size, s.align),
            )
        };
    }
}

/// Returns every kept block to the system (e.g. after loading, whose shapes the denoising
/// loop does not share). Nothing happens where [`BlockCache`] is not the allocator.
pub fn release_cached() {
    let mut c = cache();
    while c.bytes > 0 {
        c.evict_oldest();
    }
}

/// A fresh big block, advised for huge pages.
///
/// # Safety
/// `size` is a class, `align` valid.
unsafe fn fresh(size: usize, align: usize, zeroed: bool) -> *mut u8 {
    use std::alloc::GlobalAlloc;
    // SAFETY: a valid non-zero layout (caller).
    let p = unsafe {
        let l = class_layout(size, align);
        if zeroed {
            std::alloc::System.alloc_zeroed(l)
        } else {
            std::alloc::System.alloc(l)
        }
    };
    if !p.is_null() {
        // SAFETY: the block was just allocated with `size` bytes and nothing else uses it.
        advise_huge_pages(unsafe { std::slice::from_raw_parts_mut(p, size) });
    }
    p
}

// SAFETY: every block is the system allocator's, allocated and freed with the same class
// layout (derived from the caller's layout the same way each time); a kept block is owned by
// the cache alone until handed out again.
unsafe impl std::alloc::GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let Some(size) = class_of(layout) else {
            return unsafe { std::alloc::System.alloc(layout) };
        };
        if let Some(p) = cache().take(size, layout.align()) {
            return p;
        }
        unsafe { fresh(size, layout.align(), false) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let Some(size) = class_of(layout) else {
            return unsafe { std::alloc::System.alloc_zeroed(layout) };
        };
        if let Some(p) = cache().take(size, layout.align()) {
            // A reused block holds old data: zero what was asked for (no page faults).
            unsafe { p.write_bytes(0, layout.size()) };
            return p;
        }
        unsafe { fresh(size, layout.align(), true) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        let Some(size) = class_of(layout) else {
            return unsafe { std::alloc::System.dealloc(ptr, layout) };
        };
        if !cache().put(ptr, size, layout.align()) {
            unsafe { std::alloc::System.dealloc(ptr, class_layout(size, layout.align())) };
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY (throughout): the caller's contract of GlobalAlloc::realloc.
        let new_layout =
            unsafe { std::alloc::Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class_of(layout), class_of(new_layout)) {
            (None, None) => unsafe { std::alloc::System.realloc(ptr, layout, new_size) },
            (Some(old), Some(new)) if old == new => ptr,
            (Some(old), Some(new)) => {
                // The system may move the pages without copying them (mremap).
                let p = unsafe {
                    std::alloc::System.realloc(ptr, class_layout(old, layout.align()), new)
                };
                if !p.is_null() {
                    advise_huge_pages(unsafe { std::slice::from_raw_parts_mut(p, new) });
                }
                p
            }
            _ => {
                let p = unsafe { self.alloc(new_layout) };
                if !p.is_null() {
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                p
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache's bookkeeping, driven directly (the test binary keeps the system allocator):
    /// blocks come back by class and alignment, newest first, and never past the byte cap.
    #[test]
    fn block_cache_reuses_by_class_and_stays_bounded() {
        use std::alloc::{GlobalAlloc, Layout};
        let a = BlockCache;
        let l = Layout::from_size_align(BIG + 1, 64).unwrap();
        unsafe {
            let p = a.alloc_zeroed(l);
            assert!(!p.is_null());
            assert!(
                std::slice::from_raw_parts(p, l.size())
                    .iter()
                    .all(|&b| b == 0)
            );
            p.write_bytes(7, l.size());
            a.dealloc(p, l);
            // The same class (BIG + 1 and BIG + 2 MiB round to the same size): the same block,
            // zeroed again when asked.
            let l2 = Layout::from_size_align(BIG + CLASS, 64).unwrap();
            let q = a.alloc_zeroed(l2);
            assert_eq!(p, q);
            assert!(
                std::slice::from_raw_parts(q, l2.size())
                    .iter()
                    .all(|&b| b == 0)
            );
            // Growing within the class keeps the block; past it, the data moves along.
            q.write_bytes(3, 16);
            let r = a.realloc(q, l2, BIG + CLASS + 1);
            assert!(!r.is_null());
            assert_eq!(std::slice::from_raw_parts(r, 16), &[3; 16]);
            let l3 = Layout::from_size_align(BIG + CLASS + 1, 64).unwrap();
            let small = a.realloc(r, l3, 100);
            assert_eq!(std::slice::from_raw_parts(small, 16), &[3; 16]);
            a.dealloc(small, Layout::from_size_align(100, 64).unwrap());
        }
        // Bounded: many freed blocks never keep more than the cap.
        {
            let mut c = cache();
            let size = 512 << 20;
            for _ in 0..3 {
                let p = unsafe { fresh(size, 64, false) };
                assert!(!p.is_null());
                assert!(c.put(p, size, 64));
                assert!(c.bytes <= CACHE_BYTES);
            }
        }
        release_cached();
        assert_eq!(cache().bytes, 0);
    }

    #[test]
    fn zeroed_vectors_are_zero_and_usable() {
        for n in [0, 1, 1000, (8 << 20) + 3] {
            let mut v: Vec<half::bf16> = zeroed_vec(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|x| x.to_bits() == 0));
            if n > 0 {
                v[n - 1] = half::bf16::ONE;
                v.push(half::bf16::ONE);
                assert_eq!(v[n], half::bf16::ONE);
            }
        }
        let v: Vec<f32> = zeroed_vec(5 << 20);
        assert!(v.iter().all(|&x| x == 0.0));
    }
}
