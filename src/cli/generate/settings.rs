//! One resolved [`Settings`] for a `dmd2 gen` run: built-in defaults < preset < `--from-png` <
//! flags, every value checked once, here, whatever source it came from (the same timestep,
//! prompt, size and count checks for flags, presets, PNG chunks and — per line — prompt
//! files). Nothing is loaded; the model's native size, which needs the model, is settled in
//! [`super::jobs::Base`].

use super::args::{GenArgs, OnError, SeedArg};
use crate::device::DeviceChoice;
use crate::img2img::{Hires, HiresUpscaler};
use crate::init_image::Loaded;
use crate::loader::{MemoryPolicy, ModelSpec};
use crate::lora::LoraSpec;
use crate::metadata::{self, ImageSettings};
use crate::output::file_names;
use crate::precision::DtypeChoice;
use crate::presets::{self, Preset};
use crate::prompt_syntax::PromptSyntax;
use crate::prompts::{self, PromptSource};
use crate::scheduler::{self, SamplerKind, SamplerSpec, Spacing};
use anyhow::{Context, Result, bail};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

/// Where images go.
pub enum Sink {
    Stdout,
    File(PathBuf),
    Dir { dir: PathBuf, template: String },
}

/// Everything a run does, resolved.
pub struct Settings {
    pub model: ModelSpec,
    pub preset: Option<String>,
    pub sampler: SamplerSpec,
    /// The timestep spacing was given (flag, PNG, preset); otherwise the model's scheduler
    /// config decides it.
    pub spacing_explicit: bool,
    pub cfg: f64,
    /// An explicit size (flags, PNG, preset); otherwise the model's native size.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub negative_prompt: Option<String>,
    /// How prompts are read unless a prompt-file line says otherwise.
    pub prompt_syntax: PromptSyntax,
    pub seed: u64,
    /// The seed was drawn at random (and should be printed).
    pub random_seed: bool,
    pub num_images: u64,
    pub batch_size: usize,
    pub source: PromptSource,
    pub sink: Sink,
    pub on_error: OnError,
    pub shard: Option<(u64, u64)>,
    pub skip_existing: bool,
    /// `--no-hash`: no resource hashes in the images' metadata.
    pub no_hash: bool,
    pub json: bool,
    pub quiet: bool,
    pub verbose: bool,
    pub strict: bool,
    pub force: bool,
    pub device: DeviceChoice,
    pub dtype: DtypeChoice,
    pub memory: MemoryPolicy,
    /// Files the run reads besides the model's (prompt file, PNG, preset file): no output may
    /// replace them.
    pub inputs: Vec<PathBuf>,
    /// img2img / inpainting from the flags (or the PNG): read once, before any work.
    pub init_image: Option<Arc<Loaded>>,
    pub mask: Option<Arc<Loaded>>,
    pub strength: Option<f64>,
    /// The hires fix, when asked for.
    pub hires: Option<Hires>,
    /// Inpainting's optional finish (`--mask-blur`, `--paste-back`).
    pub mask_blur: f32,
    pub paste_back: bool,
    /// `--preview`.
    pub preview: Option<PreviewSettings>,
    /// `--quality` of JPEG outputs.
    pub jpeg_quality: u8,
}

/// Where and how often previews are written, and what decodes them.
pub struct PreviewSettings {
    pub path: PathBuf,
    pub every: usize,
    pub vae: Option<String>,
}

impl Settings {
    /// Whether anything of the run goes to stdout (PNG bytes or JSON lines).
    pub fn uses_stdout(&self) -> bool {
        self.json || matches!(self.sink, Sink::Stdout)
    }

    /// Resolves the flags into settings; every error is the user's (bad input).
    pub fn resolve(mut a: GenArgs) -> Result<Settings> {
        // `dmd2 gen "a cat"`: the positional prompt comes first.
        if let Some(p) = a.prompt_positional.take() {
            a.prompt.insert(0, p);
        }
        let png = match &a.from_png {
            Some(p) => {
                let (settings, warnings) = metadata::read_png_settings(p)?;
                for w in warnings {
                    crate::stderr!("warning: {w}");
                }
                Some(settings)
            }
            None => None,
        };
        let png = png.as_ref();
        let preset: Option<Preset> = match &a.preset {
            Some(p) => Some(presets::find(p)?),
            None if a.model.is_none() && png.is_none() => {
                Some(presets::find(presets::DEFAULT_PRESET)?)
            }
            None => None,
        };
        let p = preset.clone().unwrap_or_default();
        let origin = |what: &str| -> String {
            match (&a.from_png, &preset) {
                (Some(f), _) => format!("{} ({what})", f.display()),
                (_, Some(pr)) => format!("preset {} ({what})", pr.name),
                _ => what.to_string(),
            }
        };
        // The files the PNG names, found here (see [`super::from_png`]).
        let finder = a.from_png.as_deref().map(|png| super::from_png::Finder {
            png,
            model_dir: a.model_dir.as_deref(),
            lora_dir: a.lora_dir.as_deref(),
        });
        let from_png = png.zip(finder.as_ref());
        // What the PNG leaves open (another tool's text without `Model:`, a dmd2 image made
        // with the model's own VAE) the preset still fills in.
        let model = match (&a.model, from_png) {
            (Some(m), _) => m.clone(),
            (None, Some((s, f))) if !s.model.trim().is_empty() || p.model.is_none() => {
                f.model(s)?
            }
            _ => p
                .model
                .clone()
                .context("no model: give --model PATH (or a preset that names one)")?,
        };
        let loras = if a.no_lora {
            Vec::new()
        } else if !a.loras.is_empty() {
            a.loras.clone()
        } else if let Some((s, f)) = from_png {
            f.loras(&s.loras)?
        } else {
            p.loras.clone().unwrap_or_default()
        };
        // `PATH[:WEIGHT]` parsed once, here, so a bad weight is refused before any loading.
        let loras = loras
            .iter()
            .map(|l| l.parse::<LoraSpec>().map_err(anyhow::Error::msg))
            .collect::<Result<Vec<_>>>()?;
        let unet = match (&a.unet, from_png) {
            (Some(u), _) => Some(u.clone()),
            (None, Some((s, f))) => s
                .unet
                .as_deref()
                .map(|u| f.unet(u))
                .transpose()?
                .or(p.unet.clone()),
            (None, None) => p.unet.clone(),
        };
        let vae = match (&a.vae, from_png) {
            (Some(v), _) => Some(v.clone()),
            (None, Some((s, f))) => s
                .vae
                .as_deref()
                .map(|v| f.vae(v, s.vae_hash.as_deref()))
                .transpose()?
                .or(p.vae.clone()),
            (None, None) => p.vae.clone(),
        };
        let sampler = resolve_sampler(&a, png, &p).with_context(|| origin("sampler"))?;
        let spacing_explicit =
            a.timestep_spacing.is_some() || png.is_some() || p.timestep_spacing.is_some();
        let cfg = a.cfg.or(png.map(|s| s.cfg)).or(p.cfg).unwrap_or(1.0);
        if !cfg.is_finite() {
            bail!("{}: cfg must be a finite number", origin("cfg"));
        }
        let width = a.width.or(png.map(|s| s.width)).or(p.width);
        let height = a.height.or(png.map(|s| s.height)).or(p.height);
        for (what, v) in [("width", width), ("height", height)] {
            if let Some(v) = v {
                prompts::check_dimension(what, v, a.force).map_err(anyhow::Error::msg)?;
            }
        }
        let negative_prompt = a
            .negative_prompt
            .clone()
            .or_else(|| png.and_then(|s| s.negative_prompt.clone()))
            .or(p.negative_prompt.clone());
        let prompt_syntax = a
            .prompt_syntax
            .or(png.map(|s| s.prompt_syntax))
            .or(p.prompt_syntax)
            .unwrap_or_default();
        if let Some(n) = &negative_prompt {
            prompts::check_prompt("negative prompt", n).map_err(anyhow::Error::msg)?;
            prompts::check_syntax("negative prompt", n, prompt_syntax)
                .map_err(anyhow::Error::msg)?;
        }
        prompts::check_num_images(a.num_images)
            .map_err(|e| anyhow::anyhow!("--num-images: {e}"))?;
        if a.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if let Some(t) = &a.name {
            file_names::check_template(t)?;
        }
        let source = prompt_source(&a, png, prompt_syntax)?;
        let sink = sink(&a, &source)?;
        // Check the whole prompt file before any work when it can be read twice.
        let on_error = a.on_error.unwrap_or(if source.checkable() {
            OnError::Fail
        } else {
            OnError::Skip
        });
        let mut inputs: Vec<PathBuf> = a.from_png.iter().cloned().collect();
        if let PromptSource::File { path, .. } = &source {
            inputs.push(path.clone());
        }
        if let Some(pr) = &preset
            && std::path::Path::new(&pr.origin).is_file()
        {
            inputs.push(pr.origin.clone().into());
        }
        // The PNG's init image and mask (unless the flags name others), found here.
        let png_init = match (&a.init_image, from_png) {
            (None, Some((s, f))) => s.init_image.as_ref().map(|r| (r, f)),
            _ => None,
        };
        let png_mask = match (&a.init_image, &a.mask, from_png) {
            (None, None, Some((s, f))) => s.mask.as_ref().map(|r| (r, f)),
            _ => None,
        };
        let init_path = match (&a.init_image, png_init) {
            (Some(i), _) => Some(i.clone()),
            (None, Some((r, f))) => Some(f.image(r, "init image", "--init-image")?),
            (None, None) => None,
        };
        let mask_path = match (&a.mask, png_mask) {
            (Some(m), _) => Some(m.clone()),
            (None, Some((r, f))) => Some(f.image(r, "mask", "--mask")?),
            (None, None) => None,
        };
        let init_image = init_path
            .as_deref()
            .map(|p| Loaded::read(p).map(Arc::new))
            .transpose()?;
        let mask = mask_path
            .as_deref()
            .map(|p| Loaded::read(p).map(Arc::new))
            .transpose()?;
        // Found by name: say so when the pixels are not the ones the image started from.
        for (loaded, r) in [
            (&init_image, png_init.map(|(r, _)| r)),
            (&mask, png_mask.map(|(r, _)| r)),
        ] {
            if let (Some(l), Some(r), Some(png)) = (loaded, r, &a.from_png)
                && l.sha256 != r.sha256
            {
                crate::stderr!(
                    "warning: {}: {} is not the image {:?} it was made from (its pixels differ); the result will differ",
                    png.display(),
                    l.path.display(),
                    r.path
                );
            }
        }
        if let (Some(i), Some(m)) = (&init_image, &mask)
            && (i.pixels.width, i.pixels.height) != (m.pixels.width, m.pixels.height)
        {
            bail!(
                "{}: the mask is {}x{}, the init image {}x{}",
                m.path.display(),
                m.pixels.width,
                m.pixels.height,
                i.pixels.width,
                i.pixels.height
            );
        }
        let hires = resolve_hires(&a, png, &sampler)?;
        // The size an init image makes, checked before any work.
        if let Some(i) = &init_image {
            let (dw, dh) = crate::init_image::default_size(&i.pixels, 8)
                .map_err(|e| anyhow::anyhow!("{}: {e}", i.path.display()))?;
            for (what, v) in [
                ("width", width.unwrap_or(dw)),
                ("height", height.unwrap_or(dh)),
            ] {
                prompts::check_dimension(what, v, a.force)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", i.path.display()))?;
            }
        }
        let strength = a.strength.or_else(|| png.and_then(|s| s.strength));
        if let Some(st) = strength
            && !(st > 0.0 && st <= 1.0)
        {
            bail!("--strength must be in (0, 1], not {st}");
        }
        for p in [&init_path, &mask_path].into_iter().flatten() {
            if p.as_os_str() != "-" {
                inputs.push(p.clone());
            }
        }
        let (seed, random_seed) = match (a.seed, png.map(|s| s.seed)) {
            (Some(SeedArg::Fixed(s)), _) | (None, Some(s)) => (s, false),
            (Some(SeedArg::Random), _) | (None, None) => (random_seed(), true),
        };
        Ok(Settings {
            model: ModelSpec {
                model,
                unet,
                vae,
                loras,
                embeddings: a.embeddings.clone(),
                embedding_dirs: a.embedding_dir.iter().cloned().collect(),
            },
            preset: preset.map(|p| p.name),
            sampler,
            spacing_explicit,
            cfg,
            width,
            height,
            negative_prompt,
            prompt_syntax,
            seed,
            random_seed,
            num_images: a.num_images,
            batch_size: a.batch_size,
            source,
            sink,
            on_error,
            shard: a.shard,
            skip_existing: a.skip_existing,
            no_hash: a.no_hash,
            json: a.json,
            quiet: a.quiet,
            verbose: a.verbose,
            strict: a.strict,
            force: a.force,
            device: a.device,
            dtype: a.dtype,
            init_image,
            mask,
            strength,
            hires,
            mask_blur: match a.mask_blur.or(png.and_then(|s| s.mask_blur)) {
                Some(b) if !(0.0..=256.0).contains(&b) => {
                    bail!("--mask-blur must be from 0 to 256 pixels, not {b}")
                }
                b => b.unwrap_or(0.0),
            },
            paste_back: a.paste_back || png.is_some_and(|s| s.paste_back),
            jpeg_quality: a.quality.unwrap_or(crate::output::DEFAULT_JPEG_QUALITY),
            preview: match &a.preview {
                None => None,
                Some(path) => Some(PreviewSettings {
                    path: path.clone(),
                    every: match a.preview_every {
                        Some(0) => bail!("--preview-every must be at least 1"),
                        n => n.unwrap_or(1),
                    },
                    vae: a.preview_vae.clone(),
                }),
            },
            memory: MemoryPolicy {
                vae_tiling: a.vae_tiling.then_some(a.vae_tile_size),
                tile_px: a.vae_tile_size,
                force: a.force,
            },
            inputs,
        })
    }
}

/// Sampler, steps, timesteps and spacing, the flags over the PNG over the preset, checked as
/// one: an explicit timestep list from any source must be valid timesteps.
/// `--hires-*` (or the PNG's): a scale in (1, 8], a strength that keeps a step of the
/// second pass's timesteps.
fn resolve_hires(
    a: &GenArgs,
    png: Option<&ImageSettings>,
    sampler: &SamplerSpec,
) -> Result<Option<Hires>> {
    let from_png = png.and_then(|s| s.hires.clone());
    let Some(scale) = a.hires_scale.or(from_png.as_ref().map(|h| h.scale)) else {
        return Ok(None);
    };
    if !(scale > 1.0 && scale <= 8.0) {
        bail!("--hires-scale must be above 1 and at most 8, not {scale}");
    }
    let first_steps = sampler.step_count();
    let h = Hires {
        scale,
        upscaler: a
            .hires_upscale
            .or(from_png.as_ref().map(|h| h.upscaler))
            .unwrap_or(HiresUpscaler::Lanczos),
        strength: a
            .hires_strength
            .or(from_png.as_ref().map(|h| h.strength))
            .unwrap_or(Hires::DEFAULT_STRENGTH),
        steps: a
            .hires_steps
            .or(from_png.as_ref().map(|h| h.steps))
            .unwrap_or(first_steps),
    };
    let ts = scheduler::dmd2::dmd2_timesteps(h.steps).context("--hires-steps")?;
    crate::img2img::strength_timesteps(&ts, h.strength).context("--hires-strength")?;
    Ok(Some(h))
}

fn resolve_sampler(a: &GenArgs, png: Option<&ImageSettings>, p: &Preset) -> Result<SamplerSpec> {
    let kind = a
        .sampler
        .or(png.map(|s| s.sampler.kind))
        .or(p.sampler)
        .unwrap_or(SamplerKind::Dmd2);
    let steps = a
        .steps
        .or(png.map(|s| s.sampler.steps))
        .or(p.steps)
        .unwrap_or(4);
    let timesteps = match &a.timesteps {
        Some(t) => Some(scheduler::parse_timesteps(t)?),
        // An explicit --steps replaces a preset's or image's explicit timestep list.
        None if a.steps.is_some() => None,
        None => png
            .and_then(|s| s.sampler.timesteps.clone())
            .or(p.timesteps.clone()),
    };
    let spacing = a
        .timestep_spacing
        .or(png.map(|s| s.sampler.spacing))
        .or(p.timestep_spacing)
        .unwrap_or(Spacing::Leading);
    let sampler = SamplerSpec {
        kind,
        steps,
        timesteps,
        spacing,
    };
    sampler.validate()?;
    Ok(sampler)
}

fn prompt_source(
    a: &GenArgs,
    png: Option<&ImageSettings>,
    syntax: PromptSyntax,
) -> Result<PromptSource> {
    let source = match (&a.prompt_file, a.prompt.is_empty(), png) {
        (Some(f), _, _) => PromptSource::file(f, a.prompt_format)?,
        (None, false, _) => PromptSource::Flags(a.prompt.clone()),
        (None, true, Some(s)) => PromptSource::Flags(vec![s.prompt.clone()]),
        (None, true, None) => bail!("no prompt: give --prompt TEXT or --prompt-file FILE"),
    };
    if let PromptSource::Flags(ps) = &source {
        for p in ps {
            prompts::check_prompt("prompt", p).map_err(anyhow::Error::msg)?;
            prompts::check_syntax("prompt", p, syntax).map_err(anyhow::Error::msg)?;
        }
    }
    Ok(source)
}

fn sink(a: &GenArgs, source: &PromptSource) -> Result<Sink> {
    let single_image =
        matches!(source, PromptSource::Flags(p) if p.len() == 1) && a.num_images == 1;
    Ok(match (&a.output, &a.out_dir) {
        (Some(_), Some(_)) => bail!("give either --output or --out-dir, not both"),
        (Some(o), None) if o.as_os_str() == "-" => {
            if !single_image {
                bail!("-o - writes one image; use --out-dir for several");
            }
            if std::io::stdout().is_terminal() {
                bail!(
                    "-o -: refusing to write a PNG to a terminal; redirect stdout (dmd2 gen … -o - > image.png)"
                );
            }
            if a.json {
                bail!("-o - and --json both want stdout");
            }
            Sink::Stdout
        }
        (Some(o), None) => {
            if !single_image {
                bail!("--output names one image; use --out-dir for several");
            }
            // The format comes from the extension: an unknown one is refused before any work.
            crate::output::Format::for_path(o, crate::output::DEFAULT_JPEG_QUALITY)?;
            Sink::File(o.clone())
        }
        (None, dir) => {
            if single_image && dir.is_none() && a.name.is_none() {
                Sink::File(PathBuf::from("out.png"))
            } else {
                Sink::Dir {
                    dir: dir.clone().unwrap_or_else(|| PathBuf::from(".")),
                    template: a
                        .name
                        .clone()
                        .unwrap_or_else(|| file_names::DEFAULT_TEMPLATE.to_string()),
                }
            }
        }
    })
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    // Seeds up to 2^53 survive a round trip through JSON tools as exact integers.
    h.finish() >> 11
}
