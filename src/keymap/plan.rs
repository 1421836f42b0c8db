//! The key tables of the original layout, generated from configurations: for every model
//! tensor (diffusers name) its original name, the [`Transform`] between them and both shapes.
//! Each repeated block (a resnet, a transformer block, a text encoder layer, the VAE's
//! attention) is a table of layers — diffusers name, original name, shape in the block's
//! widths — and the code around the tables holds only the numbering: the UNet's
//! `input_blocks.{n}` arithmetic, the VAE's reversed up blocks, OpenCLIP's fused attention.

use super::{
    Component, Result, TEXT_ENCODER_2_PREFIX, TEXT_ENCODER_PREFIX, Transform, UNET_PREFIX,
    VAE_PREFIX, inconsistent,
};
use crate::config::{ClipConfig, UNetConfig, VaeConfig};

/// Configurations asking for more levels, layers or transformer blocks than this are refused
/// by [`super::canonical_maps`] (no real model comes near; it bounds the work on hostile configs).
const MAX_REPEAT: usize = 4096;

/// A dimension that any size matches (the VAE's input channels when unknown).
pub const ANY: usize = usize::MAX;

/// Whether a stored shape is the expected one ([`ANY`] matches any size).
pub fn shape_matches(found: &[usize], expected: &[usize]) -> bool {
    found.len() == expected.len()
        && found
            .iter()
            .zip(expected)
            .all(|(&f, &e)| e == ANY || f == e)
}

/// A shape for messages (`?` for [`ANY`]).
pub fn fmt_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|&d| {
            if d == ANY {
                "?".to_string()
            } else {
                d.to_string()
            }
        })
        .collect();
    format!("[{}]", dims.join(", "))
}

/// One model tensor: its diffusers name, its original name and both shapes.
pub struct Entry {
    pub component: Component,
    pub target: String,
    pub source: String,
    pub transform: Transform,
    pub target_shape: Vec<usize>,
    /// The original tensor's shape ([`ANY`] where any size matches).
    pub source_shape: Vec<usize>,
    /// Another name the source goes by in some files.
    pub alias: Option<String>,
}

/// Every model tensor of an SDXL of these configurations.
#[derive(Default)]
pub struct Plan {
    pub entries: Vec<Entry>,
}

impl Plan {
    /// The plan for these configurations; `vae_in_channels` when a file says it (the encoder's
    /// input width is not in the configuration).
    pub fn for_configs(
        unet: &UNetConfig,
        text_encoder: &ClipConfig,
        text_encoder_2: &ClipConfig,
        vae: &VaeConfig,
        vae_in_channels: Option<usize>,
    ) -> Result<Plan> {
        let mut plan = Plan::default();
        plan_unet(&mut plan, unet)?;
        plan_clip_l(&mut plan, text_encoder)?;
        plan_open_clip(&mut plan, text_encoder_2)?;
        plan_vae(&mut plan, vae, vae_in_channels)?;
        Ok(plan)
    }

    /// The plan of a VAE alone (a `--vae` file in the original layout).
    pub fn for_vae(vae: &VaeConfig, vae_in_channels: Option<usize>) -> Result<Plan> {
        let mut plan = Plan::default();
        plan_vae(&mut plan, vae, vae_in_channels)?;
        Ok(plan)
    }

    fn push(
        &mut self,
        component: Component,
        target: String,
        source: String,
        transform: Transform,
        target_shape: Vec<usize>,
    ) {
        let source_shape = match (&transform, target_shape.as_slice()) {
            (Transform::Transpose, [a, b]) => vec![*b, *a],
            (Transform::Squeeze1x1, [o, i]) => vec![*o, *i, 1, 1],
            _ => target_shape.clone(),
        };
        self.entries.push(Entry {
            component,
            target,
            source,
            transform,
            target_shape,
            source_shape,
            alias: None,
        });
    }

    /// Let the last `n` entries' sources also be found under `replace(from, to)`.
    fn alias_last(&mut self, n: usize, from: &str, to: &str) {
        let len = self.entries.len();
        for e in self.entries.iter_mut().skip(len.saturating_sub(n)) {
            e.alias = Some(e.source.replace(from, to));
        }
    }

    /// `target.weight` ← `source.weight` and, with `bias`, `target.bias` ← `source.bias` (shape `[w[0]]`).
    fn linear(&mut self, c: Component, target: &str, source: &str, weight: Vec<usize>, bias: bool) {
        let rows = weight.first().copied().unwrap_or(0);
        self.push(
            c,
            format!("{target}.weight"),
            format!("{source}.weight"),
            Transform::Identity,
            weight,
        );
        if bias {
            self.push(
                c,
                format!("{target}.bias"),
                format!("{source}.bias"),
                Transform::Identity,
                vec![rows],
            );
        }
    }

    fn norm(&mut self, c: Component, target: &str, source: &str, width: usize) {
        self.linear(c, target, source, vec![width], true);
    }
}

/// A width a layer's shape is made of, resolved per block by [`Widths`].
#[derive(Clone, Copy)]
enum W {
    In,
    Out,
    /// The UNet's time embedding.
    Temb,
    /// The second input of a block's projections: cross-attention context (transformer
    /// blocks), the text-time embedding (the UNet's stem), the MLP width (text encoders).
    Other,
    /// `n · Out` (the UNet's feed-forward widths).
    OutTimes(usize),
}

/// One layer of a block table.
#[derive(Clone, Copy)]
enum Kind {
    /// weight and bias `[a]`
    Norm(W),
    /// weight `[a, b]`, bias `[a]` if the flag says so
    Dense(W, W, bool),
    /// weight `[a, b, k, k]`, bias `[a]`
    Conv(W, W, usize),
    /// `[a, b]` in diffusers, a 1×1 convolution in the original; bias `[a]`
    Squeezed(W, W),
    /// the transformer's `proj_in` / `proj_out`: [`Kind::Dense`] with
    /// `use_linear_projection`, a 1×1 [`Kind::Conv`] otherwise
    Projection,
}

/// A layer: its diffusers name and original name (each relative to its block) and its kind.
#[derive(Clone, Copy)]
struct Layer(&'static str, &'static str, Kind);

/// A layer named the same in both layouts.
const fn same(name: &'static str, kind: Kind) -> Layer {
    Layer(name, name, kind)
}

use Kind::{Conv, Dense, Norm, Projection, Squeezed};
use W::{In, Other, Out, OutTimes, Temb};

/// The widths of one block.
#[derive(Clone, Copy, Default)]
struct Widths {
    input: usize,
    out: usize,
    temb: usize,
    other: usize,
    linear_projection: bool,
}

impl Widths {
    fn out(out: usize) -> Self {
        Widths {
            out,
            ..Widths::default()
        }
    }

    fn get(&self, w: W) -> usize {
        match w {
            In => self.input,
            Out => self.out,
            Temb => self.temb,
            Other => self.other,
            OutTimes(n) => mul(self.out, n),
        }
    }
}

/// A UNet resnet (`ResnetBlock2D` ← LDM's `ResBlock`); [`UNET_SHORTCUT`] when widths change.
const UNET_RESNET: &[Layer] = &[
    Layer("norm1", "in_layers.0", Norm(In)),
    Layer("conv1", "in_layers.2", Conv(Out, In, 3)),
    Layer("time_emb_proj", "emb_layers.1", Dense(Out, Temb, true)),
    Layer("norm2", "out_layers.0", Norm(Out)),
    Layer("conv2", "out_layers.3", Conv(Out, Out, 3)),
];
const UNET_SHORTCUT: &[Layer] = &[Layer("conv_shortcut", "skip_connection", Conv(Out, In, 1))];

/// A UNet transformer's ends (`Transformer2DModel` ← `SpatialTransformer`) ...
const TRANSFORMER_IN: &[Layer] = &[same("norm", Norm(Out)), same("proj_in", Projection)];
const TRANSFORMER_OUT: &[Layer] = &[same("proj_out", Projection)];
/// ... and each of its `transformer_blocks` (GEGLU: one projection to twice the 4× width).
const TRANSFORMER_BLOCK: &[Layer] = &[
    same("norm1", Norm(Out)),
    same("norm2", Norm(Out)),
    same("norm3", Norm(Out)),
    same("attn1.to_q", Dense(Out, Out, false)),
    same("attn1.to_k", Dense(Out, Out, false)),
    same("attn1.to_v", Dense(Out, Out, false)),
    same("attn1.to_out.0", Dense(Out, Out, true)),
    same("attn2.to_q", Dense(Out, Out, false)),
    same("attn2.to_k", Dense(Out, Other, false)),
    same("attn2.to_v", Dense(Out, Other, false)),
    same("attn2.to_out.0", Dense(Out, Out, true)),
    same("ff.net.0.proj", Dense(OutTimes(8), Out, true)),
    same("ff.net.2", Dense(Out, OutTimes(4), true)),
];

/// The UNet's stem (In: latent channels, Out: the first level's width, Other: the text-time
/// embedding's input width) and head (In: the first level's width, Out: output channels).
const UNET_STEM: &[Layer] = &[
    Layer("conv_in", "input_blocks.0.0", Conv(Out, In, 3)),
    Layer(
        "time_embedding.linear_1",
        "time_embed.0",
        Dense(Temb, Out, true),
    ),
    Layer(
        "time_embedding.linear_2",
        "time_embed.2",
        Dense(Temb, Temb, true),
    ),
    Layer(
        "add_embedding.linear_1",
        "label_emb.0.0",
        Dense(Temb, Other, true),
    ),
    Layer(
        "add_embedding.linear_2",
        "label_emb.0.2",
        Dense(Temb, Temb, true),
    ),
];
const UNET_HEAD: &[Layer] = &[
    Layer("conv_norm_out", "out.0", Norm(In)),
    Layer("conv_out", "out.2", Conv(Out, In, 3)),
];

/// A down- or upsampler's convolution.
const SAMPLER: &[Layer] = &[same("", Conv(Out, Out, 3))];

/// A CLIP-L encoder layer (transformers' names in both layouts; Other: the MLP width).
const CLIP_L_LAYER: &[Layer] = &[
    same("self_attn.q_proj", Dense(Out, Out, true)),
    same("self_attn.k_proj", Dense(Out, Out, true)),
    same("self_attn.v_proj", Dense(Out, Out, true)),
    same("self_attn.out_proj", Dense(Out, Out, true)),
    same("layer_norm1", Norm(Out)),
    same("layer_norm2", Norm(Out)),
    same("mlp.fc1", Dense(Other, Out, true)),
    same("mlp.fc2", Dense(Out, Other, true)),
];

/// An OpenCLIP `resblock` after its fused `in_proj` (written in [`plan_open_clip`]).
const OPEN_CLIP_LAYER: &[Layer] = &[
    Layer("self_attn.out_proj", "attn.out_proj", Dense(Out, Out, true)),
    Layer("layer_norm1", "ln_1", Norm(Out)),
    Layer("layer_norm2", "ln_2", Norm(Out)),
    Layer("mlp.fc1", "mlp.c_fc", Dense(Other, Out, true)),
    Layer("mlp.fc2", "mlp.c_proj", Dense(Out, Other, true)),
];

/// A VAE resnet; [`VAE_SHORTCUT`] when widths change.
const VAE_RESNET: &[Layer] = &[
    same("norm1", Norm(In)),
    same("conv1", Conv(Out, In, 3)),
    same("norm2", Norm(Out)),
    same("conv2", Conv(Out, Out, 3)),
];
const VAE_SHORTCUT: &[Layer] = &[Layer("conv_shortcut", "nin_shortcut", Conv(Out, In, 1))];

/// The VAE's mid-block attention (1×1 convolutions in the original).
const VAE_ATTENTION: &[Layer] = &[
    Layer("group_norm", "norm", Norm(Out)),
    Layer("to_q", "q", Squeezed(Out, Out)),
    Layer("to_k", "k", Squeezed(Out, Out)),
    Layer("to_v", "v", Squeezed(Out, Out)),
    Layer("to_out.0", "proj_out", Squeezed(Out, Out)),
];

/// `prefix.name`, or `prefix` alone for an empty name.
fn join(prefix: &str, name: &str) -> String {
    match (prefix.is_empty(), name.is_empty()) {
        (_, true) => prefix.to_string(),
        (true, false) => name.to_string(),
        _ => format!("{prefix}.{name}"),
    }
}

impl Plan {
    /// The entries of a block table, the block's names prefixed.
    fn block(&mut self, c: Component, target: &str, source: &str, table: &[Layer], w: Widths) {
        for &Layer(t, s, kind) in table {
            let (t, s) = (join(target, t), join(source, s));
            let g = |x| w.get(x);
            match kind {
                Norm(a) => self.norm(c, &t, &s, g(a)),
                Dense(a, b, bias) => self.linear(c, &t, &s, vec![g(a), g(b)], bias),
                Conv(a, b, k) => self.linear(c, &t, &s, vec![g(a), g(b), k, k], true),
                Projection if w.linear_projection => {
                    self.linear(c, &t, &s, vec![w.out, w.out], true)
                }
                Projection => self.linear(c, &t, &s, vec![w.out, w.out, 1, 1], true),
                Squeezed(a, b) => {
                    let (tw, sw) = (format!("{t}.weight"), format!("{s}.weight"));
                    self.push(c, tw, sw, Transform::Squeeze1x1, vec![g(a), g(b)]);
                    let (tb, sb) = (format!("{t}.bias"), format!("{s}.bias"));
                    self.push(c, tb, sb, Transform::Identity, vec![g(a)]);
                }
            }
        }
    }
}

fn mul(a: usize, b: usize) -> usize {
    a.saturating_mul(b)
}

/// `Some(v[i])`, or an error saying which configuration list is too short.
fn at(c: Component, what: &str, v: &[usize], i: usize) -> Result<usize> {
    v.get(i)
        .copied()
        .ok_or_else(|| inconsistent(c, format!("configuration list {what} has no entry {i}")))
}

fn flag(c: Component, what: &str, v: &[bool], i: usize) -> Result<bool> {
    v.get(i)
        .copied()
        .ok_or_else(|| inconsistent(c, format!("configuration list {what} has no entry {i}")))
}

fn unet_resnet(plan: &mut Plan, target: &str, source: &str, input: usize, out: usize, temb: usize) {
    let w = Widths {
        input,
        out,
        temb,
        ..Widths::default()
    };
    plan.block(Component::Unet, target, source, UNET_RESNET, w);
    if input != out {
        plan.block(Component::Unet, target, source, UNET_SHORTCUT, w);
    }
}

fn unet_transformer(
    plan: &mut Plan,
    target: &str,
    source: &str,
    ch: usize,
    depth: usize,
    cfg: &UNetConfig,
) {
    let u = Component::Unet;
    let w = Widths {
        out: ch,
        other: cfg.cross_attention_dim,
        linear_projection: cfg.use_linear_projection,
        ..Widths::default()
    };
    plan.block(u, target, source, TRANSFORMER_IN, w);
    for k in 0..depth {
        let (t, s) = (
            format!("{target}.transformer_blocks.{k}"),
            format!("{source}.transformer_blocks.{k}"),
        );
        plan.block(u, &t, &s, TRANSFORMER_BLOCK, w);
    }
    plan.block(u, target, source, TRANSFORMER_OUT, w);
}

fn plan_unet(plan: &mut Plan, cfg: &UNetConfig) -> Result<()> {
    let u = Component::Unet;
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let layers = cfg.layers_per_block;
    let lists_ok = n > 0
        && cfg.down_attention.len() == n
        && cfg.down_transformer_depth.len() == n
        && cfg.up_attention.len() == n
        && cfg.up_transformer_depth.len() == n;
    if !lists_ok || layers == 0 {
        return Err(inconsistent(
            u,
            "configuration lists do not match block_out_channels",
        ));
    }
    let depths = cfg
        .down_transformer_depth
        .iter()
        .chain(&cfg.up_transformer_depth)
        .chain(&cfg.mid_transformer_depth);
    if n > MAX_REPEAT || layers > MAX_REPEAT || depths.copied().any(|d| d > MAX_REPEAT) {
        return Err(inconsistent(
            u,
            format!("configuration repeats a block more than {MAX_REPEAT} times"),
        ));
    }
    let p = |k: &str| format!("{UNET_PREFIX}{k}");
    let c0 = at(u, "block_out_channels", ch, 0)?;
    let last = at(u, "block_out_channels", ch, n - 1)?;
    let temb = mul(c0, 4);
    let stem = Widths {
        input: cfg.in_channels,
        out: c0,
        temb,
        other: cfg.projection_class_embeddings_input_dim,
        ..Widths::default()
    };
    plan.block(u, "", UNET_PREFIX.trim_end_matches('.'), UNET_STEM, stem);
    for i in 0..n {
        let out = at(u, "block_out_channels", ch, i)?;
        let mut cin = if i == 0 {
            c0
        } else {
            at(u, "block_out_channels", ch, i - 1)?
        };
        let attention = flag(u, "down_attention", &cfg.down_attention, i)?;
        let depth = at(u, "down_transformer_depth", &cfg.down_transformer_depth, i)?;
        for j in 0..layers {
            let idx = 1 + (layers + 1) * i + j;
            unet_resnet(
                plan,
                &format!("down_blocks.{i}.resnets.{j}"),
                &p(&format!("input_blocks.{idx}.0")),
                cin,
                out,
                temb,
            );
            if attention {
                let (t, s) = (
                    format!("down_blocks.{i}.attentions.{j}"),
                    p(&format!("input_blocks.{idx}.1")),
                );
                unet_transformer(plan, &t, &s, out, depth, cfg);
            }
            cin = out;
        }
        if i + 1 < n {
            let s = p(&format!("input_blocks.{}.0.op", (layers + 1) * (i + 1)));
            let t = format!("down_blocks.{i}.downsamplers.0.conv");
            plan.block(u, &t, &s, SAMPLER, Widths::out(out));
        }
    }

    unet_resnet(
        plan,
        "mid_block.resnets.0",
        &p("middle_block.0"),
        last,
        last,
        temb,
    );
    if let Some(depth) = cfg.mid_transformer_depth {
        unet_transformer(
            plan,
            "mid_block.attentions.0",
            &p("middle_block.1"),
            last,
            depth,
            cfg,
        );
        unet_resnet(
            plan,
            "mid_block.resnets.1",
            &p("middle_block.2"),
            last,
            last,
            temb,
        );
    }

    for b in 0..n {
        let level = n - 1 - b;
        let out = at(u, "block_out_channels", ch, level)?;
        let prev = if b == 0 {
            last
        } else {
            at(u, "block_out_channels", ch, level + 1)?
        };
        let below = if level == 0 {
            c0
        } else {
            at(u, "block_out_channels", ch, level - 1)?
        };
        let attention = flag(u, "up_attention", &cfg.up_attention, b)?;
        let depth = at(u, "up_transformer_depth", &cfg.up_transformer_depth, b)?;
        for j in 0..=layers {
            let o = (layers + 1) * b + j;
            // The skip connections come back in reverse; the last one of a level is the input
            // of the level (the output of the level below, or conv_in).
            let skip = if j == layers { below } else { out };
            let res_in = if j == 0 { prev } else { out };
            let (t, s) = (
                format!("up_blocks.{b}.resnets.{j}"),
                p(&format!("output_blocks.{o}.0")),
            );
            unet_resnet(plan, &t, &s, res_in.saturating_add(skip), out, temb);
            if attention {
                let (t, s) = (
                    format!("up_blocks.{b}.attentions.{j}"),
                    p(&format!("output_blocks.{o}.1")),
                );
                unet_transformer(plan, &t, &s, out, depth, cfg);
            }
        }
        if b + 1 < n {
            let slot = if attention { 2 } else { 1 };
            let s = p(&format!(
                "output_blocks.{}.{slot}.conv",
                (layers + 1) * b + layers
            ));
            let t = format!("up_blocks.{b}.upsamplers.0.conv");
            plan.block(u, &t, &s, SAMPLER, Widths::out(out));
        }
    }
    let head = Widths {
        input: c0,
        out: cfg.out_channels,
        ..Widths::default()
    };
    plan.block(u, "", UNET_PREFIX.trim_end_matches('.'), UNET_HEAD, head);
    Ok(())
}

fn check_clip(c: Component, cfg: &ClipConfig) -> Result<()> {
    if cfg.num_hidden_layers == 0 || cfg.hidden_size == 0 {
        return Err(inconsistent(c, "configuration has no layers or zero width"));
    }
    if cfg.num_hidden_layers > MAX_REPEAT {
        return Err(inconsistent(
            c,
            format!("configuration has more than {MAX_REPEAT} layers"),
        ));
    }
    Ok(())
}

fn plan_clip_l(plan: &mut Plan, cfg: &ClipConfig) -> Result<()> {
    let c = Component::TextEncoder;
    check_clip(c, cfg)?;
    let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
    let p = |k: &str| format!("{TEXT_ENCODER_PREFIX}{k}");
    for (t, rows) in [
        ("embeddings.token_embedding", cfg.vocab_size),
        ("embeddings.position_embedding", cfg.max_position_embeddings),
    ] {
        plan.linear(c, t, &p(t), vec![rows, h], false);
    }
    let w = Widths {
        out: h,
        other: m,
        ..Widths::default()
    };
    for l in 0..cfg.num_hidden_layers {
        let t = format!("encoder.layers.{l}");
        plan.block(c, &t, &p(&t), CLIP_L_LAYER, w);
    }
    plan.norm(c, "final_layer_norm", &p("final_layer_norm"), h);
    Ok(())
}

fn plan_open_clip(plan: &mut Plan, cfg: &ClipConfig) -> Result<()> {
    let c = Component::TextEncoder2;
    check_clip(c, cfg)?;
    let Some(projection) = cfg.projection_dim else {
        return Err(inconsistent(
            c,
            "configuration has no projection width (text_projection)",
        ));
    };
    let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
    let p = |k: &str| format!("{TEXT_ENCODER_2_PREFIX}{k}");
    let w = Widths {
        out: h,
        other: m,
        ..Widths::default()
    };
    plan.linear(
        c,
        "embeddings.token_embedding",
        &p("token_embedding"),
        vec![cfg.vocab_size, h],
        false,
    );
    plan.push(
        c,
        "embeddings.position_embedding.weight".into(),
        p("positional_embedding"),
        Transform::Identity,
        vec![cfg.max_position_embeddings, h],
    );
    for l in 0..cfg.num_hidden_layers {
        let t = format!("encoder.layers.{l}");
        let s = p(&format!("transformer.resblocks.{l}"));
        for (k, proj) in ["q_proj", "k_proj", "v_proj"].into_iter().enumerate() {
            let rows = Transform::Rows {
                start: mul(k, h),
                len: h,
            };
            for (suffix, fused, shape) in [
                ("weight", "in_proj_weight", vec![h, h]),
                ("bias", "in_proj_bias", vec![h]),
            ] {
                let mut source_shape = shape.clone();
                source_shape[0] = mul(3, h);
                plan.entries.push(Entry {
                    component: c,
                    target: format!("{t}.self_attn.{proj}.{suffix}"),
                    source: format!("{s}.attn.{fused}"),
                    transform: rows.clone(),
                    target_shape: shape,
                    source_shape,
                    alias: None,
                });
            }
        }
        plan.block(c, &t, &s, OPEN_CLIP_LAYER, w);
    }
    plan.norm(c, "final_layer_norm", &p("ln_final"), h);
    plan.push(
        c,
        "text_projection.weight".into(),
        p("text_projection"),
        Transform::Transpose,
        vec![projection, h],
    );
    Ok(())
}

fn vae_resnet(plan: &mut Plan, target: &str, source: &str, input: usize, out: usize) {
    let w = Widths {
        input,
        out,
        ..Widths::default()
    };
    plan.block(Component::Vae, target, source, VAE_RESNET, w);
    if input != out {
        plan.block(Component::Vae, target, source, VAE_SHORTCUT, w);
        // diffusers' loader also takes the diffusers name; some converters keep it.
        plan.alias_last(2, ".nin_shortcut.", ".conv_shortcut.");
    }
}

fn vae_mid(plan: &mut Plan, part: &str, ch: usize, attention: bool) {
    let s = |k: &str| format!("{VAE_PREFIX}{part}.mid.{k}");
    let t = |k: &str| format!("{part}.mid_block.{k}");
    vae_resnet(plan, &t("resnets.0"), &s("block_1"), ch, ch);
    if attention {
        let (t, s) = (t("attentions.0"), s("attn_1"));
        plan.block(Component::Vae, &t, &s, VAE_ATTENTION, Widths::out(ch));
    }
    vae_resnet(plan, &t("resnets.1"), &s("block_2"), ch, ch);
}

fn plan_vae(plan: &mut Plan, cfg: &VaeConfig, in_channels: Option<usize>) -> Result<()> {
    let v = Component::Vae;
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    if n == 0 || cfg.layers_per_block == 0 {
        return Err(inconsistent(
            v,
            "configuration has no levels or no resnets per level",
        ));
    }
    if n > MAX_REPEAT || cfg.layers_per_block > MAX_REPEAT {
        return Err(inconsistent(
            v,
            format!("configuration repeats a block more than {MAX_REPEAT} times"),
        ));
    }
    let layers = cfg.layers_per_block;
    let p = |k: &str| format!("{VAE_PREFIX}{k}");
    let c0 = at(v, "block_out_channels", ch, 0)?;
    let last = at(v, "block_out_channels", ch, n - 1)?;
    let latent = cfg.latent_channels;
    plan.linear(
        v,
        "encoder.conv_in",
        &p("encoder.conv_in"),
        vec![c0, in_channels.unwrap_or(ANY), 3, 3],
        true,
    );
    for i in 0..n {
        let out = at(v, "block_out_channels", ch, i)?;
        let mut cin = if i == 0 {
            c0
        } else {
            at(v, "block_out_channels", ch, i - 1)?
        };
        for j in 0..layers {
            vae_resnet(
                plan,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                &p(&format!("encoder.down.{i}.block.{j}")),
                cin,
                out,
            );
            cin = out;
        }
        if i + 1 < n {
            let (t, s) = (
                format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                p(&format!("encoder.down.{i}.downsample.conv")),
            );
            plan.block(v, &t, &s, SAMPLER, Widths::out(out));
        }
    }
    vae_mid(plan, "encoder", last, cfg.mid_block_add_attention);
    plan.norm(v, "encoder.conv_norm_out", &p("encoder.norm_out"), last);
    plan.linear(
        v,
        "encoder.conv_out",
        &p("encoder.conv_out"),
        vec![mul(latent, 2), last, 3, 3],
        true,
    );
    plan.linear(
        v,
        "quant_conv",
        &p("quant_conv"),
        vec![mul(latent, 2), mul(latent, 2), 1, 1],
        true,
    );
    plan.linear(
        v,
        "post_quant_conv",
        &p("post_quant_conv"),
        vec![latent, latent, 1, 1],
        true,
    );
    plan.linear(
        v,
        "decoder.conv_in",
        &p("decoder.conv_in"),
        vec![last, latent, 3, 3],
        true,
    );
    vae_mid(plan, "decoder", last, cfg.mid_block_add_attention);
    for b in 0..n {
        // diffusers numbers the decoder's up blocks from the deepest level, LDM from the top.
        let level = n - 1 - b;
        let out = at(v, "block_out_channels", ch, level)?;
        let mut cin = if b == 0 {
            last
        } else {
            at(v, "block_out_channels", ch, level + 1)?
        };
        for j in 0..=layers {
            let (t, s) = (
                format!("decoder.up_blocks.{b}.resnets.{j}"),
                p(&format!("decoder.up.{level}.block.{j}")),
            );
            vae_resnet(plan, &t, &s, cin, out);
            cin = out;
        }
        if b + 1 < n {
            let (t, s) = (
                format!("decoder.up_blocks.{b}.upsamplers.0.conv"),
                p(&format!("decoder.up.{level}.upsample.conv")),
            );
            plan.block(v, &t, &s, SAMPLER, Widths::out(out));
        }
    }
    plan.norm(v, "decoder.conv_norm_out", &p("decoder.norm_out"), c0);
    plan.linear(
        v,
        "decoder.conv_out",
        &p("decoder.conv_out"),
        vec![cfg.out_channels, c0, 3, 3],
        true,
    );
    Ok(())
}
