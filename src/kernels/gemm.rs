//! A bounds-checked front end to `gemm::gemm` for f32 strided matrices.

/// A matrix operand: (slice, row stride, column stride), strides in elements.
pub type Mat<'a> = (&'a [f32], usize, usize);

/// Largest index touched by an `r×c` matrix with strides (rs, cs), plus one.
fn extent(r: usize, c: usize, rs: usize, cs: usize) -> usize {
    if r == 0 || c == 0 {
        0
    } else {
        (r - 1) * rs + (c - 1) * cs + 1
    }
}

/// `dst[m×n] = (accumulate ? dst : 0) + lhs[m×k] · rhs[k×n]` with arbitrary non-negative
/// strides, on `threads` rayon threads (1: the calling thread only).
///
/// Panics if any operand's slice is too short for its shape and strides.
pub fn gemm(
    [m, n, k]: [usize; 3],
    dst: (&mut [f32], usize, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    threads: usize,
) {
    let (dst, d_rs, d_cs) = dst;
    let (lhs, l_rs, l_cs) = lhs;
    let (rhs, r_rs, r_cs) = rhs;
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= extent(m, n, d_rs, d_cs), "gemm: dst too short");
    assert!(lhs.len() >= extent(m, k, l_rs, l_cs), "gemm: lhs too short");
    assert!(rhs.len() >= extent(k, n, r_rs, r_cs), "gemm: rhs too short");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * d_rs + j * d_cs] = 0.0;
                }
            }
        }
        return;
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above prove that every element gemm reads or writes —
    // dst[i*d_rs + j*d_cs], lhs[i*l_rs + p*l_cs], rhs[p*r_rs + j*r_cs] for i<m, j<n, p<k —
    // lies inside its slice; `dst` is exclusively borrowed, so nothing else aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            d_cs as isize,
            d_rs as isize,
            accumulate,
            lhs.as_ptr(),
            l_cs as isize,
            l_rs as isize,
            rhs.as_ptr(),
            r_cs as isize,
            r_rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
}
