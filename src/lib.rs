//! dmd2: SDXL + DMD2 few-step text-to-image on candle.
pub mod rng;
