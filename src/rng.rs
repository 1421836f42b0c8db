//! PyTorch-compatible CPU random numbers.
//!
//! [`TorchRng`] reproduces
//! `g = torch.Generator('cpu').manual_seed(seed); torch.randn(n, generator=g)`
//! (float32) so that a seed gives the same initial latents as a diffusers /
//! PyTorch pipeline that draws its noise on the CPU. State carries over between
//! calls exactly as on a torch generator.
//!
//! What is followed, by PyTorch source file (ATen, torch 2.x):
//!
//! * `aten/src/ATen/core/MT19937RNGEngine.h` (`mt19937_engine`): plain 32-bit
//!   MT19937 with the standard `init_genrand` seeding. Only the low 32 bits of
//!   the 64-bit seed reach the engine, so seeds `s` and `s + 2^32` give the
//!   same stream.
//! * `aten/src/ATen/CPUGeneratorImpl.cpp`: `random()` is one engine output;
//!   `random64()` is `(first << 32) | second`; `set_current_seed` (what
//!   `manual_seed` calls) clears the cached normal samples.
//! * `aten/src/ATen/core/TransformationHelper.h` (`uniform_real`): a uniform in
//!   `[0, 1)` keeps the low `digits` bits (24 for float from `random()`, 53 for
//!   double from `random64()`) and scales them by `2^-digits`.
//! * `aten/src/ATen/core/DistributionsHelper.h` (`normal_distribution<double>`):
//!   the small-tensor path, double-precision Box–Muller using `log1p`, `sin` and
//!   `cos`, caching the sine sample on the generator for the next call.
//! * `aten/src/ATen/native/cpu/DistributionTemplates.h` (`normal_kernel`,
//!   `normal_fill`, `NormalFill16<float>`): tensors with at least 16 elements
//!   are filled with float uniforms first, then transformed by blocks of 16
//!   (pairs `j`, `j + 8`); a trailing partial block is redone on the last 16
//!   slots with 16 fresh uniforms.
//! * `aten/src/ATen/native/cpu/avx_mathfun.h` (`log256_ps`, `sincos256_ps`):
//!   the Cephes-style float32 log and sincos that the x86 AVX2 kernel uses
//!   (torch's AVX-512 build dispatches `normal_` to the AVX2 kernel too, see
//!   `native/cpu/DistributionKernels.cpp`). They are emulated lane by lane in
//!   scalar `f32`, with `mul_add` exactly where the released x86-64
//!   `libtorch_cpu.so` has fused multiply-adds (read from its disassembly).
//!
//! Torch builds without AVX2 (e.g. ARM / Apple Silicon) use `std::log`,
//! `std::sin` and `std::cos` in float instead, which differ from the AVX2 kernel
//! in the last bit or two for a good share of the values (max ~2e-6).

use std::f64::consts::PI;

/// Number of 32-bit words in the MT19937 state.
const MT_N: usize = 624;
/// MT19937 middle word offset.
const MT_M: usize = 397;
const MT_MATRIX_A: u32 = 0x9908_b0df;
const MT_UPPER_MASK: u32 = 0x8000_0000;
const MT_LOWER_MASK: u32 = 0x7fff_ffff;

/// The 32-bit Mersenne Twister, as `at::mt19937` (`MT19937RNGEngine.h`), which
/// produces the same sequence as C++ `std::mt19937`.
#[derive(Clone, Debug)]
pub struct Mt19937 {
    state: [u32; MT_N],
    /// Index of the next state word to temper; `MT_N` means "twist first".
    next: usize,
}

impl Mt19937 {
    /// Standard `init_genrand` seeding (`mt19937_engine::init_with_uint32`).
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, next: MT_N }
    }

    /// Regenerates the whole state block (`mt19937_engine::next_state`).
    fn twist(&mut self) {
        for i in 0..MT_N {
            let y = (self.state[i] & MT_UPPER_MASK) | (self.state[(i + 1) % MT_N] & MT_LOWER_MASK);
            let mag = if y & 1 == 1 { MT_MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    /// Next tempered 32-bit output (`mt19937_engine::operator()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// A torch CPU generator (`at::CPUGeneratorImpl`): MT19937 plus the cached
/// second sample of the double-precision Box–Muller transform.
#[derive(Clone, Debug)]
pub struct TorchRng {
    engine: Mt19937,
    seed: u64,
    next_double_normal: Option<f64>,
}

impl TorchRng {
    /// Same as `torch.Generator('cpu').manual_seed(seed)`.
    ///
    /// Torch stores the full 64-bit seed (`initial_seed()` returns it) but
    /// seeds the engine with its low 32 bits only. A negative Python seed `s`
    /// is taken as `s mod 2^64` by torch, i.e. `s as u64` here.
    pub fn new(seed: u64) -> Self {
        Self {
            engine: Mt19937::new(seed as u32),
            seed,
            next_double_normal: None,
        }
    }

    /// The seed this generator was created with (`Generator.initial_seed()`).
    pub fn initial_seed(&self) -> u64 {
        self.seed
    }

    /// One engine output (`CPUGeneratorImpl::random`).
    pub fn random_u32(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// Two engine outputs, first one in the high half
    /// (`CPUGeneratorImpl::random64`).
    pub fn random_u64(&mut self) -> u64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (hi << 32) | lo
    }

    /// Float uniform in `[0, 1)` (`uniform_real_distribution<float>`).
    fn uniform_f32(&mut self) -> f32 {
        const SCALE: f32 = 1.0 / (1u32 << 24) as f32;
        (self.random_u32() & 0x00ff_ffff) as f32 * SCALE
    }

    /// Double uniform in `[0, 1)` (`uniform_real_distribution<double>`).
    fn uniform_f64(&mut self) -> f64 {
        const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
        (self.random_u64() & ((1u64 << 53) - 1)) as f64 * SCALE
    }

    /// One standard normal sample in double precision, using and refilling the
    /// generator's cache (`normal_distribution<double>::operator()`).
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * PI * u1;
        self.next_double_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }

    /// Same as `torch.randn(numel, generator=g, dtype=torch.float32)` on this
    /// generator (any shape with `numel` elements, row-major).
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        let mut out = vec![0f32; numel];
        self.normal_fill(&mut out, 0.0, 1.0);
        out
    }

    /// `normal_kernel` (`DistributionTemplates.h`) for a contiguous float
    /// tensor, mean `mean` and standard deviation `std`.
    fn normal_fill(&mut self, data: &mut [f32], mean: f64, std: f64) {
        let size = data.len();
        if size < 16 {
            // Serial path: double Box–Muller, cast to float.
            for v in data.iter_mut() {
                *v = (self.normal_f64() * std + mean) as f32;
            }
            return;
        }
        // normal_fill: all uniforms first, then Box–Muller in blocks of 16.
        let (mean, std) = (mean as f32, std as f32);
        for v in data.iter_mut() {
            *v = self.uniform_f32();
        }
        for block in data.chunks_exact_mut(16) {
            normal_fill_16(block, mean, std);
        }
        if !size.is_multiple_of(16) {
            // Recompute the last 16 values from 16 fresh uniforms.
            let tail = &mut data[size - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail, mean, std);
        }
    }
}

/// Box–Muller on 16 uniforms in place: pairs `(j, j + 8)` for `j < 8`
/// (`NormalFill16<float>` for AVX2 in `DistributionTemplates.h`).
fn normal_fill_16(data: &mut [f32], mean: f32, std: f32) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2*pi in double, then rounded.
    let two_pi = (2.0 * PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (log_ps(u1) * -2.0).sqrt();
        let theta = two_pi * u2;
        let (sin, cos) = sincos_ps(theta);
        data[j] = (radius * cos).mul_add(std, mean);
        data[j + 8] = (radius * sin).mul_add(std, mean);
    }
}

// Cephes float32 constants of `avx_mathfun.h`, given by their bits as stored
// in the binary (decimal value in the comment).
/// Smallest normal float, `min_norm_pos`.
const MIN_NORM_POS: f32 = f32::MIN_POSITIVE;
const INV_MANT_MASK: u32 = !0x7f80_0000;
const SIGN_MASK: u32 = 0x8000_0000;
/// `cephes_SQRTHF` = 0.707106781186547524
const SQRTHF: f32 = f32::from_bits(0x3f35_04f3);
/// `cephes_log_p0..p8` = 7.0376836292E-2, -1.1514610310E-1, 1.1676998740E-1,
/// -1.2420140846E-1, 1.4249322787E-1, -1.6668057665E-1, 2.0000714765E-1,
/// -2.4999993993E-1, 3.3333331174E-1
const LOG_P: [f32; 9] = [
    f32::from_bits(0x3d90_21bb),
    f32::from_bits(0xbdeb_d1b8),
    f32::from_bits(0x3def_251a),
    f32::from_bits(0xbdfe_5d4f),
    f32::from_bits(0x3e11_e9bf),
    f32::from_bits(0xbe2a_ae50),
    f32::from_bits(0x3e4c_ceac),
    f32::from_bits(0xbe7f_fffc),
    f32::from_bits(0x3eaa_aaaa),
];
/// `cephes_log_q1` = -2.12194440e-4
const LOG_Q1: f32 = f32::from_bits(0xb95e_8083);
/// `cephes_log_q2` = 0.693359375
const LOG_Q2: f32 = f32::from_bits(0x3f31_8000);
/// `minus_cephes_DP1` = -0.78515625
const MINUS_DP1: f32 = f32::from_bits(0xbf49_0000);
/// `minus_cephes_DP2` = -2.4187564849853515625e-4
const MINUS_DP2: f32 = f32::from_bits(0xb97d_a000);
/// `minus_cephes_DP3` = -3.77489497744594108e-8
const MINUS_DP3: f32 = f32::from_bits(0xb322_2169);
/// `sincof_p0..p2` = -1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1
const SINCOF: [f32; 3] = [
    f32::from_bits(0xb94c_a1f9),
    f32::from_bits(0x3c08_839e),
    f32::from_bits(0xbe2a_aaa3),
];
/// `coscof_p0..p2` = 2.443315711809948E-005, -1.388731625493765E-003,
/// 4.166664568298827E-002
const COSCOF: [f32; 3] = [
    f32::from_bits(0x37cc_f5ce),
    f32::from_bits(0xbab6_061a),
    f32::from_bits(0x3d2a_aaa5),
];
/// `cephes_FOPI` = 4 / pi = 1.27323954473516
const FOPI: f32 = f32::from_bits(0x3fa2_f983);

/// Natural log of one lane as `log256_ps` (`avx_mathfun.h`) computes it in
/// torch's x86-64 build (NaN for `x <= 0`).
fn log_ps(x: f32) -> f32 {
    let invalid = x <= 0.0;
    // `_mm256_max_ps(x, min_norm_pos)`: cut off denormals.
    let x = if x > MIN_NORM_POS { x } else { MIN_NORM_POS };
    let bits = x.to_bits();
    let exponent = (bits >> 23) as i32 - 0x7f;
    // Keep the mantissa, set the exponent of 0.5: x in [0.5, 1).
    let x = f32::from_bits((bits & INV_MANT_MASK) | 0.5f32.to_bits());
    let mut e = exponent as f32 + 1.0;
    // if x < SQRTHF { e -= 1; x = x + x - 1 } else { x = x - 1 }
    let below = x < SQRTHF;
    let tmp = if below { x } else { 0.0 };
    e -= if below { 1.0 } else { 0.0 };
    let x = (x - 1.0) + tmp;
    let z = x * x;
    // Horner steps are fused in torch's build.
    let mut y = LOG_P[0];
    for &p in &LOG_P[1..] {
        y = y.mul_add(x, p);
    }
    // y = y*x (rounded); y = y*z + e*q1 (fused); y -= 0.5*z (fused, exact product).
    let y = (y * x).mul_add(z, e * LOG_Q1);
    let y = (-z).mul_add(0.5, y);
    // x = x + y; x = e*q2 + x (fused).
    let r = e.mul_add(LOG_Q2, x + y);
    if invalid {
        // `_mm256_or_ps(x, invalid_mask)`: all bits set, a NaN.
        f32::from_bits(u32::MAX)
    } else {
        r
    }
}

/// Sine and cosine of one lane as `sincos256_ps` (`avx_mathfun.h`) computes
/// them in torch's x86-64 build. Returns `(sin, cos)`.
fn sincos_ps(x: f32) -> (f32, f32) {
    let sign_in = x.to_bits() & SIGN_MASK;
    let x = f32::from_bits(x.to_bits() & !SIGN_MASK);
    // j = (int)(x * 4/pi), rounded up to even (`_mm256_cvttps_epi32`
    // truncates; only finite, small arguments reach here).
    let j = (((x * FOPI) as i32).wrapping_add(1)) & !1;
    let y = j as f32;
    let sign_sin = sign_in ^ (((j & 4) as u32) << 29);
    let sign_cos = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
    // Polynomial selection: true where the cosine polynomial gives the sine.
    let cos_poly_for_sin = j & 2 == 0;
    // Extended precision modular arithmetic, all three steps fused.
    let x = y.mul_add(MINUS_DP1, x);
    let x = y.mul_add(MINUS_DP2, x);
    let x = y.mul_add(MINUS_DP3, x);

    let z = x * x;
    let half_z = z * 0.5;
    // Cosine polynomial: two fused Horner steps, y*z rounded, then
    // (y*z)*z - 0.5*z fused, then + 1.
    let yc = COSCOF[0].mul_add(z, COSCOF[1]).mul_add(z, COSCOF[2]);
    let yc = (z * yc).mul_add(z, -half_z) + 1.0;
    // Sine polynomial: two fused Horner steps, y2*z rounded, then
    // (y2*z)*x + x fused.
    let ys = SINCOF[0].mul_add(z, SINCOF[1]).mul_add(z, SINCOF[2]);
    let ys = (z * ys).mul_add(x, x);

    // Blend with and/andnot masks, subtract and add as the kernel does
    // (this also normalises signed zeros the same way).
    let (ysin2, ysin1) = if cos_poly_for_sin {
        (ys, 0.0)
    } else {
        (0.0, yc)
    };
    let yc_rest = yc - ysin1;
    let ys_rest = ys - ysin2;
    let sin = ysin1 + ysin2;
    let cos = yc_rest + ys_rest;
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_default_seed_first_output() {
        // std::mt19937 default-constructed (seed 5489).
        let mut mt = Mt19937::new(5489);
        assert_eq!(mt.next_u32(), 3_499_211_612);
    }

    #[test]
    fn mt19937_10000th_output() {
        // C++11 [rand.predef]: the 10000th consecutive invocation of a
        // default-constructed std::mt19937 produces 4123659995.
        let mut mt = Mt19937::new(5489);
        let mut v = 0;
        for _ in 0..10_000 {
            v = mt.next_u32();
        }
        assert_eq!(v, 4_123_659_995);
    }

    #[test]
    fn mt19937_seed_zero_and_one() {
        // Reference mt19937ar init_genrand(0) / init_genrand(1) first outputs.
        assert_eq!(Mt19937::new(0).next_u32(), 2_357_136_044);
        assert_eq!(Mt19937::new(1).next_u32(), 1_791_095_845);
    }

    #[test]
    fn random64_high_word_first() {
        let mut a = TorchRng::new(5489);
        let mut mt = Mt19937::new(5489);
        let hi = mt.next_u32() as u64;
        let lo = mt.next_u32() as u64;
        assert_eq!(a.random_u64(), (hi << 32) | lo);
    }

    #[test]
    fn only_low_32_seed_bits_matter() {
        let a = TorchRng::new(5).randn(40);
        let b = TorchRng::new(5 + (1u64 << 32)).randn(40);
        assert_eq!(a, b);
        assert_eq!(TorchRng::new(u64::MAX).initial_seed(), u64::MAX);
    }

    #[test]
    fn manual_seed_zero_known_values() {
        // torch.manual_seed(0); torch.randn(3)
        let v = TorchRng::new(0).randn(3);
        let want = [1.540_996_1_f32, -0.293_428_9, -2.178_789_4];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn log_and_sincos_are_accurate() {
        for i in 1..=4096u32 {
            let u = i as f32 / 4096.0;
            assert!(
                (log_ps(u) as f64 - (u as f64).ln()).abs() < 2e-7 * (1.0 + (u as f64).ln().abs())
            );
            let t = (2.0 * PI) as f32 * u;
            let (s, c) = sincos_ps(t);
            assert!((s as f64 - (t as f64).sin()).abs() < 3e-7);
            assert!((c as f64 - (t as f64).cos()).abs() < 3e-7);
        }
        assert!(log_ps(0.0).is_nan());
        assert!(log_ps(-1.0).is_nan());
        assert_eq!(log_ps(1.0), 0.0);
    }

    #[test]
    fn empty_and_cache() {
        let mut g = TorchRng::new(3);
        assert!(g.randn(0).is_empty());
        // One small draw leaves the sine sample cached; the next one uses it
        // without consuming the engine.
        let mut h = g.clone();
        let a = g.randn(1);
        let b = g.randn(1);
        let pair = h.randn(2);
        assert_eq!([a[0], b[0]], [pair[0], pair[1]]);
    }
}
