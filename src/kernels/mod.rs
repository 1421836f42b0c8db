//! Hand-written CPU f32 kernels for the hot paths of the UNet and the VAE.
//!
//! Each kernel works on contiguous f32 slices; the wrappers in [`crate::nn`] route CPU f32
//! tensors here and keep candle's own ops for every other device and dtype.
//!
//! - [`conv`]: 1x1 convolutions as a plain GEMM, k×k (stride 1 or 2) convolutions through a
//!   chunked im2col into a reused buffer, both calling `gemm` directly and writing NCHW output
//!   in place (bias folded into the accumulator).
//! - [`norm`]: group norm with optional fused SiLU (two passes per group).
//! - [`attention`]: scaled dot-product attention straight from `[b, s, heads*d]` projections,
//!   one head per task, query blocks so the score block stays in cache.
//! - [`math`]: vectorisable `exp`, `erf`-based GELU, GEGLU, softmax.

#[cfg(target_arch = "x86_64")]
pub mod attention;
pub mod bf16;
#[cfg(target_arch = "x86_64")]
pub mod conv;
#[cfg(target_arch = "x86_64")]
pub mod gemm;
pub mod math;
pub mod norm;
#[cfg(target_arch = "x86_64")]
pub mod winograd;

/// Number of worker threads candle uses (and that the kernels split work over). Read once:
/// candle's `get_num_threads` reads the environment and /proc or /sys files on every call.
pub fn num_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// `vec![T::default(); n]` with the zeroing split over the pool's threads (and so the first
/// touch of fresh pages too). For output buffers the kernels fill in parallel: a plain `vec!`
/// zeroes them on one thread while the others wait.
pub fn par_zeroed<T: Copy + Default + Send>(n: usize) -> Vec<T> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 15;
    if n <= CHUNK {
        return vec![T::default(); n];
    }
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|x| _ = x.write(T::default())));
    // SAFETY: all n elements were written above.
    unsafe { v.set_len(n) };
    v
}

/// Runs `f` on a worker of the kernels' thread pool ([`num_threads`] threads), so that the
/// parallel loops inside it start from a worker (pushed on its own queue, taken by the others
/// while they spin) instead of being injected from outside the pool each time and waiting for
/// a sleeping worker to wake: a UNet step runs about a thousand such loops. Nested calls run
/// `f` in place.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(num_threads())
            .thread_name(|i| format!("dmd2-{i}"))
            .build()
            .ok()
    });
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// Runs `$body` (an expression using only `#[inline(always)]` helpers) compiled with AVX-512
/// or AVX2+FMA enabled when the CPU has them, so LLVM vectorises it for the wide registers;
/// otherwise with the baseline target features.
macro_rules! dispatch_simd {
    (fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU supports every feature `avx512` is compiled with.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports every feature `avx2` is compiled with.
                    return unsafe { avx2($($arg),*) };
                }
            }
            #[allow(unreachable_code)]
            $body
        }
    };
}
pub(crate) use dispatch_simd;

/// Deterministic test values in [−1, 1) (a 64-bit LCG), shared by the kernels' unit tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
