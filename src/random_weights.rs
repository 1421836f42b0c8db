//! Random weights of any shape, for benchmarks at full SDXL size without a download.

use crate::precision::Precision;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;

struct RandomBackend(Option<Precision>);

impl candle_nn::var_builder::SimpleBackend for RandomBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let rank = s.rank();
        let dims = s.dims().to_vec();
        // Drawn on the device itself (a GPU draws billions of values in moments; copying
        // them over would take longer than the benchmark).
        let t = if dims.len() >= 2 {
            // ~1/sqrt(fan_in) keeps activations O(1) through the depth of the network.
            let fan_in: usize = dims[1..].iter().product();
            Tensor::randn(0f32, (1.0 / (fan_in as f64).sqrt()) as f32, s, dev)?
        } else if name.ends_with("weight") {
            Tensor::ones(s, DType::F32, dev)?
        } else {
            Tensor::zeros(s, DType::F32, dev)?
        };
        let dtype = match self.0 {
            // As if from an fp16 checkpoint: what an f32 run keeps as stored stays f16.
            Some(p) if p.keeps_stored_f16(rank, DType::F16) => DType::F16,
            Some(p) => p.dtype_for_rank(rank),
            None => dtype,
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random weights need a shape for {name}"
        )))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A `VarBuilder` that hands out random tensors of whatever shape a model asks for.
pub fn var_builder(dtype: DType, dev: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomBackend(None)), dtype, dev.clone())
}

/// Random weights kept as `precision` keeps tensors of each rank.
pub fn var_builder_with(precision: Precision, dev: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(RandomBackend(Some(precision))),
        precision.matrices,
        dev.clone(),
    )
}
