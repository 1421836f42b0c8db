//! `dmd2 gen`: make images.

use crate::device::{self, DeviceChoice};
use crate::error::bad_input;
use crate::output::{self, PngText};
use crate::pipeline::{self, Pipeline, Request};
use crate::scheduler;
use anyhow::Result;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct GenArgs {
    /// SDXL model: a diffusers folder or an original-layout single-file .safetensors.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// What to steer away from; acts only with --cfg above 1.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Sampling steps: 4 → timesteps 999,749,499,249 (DMD2's schedule); 1 → 399.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Explicit timesteps, e.g. 999,499 (overrides --steps).
    #[arg(long, value_name = "T,T,…")]
    pub timesteps: Option<String>,
    /// Classifier-free guidance scale; 1 or below runs one conditional pass per step.
    #[arg(long, default_value_t = 1.0)]
    pub cfg: f64,
    /// Seed of the torch-compatible generator; random (and printed) when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    /// Output PNG path.
    #[arg(long, short = 'o', default_value = "out.png")]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// No progress output.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Timings per stage on stderr.
    #[arg(long, short = 'v')]
    pub verbose: bool,
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
    // Keep seeds within what torch.Generator.manual_seed accepts everywhere.
    h.finish() >> 1
}

pub fn run(a: GenArgs) -> Result<()> {
    // Everything that can be checked without the model is checked first.
    let timesteps = match &a.timesteps {
        Some(s) => scheduler::parse_timesteps(s),
        None => scheduler::dmd2_timesteps(a.steps),
    }
    .map_err(bad_input)?;
    pipeline::check_size(a.width, a.height, 8).map_err(bad_input)?;
    if !a.cfg.is_finite() {
        return Err(bad_input(anyhow::anyhow!("--cfg must be a finite number")));
    }
    let seed = a.seed.unwrap_or_else(random_seed);
    let log = |msg: &str| {
        if !a.quiet {
            eprintln!("{msg}");
        }
    };
    if a.seed.is_none() {
        log(&format!("seed: {seed}"));
    }
    let device = device::select(a.device).map_err(bad_input)?;
    log(&format!("device: {}", device::describe(&device)));

    let t0 = Instant::now();
    let parts = crate::checkpoint::open(&a.model).map_err(bad_input)?;
    let dtype = pipeline::default_dtype(&device);
    let pipe = Pipeline::load(parts, &device, dtype).map_err(bad_input)?;
    let load_s = t0.elapsed().as_secs_f64();
    if a.verbose {
        log(&format!("load: {load_s:.2}s"));
    }

    let req = Request {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        timesteps: timesteps.clone(),
        cfg: a.cfg,
        seed,
        width: a.width,
        height: a.height,
    };
    let quiet = a.quiet;
    let mut progress = |i: usize, n: usize| {
        if !quiet {
            eprintln!("step {i}/{n}");
        }
    };
    let out = pipe.generate(&req, &mut progress)?;
    let text = png_text(&req, &pipe.model_name);
    let bytes = output::encode_png(&out.rgb, out.width, out.height, Some(&text))?;
    let t_write = Instant::now();
    output::write_atomic(&a.output, &bytes)?;
    if a.verbose {
        log(&format!(
            "encode: {:.2}s, denoise: {:.2}s, decode: {:.2}s, write: {:.2}s",
            out.timings.encode,
            out.timings.denoise,
            out.timings.decode,
            t_write.elapsed().as_secs_f64()
        ));
    }
    log(&format!("wrote {}", a.output.display()));
    let _ = std::io::stderr().flush();
    Ok(())
}

/// The AUTOMATIC1111 `parameters` text and the exact settings as JSON.
pub fn png_text(req: &Request, model: &str) -> PngText {
    let mut p = req.prompt.clone();
    if let Some(n) = &req.negative_prompt {
        p.push_str(&format!("\nNegative prompt: {n}"));
    }
    p.push_str(&format!(
        "\nSteps: {}, Sampler: DMD2 (LCM), CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Timesteps: {}",
        req.timesteps.len(),
        req.cfg,
        req.seed,
        req.width,
        req.height,
        model_label(model),
        req.timesteps.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ")
    ));
    let json = serde_json::json!({
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "timesteps": req.timesteps,
        "steps": req.timesteps.len(),
        "cfg": req.cfg,
        "seed": req.seed,
        "width": req.width,
        "height": req.height,
        "sampler": "dmd2",
        "model": model,
    });
    PngText {
        parameters: p,
        json: json.to_string(),
    }
}

fn model_label(model: &str) -> String {
    let p = std::path::Path::new(model);
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.to_string())
        .replace(',', " ")
}
