//! Single-file (LDM/sgm) SDXL checkpoints: architecture inference and the name map, on
//! synthetic shape maps (SDXL base, an SSD-1B-like model, a tiny model), on error cases, and on
//! the tiny fixture pair (single file + diffusers folder).

mod common;

use dmd2::checkpoint::single_file::{SingleFileLayout, detect};
use dmd2::config::{ClipConfig, UNetConfig, VaeConfig};
use dmd2::keymap::{
    Assemble, Component, SingleFileError, Transform, canonical_maps, original_tensors,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Shapes = BTreeMap<String, Vec<usize>>;

// ---------------------------------------------------------------------------------------
// A generator of original-layout key sets, written from the LDM/sgm module structure
// (openaimodel.py's UNetModel, ldm's Encoder/Decoder, HF CLIPTextModel, OpenCLIP
// TextTransformer), independently of the library's own tables.

#[derive(Clone)]
struct ClipSpec {
    vocab: usize,
    hidden: usize,
    mlp: usize,
    layers: usize,
    positions: usize,
}

#[derive(Clone)]
struct Spec {
    in_channels: usize,
    out_channels: usize,
    channels: Vec<usize>,
    layers: usize,
    /// Per down level; 0 = no attention.
    down_depth: Vec<usize>,
    /// Per up block (deepest level first), per resnet of the block (`layers + 1`); 0 = none.
    up_depth: Vec<Vec<usize>>,
    mid_depth: Option<usize>,
    linear: bool,
    adm: usize,
    te1: ClipSpec,
    te2: ClipSpec,
    projection: usize,
    vae_channels: Vec<usize>,
    vae_layers: usize,
    latent: usize,
    vae_mid_attention: bool,
}

fn sdxl_spec() -> Spec {
    Spec {
        in_channels: 4,
        out_channels: 4,
        channels: vec![320, 640, 1280],
        layers: 2,
        down_depth: vec![0, 2, 10],
        up_depth: vec![vec![10; 3], vec![2; 3], vec![0; 3]],
        mid_depth: Some(10),
        linear: true,
        adm: 2816,
        te1: ClipSpec {
            vocab: 49408,
            hidden: 768,
            mlp: 3072,
            layers: 12,
            positions: 77,
        },
        te2: ClipSpec {
            vocab: 49408,
            hidden: 1280,
            mlp: 5120,
            layers: 32,
            positions: 77,
        },
        projection: 1280,
        vae_channels: vec![128, 256, 512, 512],
        vae_layers: 2,
        latent: 4,
        vae_mid_attention: true,
    }
}

struct Gen {
    out: Shapes,
}

impl Gen {
    fn t(&mut self, key: String, shape: &[usize]) {
        assert!(
            self.out.insert(key.clone(), shape.to_vec()).is_none(),
            "generator emitted {key} twice"
        );
    }

    fn wb(&mut self, key: &str, w: &[usize]) {
        self.t(format!("{key}.weight"), w);
        self.t(format!("{key}.bias"), &w[..1]);
    }

    fn res_block(&mut self, p: &str, cin: usize, cout: usize, temb: usize) {
        self.wb(&format!("{p}.in_layers.0"), &[cin]);
        self.wb(&format!("{p}.in_layers.2"), &[cout, cin, 3, 3]);
        self.wb(&format!("{p}.emb_layers.1"), &[cout, temb]);
        self.wb(&format!("{p}.out_layers.0"), &[cout]);
        self.wb(&format!("{p}.out_layers.3"), &[cout, cout, 3, 3]);
        if cin != cout {
            self.wb(&format!("{p}.skip_connection"), &[cout, cin, 1, 1]);
        }
    }

    fn spatial_transformer(
        &mut self,
        p: &str,
        ch: usize,
        depth: usize,
        context: usize,
        linear: bool,
    ) {
        let proj: &[usize] = if linear { &[ch, ch] } else { &[ch, ch, 1, 1] };
        self.wb(&format!("{p}.norm"), &[ch]);
        self.wb(&format!("{p}.proj_in"), proj);
        self.wb(&format!("{p}.proj_out"), proj);
        for k in 0..depth {
            let b = format!("{p}.transformer_blocks.{k}");
            for (a, kv) in [("attn1", ch), ("attn2", context)] {
                self.t(format!("{b}.{a}.to_q.weight"), &[ch, ch]);
                self.t(format!("{b}.{a}.to_k.weight"), &[ch, kv]);
                self.t(format!("{b}.{a}.to_v.weight"), &[ch, kv]);
                self.wb(&format!("{b}.{a}.to_out.0"), &[ch, ch]);
            }
            self.wb(&format!("{b}.ff.net.0.proj"), &[ch * 8, ch]);
            self.wb(&format!("{b}.ff.net.2"), &[ch, ch * 4]);
            for n in ["norm1", "norm2", "norm3"] {
                self.wb(&format!("{b}.{n}"), &[ch]);
            }
        }
    }

    fn vae_block(&mut self, p: &str, cin: usize, cout: usize) {
        self.wb(&format!("{p}.norm1"), &[cin]);
        self.wb(&format!("{p}.conv1"), &[cout, cin, 3, 3]);
        self.wb(&format!("{p}.norm2"), &[cout]);
        self.wb(&format!("{p}.conv2"), &[cout, cout, 3, 3]);
        if cin != cout {
            self.wb(&format!("{p}.nin_shortcut"), &[cout, cin, 1, 1]);
        }
    }

    fn vae_mid(&mut self, p: &str, ch: usize, attention: bool) {
        self.vae_block(&format!("{p}.block_1"), ch, ch);
        if attention {
            self.wb(&format!("{p}.attn_1.norm"), &[ch]);
            for n in ["q", "k", "v", "proj_out"] {
                self.wb(&format!("{p}.attn_1.{n}"), &[ch, ch, 1, 1]);
            }
        }
        self.vae_block(&format!("{p}.block_2"), ch, ch);
    }
}

/// The original-layout tensors of a model of this spec, as sgm's modules name them.
fn ldm_shapes(s: &Spec) -> Shapes {
    let mut g = Gen {
        out: BTreeMap::new(),
    };
    let u = "model.diffusion_model";
    let ch = &s.channels;
    let c0 = ch[0];
    let temb = 4 * c0;
    let context = s.te1.hidden + s.te2.hidden;
    g.wb(&format!("{u}.time_embed.0"), &[temb, c0]);
    g.wb(&format!("{u}.time_embed.2"), &[temb, temb]);
    g.wb(&format!("{u}.label_emb.0.0"), &[temb, s.adm]);
    g.wb(&format!("{u}.label_emb.0.2"), &[temb, temb]);
    g.wb(&format!("{u}.input_blocks.0.0"), &[c0, s.in_channels, 3, 3]);
    // input_blocks: [conv_in], then per level `layers` x [ResBlock, SpatialTransformer?],
    // then [Downsample] except after the last level.
    let mut idx = 1;
    let mut skips = vec![c0];
    let mut cur = c0;
    for (level, &c) in ch.iter().enumerate() {
        for _ in 0..s.layers {
            g.res_block(&format!("{u}.input_blocks.{idx}.0"), cur, c, temb);
            cur = c;
            if s.down_depth[level] > 0 {
                g.spatial_transformer(
                    &format!("{u}.input_blocks.{idx}.1"),
                    c,
                    s.down_depth[level],
                    context,
                    s.linear,
                );
            }
            skips.push(c);
            idx += 1;
        }
        if level + 1 < ch.len() {
            g.wb(&format!("{u}.input_blocks.{idx}.0.op"), &[c, c, 3, 3]);
            skips.push(c);
            idx += 1;
        }
    }
    g.res_block(&format!("{u}.middle_block.0"), cur, cur, temb);
    if let Some(d) = s.mid_depth {
        g.spatial_transformer(&format!("{u}.middle_block.1"), cur, d, context, s.linear);
        g.res_block(&format!("{u}.middle_block.2"), cur, cur, temb);
    }
    // output_blocks: per level from the deepest, `layers + 1` x [ResBlock(cur + skip),
    // SpatialTransformer?], the last one of a level followed by Upsample (but the top level).
    let mut idx = 0;
    for (b, level) in (0..ch.len()).rev().enumerate() {
        let c = ch[level];
        for j in 0..=s.layers {
            let skip = skips.pop().unwrap();
            g.res_block(&format!("{u}.output_blocks.{idx}.0"), cur + skip, c, temb);
            cur = c;
            let depth = s.up_depth[b][j];
            let mut slot = 1;
            if depth > 0 {
                g.spatial_transformer(
                    &format!("{u}.output_blocks.{idx}.1"),
                    c,
                    depth,
                    context,
                    s.linear,
                );
                slot = 2;
            }
            if level > 0 && j == s.layers {
                g.wb(
                    &format!("{u}.output_blocks.{idx}.{slot}.conv"),
                    &[c, c, 3, 3],
                );
            }
            idx += 1;
        }
    }
    g.wb(&format!("{u}.out.0"), &[c0]);
    g.wb(&format!("{u}.out.2"), &[s.out_channels, c0, 3, 3]);

    let t = "conditioner.embedders.0.transformer.text_model";
    let (h, m) = (s.te1.hidden, s.te1.mlp);
    g.t(
        format!("{t}.embeddings.token_embedding.weight"),
        &[s.te1.vocab, h],
    );
    g.t(
        format!("{t}.embeddings.position_embedding.weight"),
        &[s.te1.positions, h],
    );
    g.t(
        format!("{t}.embeddings.position_ids"),
        &[1, s.te1.positions],
    );
    for l in 0..s.te1.layers {
        let p = format!("{t}.encoder.layers.{l}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            g.wb(&format!("{p}.self_attn.{n}"), &[h, h]);
        }
        g.wb(&format!("{p}.layer_norm1"), &[h]);
        g.wb(&format!("{p}.layer_norm2"), &[h]);
        g.wb(&format!("{p}.mlp.fc1"), &[m, h]);
        g.wb(&format!("{p}.mlp.fc2"), &[h, m]);
    }
    g.wb(&format!("{t}.final_layer_norm"), &[h]);

    let o = "conditioner.embedders.1.model";
    let (h, m) = (s.te2.hidden, s.te2.mlp);
    g.t(format!("{o}.token_embedding.weight"), &[s.te2.vocab, h]);
    g.t(format!("{o}.positional_embedding"), &[s.te2.positions, h]);
    g.t(format!("{o}.text_projection"), &[h, s.projection]);
    g.t(format!("{o}.logit_scale"), &[]);
    g.wb(&format!("{o}.ln_final"), &[h]);
    for l in 0..s.te2.layers {
        let p = format!("{o}.transformer.resblocks.{l}");
        g.t(format!("{p}.attn.in_proj_weight"), &[3 * h, h]);
        g.t(format!("{p}.attn.in_proj_bias"), &[3 * h]);
        g.wb(&format!("{p}.attn.out_proj"), &[h, h]);
        g.wb(&format!("{p}.ln_1"), &[h]);
        g.wb(&format!("{p}.ln_2"), &[h]);
        g.wb(&format!("{p}.mlp.c_fc"), &[m, h]);
        g.wb(&format!("{p}.mlp.c_proj"), &[h, m]);
    }

    let v = "first_stage_model";
    let vc = &s.vae_channels;
    let (v0, vl) = (vc[0], *vc.last().unwrap());
    g.wb(&format!("{v}.encoder.conv_in"), &[v0, 3, 3, 3]);
    let mut cur = v0;
    for (i, &c) in vc.iter().enumerate() {
        for j in 0..s.vae_layers {
            g.vae_block(&format!("{v}.encoder.down.{i}.block.{j}"), cur, c);
            cur = c;
        }
        if i + 1 < vc.len() {
            g.wb(
                &format!("{v}.encoder.down.{i}.downsample.conv"),
                &[c, c, 3, 3],
            );
        }
    }
    g.vae_mid(&format!("{v}.encoder.mid"), vl, s.vae_mid_attention);
    g.wb(&format!("{v}.encoder.norm_out"), &[vl]);
    g.wb(&format!("{v}.encoder.conv_out"), &[2 * s.latent, vl, 3, 3]);
    g.wb(
        &format!("{v}.quant_conv"),
        &[2 * s.latent, 2 * s.latent, 1, 1],
    );
    g.wb(&format!("{v}.post_quant_conv"), &[s.latent, s.latent, 1, 1]);
    g.wb(&format!("{v}.decoder.conv_in"), &[vl, s.latent, 3, 3]);
    g.vae_mid(&format!("{v}.decoder.mid"), vl, s.vae_mid_attention);
    // ldm's decoder builds `up` from the deepest level down but stores it at index `level`.
    let mut cur = vl;
    for level in (0..vc.len()).rev() {
        let c = vc[level];
        for j in 0..=s.vae_layers {
            g.vae_block(&format!("{v}.decoder.up.{level}.block.{j}"), cur, c);
            cur = c;
        }
        if level > 0 {
            g.wb(
                &format!("{v}.decoder.up.{level}.upsample.conv"),
                &[c, c, 3, 3],
            );
        }
    }
    g.wb(&format!("{v}.decoder.norm_out"), &[v0]);
    g.wb(&format!("{v}.decoder.conv_out"), &[3, v0, 3, 3]);
    g.out
}

// ---------------------------------------------------------------------------------------
// Expected configurations

/// SDXL base's `unet/config.json` as published (stabilityai/stable-diffusion-xl-base-1.0).
const SDXL_UNET_JSON: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
  "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
  "block_out_channels": [320, 640, 1280], "center_input_sample": false, "class_embed_type": null,
  "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
  "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
  "norm_num_groups": 32, "num_attention_heads": null, "out_channels": 4,
  "projection_class_embeddings_input_dim": 2816, "resnet_time_scale_shift": "default", "sample_size": 128,
  "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "upcast_attention": false, "use_linear_projection": true
}"#;

fn sdxl_unet_config() -> UNetConfig {
    UNetConfig::from_diffusers_value(&serde_json::from_str(SDXL_UNET_JSON).unwrap()).unwrap()
}

// SDXL base's published text-encoder and VAE configs: the same table the benchmarks build
// full-size models from (detection itself never reads it).
fn clip_l() -> ClipConfig {
    dmd2::config::sdxl_base::text_encoder()
}

fn clip_big_g() -> ClipConfig {
    dmd2::config::sdxl_base::text_encoder_2()
}

fn sdxl_vae() -> VaeConfig {
    dmd2::config::sdxl_base::vae()
}

#[test]
fn benchmark_unet_table_is_sdxl_base_config() {
    assert_eq!(dmd2::config::sdxl_base::unet(), sdxl_unet_config());
}

fn counts(layout: &SingleFileLayout) -> [usize; 4] {
    Component::ALL.map(|c| layout.maps[&c].len())
}

fn mapped<'a>(
    layout: &'a SingleFileLayout,
    c: Component,
    target: &str,
) -> (&'a str, &'a Transform) {
    let m = layout.maps[&c]
        .get(target)
        .unwrap_or_else(|| panic!("{c}: no target {target}"));
    (m.source.as_str(), &m.transform)
}

// ---------------------------------------------------------------------------------------
// SDXL base

#[test]
fn sdxl_base_configs_and_counts() {
    let shapes = ldm_shapes(&sdxl_spec());
    let layout = detect(&shapes).unwrap();

    let unet = sdxl_unet_config();
    assert_eq!(unet.heads, vec![5, 10, 20]);
    assert_eq!(unet.cross_attention_dim, 2048);
    assert_eq!(unet.addition_time_embed_dim, 256);
    assert_eq!(unet.projection_class_embeddings_input_dim, 2816);
    assert_eq!(layout.unet, unet);
    assert_eq!(layout.text_encoder, clip_l());
    assert_eq!(layout.text_encoder_2, clip_big_g());
    assert_eq!(layout.vae, sdxl_vae());

    // Tensor counts of SDXL base's diffusers files (diffusers 0.42 / transformers 5.24 state
    // dicts of the same configurations): UNet 1680, CLIP-L 196 (no position_ids),
    // bigG 517 (with text_projection), VAE 248.
    assert_eq!(counts(&layout), [1680, 196, 517, 248]);
    assert_eq!(
        layout.unused,
        vec![
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids".to_string(),
            "conditioner.embedders.1.model.logit_scale".to_string(),
        ]
    );
    // Every other tensor of the file is used: 2513 = 1680 + 196 + 248 + (517 − 32·4) (q/k/v
    // weights and biases come three to a fused tensor).
    assert_eq!(shapes.len() - layout.unused.len(), 2513);
}

#[test]
fn sdxl_base_name_arithmetic() {
    let layout = detect(&ldm_shapes(&sdxl_spec())).unwrap();
    let u = Component::Unet;
    let id = &Transform::Identity;
    // The pairs below are those of diffusers' scripts/convert_diffusers_to_original_sdxl.py.
    for (target, source) in [
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
        ("add_embedding.linear_2.weight", "label_emb.0.2.weight"),
        (
            "down_blocks.0.resnets.1.conv2.weight",
            "input_blocks.2.0.out_layers.3.weight",
        ),
        (
            "down_blocks.0.downsamplers.0.conv.weight",
            "input_blocks.3.0.op.weight",
        ),
        (
            "down_blocks.1.resnets.0.conv_shortcut.weight",
            "input_blocks.4.0.skip_connection.weight",
        ),
        (
            "down_blocks.1.resnets.0.norm1.weight",
            "input_blocks.4.0.in_layers.0.weight",
        ),
        (
            "down_blocks.1.resnets.0.conv1.bias",
            "input_blocks.4.0.in_layers.2.bias",
        ),
        (
            "down_blocks.1.resnets.0.time_emb_proj.weight",
            "input_blocks.4.0.emb_layers.1.weight",
        ),
        (
            "down_blocks.1.resnets.0.norm2.bias",
            "input_blocks.4.0.out_layers.0.bias",
        ),
        (
            "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k.weight",
            "input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight",
        ),
        (
            "down_blocks.1.downsamplers.0.conv.bias",
            "input_blocks.6.0.op.bias",
        ),
        (
            "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj.weight",
            "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight",
        ),
        (
            "mid_block.resnets.0.conv1.weight",
            "middle_block.0.in_layers.2.weight",
        ),
        (
            "mid_block.attentions.0.proj_in.weight",
            "middle_block.1.proj_in.weight",
        ),
        (
            "mid_block.resnets.1.conv2.weight",
            "middle_block.2.out_layers.3.weight",
        ),
        (
            "up_blocks.0.resnets.2.conv_shortcut.weight",
            "output_blocks.2.0.skip_connection.weight",
        ),
        (
            "up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_out.0.bias",
            "output_blocks.2.1.transformer_blocks.9.attn1.to_out.0.bias",
        ),
        (
            "up_blocks.0.upsamplers.0.conv.weight",
            "output_blocks.2.2.conv.weight",
        ),
        (
            "up_blocks.1.resnets.0.norm1.weight",
            "output_blocks.3.0.in_layers.0.weight",
        ),
        (
            "up_blocks.1.upsamplers.0.conv.bias",
            "output_blocks.5.2.conv.bias",
        ),
        (
            "up_blocks.2.resnets.2.conv2.weight",
            "output_blocks.8.0.out_layers.3.weight",
        ),
        ("conv_norm_out.weight", "out.0.weight"),
        ("conv_out.bias", "out.2.bias"),
    ] {
        assert_eq!(
            mapped(&layout, u, target),
            (format!("model.diffusion_model.{source}").as_str(), id),
            "{target}"
        );
    }
    assert!(!layout.maps[&u].contains_key("up_blocks.2.upsamplers.0.conv.weight"));
    assert!(!layout.maps[&u].contains_key("down_blocks.2.downsamplers.0.conv.weight"));
    assert!(!layout.maps[&u].contains_key("down_blocks.0.attentions.0.norm.weight"));

    let v = Component::Vae;
    for (target, source, t) in [
        (
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            "encoder.down.1.block.0.nin_shortcut.weight",
            id,
        ),
        (
            "encoder.down_blocks.2.downsamplers.0.conv.weight",
            "encoder.down.2.downsample.conv.weight",
            id,
        ),
        (
            "encoder.mid_block.attentions.0.group_norm.weight",
            "encoder.mid.attn_1.norm.weight",
            id,
        ),
        (
            "encoder.mid_block.attentions.0.to_q.weight",
            "encoder.mid.attn_1.q.weight",
            &Transform::Squeeze1x1,
        ),
        (
            "decoder.mid_block.attentions.0.to_out.0.weight",
            "decoder.mid.attn_1.proj_out.weight",
            &Transform::Squeeze1x1,
        ),
        (
            "decoder.mid_block.attentions.0.to_out.0.bias",
            "decoder.mid.attn_1.proj_out.bias",
            id,
        ),
        (
            "encoder.mid_block.resnets.1.norm2.weight",
            "encoder.mid.block_2.norm2.weight",
            id,
        ),
        (
            "encoder.conv_norm_out.weight",
            "encoder.norm_out.weight",
            id,
        ),
        (
            "decoder.up_blocks.0.resnets.2.conv1.weight",
            "decoder.up.3.block.2.conv1.weight",
            id,
        ),
        (
            "decoder.up_blocks.0.upsamplers.0.conv.weight",
            "decoder.up.3.upsample.conv.weight",
            id,
        ),
        (
            "decoder.up_blocks.2.resnets.0.conv_shortcut.weight",
            "decoder.up.1.block.0.nin_shortcut.weight",
            id,
        ),
        (
            "decoder.up_blocks.3.resnets.1.norm1.bias",
            "decoder.up.0.block.1.norm1.bias",
            id,
        ),
        ("quant_conv.weight", "quant_conv.weight", id),
        ("post_quant_conv.bias", "post_quant_conv.bias", id),
    ] {
        assert_eq!(
            mapped(&layout, v, target),
            (format!("first_stage_model.{source}").as_str(), t),
            "{target}"
        );
    }
    assert!(!layout.maps[&v].contains_key("decoder.up_blocks.3.upsamplers.0.conv.weight"));

    let (src, t) = mapped(
        &layout,
        Component::TextEncoder,
        "encoder.layers.11.self_attn.v_proj.bias",
    );
    assert_eq!(
        (src, t),
        (
            "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.v_proj.bias",
            id
        )
    );
    let t2 = Component::TextEncoder2;
    let o = "conditioner.embedders.1.model.";
    for (proj, start) in [("q_proj", 0), ("k_proj", 1280), ("v_proj", 2560)] {
        let rows = Transform::Rows { start, len: 1280 };
        let w = mapped(
            &layout,
            t2,
            &format!("encoder.layers.31.self_attn.{proj}.weight"),
        );
        assert_eq!(
            w,
            (
                format!("{o}transformer.resblocks.31.attn.in_proj_weight").as_str(),
                &rows
            )
        );
        let b = mapped(
            &layout,
            t2,
            &format!("encoder.layers.31.self_attn.{proj}.bias"),
        );
        assert_eq!(
            b,
            (
                format!("{o}transformer.resblocks.31.attn.in_proj_bias").as_str(),
                &rows
            )
        );
    }
    for (target, source, t) in [
        (
            "text_projection.weight",
            "text_projection",
            &Transform::Transpose,
        ),
        (
            "embeddings.token_embedding.weight",
            "token_embedding.weight",
            id,
        ),
        (
            "embeddings.position_embedding.weight",
            "positional_embedding",
            id,
        ),
        (
            "encoder.layers.0.self_attn.out_proj.weight",
            "transformer.resblocks.0.attn.out_proj.weight",
            id,
        ),
        (
            "encoder.layers.0.layer_norm1.bias",
            "transformer.resblocks.0.ln_1.bias",
            id,
        ),
        (
            "encoder.layers.0.layer_norm2.weight",
            "transformer.resblocks.0.ln_2.weight",
            id,
        ),
        (
            "encoder.layers.0.mlp.fc1.weight",
            "transformer.resblocks.0.mlp.c_fc.weight",
            id,
        ),
        (
            "encoder.layers.0.mlp.fc2.bias",
            "transformer.resblocks.0.mlp.c_proj.bias",
            id,
        ),
        ("final_layer_norm.weight", "ln_final.weight", id),
    ] {
        assert_eq!(
            mapped(&layout, t2, target),
            (format!("{o}{source}").as_str(), t),
            "{target}"
        );
    }
}

/// Shapes after the transforms are the diffusers shapes: spot checks of each kind.
#[test]
fn sdxl_base_transformed_shapes() {
    let shapes = ldm_shapes(&sdxl_spec());
    let layout = detect(&shapes).unwrap();
    let after = |c: Component, target: &str| {
        let m = &layout.maps[&c][target];
        m.transform.apply_to_shape(&shapes[&m.source]).unwrap()
    };
    assert_eq!(
        after(Component::TextEncoder2, "text_projection.weight"),
        vec![1280, 1280]
    );
    assert_eq!(
        after(
            Component::TextEncoder2,
            "encoder.layers.3.self_attn.k_proj.weight"
        ),
        vec![1280, 1280]
    );
    assert_eq!(
        after(
            Component::TextEncoder2,
            "encoder.layers.3.self_attn.k_proj.bias"
        ),
        vec![1280]
    );
    assert_eq!(
        after(Component::Vae, "decoder.mid_block.attentions.0.to_v.weight"),
        vec![512, 512]
    );
    assert_eq!(
        after(Component::Unet, "up_blocks.0.resnets.0.conv1.weight"),
        vec![1280, 2560, 3, 3]
    );
    assert_eq!(
        after(Component::Unet, "up_blocks.1.resnets.2.conv1.weight"),
        vec![640, 960, 3, 3]
    );
    assert_eq!(
        after(Component::Unet, "up_blocks.2.resnets.0.conv1.weight"),
        vec![320, 960, 3, 3]
    );
    assert_eq!(
        after(
            Component::Unet,
            "up_blocks.2.resnets.2.conv_shortcut.weight"
        ),
        vec![320, 640, 1, 1]
    );
}

/// Writing back: the configurations alone give the same maps, and grouping them by original
/// tensor gives back exactly the file's used tensors.
#[test]
fn sdxl_base_write_back_plan() {
    let shapes = ldm_shapes(&sdxl_spec());
    let layout = detect(&shapes).unwrap();
    let canonical = canonical_maps(
        &layout.unet,
        &layout.text_encoder,
        &layout.text_encoder_2,
        &layout.vae,
    )
    .unwrap();
    assert_eq!(canonical, layout.maps);

    let originals = original_tensors(&layout.maps);
    let keys: BTreeSet<&str> = originals.iter().map(|o| o.key.as_str()).collect();
    let used: BTreeSet<&str> = shapes
        .keys()
        .map(String::as_str)
        .filter(|k| !layout.unused.iter().any(|u| u == k))
        .collect();
    assert_eq!(keys, used);
    let fused = originals
        .iter()
        .find(|o| {
            o.key == "conditioner.embedders.1.model.transformer.resblocks.7.attn.in_proj_weight"
        })
        .unwrap();
    assert_eq!(fused.assemble, Assemble::ConcatRows);
    assert_eq!(fused.component, Component::TextEncoder2);
    assert_eq!(
        fused.parts,
        ["q_proj", "k_proj", "v_proj"]
            .map(|p| format!("encoder.layers.7.self_attn.{p}.weight"))
            .to_vec()
    );
    let proj = originals
        .iter()
        .find(|o| o.key == "conditioner.embedders.1.model.text_projection")
        .unwrap();
    assert_eq!(
        (proj.assemble, proj.parts.as_slice()),
        (
            Assemble::Transpose,
            &["text_projection.weight".to_string()][..]
        )
    );
    let q = originals
        .iter()
        .find(|o| o.key == "first_stage_model.decoder.mid.attn_1.q.weight")
        .unwrap();
    assert_eq!(q.assemble, Assemble::Unsqueeze1x1);
    assert_eq!(originals.iter().filter(|o| o.parts.len() > 1).count(), 64);
    assert!(originals.iter().all(|o| o.parts.len()
        == if o.assemble == Assemble::ConcatRows {
            3
        } else {
            1
        }));
}

/// VAE attention already stored as linear weights (some conversions do that) maps as is.
#[test]
fn vae_attention_stored_as_linear() {
    let mut shapes = ldm_shapes(&sdxl_spec());
    for (k, s) in shapes.iter_mut() {
        if k.contains("mid.attn_1.") && s.len() == 4 {
            s.truncate(2);
        }
    }
    let layout = detect(&shapes).unwrap();
    let (_, t) = mapped(
        &layout,
        Component::Vae,
        "encoder.mid_block.attentions.0.to_k.weight",
    );
    assert_eq!(t, &Transform::Identity);
}

// ---------------------------------------------------------------------------------------
// Other architectures

/// SSD-1B-like: depths that differ between levels and between the down and up paths, and a
/// mid block without attention (diffusers' `UNetMidBlock2D` in a UNet2DConditionModel: one
/// resnet).
#[test]
fn uneven_depths_ssd1b_like() {
    let mut spec = sdxl_spec();
    spec.down_depth = vec![0, 2, 4];
    spec.up_depth = vec![vec![6; 3], vec![1; 3], vec![0; 3]];
    spec.mid_depth = None;
    let layout = detect(&ldm_shapes(&spec)).unwrap();
    let u = &layout.unet;
    assert_eq!(u.down_attention, vec![false, true, true]);
    assert_eq!(u.down_transformer_depth, vec![1, 2, 4]);
    assert_eq!(u.up_attention, vec![true, true, false]);
    assert_eq!(u.up_transformer_depth, vec![6, 1, 1]);
    assert_eq!(u.mid_transformer_depth, None);
    assert_eq!(u.heads, vec![5, 10, 20]);
    let map = &layout.maps[&Component::Unet];
    assert!(map.contains_key("mid_block.resnets.0.conv1.weight"));
    assert!(
        !map.keys().any(
            |k| k.starts_with("mid_block.resnets.1.") || k.starts_with("mid_block.attentions.")
        )
    );
    assert!(map.contains_key("up_blocks.0.attentions.2.transformer_blocks.5.attn2.to_v.weight"));
    assert!(!map.contains_key("up_blocks.0.attentions.2.transformer_blocks.6.attn2.to_v.weight"));
    assert!(map.contains_key("down_blocks.2.attentions.0.transformer_blocks.3.norm3.weight"));
    // 14 + down (22 + 12+10+2·(6+2·20)+2 + 12+10+2·(6+4·20)) + mid 10
    //    + up (36+3·(6+6·20)+2 + 36+3·(6+20)+2 + 36)
    assert_eq!(map.len(), 14 + (22 + 116 + 194) + 10 + (416 + 116 + 36));
    let canonical =
        canonical_maps(u, &layout.text_encoder, &layout.text_encoder_2, &layout.vae).unwrap();
    assert_eq!(canonical, layout.maps);
}

/// The real SSD-1B varies the depth within one up block ([4, 4, 10] and [2, 1, 1]), which one
/// depth per block cannot express: a clear error, not a wrong model.
#[test]
fn depth_varying_within_a_block_is_an_error() {
    let mut spec = sdxl_spec();
    spec.down_depth = vec![0, 2, 4];
    spec.up_depth = vec![vec![4, 4, 10], vec![2, 1, 1], vec![0; 3]];
    spec.mid_depth = None;
    let err = detect(&ldm_shapes(&spec)).unwrap_err();
    assert!(
        matches!(
            err,
            SingleFileError::Inconsistent {
                component: Component::Unet,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("up block 0") && msg.contains("[4, 4, 10]"),
        "{msg}"
    );
}

fn tiny_spec() -> Spec {
    Spec {
        in_channels: 4,
        out_channels: 4,
        channels: vec![32, 64],
        layers: 1,
        down_depth: vec![0, 1],
        up_depth: vec![vec![1; 2], vec![0; 2]],
        mid_depth: Some(1),
        linear: false,
        adm: 32 + 6 * 8,
        te1: ClipSpec {
            vocab: 1000,
            hidden: 32,
            mlp: 37,
            layers: 2,
            positions: 77,
        },
        te2: ClipSpec {
            vocab: 1000,
            hidden: 32,
            mlp: 37,
            layers: 2,
            positions: 77,
        },
        projection: 32,
        vae_channels: vec![32, 64],
        vae_layers: 1,
        latent: 4,
        vae_mid_attention: true,
    }
}

#[test]
fn tiny_model() {
    let layout = detect(&ldm_shapes(&tiny_spec())).unwrap();
    let u = &layout.unet;
    assert_eq!(u.block_out_channels, vec![32, 64]);
    assert_eq!(u.layers_per_block, 1);
    assert_eq!(u.heads, vec![1, 1]);
    assert!(!u.use_linear_projection);
    assert_eq!(u.cross_attention_dim, 64);
    assert_eq!(u.addition_time_embed_dim, 8);
    assert_eq!(u.mid_transformer_depth, Some(1));
    assert_eq!(layout.text_encoder.num_attention_heads, 1);
    assert_eq!(layout.text_encoder.intermediate_size, 37);
    assert_eq!(layout.text_encoder_2.projection_dim, Some(32));
    assert_eq!(layout.vae.block_out_channels, vec![32, 64]);
    assert_eq!(layout.vae.layers_per_block, 1);
    let (_, t) = mapped(
        &layout,
        Component::Unet,
        "down_blocks.1.attentions.0.proj_in.weight",
    );
    assert_eq!(t, &Transform::Identity);
    assert!(layout.maps[&Component::Unet].contains_key("up_blocks.0.upsamplers.0.conv.weight"));
}

// ---------------------------------------------------------------------------------------
// Errors

fn err_of(shapes: &Shapes) -> SingleFileError {
    let e = detect(shapes).unwrap_err();
    assert!(!e.to_string().contains('\n'), "multi-line message: {e}");
    e
}

fn keys(names: &[&str]) -> Shapes {
    names.iter().map(|k| (k.to_string(), vec![4, 4])).collect()
}

#[test]
fn error_empty() {
    assert_eq!(err_of(&Shapes::new()), SingleFileError::Empty);
}

#[test]
fn error_other_model_families() {
    let sd15 = keys(&[
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        "first_stage_model.encoder.conv_in.weight",
    ]);
    let e = err_of(&sd15);
    assert!(matches!(e, SingleFileError::NotSdxl { .. }));
    assert_eq!(
        e.to_string(),
        "not an SDXL checkpoint: no `conditioner.embedders.1.model.*` (OpenCLIP bigG) keys — this looks like a Stable \
         Diffusion 1.x checkpoint (`cond_stage_model.transformer.*`)"
    );
    let sd2 = keys(&[
        "model.diffusion_model.input_blocks.0.0.weight",
        "cond_stage_model.model.token_embedding.weight",
    ]);
    assert!(err_of(&sd2).to_string().contains("Stable Diffusion 2.x"));
    let flux = keys(&[
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
        "model.diffusion_model.img_in.weight",
    ]);
    assert!(err_of(&flux).to_string().contains("Flux"));
    let sd3 = keys(&["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]);
    assert!(err_of(&sd3).to_string().contains("Stable Diffusion 3"));
    let refiner = keys(&[
        "model.diffusion_model.input_blocks.0.0.weight",
        "conditioner.embedders.0.model.token_embedding.weight",
    ]);
    assert!(err_of(&refiner).to_string().contains("refiner"));
    let bare = keys(&["model.diffusion_model.input_blocks.0.0.weight"]);
    assert!(err_of(&bare).to_string().contains("bare UNet"));
    let lora = keys(&[
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
    ]);
    assert!(matches!(err_of(&lora), SingleFileError::Lora { .. }));
    let unknown = keys(&["foo.bar"]);
    assert!(err_of(&unknown).to_string().contains("`foo.bar`"));
}

#[test]
fn error_diffusers_unet_state_dict() {
    // The UNet of a diffusers folder, i.e. the target side of a layout.
    let layout = detect(&ldm_shapes(&sdxl_spec())).unwrap();
    let shapes = ldm_shapes(&sdxl_spec());
    let unet: Shapes = layout.maps[&Component::Unet]
        .iter()
        .map(|(k, m)| {
            (
                k.clone(),
                m.transform.apply_to_shape(&shapes[&m.source]).unwrap(),
            )
        })
        .collect();
    let e = err_of(&unet);
    assert_eq!(e, SingleFileError::DiffusersStateDict { what: "UNet" });
    assert!(
        e.to_string()
            .starts_with("looks like a diffusers UNet state dict, not a full checkpoint")
    );
    let vae = keys(&[
        "decoder.up_blocks.0.resnets.0.conv1.weight",
        "encoder.conv_in.weight",
    ]);
    assert_eq!(
        err_of(&vae),
        SingleFileError::DiffusersStateDict { what: "VAE" }
    );
}

#[test]
fn error_missing_key_is_named() {
    let mut shapes = ldm_shapes(&sdxl_spec());
    let key = "model.diffusion_model.output_blocks.4.1.transformer_blocks.1.attn2.to_v.weight";
    shapes.remove(key).unwrap();
    assert_eq!(
        err_of(&shapes),
        SingleFileError::MissingKey {
            component: Component::Unet,
            key: key.into()
        }
    );

    let mut shapes = ldm_shapes(&sdxl_spec());
    let key = "conditioner.embedders.1.model.transformer.resblocks.17.attn.in_proj_bias";
    shapes.remove(key).unwrap();
    let e = err_of(&shapes);
    assert_eq!(
        e,
        SingleFileError::MissingKey {
            component: Component::TextEncoder2,
            key: key.into()
        }
    );
    assert_eq!(
        e.to_string(),
        format!("text encoder 2 (OpenCLIP ViT-bigG): missing tensor `{key}`")
    );

    let mut shapes = ldm_shapes(&sdxl_spec());
    let key = "first_stage_model.decoder.up.2.upsample.conv.bias";
    shapes.remove(key).unwrap();
    assert_eq!(
        err_of(&shapes),
        SingleFileError::MissingKey {
            component: Component::Vae,
            key: key.into()
        }
    );

    let mut shapes = ldm_shapes(&sdxl_spec());
    shapes.retain(|k, _| !k.starts_with("first_stage_model."));
    assert!(matches!(
        err_of(&shapes),
        SingleFileError::MissingComponent {
            component: Component::Vae,
            ..
        }
    ));
}

#[test]
fn error_inconsistent_shapes() {
    let mut shapes = ldm_shapes(&sdxl_spec());
    let key = "model.diffusion_model.output_blocks.3.0.in_layers.2.weight";
    *shapes.get_mut(key).unwrap() = vec![640, 1280, 3, 3];
    let e = err_of(&shapes);
    assert_eq!(
        e,
        SingleFileError::ShapeMismatch {
            component: Component::Unet,
            key: key.into(),
            found: vec![640, 1280, 3, 3],
            expected: "[640, 1920, 3, 3]".into()
        }
    );

    let mut shapes = ldm_shapes(&sdxl_spec());
    *shapes
        .get_mut("conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight")
        .unwrap() = vec![3840, 1279];
    assert!(matches!(
        err_of(&shapes),
        SingleFileError::ShapeMismatch {
            component: Component::TextEncoder2,
            ..
        }
    ));

    // Added conditioning that is not pooled text + 6 time embeddings.
    let mut spec = sdxl_spec();
    spec.adm = 2817;
    let e = err_of(&ldm_shapes(&spec));
    assert!(
        matches!(
            e,
            SingleFileError::Inconsistent {
                component: Component::Unet,
                ..
            }
        ),
        "{e}"
    );

    // Cross-attention width that is not the two text encoders' widths together.
    let mut shapes = ldm_shapes(&sdxl_spec());
    shapes.retain(|k, _| !k.contains(".attn2.to_k.") && !k.contains(".attn2.to_v."));
    for (k, s) in ldm_shapes(&sdxl_spec()) {
        if k.contains(".attn2.to_k.") || k.contains(".attn2.to_v.") {
            shapes.insert(k, vec![s[0], 1024]);
        }
    }
    assert!(
        err_of(&shapes)
            .to_string()
            .contains("cross-attention width 1024")
    );
}

/// Hostile names and shapes give errors, never panics or runaway loops.
#[test]
fn hostile_inputs_do_not_panic() {
    let base = ldm_shapes(&sdxl_spec());
    let mut extra = base.clone();
    for k in [
        "model.diffusion_model.input_blocks.18446744073709551615.0.op.weight",
        "model.diffusion_model.input_blocks.99999999999999999999999.0.weight",
        "model.diffusion_model.output_blocks.-1.0.x",
        "conditioner.embedders.1.model.transformer.resblocks.4294967296.ln_1.weight",
        "first_stage_model.encoder.down.",
        "model.diffusion_model.input_blocks.",
    ] {
        extra.insert(k.to_string(), vec![]);
    }
    let _ = detect(&extra);
    // Shapes mangled one at a time and in bulk (a fixed-seed LCG picks the victims).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let names: Vec<String> = base.keys().cloned().collect();
    let bad: [Vec<usize>; 6] = [
        vec![],
        vec![0],
        vec![usize::MAX],
        vec![usize::MAX, usize::MAX, 3, 3],
        vec![0, 0, 0, 0],
        vec![1; 7],
    ];
    for round in 0..300 {
        let mut shapes = base.clone();
        for _ in 0..(1 + round % 5) {
            let k = &names[next() % names.len()];
            shapes.insert(k.clone(), bad[next() % bad.len()].clone());
        }
        let _ = detect(&shapes);
    }
    // Zero widths everywhere that inference reads.
    let zeros: Shapes = base
        .keys()
        .map(|k| (k.clone(), vec![0; base[k].len()]))
        .collect();
    assert!(detect(&zeros).is_err());
}

// ---------------------------------------------------------------------------------------
// The tiny fixture pair: the same random model as a diffusers folder and as a single file

fn header_shapes(path: &Path) -> Shapes {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.tensors()
        .into_iter()
        .map(|(k, info)| (k, info.shape.clone()))
        .collect()
}

/// Configurations compare equal when they describe the same network: the depth of a level
/// without attention is meaningless (diffusers configs write anything there).
fn normalise(mut c: UNetConfig) -> UNetConfig {
    for (d, a) in c.down_transformer_depth.iter_mut().zip(&c.down_attention) {
        if !a {
            *d = 0;
        }
    }
    for (d, a) in c.up_transformer_depth.iter_mut().zip(&c.up_attention) {
        if !a {
            *d = 0;
        }
    }
    c
}

/// dmd2's writer, given the tiny folder, writes the reference converter's single file: the
/// same tensor names, dtypes, shapes and bytes (sha256) as the file scripts/make_fixtures.py
/// made and diffusers' `from_single_file` read back (`tiny.single_file.json`). The other tests
/// read that written file as the tiny single-file checkpoint.
#[test]
fn writer_reproduces_the_reference_single_file() {
    use sha2::{Digest, Sha256};
    let path = common::tiny_single_file();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let desc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("tiny.single_file.json")).unwrap(),
    )
    .unwrap();
    let rows = desc["tensors"].as_array().unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let want: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(names, want, "tensor names");
    for r in rows {
        let name = r[0].as_str().unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(format!("{:?}", t.dtype()), r[1].as_str().unwrap(), "{name}");
        let shape: Vec<usize> = r[2]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        let hex: String = Sha256::digest(t.data())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, r[3].as_str().unwrap(), "{name}: data differs");
    }
}

#[test]
fn tiny_fixture_single_file_matches_folder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (single, folder) = (common::tiny_single_file(), root.join("tiny"));
    let shapes = header_shapes(&single);
    let layout = detect(&shapes).unwrap_or_else(|e| panic!("tiny.safetensors: {e}"));
    assert_eq!(layout.unused, Vec::<String>::new());
    for c in Component::ALL {
        let file = match c {
            Component::Unet | Component::Vae => "diffusion_pytorch_model.safetensors",
            Component::TextEncoder | Component::TextEncoder2 => "model.safetensors",
        };
        let expected: Shapes = header_shapes(&folder.join(c.folder()).join(file))
            .into_iter()
            .map(|(k, s)| {
                (
                    k.strip_prefix("text_model.")
                        .map(str::to_string)
                        .unwrap_or(k),
                    s,
                )
            })
            .filter(|(k, _)| k != "embeddings.position_ids")
            .collect();
        let got: Shapes = layout.maps[&c]
            .iter()
            .map(|(k, m)| {
                let s = m
                    .transform
                    .apply_to_shape(&shapes[&m.source])
                    .unwrap_or_else(|| panic!("{c}: {k}: bad transform"));
                (k.clone(), s)
            })
            .collect();
        let missing: Vec<&String> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<&String> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{c}: not mapped {missing:?}; not in the folder {extra:?}"
        );
        for (k, s) in &expected {
            assert_eq!(&got[k], s, "{c}: {k}: shape after transform");
        }
    }
    let unet = UNetConfig::from_diffusers_json(&folder.join("unet/config.json")).unwrap();
    assert_eq!(
        normalise(layout.unet.clone()),
        normalise(unet),
        "UNet config"
    );
    let te = ClipConfig::from_transformers_json(&folder.join("text_encoder/config.json"), false)
        .unwrap();
    assert_eq!(layout.text_encoder, te, "text encoder config");
    let te2 = ClipConfig::from_transformers_json(&folder.join("text_encoder_2/config.json"), true)
        .unwrap();
    assert_eq!(layout.text_encoder_2, te2, "text encoder 2 config");
    let vae = VaeConfig::from_diffusers_json(&folder.join("vae/config.json")).unwrap();
    assert_eq!(layout.vae, vae, "VAE config");
}

/// "tiny2" exists only as a single file; its configuration is the one
/// scripts/make_fixtures.py builds it from.
#[test]
fn tiny2_fixture_configs() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny2.safetensors");
    let layout = detect(&header_shapes(&path)).unwrap_or_else(|e| panic!("tiny2.safetensors: {e}"));
    assert_eq!(layout.unused, Vec::<String>::new());
    let mut unet: serde_json::Value = serde_json::from_str(SDXL_UNET_JSON).unwrap();
    for (k, v) in [
        ("block_out_channels", serde_json::json!([32, 64, 64])),
        ("layers_per_block", serde_json::json!(2)),
        ("transformer_layers_per_block", serde_json::json!([1, 2, 1])),
        ("attention_head_dim", serde_json::json!([1, 1, 1])),
        ("addition_time_embed_dim", serde_json::json!(16)),
        ("cross_attention_dim", serde_json::json!(8 + 24)),
        (
            "projection_class_embeddings_input_dim",
            serde_json::json!(40 + 6 * 16),
        ),
    ] {
        unet[k] = v;
    }
    assert_eq!(
        normalise(layout.unet.clone()),
        normalise(UNetConfig::from_diffusers_value(&unet).unwrap())
    );
    let te = ClipConfig {
        hidden_size: 8,
        intermediate_size: 32,
        num_hidden_layers: 4,
        num_attention_heads: 1,
        ..clip_l()
    };
    assert_eq!(layout.text_encoder, te);
    let te2 = ClipConfig {
        hidden_size: 24,
        intermediate_size: 96,
        num_hidden_layers: 3,
        num_attention_heads: 1,
        projection_dim: Some(40),
        ..clip_big_g()
    };
    assert_eq!(layout.text_encoder_2, te2);
    let vae = VaeConfig {
        block_out_channels: vec![32, 64, 64, 64],
        ..sdxl_vae()
    };
    assert_eq!(layout.vae, vae);
}

/// Configurations from config.json files are checked, not trusted, when planning a write.
#[test]
fn canonical_maps_rejects_bad_configs() {
    let (te, te2, vae) = (clip_l(), clip_big_g(), sdxl_vae());
    let mut unet = sdxl_unet_config();
    unet.up_transformer_depth[0] = usize::MAX;
    assert!(canonical_maps(&unet, &te, &te2, &vae).is_err());
    let mut unet = sdxl_unet_config();
    unet.heads.clear();
    unet.down_attention.pop();
    assert!(canonical_maps(&unet, &te, &te2, &vae).is_err());
    let unet = sdxl_unet_config();
    let te2_no_projection = ClipConfig {
        projection_dim: None,
        ..clip_big_g()
    };
    assert!(canonical_maps(&unet, &te, &te2_no_projection, &vae).is_err());
    let huge = ClipConfig {
        num_hidden_layers: 1 << 40,
        ..clip_l()
    };
    assert!(canonical_maps(&unet, &huge, &te2, &vae).is_err());
    let empty_vae = VaeConfig {
        block_out_channels: vec![],
        ..sdxl_vae()
    };
    assert!(canonical_maps(&unet, &te, &te2, &empty_vae).is_err());
}

#[test]
fn messages_stay_on_one_line() {
    let odd = keys(&["a\nb"]);
    assert!(err_of(&odd).to_string().contains("a\\nb"));
    let lora = keys(&["lora_x\n.lora_down.weight"]);
    assert!(matches!(err_of(&lora), SingleFileError::Lora { .. }));
}
