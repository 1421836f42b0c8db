//! `--vae PATH`: a VAE to decode (and encode) with instead of the model's own.
//!
//! Accepted:
//! - a diffusers VAE folder (`config.json` + `diffusion_pytorch_model[.fp16].safetensors`, or
//!   shards), e.g. `madebyollin/sdxl-vae-fp16-fix` or `madebyollin/taesdxl`; a whole pipeline
//!   folder stands for its `vae/`. `_class_name` says `AutoencoderKL` or `AutoencoderTiny`,
//!   and the config brings the scaling factor, latent statistics and `force_upcast`;
//! - a `.safetensors` file with diffusers keys (`decoder.up_blocks.*` for an AutoencoderKL,
//!   `decoder.layers.*` for an AutoencoderTiny) or original (LDM) keys (`decoder.up.*`,
//!   `first_stage_model.*` too, as in `sdxl_vae.safetensors`): no config, so the architecture
//!   comes from the shapes and the rest from SDXL's defaults (scaling factor 0.13025 and
//!   `force_upcast` for an AutoencoderKL; TAESDXL's for a tiny one).
//!
//! Every tensor the model needs must be in the file with its shape, checked before any is read.

use crate::config::{TinyVaeConfig, VaeArch, VaeConfig};
use crate::keymap::plan::{Plan, fmt_shape, shape_matches};
use crate::keymap::{Mapped, NORM_GROUPS, Transform};
use crate::weights::{ComponentWeights, WeightFiles};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// A VAE ready to replace a model's: its architecture and its weights (diffusers names).
pub struct VaeSource {
    pub arch: VaeArch,
    pub weights: ComponentWeights,
}

/// Opens the VAE at `path` (folder or file), checking every tensor's shape.
pub fn open(path: &Path) -> Result<VaeSource> {
    if path.is_dir() {
        return open_folder(path);
    }
    if !path.exists() {
        bail!("{}: no such file or directory", path.display());
    }
    crate::files::require_regular_file(path)?;
    match super::unet_file::detect_format(path)? {
        super::unet_file::UnetFormat::Safetensors => {}
        _ => bail!(
            "{}: a PyTorch checkpoint; --vae reads safetensors (convert it, or use the repo's \
             .safetensors)",
            path.display()
        ),
    }
    let files = Arc::new(WeightFiles::open(&[path.to_path_buf()])?);
    let shapes = files.shapes();
    let has_prefix = |p: &str| shapes.keys().any(|k| k.starts_with(p));
    let (arch, map) = if has_prefix("decoder.layers.") || has_prefix("encoder.layers.") {
        let config = infer_tiny(&shapes).with_context(|| {
            format!(
                "{}: tiny VAE (AutoencoderTiny) keys, but not a layout dmd2 recognises",
                path.display()
            )
        })?;
        (VaeArch::Tiny(config), identity_map(&shapes))
    } else if has_prefix("decoder.up_blocks.") {
        let config = infer_kl_diffusers(&shapes)
            .with_context(|| format!("{}: an incomplete diffusers VAE", path.display()))?;
        let map = shapes
            .keys()
            .filter_map(|k| {
                crate::checkpoint::diffusers::vae_name(k).map(|(name, transform)| {
                    (
                        name,
                        Mapped {
                            source: k.clone(),
                            transform,
                        },
                    )
                })
            })
            .collect();
        (VaeArch::Kl(config), map)
    } else if has_prefix("decoder.up.") || has_prefix("first_stage_model.decoder.up.") {
        let (config, map) = super::single_file::detect_vae(&shapes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        (VaeArch::Kl(config), map)
    } else {
        bail!(
            "{}: not a VAE (no decoder tensors of an AutoencoderKL or AutoencoderTiny, in \
             diffusers or original names)",
            path.display()
        );
    };
    arch.validate()
        .with_context(|| format!("{}: unsupported VAE shapes", path.display()))?;
    let weights = ComponentWeights {
        files,
        map,
        patches: Default::default(),
        non_finite: Default::default(),
        merge_scratch: Default::default(),
    };
    check_shapes(&arch, &weights, path)?;
    Ok(VaeSource { arch, weights })
}

fn open_folder(dir: &Path) -> Result<VaeSource> {
    let dir = if !dir.join("config.json").is_file() && dir.join("vae/config.json").is_file() {
        dir.join("vae")
    } else {
        dir.to_path_buf()
    };
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!(
            "{}: no config.json (a diffusers VAE folder holds config.json and \
             diffusion_pytorch_model.safetensors)",
            dir.display()
        );
    }
    let arch = VaeArch::from_diffusers_json(&config)?;
    let paths = super::diffusers::weight_files(&dir, "diffusion_pytorch_model")?;
    let files = Arc::new(WeightFiles::open(&paths)?);
    let weights = ComponentWeights::identity(files, crate::checkpoint::diffusers::vae_name);
    check_shapes(&arch, &weights, &dir)?;
    Ok(VaeSource { arch, weights })
}

fn identity_map(shapes: &BTreeMap<String, Vec<usize>>) -> BTreeMap<String, Mapped> {
    shapes
        .keys()
        .map(|k| {
            (
                k.clone(),
                Mapped {
                    source: k.clone(),
                    transform: Transform::Identity,
                },
            )
        })
        .collect()
}

/// Every tensor `arch` needs, with its shape (diffusers names; `ANY` where free).
fn expected_shapes(arch: &VaeArch) -> Result<Vec<(String, Vec<usize>)>> {
    Ok(match arch {
        VaeArch::Kl(c) => Plan::for_vae(c, None)?
            .entries
            .into_iter()
            .map(|e| (e.target, e.target_shape))
            .collect(),
        VaeArch::Tiny(c) => crate::vae::tiny::tensor_shapes(c),
    })
}

/// Every tensor of the VAE must exist with its shape; the first misfit is named.
fn check_shapes(arch: &VaeArch, weights: &ComponentWeights, path: &Path) -> Result<()> {
    let have = super::unet_file::model_shapes(weights)?;
    let mut problems = Vec::new();
    for (name, shape) in expected_shapes(arch)? {
        match have.get(&name) {
            None => problems.push(format!("{name} is missing")),
            Some(s) if !shape_matches(s, &shape) => problems.push(format!(
                "{name} has shape {s:?}, expected {}",
                fmt_shape(&shape)
            )),
            Some(_) => {}
        }
    }
    if let Some(first) = problems.first() {
        let more = match problems.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        bail!(
            "{}: not a complete {}: {first}{more}",
            path.display(),
            arch.class_name()
        );
    }
    Ok(())
}

fn dims4(shapes: &BTreeMap<String, Vec<usize>>, key: &str) -> Result<[usize; 4]> {
    match shapes.get(key).map(Vec::as_slice) {
        Some(&[a, b, c, d]) => Ok([a, b, c, d]),
        Some(s) => bail!("{key} has shape {s:?}, expected 4 dimensions"),
        None => bail!("no tensor {key}"),
    }
}

/// How many `prefix{i}.` groups there are, counting from 0 without gaps.
fn count(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> usize {
    (0..)
        .take_while(|i| {
            let p = format!("{prefix}{i}.");
            shapes.keys().any(|k| k.starts_with(&p))
        })
        .count()
}

/// An AutoencoderKL's configuration from its diffusers tensor names and shapes.
fn infer_kl_diffusers(shapes: &BTreeMap<String, Vec<usize>>) -> Result<VaeConfig> {
    let levels = count(shapes, "encoder.down_blocks.");
    let layers = count(shapes, "encoder.down_blocks.0.resnets.");
    if levels == 0 || layers == 0 {
        bail!("no encoder.down_blocks.0.resnets.0 tensors");
    }
    let channels = (0..levels)
        .map(|i| {
            Ok(dims4(
                shapes,
                &format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"),
            )?[0])
        })
        .collect::<Result<Vec<_>>>()?;
    let latent_channels = dims4(shapes, "decoder.conv_in.weight")?[1];
    let [out_channels, ..] = dims4(shapes, "decoder.conv_out.weight")?;
    let has = |p: &str| shapes.keys().any(|k| k.starts_with(p));
    Ok(VaeConfig {
        latent_channels,
        out_channels,
        block_out_channels: channels,
        layers_per_block: layers,
        norm_num_groups: NORM_GROUPS,
        scaling_factor: VaeConfig::SDXL_SCALING_FACTOR,
        latents_mean_std: None,
        use_post_quant_conv: has("post_quant_conv."),
        mid_block_add_attention: has("decoder.mid_block.attentions.0."),
        force_upcast: true,
    })
}

/// An AutoencoderTiny's configuration from its layer numbering: the decoder's levels end at
/// an index without weights (the Upsample) and the last one at the output convolution; the
/// encoder's levels start at a bias-free (stride-2) convolution. Scaling factor and latent
/// range are TAESDXL's.
fn infer_tiny(shapes: &BTreeMap<String, Vec<usize>>) -> Result<TinyVaeConfig> {
    let has = |k: String| shapes.contains_key(&k);
    let d = "decoder.layers.";
    let [c0, latent_channels, _, _] = dims4(shapes, &format!("{d}0.weight"))?;
    let (mut widths, mut blocks) = (Vec::new(), Vec::new());
    let (mut idx, mut n, mut width) = (2, 0, c0);
    let out_channels = loop {
        if idx > 1024 || widths.len() > 8 {
            bail!("the decoder does not end");
        }
        if has(format!("{d}{idx}.conv.0.weight")) {
            width = dims4(shapes, &format!("{d}{idx}.conv.0.weight"))?[0];
            n += 1;
            idx += 1;
        } else if has(format!("{d}{idx}.weight")) {
            // The output convolution: this level is the last.
            widths.push(width);
            blocks.push(n);
            break dims4(shapes, &format!("{d}{idx}.weight"))?[0];
        } else {
            // An Upsample, then the level's convolution.
            if !has(format!("{d}{}.weight", idx + 1)) {
                bail!("no {d}{}.weight after the upsampling", idx + 1);
            }
            widths.push(width);
            blocks.push(n);
            n = 0;
            idx += 2;
        }
    };
    let e = "encoder.layers.";
    let [e0, in_channels, _, _] = dims4(shapes, &format!("{e}0.weight"))?;
    let (mut e_widths, mut e_blocks) = (vec![e0], vec![0]);
    let mut idx = 1;
    loop {
        if idx > 1024 || e_widths.len() > 8 {
            bail!("the encoder does not end");
        }
        if has(format!("{e}{idx}.conv.0.weight")) {
            if let Some(b) = e_blocks.last_mut() {
                *b += 1;
            }
        } else if has(format!("{e}{idx}.bias")) {
            break; // the output convolution
        } else if has(format!("{e}{idx}.weight")) {
            e_widths.push(dims4(shapes, &format!("{e}{idx}.weight"))?[0]);
            e_blocks.push(0);
        } else {
            bail!("no {e}{idx}.weight");
        }
        idx += 1;
    }
    Ok(TinyVaeConfig {
        in_channels,
        out_channels,
        latent_channels,
        encoder_block_out_channels: e_widths,
        decoder_block_out_channels: widths,
        num_encoder_blocks: e_blocks,
        num_decoder_blocks: blocks,
        ..TinyVaeConfig::taesdxl()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes of a tiny VAE of a configuration give that configuration back.
    #[test]
    fn tiny_config_from_shapes() {
        for c in [
            TinyVaeConfig::taesdxl(),
            TinyVaeConfig {
                encoder_block_out_channels: vec![16; 3],
                decoder_block_out_channels: vec![24; 3],
                num_encoder_blocks: vec![2, 1, 0],
                num_decoder_blocks: vec![1, 0, 2],
                latent_channels: 8,
                ..TinyVaeConfig::taesdxl()
            },
        ] {
            let shapes: BTreeMap<String, Vec<usize>> =
                crate::vae::tiny::tensor_shapes(&c).into_iter().collect();
            assert_eq!(infer_tiny(&shapes).unwrap(), c);
        }
    }
}
