"""Parity fixtures for SDXL-architecture models whose configs differ from SDXL base's in
ways real and test checkpoints do: the loader must follow each diffusers config field, not
SDXL base's values.

    /work/pyenv/bin/python scripts/make_variant_fixtures.py

Writes tests/fixtures/variants/<model>/ (diffusers folders), tests/fixtures/variants/refs/
(cases.json, <case>.safetensors intermediates, <case>.png) and
tests/fixtures/variants/va_unet_fp16.bin (va's UNet as torch.save writes a state dict, for
`--unet` with a PyTorch file; the smallest UNet of the fixtures), made exactly as
make_fixtures.py makes the tiny model's references (its functions are reused). Folders
only: these configs break the single-file head rule (heads = width / 64), and a single file
does not record head counts.

Model "va" follows the shape of diffusers' own SDXL pipeline tests (one layer per block
instead of two, to keep it small): two UNet levels, GroupNorm with one group, 2 and 4
heads of width 16, both text encoders 8 wide with 4
heads and exact GELU, a two-level VAE (2 pixels per latent) without post_quant_conv and
with latents_mean / latents_std and its own scaling factor.

Model "vb": four UNet levels with attention in the first three, convolutional proj_in /
proj_out (use_linear_projection false), one head count for all levels, mid-block depth from
the last entry of transformer_layers_per_block although the last level has no attention,
8 groups, norm_eps 1e-6, upcast_attention; a three-level VAE (4 pixels per latent) with
8 groups, two resnets per level, no mid-block attention and SD 1.5's scaling factor;
quick-GELU text encoders of different widths; force_zeros_for_empty_prompt false, so a
CFG run without a negative prompt encodes "".

To keep the files small every weight is float16 (the values are f16-rounded, so the
float32 references describe the files exactly) and the folders carry no tokenizer/ folders:
dmd2 then uses its built-in CLIP tokenizer, which is the one these references ran with
(make_fixtures.py checks it); the tokenizer formats are covered by the tiny model.
"""

import copy
import json
import shutil
import tempfile
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import make_fixtures as mf

OUT = mf.FIXTURES / "variants"
REFS = OUT / "refs"

VARIANTS = {
    "va": {
        "seed": 20241101,
        "unet": {
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [2, 4],
            "transformer_layers_per_block": [1, 2],
            "norm_num_groups": 1,
            "addition_time_embed_dim": 8,
            "sample_size": 32,
        },
        "vae": {
            "block_out_channels": [32, 64],
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "layers_per_block": 1,
            "use_post_quant_conv": False,
            "scaling_factor": 0.5,
            "latents_mean": [0.1, -0.2, 0.3, 0.0],
            "latents_std": [1.5, 0.5, 1.0, 2.0],
            "sample_size": 64,
        },
        "text_encoder": {"hidden_size": 8, "intermediate_size": 37, "num_hidden_layers": 3,
                         "num_attention_heads": 4, "hidden_act": "gelu"},
        "text_encoder_2": {"hidden_size": 8, "intermediate_size": 37, "num_hidden_layers": 3,
                           "num_attention_heads": 4, "hidden_act": "gelu", "projection_dim": 16},
        "force_zeros_for_empty_prompt": True,
    },
    "vb": {
        "seed": 20241102,
        "unet": {
            "block_out_channels": [16, 32, 32, 64],
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "attention_head_dim": 2,
            "transformer_layers_per_block": [2, 1, 1, 3],
            "use_linear_projection": False,
            "upcast_attention": True,
            "norm_num_groups": 8,
            "norm_eps": 1e-6,
            "addition_time_embed_dim": 4,
            "sample_size": 16,
        },
        "vae": {
            "block_out_channels": [16, 32, 32],
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
            "layers_per_block": 2,
            "norm_num_groups": 8,
            "mid_block_add_attention": False,
            "scaling_factor": 0.18215,
            "sample_size": 64,
        },
        "text_encoder": {"hidden_size": 12, "intermediate_size": 40, "num_hidden_layers": 2,
                         "num_attention_heads": 3, "hidden_act": "quick_gelu"},
        "text_encoder_2": {"hidden_size": 8, "intermediate_size": 20, "num_hidden_layers": 3,
                           "num_attention_heads": 2, "hidden_act": "quick_gelu", "projection_dim": 20},
        "force_zeros_for_empty_prompt": False,
    },
}

CASES = [
    dict(name="va_cfg_off", model="va", prompt="a photo of a cat", negative_prompt=None,
         timesteps=mf.STEPS_4, guidance_scale=1.0, seed=11, width=64, height=64),
    dict(name="va_cfg_neg", model="va", prompt="wow! a red car on a hill", negative_prompt="blurry",
         timesteps=[999, 874, 749, 624, 499, 374, 249, 124], guidance_scale=2.0, seed=12, width=96, height=64),
    dict(name="vb_cfg_empty_neg", model="vb", prompt="a lighthouse at night", negative_prompt=None,
         timesteps=[999, 499], guidance_scale=3.0, seed=14, width=128, height=64),
    dict(name="vb_one_step", model="vb", prompt="an astronaut riding a horse", negative_prompt="ugly",
         timesteps=[399], guidance_scale=1.0, seed=15, width=64, height=64),
]
for _case in CASES:
    _case["scheduler"] = "lcm"


def build(name, spec, vocab, merges, tmp):
    unet_cfg = copy.deepcopy(mf.SDXL_UNET_CONFIG)
    unet_cfg.update(spec["unet"])
    te1, te2 = spec["text_encoder"], spec["text_encoder_2"]
    unet_cfg["cross_attention_dim"] = te1["hidden_size"] + te2["hidden_size"]
    unet_cfg["projection_class_embeddings_input_dim"] = te2["projection_dim"] + 6 * unet_cfg["addition_time_embed_dim"]
    vae_cfg = copy.deepcopy(mf.SDXL_VAE_CONFIG)
    vae_cfg.update(spec["vae"])
    torch.manual_seed(spec["seed"])
    models = [
        ("unet", UNet2DConditionModel.from_config(unet_cfg)),
        ("vae", AutoencoderKL.from_config(vae_cfg)),
        ("text_encoder", CLIPTextModel(mf.text_encoder_config(spec, "text_encoder"))),
        ("text_encoder_2", CLIPTextModelWithProjection(mf.text_encoder_config(spec, "text_encoder_2"))),
    ]
    for i, (part, model) in enumerate(models):
        kinds = mf.randomize_(model, spec["seed"] * 10 + i, torch.float16)
        print(f"  {name}.{part}: {sum(p.numel() for p in model.parameters())} parameters, randomised {kinds}")
        model.eval()
    tok = tmp / f"{name}-tokenizers"
    mf.write_hf_tokenizer_dir(tok / "tokenizer", vocab, merges, pad_token=mf.EOS)
    mf.write_hf_tokenizer_dir(tok / "tokenizer_2", vocab, merges, pad_token="!")
    m = dict(models)
    pipe = StableDiffusionXLPipeline(
        vae=m["vae"],
        text_encoder=m["text_encoder"],
        text_encoder_2=m["text_encoder_2"],
        tokenizer=CLIPTokenizer.from_pretrained(tok / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(tok / "tokenizer_2"),
        unet=m["unet"],
        scheduler=EulerDiscreteScheduler.from_config(mf.SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=spec["force_zeros_for_empty_prompt"],
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_folder(pipe, folder):
    """save_pretrained, every weight file as float16, tokenizer folders dropped."""
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / sub)
    index = json.loads((folder / "model_index.json").read_text())
    for sub in ("tokenizer", "tokenizer_2"):
        index.pop(sub)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for f in sorted(folder.rglob("*.safetensors")):
        sd = load_file(f)
        for k, v in sd.items():
            assert torch.equal(v.to(torch.float16).float(), v.float()), (f, k)
        save_file({k: v.to(torch.float16) for k, v in sorted(sd.items())}, f, metadata={"format": "pt"})


def main():
    torch.set_grad_enabled(False)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix="dmd2-variants-"))
    try:
        vocab, merges = mf.load_clip_bpe()
        if OUT.exists():
            shutil.rmtree(OUT)
        REFS.mkdir(parents=True)
        pipes = {}
        for name, spec in VARIANTS.items():
            built = build(name, spec, vocab, merges, tmp)
            save_folder(built, OUT / name)
            # The references come from the folder as written (plus the tokenizers dmd2
            # has built in), so they describe the files.
            pipe = StableDiffusionXLPipeline.from_pretrained(
                OUT / name, dtype=torch.float32, add_watermarker=False,
                tokenizer=built.tokenizer, tokenizer_2=built.tokenizer_2,
            )
            pipe.set_progress_bar_config(disable=True)
            mf.own_memory_(pipe)
            ok, n = mf._components_equal(built, pipe, name)
            print(f"  {name} folder reloads with from_pretrained: {n} tensors, all equal: {ok}")
            assert ok
            pipes[name] = pipe
        for case in CASES:
            rec, image = mf.run_case(pipes[case["model"]], case)
            save_file(rec, str(REFS / f"{case['name']}.safetensors"))
            image.save(REFS / f"{case['name']}.png")
            mf.describe_case(case["name"], rec)
        tok = mf.build_tokenizer(vocab, merges)
        mf.check_asset_against_refs(tok, CASES, refs=REFS)
        (REFS / "cases.json").write_text(json.dumps(CASES, indent=2) + "\n")
        sd = {k: v.to(torch.float16).clone() for k, v in pipes["va"].unet.state_dict().items()}
        for k, v in pipes["va"].unet.state_dict().items():
            assert torch.equal(sd[k].to(torch.float32), v), f"{k} is not a float16 value"
        torch.save(sd, OUT / "va_unet_fp16.bin")
        mf.report_outputs([f for f in OUT.rglob("*") if f.is_file()])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
