//! `dmd2 gen`'s flags, as clap parses them: nothing here is resolved or checked beyond its
//! own syntax (see [`super::settings`]).

use crate::device::DeviceChoice;
use crate::img2img::HiresUpscaler;
use crate::precision::DtypeChoice;
use crate::prompt_syntax::PromptSyntax;
use crate::prompts::PromptFormat;
use crate::scheduler::{SamplerKind, Spacing};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct GenArgs {
    /// The prompt, as `dmd2 gen "a cat"` (the same as --prompt "a cat").
    #[arg(value_name = "PROMPT", conflicts_with = "prompt_file")]
    pub prompt_positional: Option<String>,
    /// SDXL model: a diffusers folder, a single-file .safetensors, or a Hugging Face repo id
    /// (ORG/NAME[@REV][/FILE]). Default: the preset's (SDXL base).
    #[arg(long, value_name = "PATH|REPO", env = "DMD2_MODEL")]
    pub model: Option<String>,
    /// LoRA to merge at load, PATH[:WEIGHT] or REPO/FILE[:WEIGHT]; repeatable. Replaces the
    /// preset's LoRAs. DMD2_LORA gives a default: one LoRA, or several separated by `;`.
    #[arg(
        long = "lora",
        value_name = "PATH[:WEIGHT]",
        env = "DMD2_LORA",
        value_delimiter = ';'
    )]
    pub loras: Vec<String>,
    /// A textual-inversion embedding for SDXL (safetensors with clip_l and clip_g), used where
    /// a prompt names it by its file stem (A1111 syntax; weights apply); repeatable.
    #[arg(long = "embedding", value_name = "FILE")]
    pub embeddings: Vec<PathBuf>,
    /// A directory of embeddings (every .safetensors in it, each named by its file stem).
    #[arg(long, value_name = "DIR")]
    pub embedding_dir: Option<PathBuf>,
    /// Where `--from-png` looks for the LoRAs an image names (A1111's `<lora:NAME:W>` tags,
    /// dmd2's file names): NAME.safetensors in DIR or below, else the file whose AutoV3 hash
    /// is the image's `Lora hashes` entry.
    #[arg(long, value_name = "DIR", env = "DMD2_LORA_DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Where `--from-png` looks for the model (and a `--unet` or `--vae` file) an image names:
    /// a file or model folder of that name in DIR or below, else the file whose A1111 hash is
    /// the image's `Model hash` (`VAE hash`).
    #[arg(long, value_name = "DIR", env = "DMD2_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// Use no LoRA, even if the preset names some.
    #[arg(long, conflicts_with = "loras")]
    pub no_lora: bool,
    /// Replace the model's UNet with a diffusers-layout UNet (safetensors or PyTorch .bin).
    #[arg(long, value_name = "FILE|REPO/FILE")]
    pub unet: Option<String>,
    /// Decode (and encode, for img2img) with this VAE instead of the model's: a diffusers
    /// AutoencoderKL or AutoencoderTiny folder or repo, a VAE .safetensors (diffusers or
    /// original keys), REPO/FILE, or `taesdxl` (madebyollin/taesdxl, the tiny VAE: fast,
    /// slightly softer) or `sdxl-vae-fp16-fix` (decodes in f16 on a GPU).
    #[arg(long, value_name = "PATH|REPO")]
    pub vae: Option<String>,
    /// Named settings (see `dmd2 presets`) or a preset .toml file. With neither --model nor
    /// --preset, the default recipe `dmd2-4step` applies.
    #[arg(long, value_name = "NAME|FILE", value_parser = PresetName, hide_possible_values = true)]
    pub preset: Option<String>,
    /// The prompt; repeatable.
    #[arg(long, short = 'p')]
    pub prompt: Vec<String>,
    /// Prompts from a file, one per line (`-` for stdin); `.jsonl` files are JSON Lines.
    #[arg(long, value_name = "FILE|-", conflicts_with = "prompt")]
    pub prompt_file: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub prompt_format: Option<PromptFormat>,
    /// What to steer away from; acts only with --cfg above 1.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// How prompts are read. a1111 (default): `(word)` ×1.1, `[word]` ÷1.1, `(word:1.3)`,
    /// `BREAK`, any length in chunks of 75 tokens, as AUTOMATIC1111/Forge. plain: the text
    /// as is, cut after 75 tokens, as diffusers.
    #[arg(long, value_enum, value_name = "SYNTAX")]
    pub prompt_syntax: Option<PromptSyntax>,
    /// img2img: start from this image (PNG, JPEG, WebP; `-` reads stdin), resized with PIL's
    /// Lanczos to --width/--height when given, else its own size rounded down to a multiple
    /// of 8.
    #[arg(long, value_name = "IMAGE|-")]
    pub init_image: Option<PathBuf>,
    /// Inpainting: repaint where this mask is white (grey levels from 50% up count as
    /// white), keep the init image elsewhere. Same size as the init image.
    #[arg(long, value_name = "IMAGE", requires = "init_image")]
    pub mask: Option<PathBuf>,
    /// Inpainting: blur the mask by this Gaussian radius in pixels first (PIL's GaussianBlur,
    /// as diffusers' mask_processor.blur and A1111's mask blur). Default 0.
    #[arg(long, value_name = "PX", requires = "mask")]
    pub mask_blur: Option<f32>,
    /// Inpainting: paste the init image back outside the (blurred) mask after decoding,
    /// blended by its grey levels (A1111's finish); off by default, as diffusers.
    #[arg(long, requires = "mask")]
    pub paste_back: bool,
    /// How much of the timestep list runs from the init image, in (0, 1]: with 4 steps 0.5
    /// runs 499, 249. Default 0.3 for img2img, 0.9999 for inpainting (diffusers').
    #[arg(long, requires = "init_image")]
    pub strength: Option<f64>,
    /// Hires fix: make the image, enlarge it F times (e.g. 1.5 or 2; sides rounded down to
    /// multiples of 8) and refine it with an img2img pass at that size.
    #[arg(long, value_name = "F")]
    pub hires_scale: Option<f64>,
    /// How the hires fix enlarges: lanczos (pixels, default), latent (bilinear) or
    /// latent-nearest, as A1111's upscalers of those names.
    #[arg(long, value_enum, requires = "hires_scale")]
    pub hires_upscale: Option<HiresUpscaler>,
    /// Strength of the hires pass. Default 0.5 (with 4 steps: 499, 249).
    #[arg(long, requires = "hires_scale")]
    pub hires_strength: Option<f64>,
    /// DMD2 steps of the hires pass before the strength cuts them. Default: the first pass's.
    #[arg(long, requires = "hires_scale")]
    pub hires_steps: Option<usize>,
    /// Sampling steps (DMD2: 4 → timesteps 999,749,499,249; 1 → 399). Default 4.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Explicit DMD2 timesteps, e.g. 999,499 (overrides --steps).
    #[arg(long, value_name = "T,T,…")]
    pub timesteps: Option<String>,
    /// Classifier-free guidance scale; 1 or below runs one conditional pass per step. Default 1.
    #[arg(long)]
    pub cfg: Option<f64>,
    /// Sampler: dmd2 (default), or the teacher's euler, euler-a, ddim.
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerKind>,
    /// Timestep spacing of the teacher samplers (SDXL's: leading).
    #[arg(long, value_enum)]
    pub timestep_spacing: Option<Spacing>,
    /// Seed of image 0; image i gets seed + i. Random (and printed) when absent or -1.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_seed)]
    pub seed: Option<SeedArg>,
    /// Default: the model's native size (UNet sample_size × 8 for folders; 1024 for SDXL).
    #[arg(long)]
    pub width: Option<usize>,
    /// Default: the model's native size (UNet sample_size × 8 for folders; 1024 for SDXL).
    #[arg(long)]
    pub height: Option<usize>,
    /// Images per prompt (at most 2^32).
    #[arg(long, default_value_t = 1)]
    pub num_images: u64,
    /// Images per UNet call (throughput on GPUs).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Output image for a single image: .png, .jpg/.jpeg or .webp (lossless) by its extension
    /// (`-` writes a PNG to stdout). Default out.png.
    #[arg(long, short = 'o', value_name = "FILE|-")]
    pub output: Option<PathBuf>,
    /// Quality of JPEG outputs, 1–100. Default 90.
    #[arg(long, value_name = "1-100", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub quality: Option<u8>,
    /// Directory for several images (named by --name).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// File name template: fields {index}, {seed}, {prompt}, {line}, {steps}, {preset};
    /// `{index:05}` pads with zeros. Ending in .jpg, .jpeg or .webp picks that format; other
    /// names get .png appended.
    #[arg(long, value_name = "TEMPLATE")]
    pub name: Option<String>,
    /// One JSON line per finished image on stdout (with --preview also a line per preview,
    /// `"event": "preview"`).
    #[arg(long)]
    pub json: bool,
    /// Rewrite this PNG after every step with a preview of the image being made (the
    /// sampler's current estimate), replaced atomically so an image viewer can watch it.
    /// Images of one batch appear side by side.
    #[arg(long, value_name = "FILE")]
    pub preview: Option<PathBuf>,
    /// A preview every N steps (and after the last). Default 1.
    #[arg(long, value_name = "N", requires = "preview")]
    pub preview_every: Option<usize>,
    /// Decode previews with this VAE, e.g. `taesdxl` (full size, fast), instead of a linear
    /// map of the latents to colours at 1/8 of each side (free). Default: --vae when it is a
    /// tiny VAE.
    #[arg(long, value_name = "PATH|REPO", requires = "preview")]
    pub preview_vae: Option<String>,
    /// Skip images whose file exists (resume an interrupted batch).
    #[arg(long)]
    pub skip_existing: bool,
    /// Write no `Model hash`, `VAE hash` or `Lora hashes` (hashing a new 7 GB checkpoint
    /// reads it once; the hashes are cached by size and modification time after that).
    #[arg(long)]
    pub no_hash: bool,
    /// What a bad prompt line or failed image does: fail (stop) or skip (count, go on).
    /// Default: fail before any work for files, skip for stdin.
    #[arg(long, value_enum)]
    pub on_error: Option<OnError>,
    /// Take only images whose index ≡ K (mod N), e.g. 0/4.
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    pub shard: Option<(u64, u64)>,
    /// Regenerate the image whose settings this PNG (or A1111 JPEG/WebP) carries; flags
    /// override them. The files it names are found as given, in --model-dir / --lora-dir by
    /// name or hash, or (init image, mask) beside it.
    #[arg(long, value_name = "IMAGE.png")]
    pub from_png: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Compute precision. auto: f16 on a GPU; on the CPU bf16 when it has AVX-512 BF16 and the
    /// UNet has ≥ 100 M parameters (every real SDXL checkpoint), f32 otherwise. CPU bf16
    /// keeps weights in bf16 and accumulates in f32; f16 needs a GPU.
    #[arg(long, value_enum, default_value_t = DtypeChoice::Auto)]
    pub dtype: DtypeChoice,
    /// Decode with the VAE in overlapping tiles (diffusers' tiled decode: quarter-tile
    /// overlaps blended linearly): less memory for large images, tiles decoded independently
    /// so results differ slightly from a whole decode. Turned on automatically when a whole
    /// decode would not fit in memory.
    #[arg(long)]
    pub vae_tiling: bool,
    /// Tile size for --vae-tiling, in pixels (a multiple of 64).
    #[arg(long, value_name = "PX", default_value_t = 512, value_parser = parse_tile_size)]
    pub vae_tile_size: usize,
    /// Allow sizes outside 64..4096 and memory estimates above what the machine has.
    #[arg(long)]
    pub force: bool,
    /// Refuse weights that hold NaN or Inf (otherwise a warning).
    #[arg(long)]
    pub strict: bool,
    /// No progress output.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Timings per stage and LoRA details on stderr.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnError {
    Skip,
    Fail,
}

/// `--preset`'s values: any name or file (checked when resolved), with the built-in names
/// offered to shell completions.
#[derive(Clone)]
struct PresetName;

impl clap::builder::TypedValueParser for PresetName {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        clap::builder::StringValueParser::new().parse_ref(cmd, arg, value)
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            crate::presets::builtin_names().map(clap::builder::PossibleValue::new),
        ))
    }
}

/// `--seed`: a whole number, or -1 for a random one (as A1111 and stable-diffusion.cpp take it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedArg {
    Random,
    Fixed(u64),
}

fn parse_seed(s: &str) -> Result<SeedArg, String> {
    match s.trim() {
        "-1" => Ok(SeedArg::Random),
        t => t.parse().map(SeedArg::Fixed).map_err(|_| {
            format!(
                "seed must be a whole number from 0 to 2^64 - 1, or -1 for a random one (got {s:?})"
            )
        }),
    }
}

fn parse_tile_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 64 && n % 64 == 0 => Ok(n),
        _ => Err(format!(
            "tile size must be a multiple of 64 pixels, at least 64 (got {s:?})"
        )),
    }
}

fn parse_shard(s: &str) -> Result<(u64, u64), String> {
    let (k, n) = s.split_once('/').ok_or("expected K/N, e.g. 0/4")?;
    let k: u64 = k.trim().parse().map_err(|_| "K is not a whole number")?;
    let n: u64 = n.trim().parse().map_err(|_| "N is not a whole number")?;
    if n == 0 || k >= n {
        return Err(format!("shard {k}/{n}: need 0 <= K < N"));
    }
    Ok((k, n))
}
