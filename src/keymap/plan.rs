//! The key tables of the original layout, generated from configurations: for every model
//! tensor (diffusers name) its original name, the [`Transform`] between them and both shapes.
//! The UNet's level/block numbering, the OpenCLIP renames and fused attention, the VAE's
//! reversed up blocks and 1x1-convolution attention are written once, here.

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

fn unet_resnet(plan: &mut Plan, target: &str, source: &str, cin: usize, cout: usize, temb: usize) {
    let u = Component::Unet;
    plan.norm(
        u,
        &format!("{target}.norm1"),
        &format!("{source}.in_layers.0"),
        cin,
    );
    plan.linear(
        u,
        &format!("{target}.conv1"),
        &format!("{source}.in_layers.2"),
        vec![cout, cin, 3, 3],
        true,
    );
    plan.linear(
        u,
        &format!("{target}.time_emb_proj"),
        &format!("{source}.emb_layers.1"),
        vec![cout, temb],
        true,
    );
    plan.norm(
        u,
        &format!("{target}.norm2"),
        &format!("{source}.out_layers.0"),
        cout,
    );
    plan.linear(
        u,
        &format!("{target}.conv2"),
        &format!("{source}.out_layers.3"),
        vec![cout, cout, 3, 3],
        true,
    );
    if cin != cout {
        plan.linear(
            u,
            &format!("{target}.conv_shortcut"),
            &format!("{source}.skip_connection"),
            vec![cout, cin, 1, 1],
            true,
        );
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
    let proj = if cfg.use_linear_projection {
        vec![ch, ch]
    } else {
        vec![ch, ch, 1, 1]
    };
    plan.norm(u, &format!("{target}.norm"), &format!("{source}.norm"), ch);
    plan.linear(
        u,
        &format!("{target}.proj_in"),
        &format!("{source}.proj_in"),
        proj.clone(),
        true,
    );
    for k in 0..depth {
        let t = format!("{target}.transformer_blocks.{k}");
        let s = format!("{source}.transformer_blocks.{k}");
        for n in ["norm1", "norm2", "norm3"] {
            plan.norm(u, &format!("{t}.{n}"), &format!("{s}.{n}"), ch);
        }
        for (attn, kv) in [("attn1", ch), ("attn2", cfg.cross_attention_dim)] {
            plan.linear(
                u,
                &format!("{t}.{attn}.to_q"),
                &format!("{s}.{attn}.to_q"),
                vec![ch, ch],
                false,
            );
            plan.linear(
                u,
                &format!("{t}.{attn}.to_k"),
                &format!("{s}.{attn}.to_k"),
                vec![ch, kv],
                false,
            );
            plan.linear(
                u,
                &format!("{t}.{attn}.to_v"),
                &format!("{s}.{attn}.to_v"),
                vec![ch, kv],
                false,
            );
            plan.linear(
                u,
                &format!("{t}.{attn}.to_out.0"),
                &format!("{s}.{attn}.to_out.0"),
                vec![ch, ch],
                true,
            );
        }
        // GEGLU: one projection to twice the 4x inner width.
        plan.linear(
            u,
            &format!("{t}.ff.net.0.proj"),
            &format!("{s}.ff.net.0.proj"),
            vec![mul(ch, 8), ch],
            true,
        );
        plan.linear(
            u,
            &format!("{t}.ff.net.2"),
            &format!("{s}.ff.net.2"),
            vec![ch, mul(ch, 4)],
            true,
        );
    }
    plan.linear(
        u,
        &format!("{target}.proj_out"),
        &format!("{source}.proj_out"),
        proj,
        true,
    );
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
    plan.linear(
        u,
        "conv_in",
        &p("input_blocks.0.0"),
        vec![c0, cfg.in_channels, 3, 3],
        true,
    );
    plan.linear(
        u,
        "time_embedding.linear_1",
        &p("time_embed.0"),
        vec![temb, c0],
        true,
    );
    plan.linear(
        u,
        "time_embedding.linear_2",
        &p("time_embed.2"),
        vec![temb, temb],
        true,
    );
    plan.linear(
        u,
        "add_embedding.linear_1",
        &p("label_emb.0.0"),
        vec![temb, cfg.projection_class_embeddings_input_dim],
        true,
    );
    plan.linear(
        u,
        "add_embedding.linear_2",
        &p("label_emb.0.2"),
        vec![temb, temb],
        true,
    );

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
            plan.linear(
                u,
                &format!("down_blocks.{i}.downsamplers.0.conv"),
                &s,
                vec![out, out, 3, 3],
                true,
            );
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
            plan.linear(
                u,
                &format!("up_blocks.{b}.upsamplers.0.conv"),
                &s,
                vec![out, out, 3, 3],
                true,
            );
        }
    }
    plan.norm(u, "conv_norm_out", &p("out.0"), c0);
    plan.linear(
        u,
        "conv_out",
        &p("out.2"),
        vec![cfg.out_channels, c0, 3, 3],
        true,
    );
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
    for l in 0..cfg.num_hidden_layers {
        let t = format!("encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            let name = format!("{t}.self_attn.{proj}");
            plan.linear(c, &name, &p(&name), vec![h, h], true);
        }
        for (name, shape) in [
            ("layer_norm1", vec![h]),
            ("layer_norm2", vec![h]),
            ("mlp.fc1", vec![m, h]),
            ("mlp.fc2", vec![h, m]),
        ] {
            let name = format!("{t}.{name}");
            plan.linear(c, &name, &p(&name), shape, true);
        }
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
        plan.linear(
            c,
            &format!("{t}.self_attn.out_proj"),
            &format!("{s}.attn.out_proj"),
            vec![h, h],
            true,
        );
        plan.norm(c, &format!("{t}.layer_norm1"), &format!("{s}.ln_1"), h);
        plan.norm(c, &format!("{t}.layer_norm2"), &format!("{s}.ln_2"), h);
        plan.linear(
            c,
            &format!("{t}.mlp.fc1"),
            &format!("{s}.mlp.c_fc"),
            vec![m, h],
            true,
        );
        plan.linear(
            c,
            &format!("{t}.mlp.fc2"),
            &format!("{s}.mlp.c_proj"),
            vec![h, m],
            true,
        );
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

fn vae_resnet(plan: &mut Plan, target: &str, source: &str, cin: usize, cout: usize) {
    let v = Component::Vae;
    plan.norm(
        v,
        &format!("{target}.norm1"),
        &format!("{source}.norm1"),
        cin,
    );
    plan.linear(
        v,
        &format!("{target}.conv1"),
        &format!("{source}.conv1"),
        vec![cout, cin, 3, 3],
        true,
    );
    plan.norm(
        v,
        &format!("{target}.norm2"),
        &format!("{source}.norm2"),
        cout,
    );
    plan.linear(
        v,
        &format!("{target}.conv2"),
        &format!("{source}.conv2"),
        vec![cout, cout, 3, 3],
        true,
    );
    if cin != cout {
        plan.linear(
            v,
            &format!("{target}.conv_shortcut"),
            &format!("{source}.nin_shortcut"),
            vec![cout, cin, 1, 1],
            true,
        );
        // diffusers' loader also takes the diffusers name; some converters keep it.
        plan.alias_last(2, ".nin_shortcut.", ".conv_shortcut.");
    }
}

fn vae_mid(plan: &mut Plan, part: &str, ch: usize, attention: bool) {
    let v = Component::Vae;
    let s = |k: &str| format!("{VAE_PREFIX}{part}.mid.{k}");
    vae_resnet(
        plan,
        &format!("{part}.mid_block.resnets.0"),
        &s("block_1"),
        ch,
        ch,
    );
    if attention {
        let t = format!("{part}.mid_block.attentions.0");
        plan.norm(v, &format!("{t}.group_norm"), &s("attn_1.norm"), ch);
        for (target, source) in [
            ("to_q", "q"),
            ("to_k", "k"),
            ("to_v", "v"),
            ("to_out.0", "proj_out"),
        ] {
            let (t, src) = (format!("{t}.{target}"), s(&format!("attn_1.{source}")));
            plan.push(
                v,
                format!("{t}.weight"),
                format!("{src}.weight"),
                Transform::Squeeze1x1,
                vec![ch, ch],
            );
            plan.push(
                v,
                format!("{t}.bias"),
                format!("{src}.bias"),
                Transform::Identity,
                vec![ch],
            );
        }
    }
    vae_resnet(
        plan,
        &format!("{part}.mid_block.resnets.1"),
        &s("block_2"),
        ch,
        ch,
    );
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
            plan.linear(v, &t, &s, vec![out, out, 3, 3], true);
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
            plan.linear(v, &t, &s, vec![out, out, 3, 3], true);
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
