//! The SDXL + DMD2 text-to-image pipeline: encode the prompt with both CLIP encoders, run the
//! DMD2 sampler on the UNet, decode with the VAE. Mirrors diffusers'
//! `StableDiffusionXLPipeline.__call__` with `LCMScheduler` and explicit timesteps.

use crate::checkpoint::ModelParts;
use crate::clip::ClipTextModel;
use crate::rng::TorchRng;
use crate::scheduler;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet;
use crate::vae::VaeDecoder;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

/// Prompt conditioning for one image: `context` `[1, 77, cross]`, `pooled` `[1, P]`.
#[derive(Clone)]
pub struct Conditioning {
    pub context: Tensor,
    pub pooled: Tensor,
}

/// One image to make.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub timesteps: Vec<usize>,
    pub cfg: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
}

impl Request {
    /// Classifier-free guidance is on only above 1 (diffusers: `guidance_scale > 1`).
    pub fn cfg_active(&self) -> bool {
        self.cfg > 1.0
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Timings {
    pub encode: f64,
    pub denoise: f64,
    pub decode: f64,
}

pub struct Generated {
    /// Final latents (the sampler's last x0 estimate), `[1, 4, h/8, w/8]`, f32.
    pub latents: Tensor,
    /// 8-bit RGB, row-major, `width * height * 3` bytes.
    pub rgb: Vec<u8>,
    pub width: usize,
    pub height: usize,
    pub timings: Timings,
}

pub struct Pipeline {
    pub model_name: String,
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    text_encoder: ClipTextModel,
    text_encoder_2: ClipTextModel,
    unet: UNet,
    vae: VaeDecoder,
    device: Device,
    dtype: DType,
    alphas_cumprod: Vec<f32>,
    force_zeros_for_empty_prompt: bool,
}

/// The dtype to compute in on a device: f32 on the CPU (candle's CPU bf16 convolution is
/// missing and f16 is slower), f16 on GPUs.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

impl Pipeline {
    pub fn load(parts: ModelParts, device: &Device, dtype: DType) -> Result<Self> {
        let ModelParts { name, .. } = &parts;
        let name = name.clone();
        let te = ClipTextModel::new(
            &parts.text_encoder_config,
            parts.text_encoder.var_builder(dtype, device),
        )
        .with_context(|| {
            format!(
                "{}: cannot build text encoder 1",
                parts.text_encoder.describe()
            )
        })?;
        let te2 = ClipTextModel::new(
            &parts.text_encoder_2_config,
            parts.text_encoder_2.var_builder(dtype, device),
        )
        .with_context(|| {
            format!(
                "{}: cannot build text encoder 2",
                parts.text_encoder_2.describe()
            )
        })?;
        let unet = UNet::new(&parts.unet_config, parts.unet.var_builder(dtype, device))
            .with_context(|| format!("{}: cannot build the UNet", parts.unet.describe()))?;
        // diffusers' force_upcast: the SDXL VAE overflows in f16, so it always decodes in f32.
        let vae = VaeDecoder::new(&parts.vae_config, parts.vae.var_builder(DType::F32, device))
            .with_context(|| format!("{}: cannot build the VAE", parts.vae.describe()))?;
        let cross = parts.text_encoder_config.hidden_size + parts.text_encoder_2_config.hidden_size;
        if cross != parts.unet_config.cross_attention_dim {
            bail!(
                "{name}: the text encoders give {cross}-wide context, the UNet expects {}",
                parts.unet_config.cross_attention_dim
            );
        }
        if parts.text_encoder_2_config.projection_dim != Some(parts.unet_config.pooled_dim()) {
            bail!(
                "{name}: text encoder 2 projects to {:?}, the UNet's added conditioning expects {}",
                parts.text_encoder_2_config.projection_dim,
                parts.unet_config.pooled_dim()
            );
        }
        Ok(Self {
            model_name: name,
            tokenizer: parts.tokenizer,
            tokenizer_2: parts.tokenizer_2,
            text_encoder: te,
            text_encoder_2: te2,
            unet,
            vae,
            device: device.clone(),
            dtype,
            alphas_cumprod: scheduler::sdxl_alphas_cumprod(),
            force_zeros_for_empty_prompt: parts.force_zeros_for_empty_prompt,
        })
    }

    pub fn unet(&self) -> &UNet {
        &self.unet
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Pixels per latent along each axis (8 for SDXL).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// Token ids of both tokenizers, 77 each.
    pub fn token_ids(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        Ok((
            self.tokenizer.encode(prompt)?,
            self.tokenizer_2.encode(prompt)?,
        ))
    }

    /// SDXL's prompt encoding: both encoders' penultimate hidden states side by side, and
    /// encoder 2's projected pooled output.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Conditioning> {
        let (ids1, ids2) = self.token_ids(prompt)?;
        let ids1 = Tensor::new(ids1.as_slice(), &self.device)?.unsqueeze(0)?;
        let ids2 = Tensor::new(ids2.as_slice(), &self.device)?.unsqueeze(0)?;
        let o1 = self.text_encoder.encode(&ids1)?;
        let o2 = self.text_encoder_2.encode(&ids2)?;
        let context = Tensor::cat(&[o1.penultimate, o2.penultimate], 2)?.to_dtype(DType::F32)?;
        let pooled = o2
            .pooled
            .context("text encoder 2 has no projection")?
            .to_dtype(DType::F32)?;
        Ok(Conditioning { context, pooled })
    }

    /// The negative branch: the encoded negative prompt, or zeros when none was given
    /// (diffusers' `force_zeros_for_empty_prompt`).
    pub fn encode_negative(
        &self,
        negative: Option<&str>,
        like: &Conditioning,
    ) -> Result<Conditioning> {
        match negative {
            None if self.force_zeros_for_empty_prompt => Ok(Conditioning {
                context: like.context.zeros_like()?,
                pooled: like.pooled.zeros_like()?,
            }),
            n => self.encode_prompt(n.unwrap_or("")),
        }
    }

    /// Run the DMD2 sampler; returns the final latents `[1, 4, h, w]` (f32).
    pub fn denoise(
        &self,
        req: &Request,
        cond: &Conditioning,
        uncond: Option<&Conditioning>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let s = self.vae_scale_factor();
        let (h, w) = (req.height / s, req.width / s);
        let c = self.unet.config().in_channels;
        let mut rng = TorchRng::new(req.seed);
        let shape = (1, c, h, w);
        let numel = c * h * w;
        // LCMScheduler's init_noise_sigma is 1.
        let mut latents = Tensor::from_vec(rng.randn(numel), shape, &self.device)?;
        let (context, pooled) = match uncond {
            Some(u) => (
                Tensor::cat(&[&u.context, &cond.context], 0)?,
                Tensor::cat(&[&u.pooled, &cond.pooled], 0)?,
            ),
            None => (cond.context.clone(), cond.pooled.clone()),
        };
        let batch = context.dim(0)?;
        let (hf, wf) = (req.height as f32, req.width as f32);
        // add_time_ids = original size + crop top-left + target size
        let ids = [hf, wf, 0.0, 0.0, hf, wf].repeat(batch);
        let time_ids = Tensor::from_vec(ids, (batch, 6), &self.device)?;
        let context = context.to_dtype(self.dtype)?;
        let pooled = pooled.to_dtype(self.dtype)?;
        let n = req.timesteps.len();
        for (i, &t) in req.timesteps.iter().enumerate() {
            let input = if uncond.is_some() {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let eps = self
                .unet
                .forward(
                    &input.to_dtype(self.dtype)?,
                    t as f64,
                    &context,
                    &pooled,
                    &time_ids,
                )?
                .to_dtype(DType::F32)?;
            let eps = if uncond.is_some() {
                let (u, c) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
                (&u + ((c - &u)? * req.cfg)?)?
            } else {
                eps
            };
            let st = scheduler::lcm_step(&self.alphas_cumprod, &req.timesteps, i);
            let denoised = ((&latents * st.x_coef)? + (eps * st.eps_coef)?)?;
            latents = match st.renoise {
                Some((a, b)) => {
                    let noise = Tensor::from_vec(rng.randn(numel), shape, &self.device)?;
                    ((denoised * a)? + (noise * b)?)?
                }
                None => denoised,
            };
            let total = latents
                .abs()?
                .sum_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            if !total.is_finite() {
                bail!(
                    "the latents became NaN/Inf at step {} of {n} (timestep {t}): numerical overflow or broken weights",
                    i + 1
                );
            }
            progress(i + 1, n);
        }
        Ok(latents)
    }

    /// VAE decode (in f32) and diffusers' post-processing to 8-bit RGB.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<u8>> {
        let image = self.vae.decode(&latents.to_dtype(DType::F32)?)?;
        Ok(crate::vae::to_rgb8(&image.squeeze(0)?)?)
    }

    /// Raw VAE output in [-1, 1] before post-processing, `[1, 3, H, W]`.
    pub fn decode_raw(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.vae.decode(&latents.to_dtype(DType::F32)?)?)
    }

    pub fn generate(
        &self,
        req: &Request,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        check_size(req.width, req.height, self.vae_scale_factor())?;
        let t0 = Instant::now();
        let cond = self.encode_prompt(&req.prompt)?;
        let uncond = if req.cfg_active() {
            Some(self.encode_negative(req.negative_prompt.as_deref(), &cond)?)
        } else {
            None
        };
        let t1 = Instant::now();
        let latents = self.denoise(req, &cond, uncond.as_ref(), progress)?;
        let t2 = Instant::now();
        let rgb = self.decode(&latents)?;
        let t3 = Instant::now();
        Ok(Generated {
            latents,
            rgb,
            width: req.width,
            height: req.height,
            timings: Timings {
                encode: (t1 - t0).as_secs_f64(),
                denoise: (t2 - t1).as_secs_f64(),
                decode: (t3 - t2).as_secs_f64(),
            },
        })
    }
}

/// Sizes must be whole numbers of latents (multiples of 8 for SDXL).
pub fn check_size(width: usize, height: usize, multiple: usize) -> Result<()> {
    if width == 0
        || height == 0
        || !width.is_multiple_of(multiple)
        || !height.is_multiple_of(multiple)
    {
        bail!("width and height must be positive multiples of {multiple} (got {width}x{height})");
    }
    Ok(())
}
