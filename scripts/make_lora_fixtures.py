#!/usr/bin/env python3
"""Build the LoRA fixtures for dmd2's Rust tests (tests/lora.rs): tiny random LoRAs for the
tiny SDXL test model (tests/fixtures/tiny) in every format dmd2 reads, the weights they fuse
into, and diffusers' images with them.

What it writes (tests/fixtures/lora/):

  <format>.safetensors      one LoRA per format (keys as the real tools write them):
    kohya_diffusers           kohya keys built from diffusers module names, the DMD2 LoRA's
                              format and module set (attention q/k/v/out, proj_in/out, ff,
                              resnet conv1/conv2/conv_shortcut/time_emb_proj, down/upsamplers;
                              3x3 convs as down [r, in, 3, 3], up [out, r, 1, 1]); float16
                              with float16 0-dim alphas, like dmd2_sdxl_4step_lora_fp16
    kohya_ldm                 kohya keys built from original (LDM/sgm) module names
                              (input_blocks / middle_block / output_blocks, in_layers_2,
                              out_layers_3, emb_layers_1, skip_connection, op, time_embed,
                              label_emb, out_2) plus lora_te1_ / lora_te2_; bfloat16
    peft                      diffusers/PEFT: unet.<path>.lora_A/lora_B.weight,
                              text_encoder.<path> (no text_model.), text_encoder_2.text_model.<path>,
                              no alpha keys; alpha from the `lora_adapter_metadata` that
                              diffusers' save_lora_weights writes (lora_alpha, alpha_pattern)
    peft_noalpha              PEFT keys without any alpha (alpha = rank, scale 1), with
                              text_encoder.text_model. prefixes
    lora_dot                  the older diffusers spelling <path>.lora.down.weight / .lora.up.weight
    locon                     LyCORIS LoCon (LDM names): linear LoRAs, 3x3 conv LoRAs and
                              Tucker-decomposed 3x3 convs (lora_down [r, in, 1, 1],
                              lora_mid [r, r, 3, 3], lora_up [out, r, 1, 1])
    loha                      LyCORIS LoHa (diffusers names + lora_te1_): hada_w1_a/b, hada_w2_a/b,
                              conv w1_b as [R, in*k*k], and Tucker hada_t1/hada_t2 on 3x3 convs
    lokr                      LyCORIS LoKr (LDM names + lora_te2_): lokr_w1 + lokr_w2 (full),
                              lokr_w1 + lokr_w2_a/b, lokr_w1_a/b + lokr_w2_a/b, 4-D lokr_w2,
                              Tucker lokr_t2, conv lokr_w2_b as [R, d*k*k]

  fused/<format>.safetensors   for every weight the LoRA touches (multiplier 1.0), keyed
                              `<component>/<diffusers weight name>` with component one of
                              unet, text_encoder, text_encoder_2 (names without text_model.):
                                .rows   the fused weight's first row, flattened [1, rest], f32
                                .proj   fused.flatten(1) @ probe, float64
                                .dproj  delta.flatten(1) @ probe, float64
                              and `probe/<n>`: the probe vectors (f32 values) by length n.
                              A random projection of the whole tensor stands in for the tensor
                              itself (the UNet's fused weights would be ~20 MB per format).

  cases.json, refs/<case>.safetensors, refs/<case>.png
                              end-to-end runs of StableDiffusionXLPipeline + LCMScheduler,
                              timesteps [999, 749, 499, 249], CPU generator, float32:
                              final_latents and the uint8 image [H, W, 3].

How the references are made. Every delta is computed by the formulas below in float64 from the
stored (half-precision where stored so) factors, and the reference fused weight is
(W.double() + delta).float(). Where diffusers 0.42 loads the format into the UNet
(kohya_diffusers, kohya_ldm, peft, peft_noalpha, lora_dot), `load_lora_weights` +
`fuse_lora` is run too and its fused UNet weights must equal the formula's (relative 1e-6),
which checks the key mapping and alpha handling against diffusers. Text-encoder LoRAs go
through transformers' PEFT integration, which needs peft >= 0.22 (0.21 installed): those use
the formulas alone (plain LoRA, the same maths as the UNet's).

Formulas (ComfyUI comfy/weight_adapter/{lora,loha,lokr}.py, LyCORIS lycoris/modules/*.py):
  LoRA/LoCon  delta = (up.flatten(1) @ down'.flatten(1)).reshape(W.shape) * alpha / rank,
              rank = down.shape[0]; with lora_mid: down'[a, i, k, l] = sum_j mid[a, j, k, l] down[j, i]
  LoHa        delta = (w1a @ w1b) * (w2a @ w2b) * alpha / w1b.shape[0]; Tucker:
              einsum('ijkl,jr,ip->prkl', t, wb, wa) for each pair
  LoKr        delta = kron(w1, w2) * alpha / dim, w1 = w1_a @ w1_b if decomposed, w2 likewise
              (Tucker: einsum as LoHa); dim = w2_b.shape[0] if w2 is decomposed, else
              w1_b.shape[0] if w1 is; both full: scale 1 (alpha ignored); 4-D w2: w1[:, :, None, None]
  no alpha    scale 1 (alpha = rank); PEFT metadata: lora_alpha / rank (alpha_pattern per module)

Run by hand (never in CI), after scripts/make_fixtures.py:

    /work/pyenv/bin/python scripts/make_lora_fixtures.py

Nothing is downloaded; re-runs give identical files on the same machine and thread count.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import LCMScheduler, StableDiffusionXLPipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TINY = FIXTURES / "tiny"
TINY_SINGLE = FIXTURES / "tiny.safetensors"
OUT = FIXTURES / "lora"

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
UNET_LDM_PREFIX = "model.diffusion_model."
PROBE_SEED = 1234

CASES = [
    {
        "name": "kohya_cfg1",
        "model": "tiny",
        "prompt": "a photo of a cat",
        "negative_prompt": None,
        "timesteps": [999, 749, 499, 249],
        "guidance_scale": 1.0,
        "seed": 42,
        "width": 64,
        "height": 64,
        "scheduler": "lcm",
        "loras": [{"file": "kohya_diffusers.safetensors", "weight": 1.0}],
    },
    {
        "name": "kohya_07_cfg",
        "model": "tiny",
        "prompt": "a watercolor painting of a lighthouse",
        "negative_prompt": "blurry, low quality",
        "timesteps": [999, 749, 499, 249],
        "guidance_scale": 1.6,
        "seed": 7,
        "width": 64,
        "height": 64,
        "scheduler": "lcm",
        "loras": [{"file": "kohya_diffusers.safetensors", "weight": 0.7}],
    },
    {
        "name": "kohya_plus_loha",
        "model": "tiny",
        "prompt": "an astronaut riding a horse",
        "negative_prompt": None,
        "timesteps": [999, 749, 499, 249],
        "guidance_scale": 1.0,
        "seed": 3,
        "width": 64,
        "height": 64,
        "scheduler": "lcm",
        "loras": [
            {"file": "kohya_diffusers.safetensors", "weight": 1.0},
            {"file": "loha.safetensors", "weight": 0.8},
        ],
    },
]


# ---------------------------------------------------------------------------------------
# The tiny model's weights, by diffusers name, and the original (LDM) names of the UNet's
# ---------------------------------------------------------------------------------------


def base_weights():
    """component -> {diffusers weight name: float32 tensor} for every Linear/Conv2d weight
    (ndim 2 or 4, embeddings excluded); text encoder names without `text_model.`."""
    files = {
        "unet": TINY / "unet" / "diffusion_pytorch_model.safetensors",
        "text_encoder": TINY / "text_encoder" / "model.safetensors",
        "text_encoder_2": TINY / "text_encoder_2" / "model.safetensors",
    }
    out = {}
    for comp, f in files.items():
        sd = load_file(str(f))
        out[comp] = {
            k.removeprefix("text_model."): v.float()
            for k, v in sd.items()
            if k.endswith(".weight") and v.ndim in (2, 4) and "embedding" not in k
        }
    return out


def unet_ldm_names(unet):
    """diffusers module name -> LDM module name, found by matching the tensors of
    tests/fixtures/tiny.safetensors (the same random numbers, stored as f16) with the folder's:
    independent of any hand-written key map."""
    by_value = {}
    with safe_open(str(TINY_SINGLE), "pt") as f:
        for k in f.keys():
            if k.startswith(UNET_LDM_PREFIX) and k.endswith(".weight"):
                t = f.get_tensor(k).float()
                if t.ndim in (2, 4):
                    by_value.setdefault((tuple(t.shape), t.flatten()[:64].numpy().tobytes()), []).append(k)
    out = {}
    for name, w in unet.items():
        hits = by_value.get((tuple(w.shape), w.flatten()[:64].numpy().tobytes()), [])
        assert len(hits) == 1, (name, hits)
        out[name.removesuffix(".weight")] = hits[0].removeprefix(UNET_LDM_PREFIX).removesuffix(".weight")
    assert len(set(out.values())) == len(out)
    return out


def flat(name):
    return name.replace(".", "_")


def kohya_name(comp, module, ldm=None):
    """kohya key prefix of a module: lora_unet_<flattened name>, lora_te1_text_model_…"""
    if comp == "unet":
        return "lora_unet_" + flat(ldm[module] if ldm is not None else module)
    te = "lora_te1_" if comp == "text_encoder" else "lora_te2_"
    if module.startswith("text_projection"):
        return te + flat(module)
    return te + "text_model_" + flat(module)


DMD2_PATTERNS = (
    ".to_q", ".to_k", ".to_v", ".to_out.0", ".proj_in", ".proj_out", ".ff.net.0.proj", ".ff.net.2",
    ".conv1", ".conv2", ".conv_shortcut", ".time_emb_proj", "samplers.0.conv",
)


def dmd2_modules(unet):
    """The DMD2 LoRA's module set: everything in the blocks except norms (788 on SDXL base)."""
    mods = [k.removesuffix(".weight") for k in unet]
    return sorted(m for m in mods if m.startswith(("down_blocks", "mid_block", "up_blocks")) and m.endswith(DMD2_PATTERNS))


# ---------------------------------------------------------------------------------------
# LoRA construction (random factors) and their deltas (float64)
# ---------------------------------------------------------------------------------------


class Maker:
    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, std=1.0):
        return torch.randn(shape, generator=self.gen, dtype=torch.float32) * std

    def pick(self, items, n):
        idx = torch.randperm(len(items), generator=self.gen)[:n].tolist()
        return [items[i] for i in sorted(idx)]


def fan_in(w):
    return w[0].numel()


def rel_target(w, strength):
    """std of delta entries for a visible but sane change: `strength` times W's std."""
    return strength * float(w.std())


def make_lora(mk, w, rank, scale, strength, conv_full=True):
    """down/up of a kohya/PEFT LoRA with delta std ~ strength·std(W) at this scale."""
    out = w.shape[0]
    if w.ndim == 4 and conv_full:
        down = mk.randn(rank, *w.shape[1:], std=1.0 / np.sqrt(fan_in(w)))
        up = mk.randn(out, rank, 1, 1)
    else:
        down = mk.randn(rank, fan_in(w), std=1.0 / np.sqrt(fan_in(w)))
        if w.ndim == 4:
            down = down.reshape(rank, *w.shape[1:])
            up = mk.randn(out, rank, 1, 1)
        else:
            up = mk.randn(out, rank)
    up_std = rel_target(w, strength) / (scale * np.sqrt(rank))
    return down, up * up_std


def lora_delta(w_shape, up, down, scale, mid=None):
    up, down = up.double(), down.double()
    if mid is not None:
        mid = mid.double()
        down2 = down.flatten(1)  # [r, in]
        down = torch.einsum("ajkl,ji->aikl", mid, down2)
    d = up.flatten(1) @ down.flatten(1)
    return (d.reshape(w_shape) * scale)


def rebuild_tucker(t, wa, wb):
    return torch.einsum("ijkl,jr,ip->prkl", t.double(), wb.double(), wa.double())


def loha_delta(w_shape, p, scale):
    if "hada_t1" in p:
        m1 = rebuild_tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
        m2 = rebuild_tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    else:
        m1 = p["hada_w1_a"].double() @ p["hada_w1_b"].double()
        m2 = p["hada_w2_a"].double() @ p["hada_w2_b"].double()
    return (m1 * m2).reshape(w_shape) * scale


def lokr_delta(w_shape, p, alpha):
    dim = None
    if "lokr_w1" in p:
        w1 = p["lokr_w1"].double()
    else:
        dim = p["lokr_w1_b"].shape[0]
        w1 = p["lokr_w1_a"].double() @ p["lokr_w1_b"].double()
    if "lokr_w2" in p:
        w2 = p["lokr_w2"].double()
    else:
        dim = p["lokr_w2_b"].shape[0]
        if "lokr_t2" in p:
            w2 = rebuild_tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = p["lokr_w2_a"].double() @ p["lokr_w2_b"].double()
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if (alpha is not None and dim is not None) else 1.0
    return torch.kron(w1.contiguous(), w2.contiguous()).reshape(w_shape) * scale


def factor_pair(n):
    """n = a·b with a ≤ b, a as large as possible (LyCORIS' factorization with factor −1)."""
    a = int(np.sqrt(n))
    while n % a:
        a -= 1
    return a, n // a


# ---------------------------------------------------------------------------------------
# The formats
# ---------------------------------------------------------------------------------------


def store(t, dtype):
    """A factor as it is stored, and the float32 values of what was stored."""
    s = t.to(dtype).contiguous()
    return s


def build_kohya_diffusers(base, mk):
    sd, deltas = {}, {}
    alpha = 2.0
    for m in dmd2_modules(base["unet"]):
        w = base["unet"][m + ".weight"]
        rank = 4
        down, up = make_lora(mk, w, rank, alpha / rank, 1.0)
        k = kohya_name("unet", m)
        sd[k + ".lora_down.weight"] = store(down, torch.float16)
        sd[k + ".lora_up.weight"] = store(up, torch.float16)
        sd[k + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
        deltas[("unet", m)] = lora_delta(w.shape, sd[k + ".lora_up.weight"], sd[k + ".lora_down.weight"], alpha / rank)
    return sd, deltas


def build_kohya_ldm(base, mk, ldm):
    sd, deltas = {}, {}
    unet_mods = sorted(k.removesuffix(".weight") for k in base["unet"])
    specials = [m for m in unet_mods if m.startswith(("conv_in", "conv_out", "time_embedding", "add_embedding"))]
    kinds = {}
    for m in unet_mods:
        for pat in (".conv1", ".conv2", ".conv_shortcut", ".time_emb_proj", "downsamplers", "upsamplers",
                    ".proj_in", ".attn1.to_q", ".attn2.to_k", ".ff.net.2", "mid_block"):
            if pat in m:
                kinds.setdefault(pat, []).append(m)
    chosen = set(specials)
    for pat, ms in kinds.items():
        chosen.update(mk.pick(ms, 2))
    chosen.update(mk.pick(unet_mods, 12))
    plan = [("unet", m) for m in sorted(chosen)]
    for comp in ("text_encoder", "text_encoder_2"):
        mods = sorted(k.removesuffix(".weight") for k in base[comp])
        layer0 = [m for m in mods if m.startswith("encoder.layers.0.")]
        extra = [m for m in mods if m.startswith("text_projection")]
        plan += [(comp, m) for m in sorted(set(layer0 + extra + mk.pick(mods, 4)))]
    for i, (comp, m) in enumerate(plan):
        w = base[comp][m + ".weight"]
        rank = [2, 4, 3][i % 3]
        # One alpha for the UNet (as kohya writes it): diffusers 0.42 applies per-module alphas
        # to attention modules wrongly (it keys them `attnN.processor`), and the UNet part is
        # checked against diffusers. The text encoders get mixed alphas.
        alpha = 4.0 if comp == "unet" else [1.0, 4.0, 8.0, 3.0][i % 4]
        down, up = make_lora(mk, w, rank, alpha / rank, 0.3)
        k = kohya_name(comp, m, ldm if comp == "unet" else None)
        sd[k + ".lora_down.weight"] = store(down, torch.bfloat16)
        sd[k + ".lora_up.weight"] = store(up, torch.bfloat16)
        sd[k + ".alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
        deltas[(comp, m)] = lora_delta(w.shape, sd[k + ".lora_up.weight"], sd[k + ".lora_down.weight"], alpha / rank)
    return sd, deltas


def peft_prefix(comp, with_text_model):
    if comp == "unet":
        return "unet."
    return comp + "." + ("text_model." if with_text_model else "")


def build_peft(base, mk, with_metadata):
    """PEFT keys; with_metadata: lora_alpha from diffusers' lora_adapter_metadata (plus an
    alpha_pattern and a rank_pattern entry), text_encoder without text_model. and
    text_encoder_2 with it (what diffusers + transformers 5 save); else no alpha at all."""
    sd, deltas = {}, {}
    meta = {}
    plan = []
    unet_mods = sorted(k.removesuffix(".weight") for k in base["unet"])
    plan += [("unet", m) for m in mk.pick(unet_mods, 24)]
    for comp in ("text_encoder", "text_encoder_2"):
        mods = sorted(k.removesuffix(".weight") for k in base[comp])
        plan += [(comp, m) for m in mk.pick(mods, 6)]
    cfg = {"unet": (4, 8.0), "text_encoder": (2, 4.0), "text_encoder_2": (2, 1.0)}
    pattern_module = plan[3][1]  # a UNet module with its own rank and alpha
    for comp, m in plan:
        w = base[comp][m + ".weight"]
        r, a = cfg[comp]
        if with_metadata and comp == "unet" and m == pattern_module:
            r, a = 3, 6.0
        scale = a / r if with_metadata else 1.0
        down, up = make_lora(mk, w, r, scale, 0.3)
        with_tm = comp == "text_encoder_2" if with_metadata else True
        k = peft_prefix(comp, with_tm) + m
        sd[k + ".lora_A.weight"] = store(down, torch.float32)
        sd[k + ".lora_B.weight"] = store(up, torch.float32)
        deltas[(comp, m)] = lora_delta(w.shape, up, down, scale)
    if with_metadata:
        for comp, (r, a) in cfg.items():
            targets = sorted({m for c, m in plan if c == comp})
            meta.update(
                {
                    f"{comp}.r": r,
                    f"{comp}.lora_alpha": a,
                    f"{comp}.target_modules": targets,
                    f"{comp}.rank_pattern": {pattern_module: 3} if comp == "unet" else {},
                    f"{comp}.alpha_pattern": {pattern_module: 6.0} if comp == "unet" else {},
                    f"{comp}.use_rslora": False,
                    f"{comp}.use_dora": False,
                    f"{comp}.peft_type": "LORA",
                    f"{comp}.bias": "none",
                    f"{comp}.init_lora_weights": True,
                }
            )
    return sd, deltas, meta


def build_lora_dot(base, mk):
    sd, deltas = {}, {}
    plan = []
    unet_mods = sorted(k.removesuffix(".weight") for k in base["unet"])
    plan += [("unet", m) for m in mk.pick(unet_mods, 16)]
    mods = sorted(k.removesuffix(".weight") for k in base["text_encoder_2"])
    plan += [("text_encoder_2", m) for m in mk.pick(mods, 4)]
    for comp, m in plan:
        w = base[comp][m + ".weight"]
        down, up = make_lora(mk, w, 4, 1.0, 0.3)
        k = peft_prefix(comp, True) + m
        sd[k + ".lora.down.weight"] = store(down, torch.float32)
        sd[k + ".lora.up.weight"] = store(up, torch.float32)
        deltas[(comp, m)] = lora_delta(w.shape, up, down, 1.0)
    return sd, deltas


def build_locon(base, mk, ldm):
    sd, deltas = {}, {}
    unet_mods = sorted(k.removesuffix(".weight") for k in base["unet"])
    convs3 = [m for m in unet_mods if base["unet"][m + ".weight"].shape[2:] == (3, 3)]
    lin = [m for m in unet_mods if base["unet"][m + ".weight"].ndim == 2]
    conv1 = [m for m in unet_mods if base["unet"][m + ".weight"].shape[2:] == (1, 1)]
    tucker = mk.pick(convs3, 6)
    plain3 = mk.pick([m for m in convs3 if m not in tucker], 4)
    plan = [(m, "tucker") for m in tucker] + [(m, "conv") for m in plain3]
    plan += [(m, "lin") for m in mk.pick(lin, 8)] + [(m, "lin") for m in conv1[:1]]
    for i, (m, kind) in enumerate(sorted(plan)):
        w = base["unet"][m + ".weight"]
        rank, alpha = [(4, 2.0), (3, 3.0), (2, 1.0)][i % 3]
        scale = alpha / rank
        k = kohya_name("unet", m, ldm)
        if kind == "tucker":
            down = mk.randn(rank, w.shape[1], 1, 1, std=1.0 / np.sqrt(w.shape[1]))
            mid = mk.randn(rank, rank, 3, 3, std=1.0 / np.sqrt(rank * 9))
            up = mk.randn(w.shape[0], rank, 1, 1, std=rel_target(w, 0.35) / (scale * np.sqrt(rank)))
            sd[k + ".lora_mid.weight"] = mid
        else:
            down, up = make_lora(mk, w, rank, scale, 0.3)
            mid = None
        sd[k + ".lora_down.weight"] = down.contiguous()
        sd[k + ".lora_up.weight"] = up.contiguous()
        sd[k + ".alpha"] = torch.tensor(alpha)
        deltas[("unet", m)] = lora_delta(w.shape, up, down, scale, mid)
    return sd, deltas


def build_loha(base, mk):
    sd, deltas = {}, {}
    unet_mods = sorted(k.removesuffix(".weight") for k in base["unet"])
    convs3 = [m for m in unet_mods if base["unet"][m + ".weight"].shape[2:] == (3, 3)]
    lin = [m for m in unet_mods if base["unet"][m + ".weight"].ndim == 2]
    conv1 = [m for m in unet_mods if base["unet"][m + ".weight"].shape[2:] == (1, 1)]
    tucker = mk.pick(convs3, 4)
    plain3 = mk.pick([m for m in convs3 if m not in tucker], 4)
    plan = [("unet", m, "tucker") for m in tucker] + [("unet", m, "flat") for m in plain3]
    plan += [("unet", m, "flat") for m in mk.pick(lin, 14) + conv1[:1]]
    te_mods = sorted(k.removesuffix(".weight") for k in base["text_encoder"])
    plan += [("text_encoder", m, "flat") for m in mk.pick(te_mods, 5)]
    for i, (comp, m, kind) in enumerate(sorted(plan)):
        w = base[comp][m + ".weight"]
        R, alpha = [(4, 2.0), (2, 2.0), (3, 1.0)][i % 3]
        scale = alpha / R
        out, inn = w.shape[0], fan_in(w)
        # (w1a w1b) ⊙ (w2a w2b): entries ~ R·σ1a σ1b σ2a σ2b; aim at strength·std(W).
        target = rel_target(w, 0.3) / scale
        s = float(np.sqrt(target / R))  # per product std
        p = {}
        if kind == "tucker":
            cin = w.shape[1]
            for j in ("1", "2"):
                p[f"hada_t{j}"] = mk.randn(R, R, 3, 3, std=1.0 / np.sqrt(R * 9))
                p[f"hada_w{j}_a"] = mk.randn(R, out, std=np.sqrt(s))
                p[f"hada_w{j}_b"] = mk.randn(R, cin, std=np.sqrt(s) * np.sqrt(3))
        else:
            for j in ("1", "2"):
                p[f"hada_w{j}_a"] = mk.randn(out, R, std=np.sqrt(s))
                p[f"hada_w{j}_b"] = mk.randn(R, inn, std=np.sqrt(s))
        k = kohya_name(comp, m)
        for name, t in p.items():
            sd[f"{k}.{name}"] = t.contiguous()
        sd[k + ".alpha"] = torch.tensor(alpha)
        deltas[(comp, m)] = loha_delta(w.shape, p, scale)
    return sd, deltas


def build_lokr(base, mk, ldm):
    sd, deltas = {}, {}
    unet_mods = sorted(k.removesuffix(".weight") for k in base["unet"])
    convs3 = [m for m in unet_mods if base["unet"][m + ".weight"].shape[2:] == (3, 3)]
    lin = [m for m in unet_mods if base["unet"][m + ".weight"].ndim == 2]
    kinds = ["full", "w2dec", "both"]
    plan = [("unet", m, kinds[i % 3]) for i, m in enumerate(mk.pick(lin, 12))]
    conv_kinds = ["conv_full", "conv_tucker", "conv_flat"]
    plan += [("unet", m, conv_kinds[i % 3]) for i, m in enumerate(mk.pick(convs3, 6))]
    te2 = sorted(k.removesuffix(".weight") for k in base["text_encoder_2"])
    plan += [("text_encoder_2", m, kinds[i % 3]) for i, m in enumerate(mk.pick(te2, 3))]
    plan += [("text_encoder_2", "encoder.layers.0.self_attn.k_proj", "w2dec")]
    for i, (comp, m, kind) in enumerate(sorted(set(plan))):
        w = base[comp][m + ".weight"]
        out, cin = w.shape[0], w.shape[1]
        a, c = factor_pair(out)
        b, d = factor_pair(cin)
        R = 2
        alpha = [1.0, 4.0, 3.0][i % 3]
        p = {}
        target = rel_target(w, 0.3)
        if kind == "full":
            p["lokr_w1"] = mk.randn(a, b)
            p["lokr_w2"] = mk.randn(c, d, std=target)
        elif kind == "w2dec":
            p["lokr_w1"] = mk.randn(a, b)
            p["lokr_w2_a"] = mk.randn(c, R)
            p["lokr_w2_b"] = mk.randn(R, d, std=target / (alpha / R) / np.sqrt(R))
        elif kind == "both":
            p["lokr_w1_a"] = mk.randn(a, R, std=1.0 / np.sqrt(R))
            p["lokr_w1_b"] = mk.randn(R, b)
            p["lokr_w2_a"] = mk.randn(c, R)
            p["lokr_w2_b"] = mk.randn(R, d, std=target / (alpha / R) / np.sqrt(R))
        elif kind == "conv_full":
            p["lokr_w1"] = mk.randn(a, b)
            p["lokr_w2"] = mk.randn(c, d, 3, 3, std=target)
        elif kind == "conv_tucker":
            p["lokr_w1"] = mk.randn(a, b)
            p["lokr_t2"] = mk.randn(R, R, 3, 3, std=1.0 / 3.0)
            p["lokr_w2_a"] = mk.randn(R, c)
            p["lokr_w2_b"] = mk.randn(R, d, std=target / (alpha / R) / np.sqrt(R) * np.sqrt(R))
        elif kind == "conv_flat":
            p["lokr_w1"] = mk.randn(a, b)
            p["lokr_w2_a"] = mk.randn(c, R)
            p["lokr_w2_b"] = mk.randn(R, d * 9, std=target / (alpha / R) / np.sqrt(R))
        k = kohya_name(comp, m, ldm if comp == "unet" else None)
        for name, t in p.items():
            sd[f"{k}.{name}"] = t.contiguous()
        sd[k + ".alpha"] = torch.tensor(alpha)  # ignored when both factors are full
        deltas[(comp, m)] = lokr_delta(w.shape, p, alpha)
    return sd, deltas


# ---------------------------------------------------------------------------------------
# diffusers cross-check, references, images
# ---------------------------------------------------------------------------------------


def load_pipe():
    pipe = StableDiffusionXLPipeline.from_pretrained(TINY, dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):  # own memory, see make_fixtures.py
        module = getattr(pipe, comp)
        for p in module.parameters():
            p.data = p.data.clone()
    return pipe


def unet_weights(pipe):
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def diffusers_fused_unet(pipe, path, scale=1.0):
    """Fused UNet weights after diffusers' load_lora_weights + fuse_lora (UNet keys only)."""
    before = unet_weights(pipe)
    pipe.load_lora_weights(str(path), adapter_name="check")
    pipe.fuse_lora(lora_scale=scale, components=["unet"], adapter_names=["check"])
    pipe.unload_lora_weights()
    after = unet_weights(pipe)
    pipe.unet.load_state_dict(before)
    changed = {k: v for k, v in after.items() if not torch.equal(v, before[k])}
    return changed


def unet_only(sd, meta=None, tmp=None, name="x"):
    keep = {k: v for k, v in sd.items() if k.startswith(("lora_unet_", "unet."))}
    path = Path(tmp) / f"{name}-unet.safetensors"
    md = {"format": "pt"}
    if meta:
        md["lora_adapter_metadata"] = json.dumps(
            {k: v for k, v in meta.items() if k.startswith("unet.")}, indent=2, sort_keys=True
        )
    save_file(keep, str(path), metadata=md)
    return path


def check_against_diffusers(pipe, fmt, sd, deltas, base, tmp, meta=None):
    path = unet_only(sd, meta, tmp, fmt)
    fused = diffusers_fused_unet(pipe, path)
    want = {m + ".weight" for c, m in deltas if c == "unet"}
    got = set(fused)
    assert got == want, f"{fmt}: diffusers changed {sorted(got ^ want)[:6]}"
    worst = 0.0
    for name in want:
        ref = (base["unet"][name].double() + deltas[("unet", name.removesuffix(".weight"))]).float()
        e = float((fused[name] - ref).abs().max() / ref.abs().max())
        worst = max(worst, e)
    assert worst < 1e-6, f"{fmt}: diffusers' fused weights differ from the formula by {worst:e}"
    print(f"  {fmt}: diffusers fuses the same {len(want)} UNet weights (worst relative {worst:.1e})")


def probe(n, cache):
    if n not in cache:
        g = torch.Generator().manual_seed(PROBE_SEED + n)
        cache[n] = torch.randn(n, generator=g, dtype=torch.float32)
    return cache[n]


def save_fused(fmt, deltas, base):
    out, probes = {}, {}
    for (comp, m), d in sorted(deltas.items()):
        w = base[comp][m + ".weight"]
        fused = (w.double() + d).float()
        flat2 = fused.flatten(1)
        p = probe(flat2.shape[1], probes).double()
        key = f"{comp}/{m}.weight"
        out[key + ".rows"] = flat2[:1].contiguous()
        out[key + ".proj"] = (fused.double().flatten(1) @ p).contiguous()
        out[key + ".dproj"] = (d.flatten(1) @ p).contiguous()
    for n, p in probes.items():
        out[f"probe/{n}"] = p
    (OUT / "fused").mkdir(parents=True, exist_ok=True)
    save_file(out, str(OUT / "fused" / f"{fmt}.safetensors"), metadata={"format": "pt"})


def fuse_into(pipe, deltas, weight):
    """W += weight·delta (computed in float64, added in float32 like a float32 merge)."""
    with torch.no_grad():
        for (comp, m), d in deltas.items():
            module = getattr(pipe, comp)
            names = [m] if comp != "text_encoder_2" else ["text_model." + m if not m.startswith("text_projection") else m]
            sd = dict(module.named_parameters())
            name = names[0] + ".weight"
            if name not in sd:
                name = m + ".weight"
            p = sd[name]
            p.add_((d * weight).float())


def run_case(pipe, case):
    base_scheduler = pipe.scheduler
    pipe.scheduler = LCMScheduler.from_config(base_scheduler.config)
    steps = []

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].clone())
        return {}

    try:
        with torch.no_grad():
            image = pipe(
                prompt=case["prompt"],
                negative_prompt=case["negative_prompt"],
                timesteps=list(case["timesteps"]),
                guidance_scale=case["guidance_scale"],
                generator=torch.Generator("cpu").manual_seed(case["seed"]),
                width=case["width"],
                height=case["height"],
                output_type="pil",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
            ).images[0]
    finally:
        pipe.scheduler = base_scheduler
    rec = {
        "final_latents": steps[-1].clone().contiguous(),
        "image": torch.from_numpy(np.array(image, dtype=np.uint8).copy()),
    }
    return rec, image


def main():
    torch.set_grad_enabled(False)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="dmd2-lora-fixtures-"))
    try:
        base = base_weights()
        ldm = unet_ldm_names(base["unet"])
        print(f"  tiny: {sum(len(v) for v in base.values())} linear/conv weights; UNet LDM names matched by value")
        if OUT.exists():
            shutil.rmtree(OUT)
        (OUT / "refs").mkdir(parents=True)

        mk = Maker(20240531)
        formats = {}
        formats["kohya_diffusers"] = build_kohya_diffusers(base, mk) + (None,)
        formats["kohya_ldm"] = build_kohya_ldm(base, mk, ldm) + (None,)
        formats["peft"] = build_peft(base, mk, True)
        sd, deltas, _ = build_peft(base, mk, False)
        formats["peft_noalpha"] = (sd, deltas, None)
        formats["lora_dot"] = build_lora_dot(base, mk) + (None,)
        formats["locon"] = build_locon(base, mk, ldm) + (None,)
        formats["loha"] = build_loha(base, mk) + (None,)
        formats["lokr"] = build_lokr(base, mk, ldm) + (None,)

        pipe = load_pipe()
        for fmt, (sd, deltas, meta) in formats.items():
            md = {"format": "pt"}
            if meta:
                md["lora_adapter_metadata"] = json.dumps(meta, indent=2, sort_keys=True)
            save_file(dict(sorted(sd.items())), str(OUT / f"{fmt}.safetensors"), metadata=md)
            save_fused(fmt, deltas, base)
            parts = sorted({c for c, _ in deltas})
            print(f"  {fmt}: {len(deltas)} modules ({', '.join(parts)}), "
                  f"{(OUT / (fmt + '.safetensors')).stat().st_size} bytes")
            if fmt in ("kohya_diffusers", "kohya_ldm", "peft", "peft_noalpha", "lora_dot"):
                check_against_diffusers(pipe, fmt, sd, deltas, base, tmp, meta)

        print("[images]")
        plain = load_pipe()
        for case in CASES:
            pipe = load_pipe()
            loras = case["loras"]
            for i, l in enumerate(loras):
                fmt = l["file"].removesuffix(".safetensors")
                sd, deltas, meta = formats[fmt]
                if fmt == "kohya_diffusers":
                    # through diffusers itself (UNet-only LoRA)
                    pipe.load_lora_weights(str(OUT / l["file"]), adapter_name=f"l{i}")
                    pipe.fuse_lora(lora_scale=l["weight"], components=["unet"], adapter_names=[f"l{i}"])
                    pipe.unload_lora_weights()
                else:
                    fuse_into(pipe, deltas, l["weight"])
            rec, image = run_case(pipe, case)
            plain_rec, _ = run_case(plain, case)
            diff = (rec["image"].float() - plain_rec["image"].float()).abs().mean()
            save_file(rec, str(OUT / "refs" / f"{case['name']}.safetensors"))
            image.save(OUT / "refs" / f"{case['name']}.png")
            print(f"  {case['name']}: image std {rec['image'].float().std():.1f}, "
                  f"mean |change| vs no LoRA {diff:.1f} levels")
            assert diff > 3, f"{case['name']}: the LoRA barely changes the image"
        (OUT / "cases.json").write_text(json.dumps(CASES, indent=2) + "\n")
        for f in OUT.rglob("*"):
            if f.is_file():
                f.chmod(0o644)
        total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
        print(f"[done] tests/fixtures/lora: {total} bytes ({total / 2**20:.2f} MiB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
