//! `dmd2 gen`, in layers: the flags ([`args`]) resolve into one [`Settings`] ([`settings`]);
//! prompts stream into jobs ([`jobs`]); the model loads through [`crate::loader`]; images go
//! out through [`write`]. [`run`] reads like the work: check, open, load, generate, report.

pub mod args;
pub mod from_png;
pub mod jobs;
pub mod preview;
pub mod settings;
pub mod write;

pub use args::{GenArgs, OnError};

use crate::error::{Dmd2Error, bad_input, one_line};
use crate::loader::{self, RunShape};
use crate::output::{FileId, Target};
use crate::pipeline::{self, Pipeline};
use crate::prompt_syntax::PromptSyntax;
use crate::prompts::{LineError, PromptItem, PromptSource};
use anyhow::Result;
use jobs::{Base, ItemJobs, Job, Names};
use settings::{Settings, Sink};
use std::time::Instant;
use write::{Counts, Writer};

pub fn run(a: GenArgs) -> Result<()> {
    let started = Instant::now();
    let s = Settings::resolve(a).map_err(bad_input)?;
    let log = |msg: &str| {
        if !s.quiet {
            crate::stderr!("{msg}");
        }
    };

    // 1. Every prompt line and every output name, before any work, when the prompts can be
    //    read twice.
    if s.source.checkable() && s.on_error == OnError::Fail {
        check_before_work(&s)?;
    }
    // 1b. --skip-existing with every image already there: nothing to load.
    let survey = survey(&s);
    if let Some(done) = survey.as_ref().and_then(|v| v.all_done.as_ref()) {
        let mut counts = Counts::default();
        for (index, seed, path) in done {
            if s.json {
                write::skipped_line(*index, *seed, path)?;
            }
            counts.skipped += 1;
        }
        if !s.quiet {
            crate::stderr!(
                "{}",
                write::summary(&counts, false, started.elapsed().as_secs_f64())
            );
        }
        return Ok(());
    }
    if s.random_seed {
        log(&format!("seed: {} (image i uses seed + i)", s.seed));
    }
    if let Some(p) = &s.preset {
        log(&format!("preset: {p}"));
    }
    let device = crate::device::select(s.device).map_err(bad_input)?;
    log(&format!("device: {}", crate::device::describe(&device)));

    // 2. The model opened (configs and headers), the outputs checked against its files.
    let t0 = Instant::now();
    let opened = loader::open(&s.model).map_err(bad_input)?;
    for r in &opened.loras {
        log(&r.to_string());
        if s.verbose {
            for name in r.unmatched.iter().chain(&r.ignored_keys) {
                crate::stderr!("  not merged: {name}");
            }
        }
    }
    let embeddings = &opened.parts.embeddings;
    if !embeddings.is_empty() {
        let names: Vec<String> = embeddings
            .iter()
            .map(|e| format!("{} ({} vectors)", e.name, e.vectors()))
            .collect();
        log(&format!("embeddings: {}", names.join(", ")));
        for name in embeddings.word_clashes(&opened.parts.tokenizer) {
            crate::stderr!(
                "warning: embedding {name:?} has the name of a word: every {name:?} in a prompt becomes the embedding"
            );
        }
        if s.prompt_syntax == PromptSyntax::Plain {
            crate::stderr!(
                "warning: --prompt-syntax plain reads embedding names as text; use a1111 for embeddings"
            );
        }
    }
    let model_path = opened.model_path.clone();
    let vae_path = opened.vae_path.clone();
    let default_size =
        crate::checkpoint::diffusers::default_image_size(&opened.model_path).unwrap_or(1024);
    let base = Base::new(&s, default_size, opened.parts.scheduler.timestep_spacing);
    let inputs: Vec<FileId> = opened
        .input_files
        .iter()
        .chain(&s.inputs)
        .filter_map(|p| FileId::of(p))
        .collect();
    let file_target = match &s.sink {
        Sink::File(p) => Some(crate::output::check_target(p, &inputs).map_err(bad_input)?),
        _ => None,
    };
    let preview_target = match &s.preview {
        Some(p) => {
            let same = |out: &std::path::Path| {
                out == p.path || FileId::of(out).is_some() && FileId::of(out) == FileId::of(&p.path)
            };
            if matches!(&s.sink, Sink::File(out) if same(out)) {
                return Err(bad_input(anyhow::anyhow!(
                    "{}: is also the output image; give --preview another file",
                    p.path.display()
                )));
            }
            Some(crate::output::check_target(&p.path, &inputs).map_err(bad_input)?)
        }
        None => None,
    };
    let model_vae = preview::ModelVae {
        arch: opened.parts.vae_config.clone(),
        weights: opened.parts.vae.clone(),
    };

    // Output only to stdout and nobody reads it (`| head` already gone): nothing to do.
    if s.uses_stdout() && crate::stdio::stdout_reader_gone() {
        return Err(crate::stdio::StdoutClosed.into());
    }

    // 3. Loaded: precision, memory plan, every tensor.
    // The hires fix's second pass is the run's largest image.
    let (run_w, run_h) = match &s.hires {
        Some(h) => h.size(base.width, base.height),
        None => (base.width, base.height),
    };
    for (what, v) in [("hires width", run_w), ("hires height", run_h)] {
        if s.hires.is_some() {
            crate::prompts::check_dimension(what, v, s.force)
                .map_err(|e| bad_input(anyhow::anyhow!(e)))?;
        }
    }
    let run_shape = RunShape {
        width: run_w,
        height: run_h,
        batch: s.batch_size,
        cfg: s.cfg > 1.0,
    };
    // When every prompt is known up front, they are encoded as the model loads and the text
    // encoders are freed before the UNet is read.
    let up_front: Option<Vec<(PromptSyntax, &str)>> = match &s.source {
        PromptSource::Flags(ps) => Some(
            ps.iter()
                .map(String::as_str)
                .chain([s.negative_prompt.as_deref().unwrap_or("")])
                .map(|p| (s.prompt_syntax, p))
                .collect(),
        ),
        _ => None,
    };
    let (mut pipe, report) = opened
        .build(&device, s.dtype, run_shape, s.memory, up_front.as_deref())
        .map_err(bad_input)?;
    if s.verbose {
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
        crate::stderr!(
            "precision: UNet {}, VAE {}{kernels}",
            report.precision.unet.name(),
            report.precision.vae.name()
        );
    }
    if report.bf16_for_memory {
        log(
            "note: f32 weights would not fit in memory; --dtype auto runs the UNet with bf16 weights (--dtype f32 to insist)",
        );
    }
    if report.tiling_forced_by_memory {
        log(&format!(
            "note: a whole {}x{} VAE decode would not fit in memory; decoding in {}px tiles (--vae-tiling)",
            base.width, base.height, s.memory.tile_px
        ));
    }
    if let Some(first) = report.non_finite.first() {
        let msg = format!(
            "{} weight tensor(s) hold NaN or Inf (first: {first})",
            report.non_finite.len()
        );
        if s.strict {
            return Err(bad_input(anyhow::anyhow!("{msg}; refusing with --strict")));
        }
        crate::stderr!(
            "warning: {msg}; images will likely be black or noise (--strict refuses such files)"
        );
    }
    let preview_index = match (&s.preview, preview_target) {
        (Some(p), Some(target)) => {
            Some(preview::install(&mut pipe, p, target, model_vae, s.json).map_err(bad_input)?)
        }
        _ => None,
    };
    if s.verbose {
        log(&format!("load: {:.2}s", t0.elapsed().as_secs_f64()));
    }
    super::signals::install();
    if let Sink::Dir { dir, .. } = &s.sink {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!("{}: cannot create the output directory: {e}", dir.display())
        })?;
        crate::output::remove_stale_temp_files(dir);
    }

    // 4. The images, prompt by prompt, in batches of compatible jobs.
    let mut writer = Writer::new(&s, inputs, report.precision.unet.short_name());
    // The hashes A1111 and Civitai name resources by (cached after the first run).
    writer.model_revision = crate::hub::snapshot_commit(&model_path);
    if !s.no_hash {
        resource_hashes(&mut writer, &s, &model_path, vae_path.as_deref());
    }
    writer.load_seconds = started.elapsed().as_secs_f64();
    let mut run = Run {
        s: &s,
        pipe: &mut pipe,
        writer: &writer,
        counts: Counts::default(),
        progress: {
            let mut p = crate::progress::Progress::new(s.quiet);
            if let Some(v) = &survey {
                p.set_total(v.total);
            }
            p
        },
        batch: Vec::new(),
        names: Names::default(),
        file_target,
        preview_index,
    };
    let result = run.all(&base);
    run.progress.finish();

    // 5. The summary and the exit status.
    let interrupted = crate::cancel::requested().is_some();
    if !s.quiet || run.counts.failed() > 0 || interrupted {
        crate::stderr!(
            "{}",
            write::summary(&run.counts, interrupted, started.elapsed().as_secs_f64())
        );
    }
    result?;
    if let Some(signal) = crate::cancel::requested() {
        return Err(crate::cancel::Interrupted { signal }.into());
    }
    write::outcome(&run.counts)
}

/// What one pass over prompts that can be read twice tells before any work: how many images
/// the run makes (this shard's), and — with `--skip-existing` — every image's (index, seed,
/// path) when all of their files exist already. `None` when the prompts cannot be read
/// twice or a line is bad (the normal run reports it).
struct Survey {
    total: u64,
    all_done: Option<Vec<(u64, u64, std::path::PathBuf)>>,
}

fn survey(s: &Settings) -> Option<Survey> {
    if !s.source.checkable() {
        return None;
    }
    let mut done = (s.skip_existing && !matches!(s.sink, Sink::Stdout)).then(Vec::new);
    let mut index = 0u64;
    let mut total = 0u64;
    for item in s.source.items(s.force).ok()? {
        let item = item.ok()?;
        let mut jobs = ItemJobs::new(s, &s.sampler, &item, index).ok()?;
        index = jobs.end();
        total = total.checked_add(jobs.remaining())?;
        if done.is_some() {
            while let Some(i) = jobs.next() {
                let seed = jobs::seed_of(s, &item, &jobs, i);
                match jobs::output_path(s, &item, &jobs, i, seed) {
                    Ok(Some(p)) if p.is_file() => done.as_mut()?.push((i, seed, p)),
                    _ => {
                        done = None;
                        break;
                    }
                }
            }
        }
    }
    Some(Survey {
        total,
        all_done: done,
    })
}

/// Reads the whole prompt source once before any work: every line parsed and checked, every
/// output name rendered; names two images would share are refused here.
fn check_before_work(s: &Settings) -> Result<()> {
    let mut bad: Vec<String> = Vec::new();
    let mut names = Names::default();
    let mut index = 0u64;
    for item in s.source.items(s.force).map_err(bad_input)? {
        let item = match item {
            Ok(i) => i,
            Err(e) => {
                bad.push(e.to_string());
                continue;
            }
        };
        let line_error = |e: anyhow::Error| {
            LineError {
                source: s.source.name(),
                line: item.line,
                message: one_line(&e),
            }
            .to_string()
        };
        let jobs = match ItemJobs::new(s, &s.sampler, &item, index) {
            Ok(j) => j,
            Err(e) => {
                bad.push(line_error(e));
                continue;
            }
        };
        index = jobs.end();
        if matches!(s.sink, Sink::Dir { .. }) {
            let mut jobs = jobs;
            while let Some(i) = jobs.next() {
                if names.len() >= Names::CAP {
                    break;
                }
                let seed = jobs::seed_of(s, &item, &jobs, i);
                let r = jobs::output_path(s, &item, &jobs, i, seed)
                    .and_then(|p| p.map_or(Ok(()), |p| names.claim(&p, i)));
                if let Err(e) = r {
                    bad.push(line_error(e));
                    break;
                }
            }
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    for e in &bad {
        crate::stderr!("error: {e}");
    }
    Err(anyhow::Error::new(Dmd2Error::BadInput(format!(
        "{}: {} problem(s); nothing was generated (--on-error skip to go on without those lines)",
        s.source.name(),
        bad.len()
    ))))
}

/// The state of the image loop.
struct Run<'a> {
    s: &'a Settings,
    pipe: &'a mut Pipeline,
    writer: &'a Writer<'a>,
    counts: Counts,
    progress: crate::progress::Progress,
    /// Jobs that share one UNet call, with their checked targets.
    batch: Vec<(Job, Option<Target>)>,
    names: Names,
    /// The `--output` file's target, checked before loading.
    file_target: Option<Target>,
    /// The first image of the batch being made, for `--preview`'s JSON lines.
    preview_index: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl Run<'_> {
    /// Every prompt item's jobs; stops at the first error when `--on-error fail`, or when
    /// interrupted.
    fn all(&mut self, base: &Base) -> Result<()> {
        let s = self.s;
        let mut index = 0u64;
        for item in s.source.items(s.force).map_err(bad_input)? {
            if crate::cancel::requested().is_some() {
                return Ok(());
            }
            let item: PromptItem = match item {
                Ok(i) => i,
                Err(e) => {
                    self.bad_input(e.to_string())?;
                    continue;
                }
            };
            let jobs = match ItemJobs::new(s, &base.sampler, &item, index) {
                Ok(j) => j,
                Err(e) => {
                    self.bad_line(&item, e)?;
                    continue;
                }
            };
            index = jobs.end();
            self.warn_truncated(&item);
            let mut jobs = jobs;
            while let Some(i) = jobs.next() {
                let job = match base.job(&item, &jobs, i) {
                    Ok(j) => j,
                    Err(e) => {
                        self.bad_line(&item, e)?;
                        break;
                    }
                };
                if !self.queue(&item, job)? {
                    break;
                }
                if crate::cancel::requested().is_some() {
                    return Ok(());
                }
            }
        }
        // The last batch: its decode runs without the UNet in memory.
        let batch = std::mem::take(&mut self.batch);
        self.run_batch(batch, true)
    }

    /// A `plain` prompt past 75 tokens loses the rest, as in diffusers: said on stderr.
    fn warn_truncated(&self, item: &PromptItem) {
        let st = &item.settings;
        if st.prompt_syntax.unwrap_or(self.s.prompt_syntax) != PromptSyntax::Plain {
            return;
        }
        let negative = st
            .negative_prompt
            .as_ref()
            .or(self.s.negative_prompt.as_ref());
        for (what, text) in [("prompt", Some(&st.prompt)), ("negative prompt", negative)] {
            let Some(text) = text else { continue };
            let read = crate::prompt_chunks::tokenize_prompt(
                self.pipe.tokenizer(),
                PromptSyntax::Plain,
                text,
                None,
            );
            if let Ok(t) = read
                && t.dropped > 0
            {
                let at = if item.line > 0 {
                    format!("{}:{}: ", self.s.source.name(), item.line)
                } else {
                    String::new()
                };
                crate::stderr!(
                    "warning: {at}{what} is {} tokens; the last {} are cut off (CLIP reads 75; --prompt-syntax a1111 reads them all)",
                    t.dropped + crate::prompt_chunks::CHUNK_TOKENS,
                    t.dropped
                );
            }
        }
    }

    /// Queues a job (running the batch before it when the job cannot join it); `false` when
    /// the item's remaining jobs should be dropped (a bad name).
    fn queue(&mut self, item: &PromptItem, job: Job) -> Result<bool> {
        let target = match &job.path {
            None => None,
            Some(p) => {
                if self.s.skip_existing
                    && p.exists()
                    && !matches!(self.file_target, Some(Target::Stream(_)))
                {
                    self.counts.skipped += 1;
                    if self.s.json {
                        write::skipped_line(job.index, job.req.seed, p)?;
                    }
                    return Ok(true);
                }
                let checked = match &self.file_target {
                    Some(t) => Ok(t.clone()),
                    None => self
                        .names
                        .claim(p, job.index)
                        .and_then(|_| self.writer.target(p)),
                };
                match checked {
                    Ok(t) => Some(t),
                    Err(e) => {
                        self.bad_line(item, e)?;
                        return Ok(false);
                    }
                }
            }
        };
        if let Some((last, _)) = self.batch.last()
            && (!pipeline::batchable(&last.req, &job.req) || self.batch.len() >= self.s.batch_size)
        {
            let batch = std::mem::take(&mut self.batch);
            self.run_batch(batch, false)?;
        }
        self.batch.push((job, target));
        Ok(true)
    }

    /// A bad line or name: reported, counted, and the run's end when `--on-error fail`.
    fn bad_line(&mut self, item: &PromptItem, e: anyhow::Error) -> Result<()> {
        let e = LineError {
            source: self.s.source.name(),
            line: item.line,
            message: one_line(&e),
        };
        self.bad_input(e.to_string())
    }

    fn bad_input(&mut self, message: String) -> Result<()> {
        crate::stderr!("error: {message}");
        self.counts.failed_input += 1;
        if self.s.on_error == OnError::Fail {
            return Err(anyhow::Error::new(Dmd2Error::BadInput(message)));
        }
        Ok(())
    }

    /// Makes and writes one batch of images; after the `last` one the UNet is freed before
    /// the decode.
    fn run_batch(&mut self, batch: Vec<(Job, Option<Target>)>, last: bool) -> Result<()> {
        if batch.is_empty() || crate::cancel::requested().is_some() {
            return Ok(());
        }
        // The reader of stdout left after the last image: stop before making another.
        if self.s.uses_stdout() && crate::stdio::stdout_reader_gone() {
            return Err(crate::stdio::StdoutClosed.into());
        }
        let reqs: Vec<_> = batch.iter().map(|(j, _)| j.req.clone()).collect();
        let label = format!("image {}", batch[0].0.index);
        if let Some(i) = &self.preview_index {
            i.store(batch[0].0.index, std::sync::atomic::Ordering::Relaxed);
        }
        let generated = {
            let progress = &self.progress;
            let mut step = |i: usize, n: usize| progress.step(&label, i, n);
            match &self.s.hires {
                // The hires pass needs the UNet after the first: nothing is freed early.
                Some(h) => self
                    .pipe
                    .generate_batch(&reqs, &mut step)
                    .and_then(|first| {
                        first
                            .iter()
                            .zip(&reqs)
                            .map(|(img, r)| self.pipe.hires_pass(r, img, h, &mut step))
                            .collect::<Result<Vec<_>>>()
                    }),
                None if last => self.pipe.generate_last_batch(&reqs, &mut step),
                None => self.pipe.generate_batch(&reqs, &mut step),
            }
        };
        let images = match generated {
            Ok(g) => g,
            Err(e) if crate::cancel::interrupted(&e).is_some() => return Ok(()),
            Err(e) => {
                let first = &batch[0].0;
                crate::stderr!(
                    "error: image {} (line {}): {}",
                    first.index,
                    first.line,
                    one_line(&e)
                );
                self.counts.failed_runtime += batch.len();
                if self.s.on_error == OnError::Fail {
                    return Err(e);
                }
                return Ok(());
            }
        };
        for ((job, target), img) in batch.iter().zip(images) {
            match self.writer.write(job, target.as_ref(), &img) {
                Ok(write_s) => {
                    self.counts.written += 1;
                    self.progress
                        .image_done(&write::shown(target.as_ref()), self.counts.written);
                    if self.s.verbose {
                        let t = &img.timings;
                        let steps: Vec<String> =
                            t.steps.iter().map(|s| format!("{s:.2}")).collect();
                        crate::stderr!(
                            "timings: encode {:.2}s, denoise {:.2}s (steps {}), decode {:.2}s, write {write_s:.2}s",
                            t.encode,
                            t.denoise,
                            steps.join(" "),
                            t.decode
                        );
                    }
                }
                // `| head` has read what it wanted: the run ends there, quietly (exit 0).
                Err(e) if crate::stdio::stdout_closed(&e) => return Err(e),
                Err(e) => {
                    crate::stderr!("error: image {}: {}", job.index, one_line(&e));
                    self.counts.failed_write += 1;
                    if self.s.on_error == OnError::Fail {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A1111's `Model hash` of a single-file model and `VAE hash` of a VAE file, Civitai's AutoV3
/// of each local LoRA.
fn resource_hashes(
    writer: &mut Writer,
    s: &Settings,
    model_path: &std::path::Path,
    vae_path: Option<&std::path::Path>,
) {
    if model_path.is_file() {
        writer.model_hash = crate::hashes::model_hash(model_path).ok();
    }
    writer.vae_hash = vae_path
        .and_then(crate::hashes::weights_file)
        .and_then(|f| crate::hashes::model_hash(&f).ok());
    writer.lora_hashes = s
        .model
        .loras
        .iter()
        .map(|l| {
            l.path
                .is_file()
                .then(|| crate::hashes::lora_hash(&l.path).ok())
                .flatten()
        })
        .collect();
}
