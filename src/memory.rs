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

#[cfg(test)]
mod tests {
    use super::*;

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
