//! The SDXL + DMD2 text-to-image pipeline: encode the prompt with both CLIP encoders, run the
//! DMD2 sampler on the UNet, decode with the VAE. Mirrors diffusers'
//! `StableDiffusionXLPipeline.__call__` with `LCMScheduler` and explicit timesteps.

use crate::checkpoint::ModelParts;
use crate::clip::ClipTextModel;
pub use crate::conditioning::Conditioning;
use crate::conditioning::TextEncoders;
use crate::precision::{Precision, RunPrecision};
use crate::prompt_syntax::PromptSyntax;
use crate::rng::TorchRng;
use crate::scheduler::SamplerSpec;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet;
use crate::vae::{Encoder, Vae};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

/// One image to make.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// How both prompts are read (A1111 weights and chunks, or plain text).
    pub prompt_syntax: PromptSyntax,
    pub sampler: SamplerSpec,
    pub cfg: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// img2img or inpainting: the image (and mask) to start from.
    pub init: Option<crate::img2img::InitImage>,
}

impl Request {
    /// Classifier-free guidance is on only above 1 (diffusers: `guidance_scale > 1`).
    pub fn cfg_active(&self) -> bool {
        self.cfg > 1.0
    }
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub encode: f64,
    pub denoise: f64,
    pub decode: f64,
    /// Each UNet step (with its sampler step), in order: `denoise` split by step.
    pub steps: Vec<f64>,
}

/// Inpainting's state through the loop.
struct Inpaint {
    /// `[1, 1, h, w]` latent-sized mask, 1 = repaint.
    mask: Tensor,
    image_latents: Tensor,
    /// The noise the first latents were made with (reused to noise `image_latents`).
    noise: Tensor,
    timesteps: Vec<usize>,
}

/// A batch between its denoising loop and its decode.
struct Denoised {
    latents: Tensor,
    /// Start, end of text encoding, end of each step.
    t0: Instant,
    t1: Instant,
    step_ends: Vec<Instant>,
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
    text: Text,
    /// `None` once released for the last decode ([`Pipeline::generate_last_batch`]).
    unet: Option<UNet>,
    vae: Vae,
    /// The VAE's weights and config, for the encoder img2img builds on first use.
    vae_weights: (
        std::sync::Arc<crate::weights::ComponentWeights>,
        crate::config::VaeArch,
    ),
    vae_encoder: std::sync::OnceLock<Encoder>,
    device: Device,
    precision: RunPrecision,
    /// Tile size in latents when the VAE decodes in tiles.
    vae_tile: Option<usize>,
    force_zeros_for_empty_prompt: bool,
    embeddings: crate::conditioning::TextEmbeddings,
    /// Shown the sampler's x0 estimate after each step, when set.
    preview: Option<std::sync::Mutex<crate::preview::Preview>>,
}

/// How prompts become conditioning: the two text encoders, or — for runs whose prompts are
/// all known when the model loads — the encodings of those prompts, made before the UNet
/// was loaded (the encoders, 3.3 GB in f32 for SDXL, are never in memory beside it).
enum Text {
    Encoders(ClipTextModel, ClipTextModel),
    Encoded {
        prompts: std::collections::HashMap<(PromptSyntax, String), Conditioning>,
        /// The empty prompt's, which pads prompts of fewer chunks than their neighbours;
        /// `None` when all the prompts have as many chunks (nothing is ever padded).
        empty: Option<Conditioning>,
    },
}

impl Pipeline {
    /// Loads every part; prompts are encoded as they come.
    pub fn load(parts: ModelParts, device: &Device, precision: RunPrecision) -> Result<Self> {
        Self::load_inner(parts, device, precision, None)
    }

    /// Loads the text encoders, encodes `prompts` and frees the encoders, then loads the
    /// UNet and the VAE: the pipeline can make images for these prompts only, and never
    /// holds the encoders and the UNet at once.
    pub fn load_for_prompts(
        parts: ModelParts,
        device: &Device,
        precision: RunPrecision,
        prompts: &[(PromptSyntax, &str)],
    ) -> Result<Self> {
        Self::load_inner(parts, device, precision, Some(prompts))
    }

    fn load_inner(
        parts: ModelParts,
        device: &Device,
        precision: RunPrecision,
        up_front: Option<&[(PromptSyntax, &str)]>,
    ) -> Result<Self> {
        let ModelParts { name, .. } = &parts;
        let name = name.clone();
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
        let te = ClipTextModel::new(
            &parts.text_encoder_config,
            parts.text_encoder.var_builder(precision.text, device),
        )
        .with_context(|| {
            format!(
                "{}: cannot build text encoder 1",
                parts.text_encoder.describe()
            )
        })?;
        let te2 = ClipTextModel::new(
            &parts.text_encoder_2_config,
            parts.text_encoder_2.var_builder(precision.text, device),
        )
        .with_context(|| {
            format!(
                "{}: cannot build text encoder 2",
                parts.text_encoder_2.describe()
            )
        })?;
        let embeddings = crate::conditioning::TextEmbeddings::new(
            parts.embeddings.clone(),
            &parts.tokenizer,
            &parts.tokenizer_2,
        )?;
        let text = match up_front {
            None => Text::Encoders(te, te2),
            Some(prompts) => {
                let encoders = TextEncoders {
                    tokenizer: &parts.tokenizer,
                    tokenizer_2: &parts.tokenizer_2,
                    encoder: &te,
                    encoder_2: &te2,
                    device,
                    embeddings: &embeddings,
                };
                let mut encoded = std::collections::HashMap::new();
                for &(syntax, p) in prompts {
                    if let std::collections::hash_map::Entry::Vacant(slot) =
                        encoded.entry((syntax, p.to_string()))
                    {
                        slot.insert(encoders.encode(syntax, p)?);
                    }
                }
                // Padding (the empty prompt's conditioning) is needed only between prompts
                // of different chunk counts; a run whose prompts all have as many (the usual
                // single prompt) skips a pass of both encoders.
                let mut counts = std::collections::BTreeSet::new();
                for c in encoded.values() {
                    counts.insert(c.chunks()?);
                }
                let empty = if counts.len() > 1 {
                    Some(encoders.encode_empty()?)
                } else {
                    None
                };
                // Done with the encoders: freed here, before the UNet is read (SDXL's are
                // 3.3 GB in f32), not at the end of this function.
                drop((te, te2));
                Text::Encoded {
                    prompts: encoded,
                    empty,
                }
            }
        };
        let unet = UNet::new(
            &parts.unet_config,
            parts.unet.var_builder(precision.unet, device),
        )
        .with_context(|| format!("{}: cannot build the UNet", parts.unet.describe()))?;
        let vae = Vae::new(
            &parts.vae_config,
            parts.vae.var_builder(precision.vae, device),
        )
        .with_context(|| format!("{}: cannot build the VAE", parts.vae.describe()))?;
        Ok(Self {
            model_name: name,
            tokenizer: parts.tokenizer,
            tokenizer_2: parts.tokenizer_2,
            text,
            unet: Some(unet),
            vae,
            vae_weights: (parts.vae.clone(), parts.vae_config.clone()),
            vae_encoder: std::sync::OnceLock::new(),
            device: device.clone(),
            precision,
            vae_tile: None,
            force_zeros_for_empty_prompt: parts.force_zeros_for_empty_prompt,
            embeddings,
            preview: None,
        })
    }

    /// The UNet; `None` after [`Pipeline::generate_last_batch`] released it.
    pub fn unet(&self) -> Option<&UNet> {
        self.unet.as_ref()
    }

    fn unet_or_err(&self) -> Result<&UNet> {
        self.unet
            .as_ref()
            .context("the UNet was released after the last batch (generate_last_batch)")
    }

    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    pub fn precision(&self) -> RunPrecision {
        self.precision
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Pixels per latent along each axis (8 for SDXL).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// Token ids of both tokenizers for a plain prompt, 77 each.
    pub fn token_ids(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        Ok((
            self.tokenizer.encode(prompt)?,
            self.tokenizer_2.encode(prompt)?,
        ))
    }

    /// The first tokenizer (A1111's chunks and `dmd2 tokens` use its ids).
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// SDXL's prompt encoding (see [`crate::conditioning`]): `[1, 77·k, cross]` and
    /// `[1, P]`. A pipeline loaded [`for_prompts`](Pipeline::load_for_prompts) knows those
    /// prompts only.
    pub fn encode_prompt(&self, syntax: PromptSyntax, prompt: &str) -> Result<Conditioning> {
        match &self.text {
            Text::Encoders(te1, te2) => self.encoders(te1, te2).encode(syntax, prompt),
            Text::Encoded { prompts, .. } => prompts
                .get(&(syntax, prompt.to_string()))
                .cloned()
                .with_context(|| {
                    format!("prompt {prompt:?} is not one this pipeline was loaded for")
                }),
        }
    }

    /// The empty prompt's conditioning: what pads prompts of fewer chunks.
    pub fn encode_empty(&self) -> Result<Conditioning> {
        match &self.text {
            Text::Encoders(te1, te2) => self.encoders(te1, te2).encode_empty(),
            Text::Encoded { empty, .. } => empty.clone().context(
                "the empty prompt was not encoded: the prompts this pipeline was loaded for all have as many chunks",
            ),
        }
    }

    fn encoders<'a>(&'a self, te1: &'a ClipTextModel, te2: &'a ClipTextModel) -> TextEncoders<'a> {
        TextEncoders {
            tokenizer: &self.tokenizer,
            tokenizer_2: &self.tokenizer_2,
            encoder: te1,
            encoder_2: te2,
            device: &self.device,
            embeddings: &self.embeddings,
        }
    }

    /// The negative branch for one image: the encoded negative prompt, or zeros shaped as
    /// `like` when none was given (diffusers' `force_zeros_for_empty_prompt`).
    pub fn encode_negative(
        &self,
        syntax: PromptSyntax,
        negative: Option<&str>,
        like: &Conditioning,
    ) -> Result<Conditioning> {
        match negative {
            None if self.force_zeros_for_empty_prompt => Ok(Conditioning {
                context: like.context.zeros_like()?,
                pooled: like.pooled.zeros_like()?,
            }),
            n => self.encode_prompt(syntax, n.unwrap_or("")),
        }
    }

    /// Run the sampler for a batch of images that share size, sampler and CFG scale; image
    /// `b` draws all its noise from its own generator seeded with `reqs[b].seed`, so it comes
    /// out exactly as if generated alone. Returns the final latents `[B, 4, h, w]` (f32).
    pub fn denoise(
        &self,
        reqs: &[Request],
        cond: &Conditioning,
        uncond: Option<&Conditioning>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let first = reqs.first().context("empty batch")?;
        check_batch(reqs)?;
        let s = self.vae_scale_factor();
        let (h, w) = (first.height / s, first.width / s);
        let unet = self.unet_or_err()?;
        let c = unet.config().in_channels;
        let b = reqs.len();
        let mut rngs: Vec<TorchRng> = reqs.iter().map(|r| TorchRng::new(r.seed)).collect();
        let shape = (b, c, h, w);
        let (mut sampler, mut latents, inpaint) = match &first.init {
            None => {
                let sampler = first.sampler.build()?;
                let init = crate::scheduler::noise_like(
                    &Tensor::zeros(shape, DType::F32, &self.device)?,
                    &mut rngs,
                )?;
                let latents = (init * sampler.init_noise_sigma())?;
                (sampler, latents, None)
            }
            Some(init) => self.start_from_image(first, init, shape, &mut rngs)?,
        };
        let (context, pooled) = match uncond {
            Some(u) => (
                Tensor::cat(&[&u.context, &cond.context], 0)?,
                Tensor::cat(&[&u.pooled, &cond.pooled], 0)?,
            ),
            None => (cond.context.clone(), cond.pooled.clone()),
        };
        let rows = context.dim(0)?;
        let (hf, wf) = (first.height as f32, first.width as f32);
        // add_time_ids = original size + crop top-left + target size
        let ids = [hf, wf, 0.0, 0.0, hf, wf].repeat(rows);
        let time_ids = Tensor::from_vec(ids, (rows, 6), &self.device)?;
        let act = self.precision.unet.activations;
        let context = context.to_dtype(act)?;
        let pooled = pooled.to_dtype(act)?;
        let timesteps = sampler.timesteps().to_vec();
        let n = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            crate::cancel::check()?;
            let x = sampler.scale_model_input(&latents, i)?;
            // CFG: negatives first, then positives, in one UNet call (as diffusers).
            let input = if uncond.is_some() {
                Tensor::cat(&[&x, &x], 0)?
            } else {
                x
            };
            let eps = unet
                .forward(&input.to_dtype(act)?, t, &context, &pooled, &time_ids)?
                .to_dtype(DType::F32)?;
            let eps = if uncond.is_some() {
                let (u, c) = (eps.narrow(0, 0, b)?, eps.narrow(0, b, b)?);
                (&u + ((c - &u)? * first.cfg)?)?
            } else {
                eps
            };
            latents = sampler.step(&eps, i, &latents, &mut rngs)?;
            // Inpainting with a 4-channel UNet: outside the mask the latents are the init
            // image's, noised to the next timestep (none after the last).
            if let Some(Inpaint {
                mask,
                image_latents,
                noise,
                timesteps,
            }) = &inpaint
            {
                let kept = match timesteps.get(i + 1) {
                    Some(&next) => crate::img2img::add_noise(image_latents, noise, next)?,
                    None => image_latents.clone(),
                };
                latents = (kept.broadcast_mul(&(1.0 - mask)?)? + latents.broadcast_mul(mask)?)?;
            }
            check_finite(&latents, i, n, t)?;
            if let Some(p) = &self.preview
                && let Some(x0) = sampler.denoised()
            {
                p.lock()
                    .map_err(|_| anyhow::anyhow!("a preview failed earlier"))?
                    .show(i + 1, n, x0)?;
            }
            progress(i + 1, n);
        }
        Ok(latents)
    }

    /// img2img and inpainting (one image): the DMD2 sampler over the timesteps the strength
    /// keeps, and the first latents: the init image VAE-encoded in f32 and sampled from its
    /// latent distribution (the image's generator: draw 1; the tiny VAE has no distribution and
    /// makes no draw), scaled, and noised to the first
    /// kept timestep (draw 2) — pure noise for inpainting at strength 1 — as diffusers'
    /// `prepare_latents`. Inpainting also encodes the masked image (draw 3; a 4-channel
    /// UNet never reads it, so only its draw is made here).
    fn start_from_image(
        &self,
        req: &Request,
        init: &crate::img2img::InitImage,
        shape: (usize, usize, usize, usize),
        rngs: &mut [TorchRng],
    ) -> Result<(Box<dyn crate::scheduler::Sampler>, Tensor, Option<Inpaint>)> {
        if req.sampler.kind != crate::scheduler::SamplerKind::Dmd2 || rngs.len() != 1 {
            bail!("an init image works with the dmd2 sampler, one image per UNet call");
        }
        let timesteps =
            crate::img2img::strength_timesteps(&req.sampler.dmd2_timesteps()?, init.strength)?;
        let sampler = crate::scheduler::SamplerSpec::dmd2(timesteps.clone()).build()?;
        let (_, channels, h, w) = init.image.dims4()?;
        let image_latents = if channels == shape.1 && init.mask.is_none() {
            // Latents already (a latent upscale): used as they are, no draw.
            init.image.to_device(&self.device)?
        } else {
            if (w, h) != (req.width, req.height) {
                bail!(
                    "internal error: the init image is {w}x{h}, the image {}x{}",
                    req.width,
                    req.height
                );
            }
            let image = init
                .image
                .to_device(&self.device)?
                .to_dtype(self.precision.vae.activations)?;
            self.vae_encoder()?
                .encode(&image, rngs)?
                .to_dtype(DType::F32)?
        };
        if image_latents.dims4()? != shape {
            bail!(
                "the VAE makes latents {:?}, the UNet takes {shape:?}",
                image_latents.dims()
            );
        }
        let noise = crate::scheduler::noise_like(&image_latents, rngs)?;
        let Some(mask) = &init.mask else {
            let latents = crate::img2img::add_noise(&image_latents, &noise, timesteps[0])?;
            return Ok((sampler, latents, None));
        };
        if self.vae_encoder()?.samples() {
            let _masked_image_draw = crate::scheduler::noise_like(&image_latents, rngs)?;
        }
        let latents = if init.strength == 1.0 {
            (&noise * sampler.init_noise_sigma())?
        } else {
            crate::img2img::add_noise(&image_latents, &noise, timesteps[0])?
        };
        // torch.nn.functional.interpolate(mask, size=latent size): nearest, source pixel
        // floor(i · H / h).
        let (_, _, lh, lw) = shape;
        let m = mask
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut small = Vec::with_capacity(lh * lw);
        for y in 0..lh {
            let sy = (y * h) / lh;
            for x in 0..lw {
                small.push(m[sy * w + (x * w) / lw]);
            }
        }
        let mask = Tensor::from_vec(small, (1, 1, lh, lw), &self.device)?;
        Ok((
            sampler,
            latents,
            Some(Inpaint {
                mask,
                image_latents,
                noise,
                timesteps,
            }),
        ))
    }

    /// The hires fix's second pass for an image `first` made from `req`: `first` enlarged
    /// (its 8-bit pixels with PIL's Lanczos, or its latents), then img2img at the larger size
    /// with the same prompts and seed, over DMD2's timesteps for `hires.steps` cut by
    /// `hires.strength` — the same as saving `first`, resizing it and running
    /// `--init-image` on it by hand.
    pub fn hires_pass(
        &self,
        req: &Request,
        first: &Generated,
        hires: &crate::img2img::Hires,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        use crate::img2img::HiresUpscaler;
        let (width, height) = hires.size(first.width, first.height);
        let s = self.vae_scale_factor();
        let image = match hires.upscaler {
            HiresUpscaler::Lanczos => crate::init_image::Pixels {
                width: first.width,
                height: first.height,
                channels: 3,
                data: first.rgb.clone(),
            }
            .resize_lanczos(width, height)
            .to_tensor(true, &Device::Cpu)?,
            up => crate::img2img::upscale_latents(
                &first.latents,
                height / s,
                width / s,
                up == HiresUpscaler::Latent,
            )?,
        };
        let second = Request {
            width,
            height,
            sampler: crate::scheduler::SamplerSpec::dmd2(crate::scheduler::dmd2::dmd2_timesteps(
                hires.steps,
            )?),
            init: Some(crate::img2img::InitImage {
                image,
                mask: None,
                strength: hires.strength,
                paste_alpha: None,
            }),
            ..req.clone()
        };
        let mut out = self.generate(&second, progress)?;
        // The image's timings are both passes': steps of the first, then of the second.
        let (a, b) = (&first.timings, &mut out.timings);
        b.encode += a.encode;
        b.denoise += a.denoise;
        b.decode += a.decode;
        b.steps = a.steps.iter().chain(&b.steps).copied().collect();
        Ok(out)
    }

    /// The VAE encoder, built on first use (text-to-image never needs it).
    fn vae_encoder(&self) -> Result<&Encoder> {
        if let Some(e) = self.vae_encoder.get() {
            return Ok(e);
        }
        let (weights, config) = &self.vae_weights;
        // The decoder's precision: diffusers upcasts the VAE to f32 to encode when its config
        // says `force_upcast`, as it does to decode.
        let e = Encoder::new(
            config,
            weights.var_builder(self.precision.vae, &self.device),
        )
        .with_context(|| format!("{}: cannot build the VAE encoder", weights.describe()))?;
        Ok(self.vae_encoder.get_or_init(|| e))
    }

    /// VAE decode and diffusers' post-processing to 8-bit RGB, one buffer per image.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<Vec<u8>>> {
        let image = self.decode_raw(latents)?;
        (0..image.dim(0)?)
            .map(|b| Ok(crate::vae::to_rgb8(&image.get(b)?)?))
            .collect()
    }

    /// Raw VAE output in [-1, 1] before post-processing, `[B, 3, H, W]`.
    pub fn decode_raw(&self, latents: &Tensor) -> Result<Tensor> {
        let z = latents.to_dtype(self.precision.vae.activations)?;
        let image = match self.vae_tile {
            Some(tile) => self.vae.decode_tiled(&z, tile)?,
            None => self.vae.decode(&z)?,
        };
        Ok(image.to_dtype(DType::F32)?)
    }

    /// Previews from now on (`None`: none); see [`crate::preview`].
    pub fn set_preview(&mut self, preview: Option<crate::preview::Preview>) {
        self.preview = preview.map(std::sync::Mutex::new);
    }

    /// Decode in tiles of `tile` latents from now on (`None`: whole images); see
    /// [`crate::vae::VaeDecoder::decode_tiled`].
    pub fn set_vae_tiling(&mut self, tile: Option<usize>) {
        self.vae_tile = tile;
    }

    /// Encode, denoise and decode a batch of compatible requests (see [`Pipeline::denoise`]).
    pub fn generate_batch(
        &self,
        reqs: &[Request],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Generated>> {
        let d = self.encode_and_denoise(reqs, progress)?;
        self.decode_batch(reqs, d)
    }

    /// [`Pipeline::generate_batch`] for a run's last batch: the UNet is freed once the
    /// latents are made, so the VAE decode (the run's largest activations: 4 GB at 1024² in
    /// f32) never shares memory with the UNet's weights (5 GB in bf16). The pipeline cannot
    /// denoise again afterwards.
    pub fn generate_last_batch(
        &mut self,
        reqs: &[Request],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Generated>> {
        let d = self.encode_and_denoise(reqs, progress)?;
        self.unet = None;
        self.decode_batch(reqs, d)
    }

    /// The first half of a batch: text encoding and the denoising loop, with their timings.
    fn encode_and_denoise(
        &self,
        reqs: &[Request],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Denoised> {
        let first = reqs.first().context("empty batch")?;
        check_batch(reqs)?;
        check_size(first.width, first.height, self.vae_scale_factor())?;
        let t0 = Instant::now();
        // Each image's prompt and negative, padded to the same number of chunks (A1111's
        // `pad_cond_uncond`).
        let mut conds = Vec::with_capacity(reqs.len());
        let mut unconds = Vec::with_capacity(reqs.len());
        let mut empty = None;
        for r in reqs {
            let c = self.encode_prompt(r.prompt_syntax, &r.prompt)?;
            if !first.cfg_active() {
                conds.push(c);
                continue;
            }
            let u = self.encode_negative(r.prompt_syntax, r.negative_prompt.as_deref(), &c)?;
            let k = c.chunks()?.max(u.chunks()?);
            if c.chunks()? != k || u.chunks()? != k {
                let e = match &empty {
                    Some(e) => e,
                    None => empty.insert(self.encode_empty()?),
                };
                conds.push(c.padded(k, e)?);
                unconds.push(u.padded(k, e)?);
            } else {
                conds.push(c);
                unconds.push(u);
            }
        }
        let t1 = Instant::now();
        let mut step_ends = Vec::new();
        let mut progress = |i, n| {
            step_ends.push(Instant::now());
            progress(i, n)
        };
        // Images whose prompts have as many chunks share UNet calls; padding a prompt to a
        // longer neighbour's length would change its image.
        let lengths = conds
            .iter()
            .map(|c| c.chunks())
            .collect::<Result<Vec<_>>>()?;
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (b, &k) in lengths.iter().enumerate() {
            match groups.iter_mut().find(|(len, _)| *len == k) {
                Some((_, members)) => members.push(b),
                None => groups.push((k, vec![b])),
            }
        }
        let mut parts: Vec<Option<Tensor>> = vec![None; reqs.len()];
        for (_, members) in &groups {
            let sub: Vec<Request> = members.iter().map(|&b| reqs[b].clone()).collect();
            let stack = |rows: &[Conditioning]| -> Result<Conditioning> {
                let picked: Vec<Conditioning> = members.iter().map(|&b| rows[b].clone()).collect();
                // Same lengths within a group: the stack pads nothing.
                Conditioning::stack(&picked, &picked[0])
            };
            let cond = stack(&conds)?;
            let uncond = if first.cfg_active() {
                Some(stack(&unconds)?)
            } else {
                None
            };
            let latents = self.denoise(&sub, &cond, uncond.as_ref(), &mut progress)?;
            for (i, &b) in members.iter().enumerate() {
                parts[b] = Some(latents.narrow(0, i, 1)?);
            }
        }
        let parts: Vec<Tensor> = parts.into_iter().flatten().collect();
        let latents = Tensor::cat(&parts, 0)?;
        Ok(Denoised {
            latents,
            t0,
            t1,
            step_ends,
        })
    }

    /// The second half: the VAE decode and the timings of the whole batch.
    fn decode_batch(&self, reqs: &[Request], d: Denoised) -> Result<Vec<Generated>> {
        let first = reqs.first().context("empty batch")?;
        let Denoised {
            latents,
            t0,
            t1,
            step_ends,
        } = d;
        let t2 = Instant::now();
        crate::cancel::check()?;
        let mut images = self.decode(&latents)?;
        for (rgb, r) in images.iter_mut().zip(reqs) {
            if let Some(init) = &r.init
                && let Some(alpha) = &init.paste_alpha
            {
                paste_back(rgb, &init.image, alpha)?;
            }
        }
        let t3 = Instant::now();
        let b = reqs.len() as f64;
        let steps = std::iter::once(t1)
            .chain(step_ends.iter().copied())
            .zip(&step_ends)
            .map(|(start, end)| (*end - start).as_secs_f64() / b)
            .collect();
        let timings = Timings {
            encode: (t1 - t0).as_secs_f64() / b,
            denoise: (t2 - t1).as_secs_f64() / b,
            decode: (t3 - t2).as_secs_f64() / b,
            steps,
        };
        images
            .into_iter()
            .enumerate()
            .map(|(i, rgb)| {
                Ok(Generated {
                    latents: latents.narrow(0, i, 1)?,
                    rgb,
                    width: first.width,
                    height: first.height,
                    timings: timings.clone(),
                })
            })
            .collect()
    }

    pub fn generate(
        &self,
        req: &Request,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        self.generate_batch(std::slice::from_ref(req), progress)?
            .pop()
            .context("no image")
    }
}

/// Requests can share a UNet call when they agree on everything but prompt and seed.
pub fn batchable(a: &Request, b: &Request) -> bool {
    a.width == b.width
        && a.height == b.height
        && a.sampler == b.sampler
        && a.cfg == b.cfg
        && a.init.is_none()
        && b.init.is_none()
}

fn check_batch(reqs: &[Request]) -> Result<()> {
    if let Some(first) = reqs.first()
        && reqs.iter().skip(1).any(|r| !batchable(first, r))
    {
        bail!("internal error: a batch mixes sizes, samplers or CFG scales");
    }
    Ok(())
}

/// Inpainting's finish: `rgb` (8-bit, H×W×3) becomes `alpha·rgb + (1 − alpha)·init`, the init
/// image being `[1, 3, H, W]` in [-1, 1] (its 8-bit values recovered exactly).
fn paste_back(rgb: &mut [u8], init: &Tensor, alpha: &Tensor) -> Result<()> {
    let (_, _, h, w) = init.dims4()?;
    let init = init.flatten_all()?.to_vec1::<f32>()?;
    let alpha = alpha.flatten_all()?.to_vec1::<f32>()?;
    if rgb.len() != h * w * 3 || alpha.len() != h * w {
        bail!("internal error: paste-back sizes differ");
    }
    for i in 0..h * w {
        let a = alpha[i];
        for c in 0..3 {
            let orig = ((init[c * h * w + i] + 1.0) / 2.0 * 255.0).round();
            let new = rgb[i * 3 + c] as f32;
            rgb[i * 3 + c] = (a * new + (1.0 - a) * orig).round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(())
}

/// NaN or Inf in the latents (an f16 overflow, a broken LoRA) stops the image with the step.
fn check_finite(latents: &Tensor, i: usize, n: usize, t: f64) -> Result<()> {
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
    Ok(())
}

/// A rough upper estimate of the memory a run needs on the compute device, in bytes: the
/// weights in the compute dtype plus the largest activations of the UNet (skip connections,
/// attention blocks) and of the VAE decode (full-resolution feature maps and the 3x3
/// convolutions' unfolded inputs). Used to refuse sizes that cannot fit before any work.
pub fn estimate_bytes(
    parts: &ModelParts,
    precision: RunPrecision,
    width: usize,
    height: usize,
    batch: usize,
    cfg: bool,
    vae_tile_px: Option<usize>,
) -> u64 {
    let bytes = |c: &crate::weights::ComponentWeights, p: Precision| -> u64 { c.bytes_in(p) };
    let unet_w = bytes(&parts.unet, precision.unet);
    let vae_w = bytes(&parts.vae, precision.vae);
    let text_w =
        bytes(&parts.text_encoder, precision.text) + bytes(&parts.text_encoder_2, precision.text);
    let px = (width * height) as u64;
    let rows = (batch * if cfg { 2 } else { 1 }) as u64;
    let c0 = parts
        .unet_config
        .block_out_channels
        .first()
        .copied()
        .unwrap_or(320) as u64;
    // About 16 feature maps of the first level's size are alive at once (skips included),
    // plus the attention and convolution work buffers.
    let unet_act = rows * 16 * c0 * (px / 64) * 4 + (64 << 20);
    let v0 = parts.vae_config.full_resolution_channels() as u64;
    // A handful of full-resolution feature maps per image during the last decoder level
    // (of one tile when tiling, plus the decoded tiles themselves).
    let vae_act = match vae_tile_px {
        Some(t) => {
            let tile_px = (t * t) as u64;
            batch as u64 * (tile_px.min(px) * 4 * v0 * 6 + px * 3 * 4 * 2) + (64 << 20)
        }
        None => batch as u64 * px * 4 * v0 * 6 + (64 << 20),
    };
    // The text encoders run first (and are freed when all prompts are known up front); the
    // UNet and VAE weights stay for the whole run.
    (text_w + unet_w + vae_w).max(unet_w + vae_w + unet_act.max(vae_act))
}

/// Memory available to this process on the CPU (Linux `MemAvailable`), if known.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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
