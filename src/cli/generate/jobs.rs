//! From prompts to jobs: each prompt item's images get their run index, seed, request and
//! output path, lazily — only the images of this shard are ever made, by arithmetic, so a
//! run of billions of images costs nothing until an image is due.

use super::settings::{Settings, Sink};
use crate::init_image::Loaded;
use crate::metadata::ImageRef;
use crate::output::file_names::{self, NameFields};
use crate::pipeline::Request;
use crate::prompts::{self, PromptItem};
use crate::scheduler::SamplerSpec;
use anyhow::{Result, bail};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One image of the run.
pub struct Job {
    pub index: u64,
    pub line: usize,
    pub req: Request,
    pub path: Option<PathBuf>,
    /// img2img / inpainting: the files it starts from, for the PNG's settings.
    pub start: Option<Start>,
}

/// The init image and mask files of a job, as the PNG records them.
#[derive(Clone)]
pub struct Start {
    pub image: ImageRef,
    pub mask: Option<ImageRef>,
    pub strength: f64,
}

fn image_ref(l: &Loaded) -> ImageRef {
    ImageRef {
        // The file's name, not this machine's path (`--from-png` looks beside the PNG).
        path: crate::metadata::shared_name(&l.path.display().to_string()),
        sha256: l.sha256.clone(),
    }
}

/// The settings every job starts from, with what the opened model decides settled: its
/// native size and its scheduler's timestep spacing, where the settings leave them open.
pub struct Base<'a> {
    pub settings: &'a Settings,
    pub width: usize,
    pub height: usize,
    pub sampler: SamplerSpec,
    /// Init images and masks prompt-file lines name, read once each.
    images: Mutex<HashMap<PathBuf, Arc<Loaded>>>,
}

impl<'a> Base<'a> {
    pub fn new(
        settings: &'a Settings,
        default_size: usize,
        model_spacing: Option<crate::scheduler::Spacing>,
    ) -> Self {
        let mut sampler = settings.sampler.clone();
        if let (false, Some(sp)) = (settings.spacing_explicit, model_spacing) {
            sampler.spacing = sp;
        }
        Self {
            settings,
            width: settings.width.unwrap_or(default_size),
            height: settings.height.unwrap_or(default_size),
            sampler,
            images: Mutex::new(HashMap::new()),
        }
    }
}

/// The images of one prompt item that this run (this shard) makes: their run indices,
/// `first..first + count` stepped by the shard count.
pub struct ItemJobs {
    /// Run index of the item's first image (whether or not this shard takes it).
    pub first: u64,
    /// Images the item asks for.
    pub count: u64,
    sampler: SamplerSpec,
    next: Option<u64>,
    step: u64,
}

impl ItemJobs {
    /// The item's images starting at run index `first`; errors when its settings conflict
    /// with the run's or the indices would overflow.
    pub fn new(s: &Settings, sampler: &SamplerSpec, item: &PromptItem, first: u64) -> Result<Self> {
        let count = item.settings.num_images.unwrap_or(s.num_images);
        if first.checked_add(count).is_none() {
            bail!("the run numbers more than 2^64 images");
        }
        let syntax = item.settings.prompt_syntax.unwrap_or(s.prompt_syntax);
        prompts::check_syntax("prompt", &item.settings.prompt, syntax)
            .map_err(anyhow::Error::msg)?;
        if let Some(n) = &item.settings.negative_prompt {
            prompts::check_syntax("negative prompt", n, syntax).map_err(anyhow::Error::msg)?;
        }
        let mut sampler = sampler.clone();
        if let Some(steps) = item.settings.steps {
            sampler.steps = steps;
            sampler.timesteps = None;
            sampler.validate()?;
        }
        let (k, n) = s.shard.unwrap_or((0, 1));
        // The first index ≥ first with index ≡ k (mod n).
        let start = first + (k + n - first % n) % n;
        Ok(Self {
            first,
            count,
            sampler,
            next: (start < first + count).then_some(start),
            step: n,
        })
    }

    /// Run index just past the item's images.
    pub fn end(&self) -> u64 {
        self.first + self.count
    }

    /// How many of the item's images this shard makes from here on.
    pub fn remaining(&self) -> u64 {
        self.next
            .map_or(0, |i| (self.first + self.count - 1 - i) / self.step + 1)
    }
}

impl Iterator for ItemJobs {
    /// A run index of this shard.
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let i = self.next?;
        self.next = i
            .checked_add(self.step)
            .filter(|&j| j < self.first + self.count);
        Some(i)
    }
}

impl Base<'_> {
    /// The item's init image (line, else flags), resized to the job's size: `--width` and
    /// `--height` (or the line's) when given, else the image's own rounded down to a
    /// multiple of 8.
    fn start(
        &self,
        item: &PromptItem,
        jobs: &ItemJobs,
    ) -> Result<(Option<crate::img2img::InitImage>, Option<Start>)> {
        let s = &item.settings;
        let image = match &s.init_image {
            Some(p) => Some(self.line_image(p)?),
            None => self.settings.init_image.clone(),
        };
        let mask = match &s.mask {
            Some(p) => Some(self.line_image(p)?),
            None => self.settings.mask.clone(),
        };
        let Some(image) = image else {
            if mask.is_some() || s.strength.is_some() {
                bail!("mask and strength need an init image");
            }
            return Ok((None, None));
        };
        if jobs.sampler.kind != crate::scheduler::SamplerKind::Dmd2 {
            bail!("an init image works with the dmd2 sampler only");
        }
        let strength = s
            .strength
            .or(self.settings.strength)
            .unwrap_or(if mask.is_some() {
                crate::img2img::DEFAULT_INPAINT_STRENGTH
            } else {
                crate::img2img::DEFAULT_STRENGTH
            });
        crate::img2img::strength_timesteps(&jobs.sampler.dmd2_timesteps()?, strength)?;
        let (dw, dh) = crate::init_image::default_size(&image.pixels, 8)
            .map_err(|e| anyhow::anyhow!("{}: {e}", image.path.display()))?;
        let width = s.width.or(self.settings.width).unwrap_or(dw);
        let height = s.height.or(self.settings.height).unwrap_or(dh);
        for (what, v) in [("width", width), ("height", height)] {
            prompts::check_dimension(what, v, self.settings.force)
                .map_err(|e| anyhow::anyhow!("{}: {e}", image.path.display()))?;
        }
        let finish = crate::init_image::MaskFinish {
            blur: self.settings.mask_blur,
            paste_back: self.settings.paste_back,
        };
        if mask.is_none() && finish != Default::default() {
            bail!("--mask-blur and --paste-back need a mask");
        }
        let init =
            crate::init_image::prepare(&image, mask.as_deref(), width, height, strength, finish)?;
        let start = Start {
            image: image_ref(&image),
            mask: mask.as_deref().map(image_ref),
            strength,
        };
        Ok((Some(init), Some(start)))
    }

    /// An image a prompt-file line names, relative to the file's directory.
    fn line_image(&self, p: &str) -> Result<Arc<Loaded>> {
        let path = match &self.settings.source {
            crate::prompts::PromptSource::File { path, .. } if Path::new(p).is_relative() => {
                path.parent().unwrap_or(Path::new("")).join(p)
            }
            _ => PathBuf::from(p),
        };
        let mut cache = self.images.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = cache.get(&path) {
            return Ok(l.clone());
        }
        let l = Arc::new(Loaded::read(&path)?);
        cache.insert(path, l.clone());
        Ok(l)
    }

    /// The job for run index `index` of `item` (whose images start at `jobs.first`).
    pub fn job(&self, item: &PromptItem, jobs: &ItemJobs, index: u64) -> Result<Job> {
        let s = &item.settings;
        let k = index - jobs.first;
        // Image i of a run gets seed + i; a line's own seed numbers its images from there.
        let seed = match s.seed {
            Some(sd) => sd.wrapping_add(k),
            None => self.settings.seed.wrapping_add(index),
        };
        let (init, start) = self.start(item, jobs)?;
        let (width, height) = match &init {
            Some(i) => (i.image.dim(3)?, i.image.dim(2)?),
            None => (
                s.width.unwrap_or(self.width),
                s.height.unwrap_or(self.height),
            ),
        };
        let req = Request {
            prompt: s.prompt.clone(),
            negative_prompt: s
                .negative_prompt
                .clone()
                .or_else(|| self.settings.negative_prompt.clone()),
            prompt_syntax: s.prompt_syntax.unwrap_or(self.settings.prompt_syntax),
            sampler: jobs.sampler.clone(),
            cfg: s.cfg.unwrap_or(self.settings.cfg),
            seed,
            width,
            height,
            init,
        };
        let path = output_path(self.settings, item, jobs, index, seed)?;
        Ok(Job {
            index,
            line: item.line,
            req,
            start,
            path,
        })
    }
}

/// The output path of image `index` (`None` for stdout): the template (or the line's `name`)
/// rendered and joined under the output directory, which it can never leave.
pub fn output_path(
    s: &Settings,
    item: &PromptItem,
    jobs: &ItemJobs,
    index: u64,
    seed: u64,
) -> Result<Option<PathBuf>> {
    Ok(match &s.sink {
        Sink::Stdout => None,
        Sink::File(p) => Some(p.clone()),
        Sink::Dir { dir, template } => {
            let steps = jobs.sampler.step_count();
            let fields = NameFields {
                index,
                seed,
                prompt: &item.settings.prompt,
                line: item.line,
                steps,
                preset: s.preset.as_deref().unwrap_or("custom"),
            };
            let name = match &item.settings.name {
                // A fixed name for several images gets each image's number appended.
                Some(t) if jobs.count > 1 && !t.contains('{') => {
                    format!("{}-{}", file_names::render(t, &fields)?, index - jobs.first)
                }
                Some(t) => file_names::render(t, &fields)?,
                None => file_names::render(template, &fields)?,
            };
            Some(file_names::safe_join(dir, &name)?)
        }
    })
}

/// The seed of image `index` of `item` (for names in the check before any work).
pub fn seed_of(s: &Settings, item: &PromptItem, jobs: &ItemJobs, index: u64) -> u64 {
    match item.settings.seed {
        Some(sd) => sd.wrapping_add(index - jobs.first),
        None => s.seed.wrapping_add(index),
    }
}

/// Output names taken in this run: a second image with a name already taken is refused, so
/// no image silently replaces another. Remembers up to [`Names::CAP`] names (beyond that,
/// collisions go unnoticed: a run that large writes one file per index by default).
#[derive(Default)]
pub struct Names(HashSet<PathBuf>);

impl Names {
    pub const CAP: usize = 4_000_000;

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes `path` for image `index`; an error if an earlier image of the run has it.
    pub fn claim(&mut self, path: &std::path::Path, index: u64) -> Result<()> {
        if self.0.len() >= Self::CAP {
            return Ok(());
        }
        if !self.0.insert(path.to_path_buf()) {
            bail!(
                "image {index} would be written to {}, which an earlier image of this run takes; give --name a field that differs per image, such as {{index}}",
                path.display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shard's indices, by arithmetic: first..first+count stepped by n from k's residue.
    #[test]
    fn shard_indices() {
        let all = |first: u64, count: u64, k: u64, n: u64| -> Vec<u64> {
            let start = first + (k + n - first % n) % n;
            let mut it = ItemJobs {
                first,
                count,
                sampler: SamplerSpec::dmd2(vec![999]),
                next: (start < first + count).then_some(start),
                step: n,
            };
            std::iter::from_fn(|| it.next()).collect()
        };
        assert_eq!(all(0, 5, 0, 1), vec![0, 1, 2, 3, 4]);
        assert_eq!(all(3, 5, 1, 3), vec![4, 7]);
        assert_eq!(all(3, 5, 0, 3), vec![3, 6]);
        assert_eq!(all(0, 1, 1, 2), Vec::<u64>::new());
        // Ten million images, one shard of ten million: one image, at once.
        assert_eq!(all(0, 10_000_000, 0, 10_000_000), vec![0]);
        assert_eq!(
            all(u64::MAX - 3, 3, 0, 1),
            vec![u64::MAX - 3, u64::MAX - 2, u64::MAX - 1]
        );
    }
}
