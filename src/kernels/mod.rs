//! Hand-written CPU kernels for the hot paths of the UNet, the VAE and the text encoders.
//!
//! Each kernel works on contiguous f32 slices; the wrappers in [`crate::nn`] route CPU f32
//! tensors here (unless `DMD2_KERNELS=candle`, see [`Backend`]) and keep candle's own ops for
//! every other device and dtype. Every kernel dispatches on a [`Tier`] (`DMD2_CPU`).
//!
//! - [`gemm`]: matrix products with f32 or bf16 operands, strided or packed at load, bias and
//!   residual terms added in the accumulator; micro-kernels per tier.
//! - [`conv`]: 1x1 convolutions as a plain product, k×k (stride 1 or 2) convolutions through
//!   a chunked im2col into a reused buffer, writing NCHW output in place.
//! - [`winograd`]: 3×3 convolutions as Winograd F(2×2, 3×3) (the VAE's).
//! - [`norm`]: group norm with optional fused SiLU (two passes per group).
//! - [`attention`]: scaled dot-product attention straight from `[b, s, heads*d]` projections,
//!   query blocks so the score block stays in cache.
//! - [`math`]: vectorisable `exp`, `erf`-based GELU, GEGLU, softmax.

pub mod attention;
pub mod conv;
pub mod gemm;
pub mod math;
pub mod norm;
pub mod tier;
pub mod winograd;

pub use tier::{Level, Tier};

/// Which implementation runs the model's ops on the CPU (`DMD2_KERNELS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// This crate's kernels ([`gemm`], [`conv`], …) for CPU f32 activations (the default).
    Own,
    /// candle's own ops for everything: the code CUDA and Metal run, tested on the CPU.
    Candle,
}

impl Backend {
    /// `DMD2_KERNELS` (`own` or unset, or `candle`).
    pub fn from_env() -> Result<Backend, String> {
        match std::env::var("DMD2_KERNELS") {
            Err(std::env::VarError::NotPresent) => Ok(Backend::Own),
            Err(std::env::VarError::NotUnicode(_)) => Err("DMD2_KERNELS is not valid UTF-8".into()),
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" | "own" => Ok(Backend::Own),
                "candle" => Ok(Backend::Candle),
                _ => Err(format!("DMD2_KERNELS={v}: unknown (own or candle)")),
            },
        }
    }

    /// This process's backend, read once (an invalid value falls back to `own`; the CLI
    /// reports it at start through [`check_env`]).
    pub fn current() -> Backend {
        static B: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
        *B.get_or_init(|| Backend::from_env().unwrap_or(Backend::Own))
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Own => "own",
            Backend::Candle => "candle",
        }
    }
}

/// Checks `DMD2_CPU` and `DMD2_KERNELS`: an error names the variable and the problem.
pub fn check_env() -> anyhow::Result<()> {
    Tier::from_env().map_err(|e| anyhow::anyhow!(e))?;
    Backend::from_env().map_err(|e| anyhow::anyhow!(e))?;
    Ok(())
}

/// Whether the own kernels serve CPU ops in this process.
pub fn own() -> bool {
    Backend::current() == Backend::Own
}

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

/// Defines `fn $name(tier: Tier, args…)` running `$body` (an expression using only
/// `#[inline(always)]` helpers) compiled with AVX-512 or AVX2+FMA enabled when the tier allows
/// them, so LLVM vectorises it for the wide registers; otherwise with the baseline target
/// features (portable code).
macro_rules! dispatch_simd {
    (fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        fn $name(tier: $crate::kernels::Tier, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                use $crate::kernels::Level;
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $body
                if tier.has(Level::Avx512) {
                    // SAFETY: a Tier is made only for levels this CPU supports.
                    return unsafe { avx512($($arg),*) };
                }
                if tier.has(Level::Avx2) {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            let _ = tier;
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
