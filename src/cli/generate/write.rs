//! The output side of `dmd2 gen`: every target checked before its image is made, images
//! written as PNG files (or to stdout), one JSON line per image, the counts and the summary.

use super::jobs::Job;
use super::settings::{Settings, Sink};
use crate::metadata::{self, ImageSettings, LoraRef};
use crate::output::{self, FileId, PngText, Target};
use crate::pipeline::Generated;
use anyhow::{Result, bail};
use std::path::Path;
use std::time::Instant;

/// What happened to the run's images.
#[derive(Default)]
pub struct Counts {
    pub written: usize,
    pub skipped: usize,
    /// Bad prompt lines and names.
    pub failed_input: usize,
    /// Images that failed while being made.
    pub failed_runtime: usize,
    /// Images made but not written.
    pub failed_write: usize,
}

impl Counts {
    pub fn failed(&self) -> usize {
        self.failed_input + self.failed_runtime + self.failed_write
    }
}

/// Writes the run's images where the settings say.
pub struct Writer<'a> {
    settings: &'a Settings,
    /// The files the run reads (model, LoRAs, prompt and settings files).
    inputs: Vec<FileId>,
    /// The model as the user named it, for the settings stored in each PNG.
    pub model: String,
    pub precision: &'static str,
    /// Seconds from the start of the process until the model was loaded (in `--json` lines).
    pub load_seconds: f64,
    /// A1111's `Model hash` of a single-file model, and each LoRA's AutoV3 (local files).
    pub model_hash: Option<String>,
    /// The Hub commit of a repo-id model.
    pub model_revision: Option<String>,
    /// A1111's `VAE hash` of a `--vae` weights file.
    pub vae_hash: Option<String>,
    pub lora_hashes: Vec<Option<String>>,
}

impl<'a> Writer<'a> {
    pub fn new(settings: &'a Settings, inputs: Vec<FileId>, precision: &'static str) -> Self {
        Self {
            settings,
            inputs,
            model: settings.model.model.clone(),
            precision,
            load_seconds: 0.0,
            model_hash: None,
            model_revision: None,
            vae_hash: None,
            lora_hashes: Vec::new(),
        }
    }

    /// Checks where `path` would be written, before its image is made (see
    /// [`output::check_target`]); for a path inside `--out-dir`, that no directory on the way
    /// is a symbolic link.
    pub fn target(&self, path: &Path) -> Result<Target> {
        if let Sink::Dir { dir, .. } = &self.settings.sink
            && let Some(parent) = path.parent()
            && parent != dir
        {
            output::create_dir_inside(dir, parent)?;
        }
        output::check_target(path, &self.inputs)
    }

    /// The settings stored in an image's PNG.
    pub fn image_settings(&self, job: &Job) -> ImageSettings {
        let req = &job.req;
        let s = self.settings;
        ImageSettings {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            prompt_syntax: req.prompt_syntax,
            seed: req.seed,
            sampler: req.sampler.clone(),
            cfg: req.cfg,
            width: req.width,
            height: req.height,
            // Names and hashes, not this machine's paths: the image may be shared.
            model: metadata::shared_name(&self.model),
            loras: self.lora_refs(|p| metadata::shared_name(&p.display().to_string())),
            unet: s.model.unet.as_deref().map(metadata::shared_name),
            vae: s.model.vae.as_deref().map(metadata::shared_name),
            vae_hash: self.vae_hash.clone(),
            preset: s.preset.clone(),
            precision: Some(self.precision.to_string()),
            init_image: job.start.as_ref().map(|st| st.image.clone()),
            mask: job.start.as_ref().and_then(|st| st.mask.clone()),
            strength: job.start.as_ref().map(|st| st.strength),
            hires: s.hires.clone(),
            model_hash: self.model_hash.clone(),
            model_revision: self.model_revision.clone(),
            mask_blur: job
                .start
                .as_ref()
                .filter(|st| st.mask.is_some() && s.mask_blur > 0.0)
                .map(|_| s.mask_blur),
            paste_back: job.start.as_ref().is_some_and(|st| st.mask.is_some()) && s.paste_back,
        }
    }

    /// The run's LoRAs, weights and hashes, each path as `path` shows it (a shared name in
    /// the PNG, as given in `--json` lines).
    fn lora_refs(&self, path: impl Fn(&Path) -> String) -> Vec<LoraRef> {
        self.settings
            .model
            .loras
            .iter()
            .enumerate()
            .map(|(i, l)| LoraRef {
                path: path(&l.path),
                weight: l.weight,
                hash: self.lora_hashes.get(i).cloned().flatten(),
            })
            .collect()
    }

    /// Writes one finished image and its JSON line; returns the seconds the write took.
    pub fn write(&self, job: &Job, target: Option<&Target>, img: &Generated) -> Result<f64> {
        let settings = self.image_settings(job);
        let text = PngText {
            parameters: settings.a1111(),
            json: settings.to_json(),
        };
        let format = match target {
            Some(t) => output::Format::for_path(t.path(), self.settings.jpeg_quality)?,
            None => output::Format::Png,
        };
        let bytes = output::encode_image(&img.rgb, img.width, img.height, Some(&text), format)?;
        let t = Instant::now();
        match target {
            None => crate::stdio::write_stdout(&bytes)?,
            Some(t) => output::write(t, &bytes)?,
        }
        let write_s = t.elapsed().as_secs_f64();
        if self.settings.json {
            self.json_line(job, target, img, write_s)?;
        }
        Ok(write_s)
    }

    fn json_line(
        &self,
        job: &Job,
        target: Option<&Target>,
        img: &Generated,
        write_s: f64,
    ) -> Result<()> {
        let steps = job.req.sampler.step_count();
        let line = serde_json::json!({
            "path": shown(target),
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
            // This machine's own paths as given (the PNG has names).
            "model": self.model,
            "loras": self.lora_refs(|p| p.display().to_string()),
            "preset": self.settings.preset,
            "seconds": {
                "load": self.load_seconds,
                "encode": img.timings.encode,
                "denoise": img.timings.denoise,
                "steps": img.timings.steps,
                "decode": img.timings.decode,
                "write": write_s,
            },
        });
        crate::stdio::write_stdout(format!("{line}\n").as_bytes())
    }
}

/// How an image's destination is shown in messages.
pub fn shown(target: Option<&Target>) -> String {
    target.map_or_else(|| "<stdout>".into(), |t| t.path().display().to_string())
}

/// `--json`'s line for an image `--skip-existing` did not make again.
pub fn skipped_line(index: u64, seed: u64, path: &std::path::Path) -> Result<()> {
    let line = serde_json::json!({
        "path": path.display().to_string(),
        "index": index,
        "seed": seed,
        "skipped": true,
    });
    crate::stdio::write_stdout(format!("{line}\n").as_bytes())
}

/// The last line of every run, on stderr.
pub fn summary(counts: &Counts, interrupted: bool, seconds: f64) -> String {
    format!(
        "{}: {} written, {} skipped (existing), {} failed in {seconds:.1}s",
        if interrupted { "interrupted" } else { "done" },
        counts.written,
        counts.skipped,
        counts.failed(),
    )
}

/// The run's error, if the counts make it one: failed images (1), bad input (2).
pub fn outcome(counts: &Counts) -> Result<()> {
    if counts.failed_runtime + counts.failed_write > 0 {
        bail!(
            "{} image(s) failed",
            counts.failed_runtime + counts.failed_write
        );
    }
    if counts.failed_input > 0 {
        return Err(anyhow::Error::new(crate::error::Dmd2Error::BadInput(
            format!(
                "{} bad prompt line(s) or name(s) skipped",
                counts.failed_input
            ),
        )));
    }
    Ok(())
}
