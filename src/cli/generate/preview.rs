//! `--preview FILE`: the pipeline's previews ([`crate::preview`]) written over one PNG,
//! atomically (a temporary file renamed into place), and with `--json` announced on stdout
//! as `{"event": "preview", …}` lines. A preview that cannot be written is a warning, once:
//! the images matter more.

use super::settings::PreviewSettings;
use crate::config::VaeArch;
use crate::output::Target;
use crate::pipeline::Pipeline;
use crate::preview::{Preview, PreviewDecoder, PreviewImage};
use crate::weights::ComponentWeights;
use anyhow::{Context, Result, bail};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The model's own VAE, which decodes previews when it is a tiny one.
pub struct ModelVae {
    pub arch: VaeArch,
    pub weights: Arc<ComponentWeights>,
}

/// Sets up `pipe`'s previews; returns the index of the image being made, for the caller to
/// keep current (the JSON lines name it).
pub fn install(
    pipe: &mut Pipeline,
    p: &PreviewSettings,
    target: Target,
    model_vae: ModelVae,
    json: bool,
) -> Result<Arc<AtomicU64>> {
    let precision = pipe.precision().vae;
    let device = pipe.device().clone();
    let (arch, weights, from) = match &p.vae {
        Some(spec) => {
            let (src, path) = crate::sources::open_vae(spec)?;
            (src.arch, Arc::new(src.weights), Some(path))
        }
        None => (model_vae.arch, model_vae.weights, None),
    };
    let decoder = match (&arch, &from) {
        (VaeArch::Kl(_), None) => PreviewDecoder::Linear,
        _ => {
            let want = 4;
            if arch.latent_channels() != want {
                bail!(
                    "--preview-vae: the VAE has {} latent channels, the model makes {want}",
                    arch.latent_channels()
                );
            }
            let vae = crate::vae::Vae::new(&arch, weights.var_builder(precision, &device))
                .with_context(|| format!("{}: cannot build the preview VAE", weights.describe()))?;
            PreviewDecoder::Vae(Box::new(vae))
        }
    };
    let index = Arc::new(AtomicU64::new(0));
    let current = index.clone();
    let mut warned = false;
    let sink = move |img: &PreviewImage| -> Result<()> {
        let written = (|| -> Result<()> {
            let png = crate::output::encode_png(img.rgb, img.width, img.height, None)?;
            crate::output::write(&target, &png)
        })();
        match written {
            Ok(()) if json => {
                let line = serde_json::json!({
                    "event": "preview",
                    "index": current.load(Ordering::Relaxed),
                    "step": img.step,
                    "steps": img.steps,
                    "path": target.path().display().to_string(),
                    "width": img.width,
                    "height": img.height,
                });
                // A closed stdout ends the run at the next image's line, quietly.
                let _ = crate::stdio::write_stdout(format!("{line}\n").as_bytes());
            }
            Ok(()) => {}
            Err(e) if !warned => {
                warned = true;
                crate::stderr!(
                    "warning: preview not written: {}",
                    crate::error::one_line(&e)
                );
            }
            Err(_) => {}
        }
        Ok(())
    };
    pipe.set_preview(Some(Preview {
        decoder,
        every: p.every,
        sink: Box::new(sink),
    }));
    Ok(index)
}
