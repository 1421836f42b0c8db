//! The teacher's samplers (diffusers' Euler, Euler ancestral and DDIM with SDXL's config).

use super::{Sampler, SamplerKind, Spacing};
use anyhow::{Result, bail};

pub fn build(kind: SamplerKind, _steps: usize, _spacing: Spacing) -> Result<Box<dyn Sampler>> {
    bail!("the {} sampler is not available in this build yet", kind.name())
}
