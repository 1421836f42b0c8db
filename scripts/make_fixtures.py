#!/usr/bin/env python3
"""Build the parity fixtures for dmd2's Rust tests: tiny SDXL-shaped models with
random weights, and diffusers' outputs for them.

What it writes (paths relative to the repository root):

  assets/clip_tokenizer.json
      The CLIP BPE tokenizer (tokenizers-library `tokenizer.json`, the structure of
      transformers' CLIPTokenizerFast) built from the vocabulary that open_clip ships
      (`bpe_simple_vocab_16e6.txt.gz`): 49408 tokens, <|startoftext|> = 49406,
      <|endoftext|> = 49407. No padding/truncation settings are stored in it.

  tests/fixtures/tiny/
      Model "tiny" as a diffusers folder (float16 safetensors: every weight is a float16
      value), laid out like the stabilityai/stable-diffusion-xl-base-1.0 hub repo:
      model_index.json, scheduler/ (SDXL base's EulerDiscreteScheduler config), unet/, vae/,
      text_encoder/ (CLIPTextModel, keys with the `text_model.` prefix as hub files
      have them), text_encoder_2/ (CLIPTextModelWithProjection), tokenizer/ and
      tokenizer_2/ as vocab.json + merges.txt + tokenizer_config.json +
      special_tokens_map.json (no tokenizer.json; tokenizer_2 pads with "!").

  tests/fixtures/tiny.single_file.json
      The same weights as one original-layout (LDM/sgm) SDXL checkpoint, float16, described
      tensor by tensor (name, dtype, shape, sha256 of the little-endian data). The file itself
      is written to tests/fixtures/tiny.safetensors (git-ignored: the other fixture scripts
      read it) and checked with diffusers' from_single_file; the Rust tests write it from the
      folder with dmd2's own writer and check it against this description, so the repository
      holds the tiny weights once.

  tests/fixtures/tiny2.safetensors
      Model "tiny2" (other depths and widths), single file only, bfloat16.

  tests/fixtures/tokenizer_ids.json
      Prompts (the cases', awkward ones, random strings) with the ids the tiny pipeline's
      two CLIPTokenizers give them (padded and truncated to 77 as the pipeline does).

  tests/fixtures/refs/cases.json, refs/<case>.safetensors, refs/<case>.png
      Reference runs of diffusers' StableDiffusionXLPipeline with LCMScheduler
      (DMD2's sampler), float32 on CPU: token ids, embeddings, add_time_ids, the
      initial noise, the first UNet call's inputs and output, the latents after
      every step, the VAE output and the final uint8 image.

Every parameter of every model is random (weights, biases, norm weights and
biases, embeddings), rounded to float16 ("tiny") or bfloat16 ("tiny2") values,
so the float32 folder and the half-precision single files hold identical numbers.
Architecture rules the Rust loader relies on for single files: attention heads =
width / 64 when width % 64 == 0, else 1 head (UNet and CLIP); GroupNorm groups 32;
everything else as in SDXL base's configs.

Run by hand (never in CI):

    /work/pyenv/bin/python scripts/make_fixtures.py

Re-runs give byte-identical files on the same machine and thread count. The models and
the tokenizer never change; the float references can move in the last bits with another
thread count or CPU (PyTorch splits its kernels differently), hence tolerances in Rust.

Extending: a new model is another spec dict like TINY (build_tiny_pipeline,
save_single_file); a new case is another CASES entry (its "scheduler" picks a class
from SCHEDULERS, made from the pipeline's own scheduler config, as diffusers users do).

Made with: Python 3.11, torch 2.15.0 (CPU), diffusers 0.42.1, transformers 5.24.0,
tokenizers 0.23.3, safetensors 0.8.0, open_clip_torch 3.3.0. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import gzip
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
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import ftfy  # noqa: E402
import open_clip  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
REFS = FIXTURES / "refs"
TOKENIZER_ASSET = ROOT / "assets" / "clip_tokenizer.json"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# --------------------------------------------------------------------------------------
# SDXL base (stabilityai/stable-diffusion-xl-base-1.0) configs: the tiny models copy
# every field from these and only change sizes.
# --------------------------------------------------------------------------------------

SDXL_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

SDXL_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SDXL_TEXT_ENCODER_CONFIG = {  # CLIP ViT-L/14 text tower
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SDXL_TEXT_ENCODER_2_CONFIG = {  # OpenCLIP ViT-bigG/14 text tower, with projection
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

SDXL_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _hub_added_token(content):
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def sdxl_tokenizer_config(pad_token):
    """tokenizer_config.json as in SDXL base's tokenizer/ ("<|endoftext|>") and tokenizer_2/ ("!")."""
    return {
        "add_prefix_space": False,
        "bos_token": _hub_added_token(BOS),
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": _hub_added_token(EOS),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _hub_added_token(EOS),
    }


def sdxl_special_tokens_map(pad_token):
    def tok(content):
        return {k: v for k, v in _hub_added_token(content).items() if k != "__type"}

    return {"bos_token": tok(BOS), "eos_token": tok(EOS), "pad_token": pad_token, "unk_token": tok(EOS)}


# --------------------------------------------------------------------------------------
# The tiny models.
# attention_head_dim is what diffusers uses as the head COUNT; it must follow the rule
# heads = width / 64 when width % 64 == 0, else 1.
# --------------------------------------------------------------------------------------

TINY = {
    "name": "tiny",
    "seed": 20240601,
    "round_dtype": torch.float16,  # every weight is a float16 value
    "single_file_dtype": torch.float16,
    "unet": {
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1, 2],  # the mid block takes the last entry: 2
        "attention_head_dim": [1, 1, 2],  # head width 64
        "addition_time_embed_dim": 8,
    },
    "vae": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1},
    "text_encoder": {"hidden_size": 16, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 1},
    "text_encoder_2": {
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 1,
        "projection_dim": 24,
    },
}

TINY2 = {
    "name": "tiny2",
    "seed": 20240602,
    "round_dtype": torch.bfloat16,  # every weight is a bfloat16 value
    "single_file_dtype": torch.bfloat16,
    "unet": {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 1],  # mid block depth 1
        "attention_head_dim": [1, 1, 1],
        "addition_time_embed_dim": 16,
    },
    "vae": {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 2},
    "text_encoder": {"hidden_size": 8, "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 1},
    "text_encoder_2": {
        "hidden_size": 24,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 1,
        "projection_dim": 40,
    },
}


def heads_for_width(width):
    return width // 64 if width % 64 == 0 else 1


def check_head_rule(spec):
    u = spec["unet"]
    for width, heads, kind in zip(u["block_out_channels"], u["attention_head_dim"], SDXL_UNET_CONFIG["down_block_types"]):
        if kind.startswith("CrossAttn"):
            assert heads == heads_for_width(width), (spec["name"], width, heads)
    for te in ("text_encoder", "text_encoder_2"):
        c = spec[te]
        assert c["num_attention_heads"] == heads_for_width(c["hidden_size"]), (spec["name"], te)
    assert spec["text_encoder"]["hidden_size"] != spec["text_encoder_2"]["hidden_size"]
    for w in u["block_out_channels"] + spec["vae"]["block_out_channels"]:
        assert w % 32 == 0


def unet_config(spec):
    cfg = copy.deepcopy(SDXL_UNET_CONFIG)
    cfg.update(spec["unet"])
    cross = spec["text_encoder"]["hidden_size"] + spec["text_encoder_2"]["hidden_size"]
    cfg["cross_attention_dim"] = cross
    cfg["projection_class_embeddings_input_dim"] = (
        spec["text_encoder_2"]["projection_dim"] + 6 * cfg["addition_time_embed_dim"]
    )
    return cfg


def vae_config(spec):
    cfg = copy.deepcopy(SDXL_VAE_CONFIG)
    cfg.update(spec["vae"])
    return cfg


def text_encoder_config(spec, which):
    base = SDXL_TEXT_ENCODER_CONFIG if which == "text_encoder" else SDXL_TEXT_ENCODER_2_CONFIG
    cfg = copy.deepcopy(base)
    cfg.update(spec[which])
    if which == "text_encoder":
        cfg["projection_dim"] = cfg["hidden_size"]  # unused by CLIPTextModel
    return CLIPTextConfig(**cfg)


# --------------------------------------------------------------------------------------
# 1. Tokenizer
# --------------------------------------------------------------------------------------


def bytes_to_unicode():
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def load_clip_bpe():
    """Vocabulary and merges exactly as CLIP builds them from bpe_simple_vocab_16e6.txt.gz."""
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    assert all(len(m) == 2 for m in merges)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == VOCAB_SIZE
    assert vocab[BOS] == 49406 and vocab[EOS] == 49407
    return vocab, merges


def build_tokenizer(vocab, merges):
    """The CLIPTokenizerFast structure, built with the tokenizers library."""
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BOS, normalized=True, special=True), AddedToken(EOS, normalized=True, special=True)])
    tok.post_processor = processors.RobertaProcessing(
        (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False, add_prefix_space=False
    )
    return tok


TOKENIZER_CHECK_PROMPTS = [
    "a photo of a cat",
    "wow! a red car!! 3 wheels",
    "A Watercolor painting of a lighthouse,   at DUSK (2019) -- 1024x768 px; it's 100% great!!!",
    "café naïve façade, Straße, 東京タワー, ½ cup, emoji 🙂🚀, ﬁne ligature",
    "don't you'll we've I'M they'd she's 3.14159 e=mc^2 #hashtag @user <html> tab\tnew\nline",
    "<|startoftext|>hello<|endoftext|> world",
    "",
]


def check_tokenizer(tok, vocab, merges, tmp):
    """Compare with transformers' CLIPTokenizer built from the same vocab and with
    open_clip's reference SimpleTokenizer; print the ids."""
    hf = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    mine = json.loads(tok.to_str())
    theirs = json.loads(hf.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "model"):
        assert mine[key] == theirs[key], key
    print("  tokenizer.json normalizer, pre_tokenizer, post_processor, decoder, model (vocab + merges): "
          "identical to transformers' CLIPTokenizer")
    # Only the added tokens' "normalized" flag differs: true here, as in the hub's CLIP
    # tokenizer.json (transformers builds false in memory, and a mix when it loads SDXL's
    # tokenizer folders). It only matters for case variants such as "<|EndOfText|>".
    strip = lambda toks: [{k: v for k, v in t.items() if k != "normalized"} for t in toks]  # noqa: E731
    assert strip(mine["added_tokens"]) == strip(theirs["added_tokens"])
    simple = open_clip.tokenizer.SimpleTokenizer()
    for prompt in TOKENIZER_CHECK_PROMPTS:
        ids = tok.encode(prompt).ids
        hf_ids = hf(prompt).input_ids
        assert ids == hf_ids, (prompt, ids, hf_ids)
        oc = [49406] + simple.encode(prompt) + [49407]
        if "<|" in prompt:
            note = "(open_clip names its special tokens differently)"
        elif ftfy.fix_text(prompt) != prompt:
            note = f"(open_clip's ftfy clean-up differs, as expected: {oc})"
        else:
            assert ids == oc, (prompt, ids, oc)
            note = "(= open_clip)"
        print(f"  {prompt!r}: {ids} {note}")
    # The hub-layout folder (vocab.json + merges.txt, no tokenizer.json) loads to the same thing.
    write_hf_tokenizer_dir(tmp / "tok", vocab, merges, pad_token=EOS)
    loaded = CLIPTokenizer.from_pretrained(tmp / "tok")
    for prompt in TOKENIZER_CHECK_PROMPTS:
        assert loaded(prompt).input_ids == tok.encode(prompt).ids


def write_hf_tokenizer_dir(folder, vocab, merges, pad_token):
    """vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json, like the
    SDXL hub repo's tokenizer/ and tokenizer_2/ (no tokenizer.json)."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(sdxl_tokenizer_config(pad_token), indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(sdxl_special_tokens_map(pad_token), indent=2) + "\n")


def asset_encoder(tok, pad_token):
    """How a consumer of assets/clip_tokenizer.json reproduces the pipeline's tokenizers:
    pad (and truncate) to 77; for SDXL's tokenizer_2 the pad token "!" (id 0) is also a
    special token, so a literal "!" in a prompt becomes id 0."""
    t = Tokenizer.from_str(tok.to_str())
    if pad_token == "!":
        t.add_special_tokens([AddedToken("!", normalized=False, special=True)])
    pad_id = t.token_to_id(pad_token)
    t.enable_truncation(max_length=77)
    t.enable_padding(length=77, pad_id=pad_id, pad_token=pad_token)
    return lambda text: t.encode(text).ids


def check_asset_against_refs(tok, cases, refs=REFS):
    enc = {"1": asset_encoder(tok, EOS), "2": asset_encoder(tok, "!")}
    n = 0
    for case in cases:
        ref = load_file(str(refs / f"{case['name']}.safetensors"))
        for which in ("1", "2"):
            for prefix, text in (("", case["prompt"]), ("neg_", case["negative_prompt"] or "")):
                key = f"{prefix}ids_{which}"
                if key in ref:
                    assert enc[which](text) == ref[key][0].tolist(), (case["name"], key)
                    n += 1
    print(f"  assets/clip_tokenizer.json (+ pad to 77; tokenizer 2: '!' special, id 0) reproduces all {n} recorded id rows")


# --------------------------------------------------------------------------------------
# 2. Models
# --------------------------------------------------------------------------------------


# Extra factors on the fan-in std: the VAE decoder's last conv would otherwise give
# decoded values of about +-3, and most pixels would clip to 0 or 255.
STD_GAIN = {"decoder.conv_out.weight": 0.4}


def randomize_(model, seed, round_dtype, gains=None):
    """Overwrite EVERY parameter with random values of an O(1)-activation scale, rounded
    to `round_dtype`-representable values (stored back as float32)."""
    gains = STD_GAIN if gains is None else gains
    gen = torch.Generator().manual_seed(seed)
    kinds = {}
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            mean, std, kind = 0.0, 0.1, "bias"
        elif p.ndim == 1:  # LayerNorm / GroupNorm weights
            mean, std, kind = 1.0, 0.1, "norm weight"
        elif "token_embedding" in name:
            mean, std, kind = 0.0, 1.0, "token embedding"
        elif "position_embedding" in name:
            mean, std, kind = 0.0, 0.3, "position embedding"
        elif p.ndim in (2, 4):  # Linear / Conv2d weight: fan-in scaling
            mean, std, kind = 0.0, gains.get(name, 1.0) / float(np.sqrt(p[0].numel())), "matrix"
        else:
            raise ValueError(f"unexpected parameter {name} {tuple(p.shape)}")
        kinds[kind] = kinds.get(kind, 0) + 1
        with torch.no_grad():
            v = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std + mean
            p.copy_(v.to(round_dtype).float())
    return kinds


def build_tiny_pipeline(spec, vocab, merges, tmp):
    """A StableDiffusionXLPipeline with SDXL base's configs shrunk to `spec`, random weights."""
    check_head_rule(spec)
    torch.manual_seed(spec["seed"])
    unet = UNet2DConditionModel.from_config(unet_config(spec))
    vae = AutoencoderKL.from_config(vae_config(spec))
    te1 = CLIPTextModel(text_encoder_config(spec, "text_encoder"))
    te2 = CLIPTextModelWithProjection(text_encoder_config(spec, "text_encoder_2"))
    for i, (name, model) in enumerate(
        [("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2)]
    ):
        kinds = randomize_(model, spec["seed"] * 10 + i, spec["round_dtype"])
        n = sum(p.numel() for p in model.parameters())
        print(f"  {spec['name']}.{name}: {n} parameters, randomised {kinds}")
        model.eval()
    tok_dirs = tmp / f"{spec['name']}-tokenizers"
    write_hf_tokenizer_dir(tok_dirs / "tokenizer", vocab, merges, pad_token=EOS)
    write_hf_tokenizer_dir(tok_dirs / "tokenizer_2", vocab, merges, pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=CLIPTokenizer.from_pretrained(tok_dirs / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(tok_dirs / "tokenizer_2"),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_diffusers_folder(pipe, folder, vocab, merges, verbose=True, dtype=torch.float16):
    """pipe.save_pretrained, then make the folder look like the SDXL hub repo:
    tokenizers as vocab.json/merges.txt (+configs) and text_encoder keys with `text_model.`."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_hf_tokenizer_dir(folder / "tokenizer", vocab, merges, pad_token=EOS)
    write_hf_tokenizer_dir(folder / "tokenizer_2", vocab, merges, pad_token="!")
    te_file = folder / "text_encoder" / "model.safetensors"
    sd = load_file(te_file)
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    save_file(dict(sorted(sd.items())), te_file, metadata={"format": "pt"})
    # Stored as float16 (tiny; bfloat16 for tiny2's config-only folder) to keep the fixtures
    # small: the weights are rounded to that dtype, so the values are those of the f32 model.
    for f in [folder / c / "diffusion_pytorch_model.safetensors" for c in ("unet", "vae")] + [
        folder / c / "model.safetensors" for c in ("text_encoder", "text_encoder_2")
    ]:
        sd = load_file(f)
        for k, v in sd.items():
            assert torch.equal(v.to(dtype).float(), v.float()), (f, k)
        save_file({k: v.to(dtype) for k, v in sorted(sd.items())}, f, metadata={"format": "pt"})
    for f in sorted(folder.rglob("*")):
        if verbose and f.is_file():
            print(f"  {f.relative_to(ROOT)}: {f.stat().st_size} bytes")


# ---- diffusers -> original (LDM / sgm) key mapping ----------------------------------

UNET_RESNET_RENAMES = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def unet_prefix_map(cfg):
    """(diffusers prefix, LDM prefix, is_resnet) for the SDXL UNet."""
    m = [
        ("conv_in.", "input_blocks.0.0.", False),
        ("time_embedding.linear_1.", "time_embed.0.", False),
        ("time_embedding.linear_2.", "time_embed.2.", False),
        ("add_embedding.linear_1.", "label_emb.0.0.", False),
        ("add_embedding.linear_2.", "label_emb.0.2.", False),
        ("conv_norm_out.", "out.0.", False),
        ("conv_out.", "out.2.", False),
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]
    lpb = cfg["layers_per_block"]
    levels = len(cfg["block_out_channels"])
    idx = 1
    for level in range(levels):
        for j in range(lpb):
            m.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{idx}.0.", True))
            m.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{idx}.1.", False))
            idx += 1
        if level < levels - 1:
            m.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{idx}.0.op.", False))
            idx += 1
    idx = 0
    for level in range(levels):
        has_attn = cfg["up_block_types"][level].startswith("CrossAttn")
        for j in range(lpb + 1):
            m.append((f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{idx}.0.", True))
            m.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{idx}.1.", False))
            if j == lpb and level < levels - 1:
                m.append((f"up_blocks.{level}.upsamplers.0.conv.", f"output_blocks.{idx}.{2 if has_attn else 1}.conv.", False))
            idx += 1
    return m


def vae_prefix_map(cfg):
    levels = len(cfg["block_out_channels"])
    m = [
        ("encoder.conv_in.", "encoder.conv_in.", False),
        ("encoder.conv_norm_out.", "encoder.norm_out.", False),
        ("encoder.conv_out.", "encoder.conv_out.", False),
        ("decoder.conv_in.", "decoder.conv_in.", False),
        ("decoder.conv_norm_out.", "decoder.norm_out.", False),
        ("decoder.conv_out.", "decoder.conv_out.", False),
        ("quant_conv.", "quant_conv.", False),
        ("post_quant_conv.", "post_quant_conv.", False),
    ]
    for part in ("encoder", "decoder"):
        m += [
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", True),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", True),
            (f"{part}.mid_block.attentions.0.group_norm.", f"{part}.mid.attn_1.norm.", False),
            (f"{part}.mid_block.attentions.0.to_q.", f"{part}.mid.attn_1.q.", False),
            (f"{part}.mid_block.attentions.0.to_k.", f"{part}.mid.attn_1.k.", False),
            (f"{part}.mid_block.attentions.0.to_v.", f"{part}.mid.attn_1.v.", False),
            (f"{part}.mid_block.attentions.0.to_out.0.", f"{part}.mid.attn_1.proj_out.", False),
        ]
    for i in range(levels):
        m.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", True))
        m.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", False))
        # The decoder's up blocks are stored in reversed order.
        m.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.", True))
        m.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{levels - 1 - i}.upsample.conv.", False))
    return m


def _apply_prefix_map(sd, pmap, resnet_renames, what):
    out = {}
    for key, value in sd.items():
        hits = [(d, l, r) for d, l, r in pmap if key.startswith(d)]
        assert len(hits) == 1, f"{what}: {key} matched {hits}"
        d, l, is_resnet = hits[0]
        rest = key[len(d) :]
        if is_resnet:
            for a, b in resnet_renames:
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
        new = l + rest
        assert new not in out, new
        out[new] = value
    return out


def unet_to_ldm(sd, cfg):
    return _apply_prefix_map(sd, unet_prefix_map(cfg), UNET_RESNET_RENAMES, "unet")


def vae_to_ldm(sd, cfg):
    out = _apply_prefix_map(sd, vae_prefix_map(cfg), [], "vae")
    # sgm names the VAE resnets' 1x1 shortcut `nin_shortcut`.
    out = {k.replace(".conv_shortcut.", ".nin_shortcut."): v for k, v in out.items()}
    for k, v in out.items():  # the mid attention's linear layers are 1x1 convs in LDM
        if ".mid.attn_1." in k and k.endswith("weight") and not k.endswith("norm.weight"):
            out[k] = v[:, :, None, None]
    return out


def clip_l_to_ldm(sd):
    """CLIP-L stays in the transformers layout; transformers 5 drops the text_model. prefix."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def open_clip_to_ldm(sd, n_layers):
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),  # [hidden, proj]
    }
    used = set(
        [
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.final_layer_norm.weight",
            "text_model.final_layer_norm.bias",
            "text_projection.weight",
        ]
    )
    renames = [
        ("layer_norm1", "ln_1"),
        ("layer_norm2", "ln_2"),
        ("self_attn.out_proj", "attn.out_proj"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
    ]
    for i in range(n_layers):
        src = f"text_model.encoder.layers.{i}."
        dst = f"transformer.resblocks.{i}."
        for t in ("weight", "bias"):
            qkv = [src + f"self_attn.{p}_proj.{t}" for p in "qkv"]
            out[dst + f"attn.in_proj_{t}"] = torch.cat([sd[k] for k in qkv], dim=0)
            used.update(qkv)
            for a, b in renames:
                out[dst + f"{b}.{t}"] = sd[src + f"{a}.{t}"]
                used.add(src + f"{a}.{t}")
    assert used == set(sd), sorted(set(sd) - used)
    return out


def original_state_dict(pipe):
    """The pipeline's weights as one original-layout SDXL checkpoint (float32)."""
    parts = [
        ("model.diffusion_model.", unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)),
        ("first_stage_model.", vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)),
        ("conditioner.embedders.0.transformer.", clip_l_to_ldm(pipe.text_encoder.state_dict())),
        (
            "conditioner.embedders.1.model.",
            open_clip_to_ldm(pipe.text_encoder_2.state_dict(), pipe.text_encoder_2.config.num_hidden_layers),
        ),
    ]
    out = {}
    for prefix, sd in parts:
        for k, v in sd.items():
            out[prefix + k] = v.detach().float().contiguous()
    return out


def save_single_file(pipe, path, dtype):
    sd = original_state_dict(pipe)
    for k, v in sd.items():  # the half-precision copy must hold exactly the float32 numbers
        assert torch.equal(v.to(dtype).float(), v), k
    save_file({k: v.to(dtype) for k, v in sorted(sd.items())}, str(path), metadata={"format": "pt"})
    print(f"  {Path(path).relative_to(ROOT)}: {len(sd)} tensors, {Path(path).stat().st_size} bytes, {dtype}")


SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def describe_single_file(path, out):
    """Write `out`: every tensor of the safetensors file `path` as [name, dtype, shape,
    sha256 of its little-endian bytes], in name order."""
    import hashlib

    from safetensors import safe_open

    rows = []
    with safe_open(str(path), "pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            rows.append([k, SAFETENSORS_DTYPES[t.dtype], list(t.shape), hashlib.sha256(raw).hexdigest()])
    Path(out).write_text(json.dumps({"tensors": rows}, indent=0) + "\n")
    print(f"  {Path(out).relative_to(ROOT)}: {len(rows)} tensors described")


TOKENIZER_FIXTURE_PROMPTS = TOKENIZER_CHECK_PROMPTS + [
    "masterpiece, best quality, (detailed eyes:1.2), [blurry], (((very detailed))), BREAK sky",
    "a photo of a cat!!! wearing a tiny hat.",
    "ÉCOLE café naïve 日本語 😀 emoji, über-photorealistic",
    "it's don't I'll we've they're 'quoted' \"double\" `tick`",
    "123,456.789 $100 #hash @user 1girl, 2boys, 8k uhd",
    "   leading and trailing   ",
    "a\u00a0b\u2003c\u3000d",
    "ß ẞ İ ı ǅ ﬃ Ⅻ ①",
    "hyphen-ated under_score slash/back\\slash a.b.c...d ...",
    "UPPER lower MiXeD CamelCase",
    "x" * 300,
    " ".join(["word"] * 100),
]


def random_prompts(n, seed):
    """Random strings over letters, digits, punctuation, accents, CJK, emoji and spaces."""
    import random

    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCXYZ !,.'\"()[]:;-_0123456789éüñ日本語😀\t\n\\/#@$%^&*+=<>?|~`"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def write_tokenizer_ids(pipe, cases, out):
    prompts = []
    for c in cases:
        prompts += [c["prompt"]] + ([c["negative_prompt"]] if c["negative_prompt"] else [])
    prompts = list(dict.fromkeys(prompts + TOKENIZER_FIXTURE_PROMPTS + random_prompts(300, 20261207)))

    def ids(tok, text):
        return tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids

    rows = [{"prompt": p, "ids_1": ids(pipe.tokenizer, p), "ids_2": ids(pipe.tokenizer_2, p)} for p in prompts]
    Path(out).write_text(json.dumps(rows, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"  {Path(out).relative_to(ROOT)}: {len(rows)} prompts")


def own_memory_(pipe):
    """Give every parameter and buffer freshly allocated memory. Weights mmapped from a
    safetensors file can sit at addresses that are not 64-byte aligned, and PyTorch's CPU
    kernels then take other code paths that differ in the last bit; with this, a pipeline
    loaded from the folder and one loaded from the single file compute identical numbers."""
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp)
        for p in module.parameters():
            p.data = p.data.clone()
        for m in module.modules():
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.clone()
    return pipe


def _components_equal(a, b, label):
    ok = True
    n = 0
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa = getattr(a, comp).state_dict()
        sb = getattr(b, comp).state_dict()
        if set(sa) != set(sb):
            print(f"    {label} {comp}: key sets differ: {sorted(set(sa) ^ set(sb))[:10]}")
            ok = False
            continue
        for k in sa:
            n += 1
            ta, tb = sa[k], sb[k]
            if ta.device.type == "meta" or tb.device.type == "meta" or ta.dtype != tb.dtype or not torch.equal(ta, tb):
                print(f"    {label} {comp}.{k}: DIFFERS")
                ok = False
    return ok, n


def verify_single_file(path, config_dir, pipe):
    """Load the single file back with diffusers' own converter and compare every parameter."""
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(config_dir), torch_dtype=torch.float32, local_files_only=True, add_watermarker=False
    )
    ok, n = _components_equal(pipe, loaded, Path(path).name)
    print(f"  from_single_file({Path(path).name}, config={Path(config_dir).name}): {n} tensors compared, all equal: {ok}")
    assert ok
    return loaded


# --------------------------------------------------------------------------------------
# 3. Reference runs
# --------------------------------------------------------------------------------------

LONG_PROMPT = (
    "an intricate matte painting of an ancient city carved into the side of a towering sandstone cliff, "
    "golden hour light spilling over terraced gardens, hanging bridges, waterfalls and narrow stairways, "
    "tiny figures of merchants and travellers with camels and colourful banners, hot air balloons drifting "
    "past, dramatic clouds, volumetric fog in the valley below, ultra detailed, sharp focus, 8k, trending "
    "on artstation, by a master of fantasy landscapes, cinematic composition, wide angle lens, warm palette "
    "with deep teal shadows, highly detailed stonework, weathered textures, birds circling the highest tower"
)

STEPS_4 = [999, 749, 499, 249]

CASES = [
    dict(name="cfg_off", model="tiny", prompt="a photo of a cat", negative_prompt=None,
         timesteps=STEPS_4, guidance_scale=1.0, seed=42, width=64, height=64),
    dict(name="cfg_neg", model="tiny", prompt="a watercolor painting of a lighthouse",
         negative_prompt="blurry, low quality", timesteps=STEPS_4, guidance_scale=2.5, seed=7, width=64, height=64),
    dict(name="cfg_noneg", model="tiny", prompt="an astronaut riding a horse", negative_prompt=None,
         timesteps=STEPS_4, guidance_scale=3.0, seed=123, width=64, height=64),
    dict(name="one_step", model="tiny", prompt="a photo of a cat", negative_prompt=None,
         timesteps=[399], guidance_scale=1.0, seed=1, width=64, height=64),
    dict(name="eight_step", model="tiny", prompt="a photo of a cat", negative_prompt=None,
         timesteps=[999, 874, 749, 624, 499, 374, 249, 124], guidance_scale=1.0, seed=2, width=64, height=64),
    dict(name="nonsquare", model="tiny", prompt="a photo of a cat", negative_prompt=None,
         timesteps=STEPS_4, guidance_scale=1.0, seed=3, width=96, height=64),
    dict(name="bang", model="tiny", prompt="wow! a red car!! 3 wheels", negative_prompt=None,
         timesteps=STEPS_4, guidance_scale=1.0, seed=4, width=64, height=64),
    dict(name="long", model="tiny", prompt=LONG_PROMPT, negative_prompt="blurry, low quality, watermark",
         timesteps=STEPS_4, guidance_scale=2.0, seed=5, width=64, height=64),
    dict(name="tiny2", model="tiny2", prompt="a cozy cabin in a snowy forest", negative_prompt="ugly",
         timesteps=STEPS_4, guidance_scale=1.5, seed=9, width=64, height=64),
]


for _case in CASES:
    _case.setdefault("scheduler", "lcm")

SCHEDULERS = {"lcm": LCMScheduler}


def run_case(pipe, case):
    """Run one case through StableDiffusionXLPipeline with the case's scheduler
    (LCMScheduler for DMD2) and record the intermediates. Returns (tensors, PIL image)."""
    base_scheduler = pipe.scheduler
    pipe.scheduler = SCHEDULERS[case["scheduler"]].from_config(base_scheduler.config)
    rec = {}
    te_inputs = {"text_encoder": [], "text_encoder_2": []}
    unet_calls = []
    handles = []

    def te_hook(name):
        def hook(module, args, kwargs):
            ids = args[0] if args else kwargs["input_ids"]
            te_inputs[name].append(ids.clone())

        return hook

    def unet_pre(module, args, kwargs):
        if not unet_calls:
            added = kwargs["added_cond_kwargs"]
            unet_calls.append(
                {
                    "unet_sample": args[0].clone(),
                    "unet_timestep": torch.as_tensor(args[1]).reshape(1).to(torch.float32),
                    "unet_encoder_hidden_states": kwargs["encoder_hidden_states"].clone(),
                    "unet_text_embeds": added["text_embeds"].clone(),
                    "unet_time_ids": added["time_ids"].clone(),
                }
            )

    def unet_post(module, args, kwargs, output):
        if "unet_out" not in unet_calls[0]:
            unet_calls[0]["unet_out"] = output[0].clone()

    handles.append(pipe.text_encoder.register_forward_pre_hook(te_hook("text_encoder"), with_kwargs=True))
    handles.append(pipe.text_encoder_2.register_forward_pre_hook(te_hook("text_encoder_2"), with_kwargs=True))
    handles.append(pipe.unet.register_forward_pre_hook(unet_pre, with_kwargs=True))
    handles.append(pipe.unet.register_forward_hook(unet_post, with_kwargs=True))

    orig_encode, orig_latents, orig_time_ids, orig_decode = (
        pipe.encode_prompt,
        pipe.prepare_latents,
        pipe._get_add_time_ids,
        pipe.vae.decode,
    )

    def encode_prompt(*a, **k):
        out = orig_encode(*a, **k)
        for key, t in zip(
            ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"], out
        ):
            if t is not None:
                rec[key] = t.clone()
        return out

    def prepare_latents(*a, **k):
        out = orig_latents(*a, **k)
        rec["init_latents"] = out.clone()
        return out

    def get_add_time_ids(*a, **k):
        out = orig_time_ids(*a, **k)
        rec.setdefault("add_time_ids", out.clone())
        return out

    def decode(*a, **k):
        out = orig_decode(*a, **k)
        rec["decoded"] = (out[0] if isinstance(out, tuple) else out.sample).clone()
        return out

    steps = []

    def on_step_end(p, i, t, kw):
        steps.append(kw["latents"].clone())
        return {}

    pipe.encode_prompt, pipe.prepare_latents, pipe._get_add_time_ids, pipe.vae.decode = (
        encode_prompt,
        prepare_latents,
        get_add_time_ids,
        decode,
    )
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
        for h in handles:
            h.remove()
        del pipe.encode_prompt, pipe.prepare_latents, pipe._get_add_time_ids
        del pipe.vae.decode
        pipe.scheduler = base_scheduler

    cfg_on = case["guidance_scale"] > 1
    # The negative prompt is encoded when given, or as "" when the pipeline does not zero it.
    zeros = pipe.config.force_zeros_for_empty_prompt
    n_prompts = 2 if cfg_on and (case["negative_prompt"] is not None or not zeros) else 1
    assert len(te_inputs["text_encoder"]) == len(te_inputs["text_encoder_2"]) == n_prompts
    rec["ids_1"], rec["ids_2"] = te_inputs["text_encoder"][0], te_inputs["text_encoder_2"][0]
    if n_prompts == 2:
        rec["neg_ids_1"], rec["neg_ids_2"] = te_inputs["text_encoder"][1], te_inputs["text_encoder_2"][1]
    if not cfg_on:
        for k in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            rec.pop(k, None)
    assert len(unet_calls) == 1 and "unet_out" in unet_calls[0]
    rec.update(unet_calls[0])
    assert len(steps) == len(case["timesteps"])
    for i, s in enumerate(steps):
        rec[f"step_latents_{i}"] = s
    rec["final_latents"] = steps[-1].clone()
    rec["image"] = torch.from_numpy(np.array(image, dtype=np.uint8).copy())

    for k, v in rec.items():
        if k.startswith(("ids_", "neg_ids_")):
            assert v.dtype == torch.int64 and tuple(v.shape) == (1, 77), (k, v.dtype, v.shape)
        elif k != "image":
            assert v.dtype == torch.float32, (k, v.dtype)
    return {k: v.contiguous() for k, v in sorted(rec.items())}, image


def describe_case(name, rec):
    img = rec["image"].float()
    eps = rec["unet_out"]
    clipped = ((img == 0) | (img == 255)).float().mean() * 100
    print(
        f"  {name:10s} image {tuple(rec['image'].shape)} min {int(img.min())} max {int(img.max())} "
        f"mean {img.mean():.1f} std {img.std():.1f} clipped {clipped:.1f}% | unet_out std {eps.std():.3f} "
        f"| final latents std {rec['final_latents'].std():.3f} | decoded range "
        f"[{rec['decoded'].min():.2f}, {rec['decoded'].max():.2f}]"
    )
    assert img.std() > 10, f"{name}: image looks blank"


# --------------------------------------------------------------------------------------


def report_outputs(files):
    """Make a script's outputs world-readable (safetensors creates files as 0600) and print
    their total size."""
    for f in files:
        f.chmod(0o644)
    total = sum(f.stat().st_size for f in files)
    print(f"[done] {len(files)} files, {total} bytes ({total / 2**20:.1f} MiB)")


def main():
    torch.set_grad_enabled(False)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"tokenizers {tokenizers.__version__}, open_clip {open_clip.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="dmd2-fixtures-"))
    try:
        print("[1] CLIP tokenizer")
        vocab, merges = load_clip_bpe()
        tok = build_tokenizer(vocab, merges)
        check_tokenizer(tok, vocab, merges, tmp)
        TOKENIZER_ASSET.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(TOKENIZER_ASSET), pretty=False)
        reloaded = Tokenizer.from_file(str(TOKENIZER_ASSET))
        for prompt in TOKENIZER_CHECK_PROMPTS:
            assert reloaded.encode(prompt).ids == tok.encode(prompt).ids
        print(f"  {TOKENIZER_ASSET.relative_to(ROOT)}: {TOKENIZER_ASSET.stat().st_size} bytes")

        print("[2] models")
        FIXTURES.mkdir(parents=True, exist_ok=True)
        built = build_tiny_pipeline(TINY, vocab, merges, tmp)
        tiny_dir = FIXTURES / "tiny"
        save_diffusers_folder(built, tiny_dir, vocab, merges)
        # The references come from the folder as written, so they describe the files.
        tiny = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32, add_watermarker=False)
        tiny.set_progress_bar_config(disable=True)
        own_memory_(tiny)
        ok, n = _components_equal(built, tiny, "tiny folder")
        print(f"  tiny folder reloads with from_pretrained: {n} tensors, all equal: {ok}")
        assert ok
        save_single_file(tiny, FIXTURES / "tiny.safetensors", TINY["single_file_dtype"])
        tiny_sf = verify_single_file(FIXTURES / "tiny.safetensors", tiny_dir, tiny)
        describe_single_file(FIXTURES / "tiny.safetensors", FIXTURES / "tiny.single_file.json")

        tiny2 = build_tiny_pipeline(TINY2, vocab, merges, tmp)
        save_single_file(tiny2, FIXTURES / "tiny2.safetensors", TINY2["single_file_dtype"])
        tiny2_cfg = tmp / "tiny2-config"
        # config only, not kept
        save_diffusers_folder(tiny2, tiny2_cfg, vocab, merges, verbose=False, dtype=TINY2["round_dtype"])
        verify_single_file(FIXTURES / "tiny2.safetensors", tiny2_cfg, tiny2)

        print("[3] reference runs")
        if REFS.exists():
            shutil.rmtree(REFS)
        REFS.mkdir(parents=True)
        pipes = {"tiny": tiny, "tiny2": tiny2}
        for case in CASES:
            rec, image = run_case(pipes[case["model"]], case)
            save_file(rec, str(REFS / f"{case['name']}.safetensors"))
            image.save(REFS / f"{case['name']}.png")
            describe_case(case["name"], rec)
        # The single-file pipeline (f16 file read as f32) gives the same numbers.
        tiny_sf.set_progress_bar_config(disable=True)
        own_memory_(tiny_sf)
        rec_sf, _ = run_case(tiny_sf, CASES[1])
        ref = load_file(str(REFS / f"{CASES[1]['name']}.safetensors"))
        same = all(torch.equal(rec_sf[k], ref[k]) for k in ref)
        print(f"  {CASES[1]['name']} through the pipeline loaded from tiny.safetensors: identical: {same}")
        assert same
        check_asset_against_refs(tok, CASES)
        (REFS / "cases.json").write_text(json.dumps(CASES, indent=2) + "\n")
        write_tokenizer_ids(tiny, CASES, FIXTURES / "tokenizer_ids.json")

        # Only this script's outputs (other scripts write other files under tests/fixtures).
        ours = [TOKENIZER_ASSET, FIXTURES / "tiny.single_file.json", FIXTURES / "tiny2.safetensors"]
        ours += [FIXTURES / "tokenizer_ids.json"]
        ours += [f for d in (tiny_dir, REFS) for f in d.rglob("*") if f.is_file()]
        report_outputs(ours)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
