//! The CPU tier: which instruction sets the kernels may use (`DMD2_CPU`).
//!
//! Every CPU dispatch in the crate asks one [`Tier`] — the GEMM micro-kernels, the
//! multiversioned element-wise math, `--dtype auto` — so one switch caps them all, and a
//! machine can run (and test) the code paths of every lesser CPU. Each tier has a contract
//! that does not depend on the instructions that carry it out:
//!
//! | tier | instructions | f32 products | bf16 products |
//! |---|---|---|---|
//! | `avx512bf16` | AVX-512F/BW/VL + AVX512_BF16 | f32 FMA, 16 lanes | `vdpbf16ps`: operands rounded to bf16 (nearest even), f32 accumulation |
//! | `avx512` | AVX-512F/VL, AVX2, FMA | f32 FMA, 16 lanes | operands rounded to bf16, widened, f32 FMA |
//! | `avx2` | AVX2, FMA | f32 FMA, 8 lanes | operands rounded to bf16, widened, f32 FMA |
//! | `generic` | portable Rust, no x86 intrinsics (the only tier off x86-64) | f32 | operands rounded to bf16, f32 accumulation |
//!
//! So every tier computes the same numbers up to the order of f32 additions; the kernel tests
//! check each tier the machine can run against one reference.
//!
//! Not capped: candle's own CPU ops and its `gemm` crate dispatch on the CPU's features by
//! themselves (gemm offers no switch); with the default `DMD2_KERNELS=own` they run only the
//! few ops the kernels do not cover.

use std::sync::OnceLock;

/// The instruction-set levels, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Generic,
    Avx2,
    Avx512,
    Avx512Bf16,
}

impl Level {
    pub const ALL: [Level; 4] = [
        Level::Generic,
        Level::Avx2,
        Level::Avx512,
        Level::Avx512Bf16,
    ];

    /// The name `DMD2_CPU` takes.
    pub fn name(self) -> &'static str {
        match self {
            Level::Generic => "generic",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Avx512Bf16 => "avx512bf16",
        }
    }

    /// Whether this CPU has every feature the level's code is compiled with.
    fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = || has!("avx2") && has!("fma");
            let avx512 = || avx2() && has!("avx512f") && has!("avx512vl") && has!("avx512bw");
            match self {
                Level::Generic => true,
                Level::Avx2 => avx2(),
                Level::Avx512 => avx512(),
                Level::Avx512Bf16 => avx512() && has!("avx512bf16"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Level::Generic
        }
    }
}

/// A [`Level`] this CPU supports. The only ways to make one check the CPU, so code that
/// dispatches on a `Tier` may run the level's instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tier(Level);

impl Tier {
    /// The portable tier, supported everywhere.
    pub const GENERIC: Tier = Tier(Level::Generic);

    /// `Some` when this CPU supports `level`.
    pub fn new(level: Level) -> Option<Tier> {
        level.supported().then_some(Tier(level))
    }

    pub fn level(self) -> Level {
        self.0
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }

    /// Whether this tier may use at least `level`'s instructions.
    pub fn has(self, level: Level) -> bool {
        self.0 >= level
    }

    /// The best tier this CPU supports.
    pub fn best() -> Tier {
        static BEST: OnceLock<Tier> = OnceLock::new();
        *BEST.get_or_init(|| {
            Level::ALL
                .into_iter()
                .rev()
                .find_map(Tier::new)
                .unwrap_or(Tier::GENERIC)
        })
    }

    /// Every tier this CPU can run, lowest first (what the kernel tests loop over).
    pub fn runnable() -> Vec<Tier> {
        Level::ALL.into_iter().filter_map(Tier::new).collect()
    }

    /// The tier of this process: `DMD2_CPU`, or the best the CPU has. An invalid `DMD2_CPU`
    /// is reported by [`Tier::from_env`] (the CLI checks it at start); here it falls back to
    /// the best tier.
    pub fn current() -> Tier {
        static CURRENT: OnceLock<Tier> = OnceLock::new();
        *CURRENT.get_or_init(|| Tier::from_env().unwrap_or_else(|_| Tier::best()))
    }

    /// Resolves `DMD2_CPU` (`native` or unset: the best tier; or a tier's name).
    pub fn from_env() -> Result<Tier, String> {
        match std::env::var("DMD2_CPU") {
            Err(std::env::VarError::NotPresent) => Ok(Tier::best()),
            Err(std::env::VarError::NotUnicode(_)) => Err("DMD2_CPU is not valid UTF-8".into()),
            Ok(v) => Tier::parse(&v),
        }
    }

    /// A `DMD2_CPU` value.
    pub fn parse(value: &str) -> Result<Tier, String> {
        let v = value.trim().to_ascii_lowercase();
        if v.is_empty() || v == "native" {
            return Ok(Tier::best());
        }
        let names = || {
            let mut all = vec!["native"];
            all.extend(Level::ALL.iter().rev().map(|l| l.name()));
            all.join(", ")
        };
        let Some(level) = Level::ALL.into_iter().find(|l| l.name() == v) else {
            return Err(format!(
                "DMD2_CPU={value}: unknown CPU tier (one of {})",
                names()
            ));
        };
        Tier::new(level).ok_or_else(|| {
            let have: Vec<&str> = Tier::runnable().iter().rev().map(|t| t.name()).collect();
            format!(
                "DMD2_CPU={value}: this CPU lacks the instructions of that tier (it runs: {})",
                have.join(", ")
            )
        })
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unsupported_tiers_are_refused() {
        assert_eq!(Tier::parse("native").unwrap(), Tier::best());
        assert_eq!(Tier::parse("").unwrap(), Tier::best());
        assert_eq!(Tier::parse("generic").unwrap(), Tier::GENERIC);
        for level in Level::ALL {
            match Tier::new(level) {
                Some(t) => assert_eq!(Tier::parse(level.name()).unwrap(), t),
                None => {
                    let e = Tier::parse(level.name()).unwrap_err();
                    assert!(e.contains("lacks") && e.contains("generic"), "{e}");
                }
            }
        }
        let e = Tier::parse("sse9").unwrap_err();
        assert!(e.contains("unknown") && e.contains("avx512bf16"), "{e}");
        // Tiers are ordered and the runnable ones end at the best.
        let r = Tier::runnable();
        assert_eq!(r[0], Tier::GENERIC);
        assert_eq!(*r.last().unwrap(), Tier::best());
        assert!(r.windows(2).all(|w| w[0] < w[1]));
    }
}
