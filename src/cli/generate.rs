//! `dmd2 gen`: settings from defaults < preset < `--from-png` < flags, prompts streamed
//! from flags, a file or stdin, images batched through the pipeline and written atomically.

use crate::device::{self, DeviceChoice};
use crate::error::{Dmd2Error, bad_input, one_line};
use crate::lora::LoraSpec;
use crate::metadata::{self, ImageSettings, LoraRef};
use crate::naming::{self, NameFields};
use crate::output::{self, PngText};
use crate::pipeline::{self, Generated, Pipeline, Request};
use crate::precision::{DtypeChoice, RunPrecision};
use crate::presets::{self, Preset};
use crate::prompts::{self, LineError, PromptFormat, PromptItem, PromptSource};
use crate::scheduler::{self, SamplerKind, SamplerSpec, Spacing};
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

#[derive(Debug, Args)]
pub struct GenArgs {
    /// SDXL model: a diffusers folder, a single-file .safetensors, or a Hugging Face repo id
    /// (ORG/NAME[@REV][/FILE]). Default: the preset's (SDXL base).
    #[arg(long, value_name = "PATH|REPO")]
    pub model: Option<String>,
    /// LoRA to merge at load, PATH[:WEIGHT] or REPO/FILE[:WEIGHT]; repeatable. Replaces the
    /// preset's LoRAs.
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    pub loras: Vec<String>,
    /// Use no LoRA, even if the preset names some.
    #[arg(long, conflicts_with = "loras")]
    pub no_lora: bool,
    /// Replace the model's UNet with a diffusers-layout UNet (safetensors or PyTorch .bin).
    #[arg(long, value_name = "FILE|REPO/FILE")]
    pub unet: Option<String>,
    /// Named settings (see `dmd2 presets`) or a preset .toml file. With neither --model nor
    /// --preset, the default recipe `dmd2-4step` applies.
    #[arg(long)]
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
    /// Seed of image 0; image i gets seed + i. Random (and printed) when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Default: the model's native size (UNet sample_size × 8 for folders; 1024 for SDXL).
    #[arg(long)]
    pub width: Option<usize>,
    /// Default: the model's native size (UNet sample_size × 8 for folders; 1024 for SDXL).
    #[arg(long)]
    pub height: Option<usize>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Images per UNet call (throughput on GPUs).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Output PNG for a single image (`-` writes it to stdout). Default out.png.
    #[arg(long, short = 'o', value_name = "FILE|-")]
    pub output: Option<PathBuf>,
    /// Directory for several images (named by --name).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// File name template: fields {index}, {seed}, {prompt}, {line}, {steps}, {preset};
    /// `{index:05}` pads with zeros.
    #[arg(long, value_name = "TEMPLATE")]
    pub name: Option<String>,
    /// One JSON line per finished image on stdout.
    #[arg(long)]
    pub json: bool,
    /// Skip images whose file exists (resume an interrupted batch).
    #[arg(long)]
    pub skip_existing: bool,
    /// What a bad prompt line or failed image does: fail (stop) or skip (count, go on).
    /// Default: fail before any work for files, skip for stdin.
    #[arg(long, value_enum)]
    pub on_error: Option<OnError>,
    /// Take only images whose index ≡ K (mod N), e.g. 0/4.
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    pub shard: Option<(u64, u64)>,
    /// Regenerate the image whose settings this PNG carries (flags override them).
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

/// Settings shared by every image of the run, after presets, `--from-png` and flags.
struct Base {
    model: String,
    loras: Vec<LoraSpec>,
    unet: Option<String>,
    preset: Option<String>,
    sampler: SamplerSpec,
    cfg: f64,
    width: usize,
    height: usize,
    negative_prompt: Option<String>,
    seed: u64,
}

/// Set by the first Ctrl-C / SIGTERM: stop after the current image.
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

fn install_signal_handler() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTS.fetch_add(1, Ordering::SeqCst) >= 1 {
            // Second interrupt: leave now. Only hidden temporary files can be left behind.
            eprintln!("\ninterrupted twice: exiting now");
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted: finishing the current image, then stopping (Ctrl-C again to exit now)"
        );
    });
}

fn interrupted() -> bool {
    INTERRUPTS.load(Ordering::SeqCst) > 0
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

fn resolve_base(a: &GenArgs, png: Option<&ImageSettings>) -> Result<Base> {
    let preset: Option<Preset> = match &a.preset {
        Some(p) => Some(presets::find(p)?),
        None if a.model.is_none() && png.is_none() => Some(presets::find(presets::DEFAULT_PRESET)?),
        None => None,
    };
    let p = preset.clone().unwrap_or_default();
    let model = a
        .model
        .clone()
        .or_else(|| png.map(|s| s.model.clone()))
        .or(p.model.clone())
        .context("no model: give --model PATH (or a preset that names one)")?;
    let loras = if a.no_lora {
        Vec::new()
    } else if !a.loras.is_empty() {
        a.loras.clone()
    } else if let Some(s) = png {
        s.loras
            .iter()
            .map(|l| format!("{}:{}", l.path, l.weight))
            .collect()
    } else {
        p.loras.clone().unwrap_or_default()
    };
    // `PATH[:WEIGHT]` parsed once, here, so a bad weight is refused before any loading.
    let loras = loras
        .iter()
        .map(|l| l.parse::<LoraSpec>().map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let unet = a
        .unet
        .clone()
        .or_else(|| png.and_then(|s| s.unet.clone()))
        .or(p.unet.clone());
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
    let cfg = a.cfg.or(png.map(|s| s.cfg)).or(p.cfg).unwrap_or(1.0);
    if !cfg.is_finite() {
        bail!("--cfg must be a finite number");
    }
    // Like diffusers: the UNet's sample_size × the VAE's scale factor when a local folder's
    // configs say (1024 for SDXL), else 1024.
    let default =
        crate::checkpoint::diffusers::default_image_size(Path::new(&model)).unwrap_or(1024);
    let width = a
        .width
        .or(png.map(|s| s.width))
        .or(p.width)
        .unwrap_or(default);
    let height = a
        .height
        .or(png.map(|s| s.height))
        .or(p.height)
        .unwrap_or(default);
    prompts::check_dimension("width", width, a.force).map_err(anyhow::Error::msg)?;
    prompts::check_dimension("height", height, a.force).map_err(anyhow::Error::msg)?;
    let negative_prompt = a
        .negative_prompt
        .clone()
        .or_else(|| png.and_then(|s| s.negative_prompt.clone()))
        .or(p.negative_prompt.clone());
    Ok(Base {
        model,
        loras,
        unet,
        preset: preset.map(|p| p.name),
        sampler,
        cfg,
        width,
        height,
        negative_prompt,
        seed: a.seed.or(png.map(|s| s.seed)).unwrap_or_else(random_seed),
    })
}

/// Where images go.
enum Sink {
    Stdout,
    File(PathBuf),
    Dir { dir: PathBuf, template: String },
}

/// One image of the run.
struct Job {
    index: u64,
    line: usize,
    req: Request,
    path: Option<PathBuf>,
}

struct Counts {
    written: usize,
    skipped: usize,
    failed_input: usize,
    failed_runtime: usize,
}

pub fn run(a: GenArgs) -> Result<()> {
    let started = Instant::now();
    let png = match &a.from_png {
        Some(p) => Some(metadata::settings_from_png(p).map_err(bad_input)?),
        None => None,
    };
    let base = resolve_base(&a, png.as_ref()).map_err(bad_input)?;
    if a.batch_size == 0 || a.num_images == 0 {
        return Err(bad_input(anyhow::anyhow!(
            "--batch-size and --num-images must be at least 1"
        )));
    }
    if let Some(t) = &a.name {
        naming::check_template(t).map_err(bad_input)?;
    }

    // Prompt source.
    let source = match (&a.prompt_file, a.prompt.is_empty(), &png) {
        (Some(f), _, _) if f.as_os_str() == "-" => PromptSource::Stdin {
            format: a.prompt_format.unwrap_or(PromptFormat::Text),
        },
        (Some(f), _, _) => {
            if !f.is_file() {
                return Err(bad_input(anyhow::anyhow!(
                    "{}: no such prompt file",
                    f.display()
                )));
            }
            PromptSource::File {
                path: f.clone(),
                format: prompts::detect_format(f, a.prompt_format),
            }
        }
        (None, false, _) => PromptSource::Flags(a.prompt.clone()),
        (None, true, Some(s)) => PromptSource::Flags(vec![s.prompt.clone()]),
        (None, true, None) => {
            return Err(bad_input(anyhow::anyhow!(
                "no prompt: give --prompt TEXT or --prompt-file FILE"
            )));
        }
    };
    let single_image =
        matches!(&source, PromptSource::Flags(p) if p.len() == 1) && a.num_images == 1;

    // Output.
    let sink = match (&a.output, &a.out_dir) {
        (Some(_), Some(_)) => {
            return Err(bad_input(anyhow::anyhow!(
                "give either --output or --out-dir, not both"
            )));
        }
        (Some(o), None) if o.as_os_str() == "-" => {
            if !single_image {
                return Err(bad_input(anyhow::anyhow!(
                    "-o - writes one image; use --out-dir for several"
                )));
            }
            if std::io::stdout().is_terminal() {
                return Err(bad_input(anyhow::anyhow!(
                    "-o -: refusing to write a PNG to a terminal; redirect stdout (dmd2 gen … -o - > image.png)"
                )));
            }
            if a.json {
                return Err(bad_input(anyhow::anyhow!(
                    "-o - and --json both want stdout"
                )));
            }
            Sink::Stdout
        }
        (Some(o), None) => {
            if !single_image {
                return Err(bad_input(anyhow::anyhow!(
                    "--output names one image; use --out-dir for several"
                )));
            }
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
                        .unwrap_or_else(|| naming::DEFAULT_TEMPLATE.to_string()),
                }
            }
        }
    };

    // Check the whole prompt file before any work when that is possible.
    let on_error = a.on_error.unwrap_or(if source.checkable() {
        OnError::Fail
    } else {
        OnError::Skip
    });
    if source.checkable() && on_error == OnError::Fail {
        let bad = prompts::validate_all(&source, a.force).map_err(bad_input)?;
        if !bad.is_empty() {
            for e in &bad {
                eprintln!("error: {e}");
            }
            return Err(anyhow::Error::new(Dmd2Error::BadInput(format!(
                "{}: {} bad line(s); nothing was generated (--on-error skip to go on without them)",
                source.name(),
                bad.len()
            ))));
        }
    }

    let log = |msg: &str| {
        if !a.quiet {
            eprintln!("{msg}");
        }
    };
    if a.seed.is_none() && png.is_none() {
        log(&format!("seed: {} (image i uses seed + i)", base.seed));
    }
    if let Some(p) = &base.preset {
        log(&format!("preset: {p}"));
    }
    let device = device::select(a.device).map_err(bad_input)?;
    log(&format!("device: {}", device::describe(&device)));

    // Load the model, merge LoRAs, build the pipeline.
    let t0 = Instant::now();
    let mut pipe = load_pipeline(&a, &base, &device)?;
    // When every prompt is known up front, encode them now and free the text encoders'
    // memory before the UNet runs.
    if let PromptSource::Flags(ps) = &source {
        let mut all: Vec<&str> = ps.iter().map(String::as_str).collect();
        let neg = base.negative_prompt.as_deref().unwrap_or("");
        all.push(neg);
        pipe.release_text_encoders(&all)?;
    }
    let load_s = t0.elapsed().as_secs_f64();
    if a.verbose {
        log(&format!("load: {load_s:.2}s"));
    }
    install_signal_handler();
    if let Sink::Dir { dir, .. } = &sink {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the output directory", dir.display()))?;
        output::remove_stale_temp_files(dir);
    }

    let mut counts = Counts {
        written: 0,
        skipped: 0,
        failed_input: 0,
        failed_runtime: 0,
    };
    let mut index: u64 = 0;
    let mut batch: Vec<Job> = Vec::new();
    let progress = crate::progress::Progress::new(a.quiet);
    let mut fatal: Option<anyhow::Error> = None;
    let items = source.items(a.force).map_err(bad_input)?;
    'items: for item in items {
        if interrupted() {
            break;
        }
        let item: PromptItem = match item {
            Ok(i) => i,
            Err(e) => {
                eprintln!("error: {e}");
                counts.failed_input += 1;
                if on_error == OnError::Fail {
                    fatal = Some(anyhow::Error::new(Dmd2Error::BadInput(e.to_string())));
                    break;
                }
                continue;
            }
        };
        let jobs = match jobs_for(&a, &base, &item, &mut index, &sink) {
            Ok(j) => j,
            Err(e) => {
                let e = LineError {
                    source: source.name(),
                    line: item.line,
                    message: one_line(&e),
                };
                eprintln!("error: {e}");
                counts.failed_input += 1;
                if on_error == OnError::Fail {
                    fatal = Some(anyhow::Error::new(Dmd2Error::BadInput(e.to_string())));
                    break;
                }
                continue;
            }
        };
        for job in jobs {
            if let Some((k, n)) = a.shard
                && job.index % n != k
            {
                continue;
            }
            if a.skip_existing
                && let Some(p) = &job.path
                && p.exists()
            {
                counts.skipped += 1;
                continue;
            }
            if let Some(last) = batch.last()
                && (!pipeline::batchable(&last.req, &job.req) || batch.len() >= a.batch_size)
            {
                if let Err(e) = run_batch(
                    &a,
                    &base,
                    &pipe,
                    std::mem::take(&mut batch),
                    &sink,
                    &mut counts,
                    &progress,
                    on_error,
                ) {
                    fatal = Some(e);
                    break 'items;
                }
                if interrupted() {
                    break 'items;
                }
            }
            batch.push(job);
        }
    }
    if fatal.is_none()
        && !batch.is_empty()
        && !interrupted()
        && let Err(e) = run_batch(
            &a,
            &base,
            &pipe,
            batch,
            &sink,
            &mut counts,
            &progress,
            on_error,
        )
    {
        fatal = Some(e);
    }
    progress.finish();
    let failed = counts.failed_input + counts.failed_runtime;
    if !a.quiet || failed > 0 {
        eprintln!(
            "{}: {} written, {} skipped (existing), {} failed in {:.1}s",
            if interrupted() { "interrupted" } else { "done" },
            counts.written,
            counts.skipped,
            failed,
            started.elapsed().as_secs_f64()
        );
    }
    if let Some(e) = fatal {
        return Err(e);
    }
    if interrupted() {
        return Err(anyhow::anyhow!("interrupted"));
    }
    if counts.failed_runtime > 0 {
        bail!("{} image(s) failed", counts.failed_runtime);
    }
    if counts.failed_input > 0 {
        return Err(anyhow::Error::new(Dmd2Error::BadInput(format!(
            "{} bad prompt line(s) skipped",
            counts.failed_input
        ))));
    }
    Ok(())
}

fn load_pipeline(a: &GenArgs, base: &Base, device: &candle_core::Device) -> Result<Pipeline> {
    let model_path = crate::sources::resolve_model(&base.model).map_err(bad_input)?;
    let mut parts = crate::checkpoint::open(&model_path).map_err(bad_input)?;
    if let Some(u) = &base.unet {
        crate::sources::replace_unet(&mut parts, u).map_err(bad_input)?;
    }
    if !base.loras.is_empty() {
        let reports = crate::sources::apply_loras(&mut parts, &base.loras).map_err(bad_input)?;
        for r in reports {
            if !a.quiet {
                eprintln!("{r}");
            }
            if a.verbose {
                for name in r.unmatched.iter().chain(&r.ignored_keys) {
                    eprintln!("  not merged: {name}");
                }
            }
        }
    }
    let precision =
        RunPrecision::resolve(a.dtype, device, parts.unet.numel()).map_err(bad_input)?;
    if a.verbose {
        let kernels = if !device.is_cpu() {
            String::new()
        } else if crate::kernels::own() {
            format!(
                "; CPU kernels: own, tier {}",
                crate::kernels::Tier::current()
            )
        } else {
            "; CPU kernels: candle's".to_string()
        };
        eprintln!(
            "precision: UNet {}, VAE {}{kernels}",
            precision.unet.name(),
            precision.vae.name()
        );
    }
    let mut tile_px = a.vae_tiling.then_some(a.vae_tile_size);
    if device.is_cpu() && !a.force {
        let estimate = |tile: Option<usize>| {
            pipeline::estimate_bytes(
                &parts,
                precision,
                base.width,
                base.height,
                a.batch_size,
                base.cfg > 1.0,
                tile,
            )
        };
        let mut need = estimate(tile_px);
        if let Some(have) = pipeline::available_memory()
            && need > have
            && tile_px.is_none()
            && base.width.max(base.height) > a.vae_tile_size
            && estimate(Some(a.vae_tile_size)) <= have
        {
            tile_px = Some(a.vae_tile_size);
            need = estimate(tile_px);
            if !a.quiet {
                eprintln!(
                    "note: a whole {}x{} VAE decode would not fit in memory; decoding in {}px tiles (--vae-tiling)",
                    base.width, base.height, a.vae_tile_size
                );
            }
        }
        if let Some(have) = pipeline::available_memory()
            && need > have
        {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return Err(bad_input(anyhow::anyhow!(
                "{}x{} with batch size {} needs about {:.1} GiB, {:.1} GiB of memory is available; use a smaller size or batch, or --force to try anyway",
                base.width,
                base.height,
                a.batch_size,
                gib(need),
                gib(have)
            )));
        }
    }
    let mut pipe = Pipeline::load(parts, device, precision).map_err(bad_input)?;
    pipe.set_vae_tiling(tile_px.map(|px| px / pipe.vae().scale_factor()));
    crate::lora::release_merge_buffers();
    let bad = crate::weights::take_non_finite();
    if !bad.is_empty() {
        let msg = format!(
            "{}: {} weight tensor(s) hold NaN or Inf (first: {})",
            base.model,
            bad.len(),
            bad[0]
        );
        if a.strict {
            return Err(bad_input(anyhow::anyhow!("{msg}; refusing with --strict")));
        }
        eprintln!(
            "warning: {msg}; images will likely be black or noise (--strict refuses such files)"
        );
    }
    Ok(pipe)
}

/// The images of one prompt item, with indices, seeds and output paths.
fn jobs_for(
    a: &GenArgs,
    base: &Base,
    item: &PromptItem,
    index: &mut u64,
    sink: &Sink,
) -> Result<Vec<Job>> {
    let s = &item.settings;
    let n = s.num_images.unwrap_or(a.num_images);
    let mut sampler = base.sampler.clone();
    if let Some(steps) = s.steps {
        sampler.steps = steps;
        sampler.timesteps = None;
        sampler.validate()?;
    }
    let mut jobs = Vec::with_capacity(n);
    for k in 0..n {
        let i = *index;
        *index += 1;
        // Image i of a run gets seed + i; a line's own seed numbers its images from there.
        let seed = match s.seed {
            Some(sd) => sd.wrapping_add(k as u64),
            None => base.seed.wrapping_add(i),
        };
        let req = Request {
            prompt: s.prompt.clone(),
            negative_prompt: s
                .negative_prompt
                .clone()
                .or_else(|| base.negative_prompt.clone()),
            sampler: sampler.clone(),
            cfg: s.cfg.unwrap_or(base.cfg),
            seed,
            width: s.width.unwrap_or(base.width),
            height: s.height.unwrap_or(base.height),
        };
        let path = match sink {
            Sink::Stdout => None,
            Sink::File(p) => Some(p.clone()),
            Sink::Dir { dir, template } => {
                let steps = sampler
                    .timesteps
                    .as_ref()
                    .map_or(sampler.steps, |t| t.len());
                let fields = NameFields {
                    index: i,
                    seed,
                    prompt: &s.prompt,
                    line: item.line,
                    steps,
                    preset: base.preset.as_deref().unwrap_or("custom"),
                };
                let name = match &s.name {
                    Some(t) => {
                        let r = naming::render(t, &fields)?;
                        if n > 1 && !t.contains('{') {
                            format!("{r}-{k}")
                        } else {
                            r
                        }
                    }
                    None => naming::render(template, &fields)?,
                };
                Some(naming::safe_join(dir, &name)?)
            }
        };
        jobs.push(Job {
            index: i,
            line: item.line,
            req,
            path,
        });
    }
    Ok(jobs)
}

fn settings_of(base: &Base, req: &Request, precision: &str) -> ImageSettings {
    ImageSettings {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        seed: req.seed,
        sampler: req.sampler.clone(),
        cfg: req.cfg,
        width: req.width,
        height: req.height,
        model: base.model.clone(),
        loras: base
            .loras
            .iter()
            .map(|l| LoraRef {
                path: l.path.display().to_string(),
                weight: l.weight,
            })
            .collect(),
        unet: base.unet.clone(),
        preset: base.preset.clone(),
        precision: Some(precision.to_string()),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_batch(
    a: &GenArgs,
    base: &Base,
    pipe: &Pipeline,
    jobs: Vec<Job>,
    sink: &Sink,
    counts: &mut Counts,
    progress: &crate::progress::Progress,
    on_error: OnError,
) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let reqs: Vec<Request> = jobs.iter().map(|j| j.req.clone()).collect();
    let label = format!("image {}", jobs[0].index);
    let generated = {
        let mut step = |i: usize, n: usize| progress.step(&label, i, n);
        pipe.generate_batch(&reqs, &mut step)
    };
    let images: Vec<Generated> = match generated {
        Ok(g) => g,
        Err(e) => {
            eprintln!(
                "error: image {} (line {}): {}",
                jobs[0].index,
                jobs[0].line,
                one_line(&e)
            );
            counts.failed_runtime += jobs.len();
            if on_error == OnError::Fail {
                return Err(e);
            }
            return Ok(());
        }
    };
    for (job, img) in jobs.iter().zip(images) {
        let settings = settings_of(base, &job.req, pipe.precision().unet.short_name());
        let text = PngText {
            parameters: settings.a1111(),
            json: settings.to_json(),
        };
        let bytes = output::encode_png(&img.rgb, img.width, img.height, Some(&text))?;
        let tw = Instant::now();
        match (sink, &job.path) {
            (Sink::Stdout, _) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)
                    .context("cannot write the PNG to stdout")?;
                out.flush().context("cannot write the PNG to stdout")?;
            }
            (_, Some(p)) => output::write_atomic(p, &bytes)?,
            (_, None) => bail!("internal error: no output path"),
        }
        let write_s = tw.elapsed().as_secs_f64();
        counts.written += 1;
        let shown = job
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<stdout>".into());
        progress.image_done(&shown, counts.written);
        if a.verbose {
            eprintln!(
                "timings: encode {:.2}s, denoise {:.2}s, decode {:.2}s, write {write_s:.2}s",
                img.timings.encode, img.timings.denoise, img.timings.decode
            );
        }
        if a.json {
            let steps = job
                .req
                .sampler
                .timesteps
                .as_ref()
                .map_or(job.req.sampler.steps, |t| t.len());
            let line = serde_json::json!({
                "path": shown,
                "index": job.index,
                "line": job.line,
                "prompt": job.req.prompt,
                "negative_prompt": job.req.negative_prompt,
                "seed": job.req.seed,
                "steps": steps,
                "cfg": job.req.cfg,
                "sampler": job.req.sampler.kind.name(),
                "width": job.req.width,
                "height": job.req.height,
                "model": base.model,
                "loras": settings.loras,
                "preset": base.preset,
                "seconds": {
                    "encode": img.timings.encode,
                    "denoise": img.timings.denoise,
                    "decode": img.timings.decode,
                    "write": write_s,
                },
            });
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}").context("cannot write to stdout")?;
            out.flush().ok();
        }
    }
    Ok(())
}
