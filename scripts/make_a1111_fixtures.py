#!/usr/bin/env python3
"""Reference fixtures for `--prompt-syntax a1111`: an independent Python reference of
AUTOMATIC1111's SDXL prompt conditioning (stable-diffusion-webui 1.10), run over the tiny
model's own text encoders, and diffusers' StableDiffusionXLPipeline + LCMScheduler fed with
those embeddings for the images.

What the reference does (written from the facts of A1111's prompt_parser.py,
sd_hijack_clip.py, sd_emphasis.py and sd_models_xl.py; not their code):
  - parse_prompt_attention: (x) x1.1, [x] /1.1, (x:w), nesting multiplies, backslash
    escapes, strays are text, unclosed groups run to the end, BREAK -> ["BREAK", -1],
    neighbours of equal weight merge;
  - per text encoder, each segment tokenized on its own with that encoder's tokenizer (no
    special tokens), chunks of 75 with the comma backtrack of 20, BREAK closes a chunk, a
    chunk is BOS + tokens padded with EOS + EOS; encoder 2's ids after the first EOS become
    its pad id (0);
  - each chunk encoded alone: hidden_states[-2]; "Original" emphasis
    z *= w; z *= mean(z before) / mean(z after); chunks concatenated; the two encoders side
    by side; pooled = encoder 2's text_embeds of chunk 0;
  - with CFG, an absent negative is zeros (force_zeros_for_empty_prompt), and the prompt
    and the negative are padded to the same number of chunks with the empty prompt's
    encoding (A1111's pad_cond_uncond).

Writes tests/fixtures/a1111/cases.json (prompts, settings, and the segments and chunk ids
and weights `dmd2 tokens --json` must print) and, for the image cases,
a1111/<case>.safetensors (embeddings, final image) and a1111/<case>.png.

Run by hand (never in CI), after scripts/make_fixtures.py:

    /work/pyenv/bin/python scripts/make_a1111_fixtures.py
"""

import json
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests/fixtures/tiny"
OUT = ROOT / "tests/fixtures/a1111"

CHUNK = 75
BACKTRACK = 20

# ---------------------------------------------------------------- the parser


def _is_space(c):
    return c.isspace()


def parse_attention(text):
    """A1111's parse_prompt_attention, as a hand-written scanner."""
    res = []
    round_open, square_open = [], []

    def multiply(start, m):
        for seg in res[start:]:
            seg[1] *= m

    def add_text(t):
        parts = re.split(r"\s*\bBREAK\b\s*", t)
        for i, part in enumerate(parts):
            if i:
                res.append(["BREAK", -1])
            res.append([part, 1.0])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt in ("(", ")", "[", "]", "\\") and nxt:
                res.append([nxt, 1.0])
                i += 2
            else:
                res.append(["", 1.0])
                i += 1
        elif c == "(":
            round_open.append(len(res))
            i += 1
        elif c == "[":
            square_open.append(len(res))
            i += 1
        elif c == ":":
            m = re.match(r":\s*([+-]?[.\d]+)\s*\)", text[i:])
            if m and round_open:
                multiply(round_open.pop(), float(m.group(1)))
                i += m.end()
            elif m:
                add_text(m.group(0))
                i += m.end()
            else:
                add_text(":")
                i += 1
        elif c == ")":
            if round_open:
                multiply(round_open.pop(), 1.1)
            else:
                add_text(")")
            i += 1
        elif c == "]":
            if square_open:
                multiply(square_open.pop(), 1 / 1.1)
            else:
                add_text("]")
            i += 1
        else:
            j = i
            while j < n and text[j] not in "\\()[]:":
                j += 1
            add_text(text[i:j])
            i = j
    for pos in round_open:
        multiply(pos, 1.1)
    for pos in square_open:
        multiply(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    k = 0
    while k + 1 < len(res):
        if res[k][1] == res[k + 1][1]:
            res[k][0] += res[k + 1][0]
            res.pop(k + 1)
        else:
            k += 1
    return res


# The doctests of A1111's parse_prompt_attention.
assert parse_attention("normal text") == [["normal text", 1.0]]
assert parse_attention("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
assert parse_attention("(unbalanced") == [["unbalanced", 1.1]]
assert parse_attention("\\(literal\\]") == [["(literal]", 1.0]]
assert parse_attention("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
assert parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
    ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1],
    ["hill", 0.55], [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]

# ---------------------------------------------------------------- chunks


def name_lookup(tokenizer, embeddings):
    """First token id -> [(name ids, name, vectors)], longest names first (A1111's ids_lookup)."""
    table = {}
    for name, (clip_l, _) in embeddings.items():
        ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        table.setdefault(ids[0], []).append((ids, name, clip_l.shape[0]))
    for v in table.values():
        v.sort(key=lambda x: -len(x[0]))
    return table


def chunk_prompt(tokenizer, segments, embeddings=None):
    """Chunks (ids, weights, fixes) of one encoder, as A1111's tokenize_line builds them;
    fixes are (position in ids, embedding name)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    lookup = name_lookup(tokenizer, embeddings or {})
    chunks = []
    cur_ids, cur_w, cur_fix = [], [], []
    last_comma = -1

    def close():
        nonlocal cur_ids, cur_w, cur_fix, last_comma
        pad = CHUNK - len(cur_ids)
        ids = [bos] + cur_ids + [eos] * pad + [eos]
        w = [1.0] + cur_w + [1.0] * pad + [1.0]
        chunks.append((ids, w, [(p + 1, name) for p, name in cur_fix]))
        cur_ids, cur_w, cur_fix, last_comma = [], [], [], -1

    for text, weight in segments:
        if text == "BREAK" and weight == -1:
            close()
            continue
        toks = tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
        pos = 0
        while pos < len(toks):
            tok = toks[pos]
            if tok == comma:
                last_comma = len(cur_ids)
            elif len(cur_ids) == CHUNK and last_comma != -1 and len(cur_ids) - last_comma <= BACKTRACK:
                cut = last_comma + 1
                moved_ids, moved_w = cur_ids[cut:], cur_w[cut:]
                cur_ids, cur_w = cur_ids[:cut], cur_w[:cut]
                close()  # the fixes stay with the chunk they were placed in
                cur_ids, cur_w = moved_ids, moved_w
            if len(cur_ids) == CHUNK:
                close()
            match = None
            for ids, name, n in lookup.get(tok, []):
                if toks[pos:pos + len(ids)] == ids:
                    match = (ids, name, n)
                    break
            if match is None:
                cur_ids.append(tok)
                cur_w.append(weight)
                pos += 1
                continue
            ids, name, n = match
            if len(cur_ids) + n > CHUNK:
                close()
            cur_fix.append((len(cur_ids), name))
            cur_ids += [0] * n
            cur_w += [weight] * n
            pos += len(ids)
    if cur_ids or not chunks:
        close()
    return chunks


def empty_chunk(tokenizer):
    return [tokenizer.bos_token_id] + [tokenizer.eos_token_id] * (CHUNK + 1), [1.0] * (CHUNK + 2), []


# ---------------------------------------------------------------- encoding


def encode_side(encoder, tokenizer, chunks, want_pooled, vectors):
    """vectors: embedding name -> [n, width] for this encoder."""
    zs, pooled = [], None
    for ids, w, fixes in chunks:
        ids = list(ids)
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            first = ids.index(tokenizer.eos_token_id)
            ids = ids[: first + 1] + [tokenizer.pad_token_id] * (len(ids) - first - 1)

        def put_vectors(module, args, out):
            out = out.clone()
            for p, name in fixes:
                v = vectors[name]
                n = min(v.shape[0], out.shape[1] - p)
                out[0, p:p + n] = v[:n]
            return out

        hook = encoder.get_input_embeddings().register_forward_hook(put_vectors)
        out = encoder(torch.tensor([ids]), output_hidden_states=True)
        hook.remove()
        z = out.hidden_states[-2].float()
        before = z.mean()
        z = z * torch.tensor(w, dtype=torch.float32).reshape(1, -1, 1)
        z = z * (before / z.mean())
        zs.append(z)
        if want_pooled and pooled is None:
            pooled = out.text_embeds.float()
    return torch.cat(zs, dim=1), pooled


def encode(pipe, prompt, embeddings=None):
    embeddings = embeddings or {}
    segments = parse_attention(prompt)
    c1 = chunk_prompt(pipe.tokenizer, segments, embeddings)
    c2 = chunk_prompt(pipe.tokenizer_2, segments, embeddings)
    k = max(len(c1), len(c2))
    c1 += [empty_chunk(pipe.tokenizer)] * (k - len(c1))
    c2 += [empty_chunk(pipe.tokenizer_2)] * (k - len(c2))
    z1, _ = encode_side(pipe.text_encoder, pipe.tokenizer, c1, False, {n: v[0] for n, v in embeddings.items()})
    z2, pooled = encode_side(pipe.text_encoder_2, pipe.tokenizer_2, c2, True,
                             {n: v[1] for n, v in embeddings.items()})
    return torch.cat([z1, z2], dim=2), pooled


def pad_to(ctx, chunks, empty):
    have = ctx.shape[1] // 77
    if have < chunks:
        ctx = torch.cat([ctx] + [empty] * (chunks - have), dim=1)
    return ctx


# ---------------------------------------------------------------- cases

LONG = (
    "masterpiece, best quality, (a cozy reading nook:1.2), tall window, rain on glass, warm lamp light, "
    "stacks of old books, a sleeping cat on a knitted blanket, steaming mug of tea, potted plants, "
    "wooden shelves, brass fittings, soft shadows, [dust motes], evening, muted colours, film grain, "
    "35mm photograph, shallow depth of field, bokeh, cinematic lighting, highly detailed, intricate, "
    "sharp focus, ((cosy atmosphere)), autumn leaves outside, city lights in the distance, quiet mood, "
    "a vintage radio, a ticking clock, a rocking chair, a patterned rug, a fireplace with glowing embers, "
    "framed paintings, a small desk with a typewriter, handwritten letters, candles, (fairy lights:0.8), "
    "a grandfather clock, velvet curtains, a chess board mid game, a sleeping dog by the hearth, "
    "copper kettle, dried flowers in a vase, a globe, maps pinned to the wall, a telescope by the window, "
    "moonlight, (soft rim light:1.1), [[overexposed]], a bowl of apples, a wool scarf, reading glasses"
)

IMAGE_CASES = [
    dict(name="weighted", prompt="masterpiece, (detailed eyes:1.2), [blurry], a ((red)) car, \\(1990\\)",
         negative_prompt=None, guidance_scale=1.0, seed=11),
    dict(name="chunked_cfg", prompt=LONG, negative_prompt="(worst quality:1.4), lowres, watermark",
         guidance_scale=2.0, seed=12),
    dict(name="break", prompt="a cat on a (sofa:1.3) BREAK a dog under a [table]",
         negative_prompt=None, guidance_scale=1.0, seed=13),
    dict(name="negative_weighted", prompt="a lighthouse at dusk",
         negative_prompt="(blurry:1.4), [[low quality]], (watermark:-0.5), BREAK text",
         guidance_scale=2.5, seed=14),
    dict(name="long_zero_negative", prompt=LONG, negative_prompt=None, guidance_scale=1.5, seed=15),
    dict(name="embeddings", prompt="kitty_style, a cat on a sofa",
         negative_prompt="neg_hands, (blurry:1.2)", guidance_scale=2.0, seed=16,
         embeddings=["kitty_style", "neg_hands"]),
    # The embedding's 3 vectors do not fit after token 73: they start the next chunk.
    dict(name="embedding_at_boundary", prompt=" ".join(["cat"] * 73) + " (neg_hands:1.3) on a sofa",
         negative_prompt=None, guidance_scale=1.0, seed=17, embeddings=["neg_hands"]),
]

# Embeddings for the tiny model: text encoder widths 16 and 32.
EMBEDDINGS = {"kitty_style": 2, "neg_hands": 3}


def make_embeddings():
    d = OUT / "embeddings"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(20261207)
    out = {}
    for name, n in EMBEDDINGS.items():
        clip_l = torch.randn(n, 16, generator=g).half().float()
        clip_g = torch.randn(n, 32, generator=g).half().float()
        save_file({"clip_l": clip_l.half(), "clip_g": clip_g.half()}, str(d / f"{name}.safetensors"))
        out[name] = (clip_l, clip_g)
    return out

TOKEN_CASES = [
    "normal text",
    "an (important) word",
    "(unbalanced",
    "\\(literal\\]",
    "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "a) stray] colon: here",
    "wow! (a red car!!:1.1) 3 wheels",
    "BREAK at the start, (BREAK in brackets), and at the end BREAK",
    "(x: -0.5 ) [[y]] \\\\ backslash \\ lone",
    "", 
    LONG,
    ", ".join(["tag%d" % i for i in range(60)]),
    " ".join(["word"] * 74) + ", a b c d e f",
    " ".join(["word"] * 200),
    dict(prompt="(kitty_style:1.2), a cat, neg_hands", embeddings=["kitty_style", "neg_hands"]),
    dict(prompt=" ".join(["cat"] * 73) + " neg_hands, kitty_style", embeddings=["kitty_style", "neg_hands"]),
    dict(prompt=" ".join(["cat"] * 70) + ", b c d neg_hands e f", embeddings=["neg_hands"]),
]


def tokens_json(tokenizer, prompt, embeddings=None):
    segments = parse_attention(prompt)
    chunks = chunk_prompt(tokenizer, segments, embeddings)
    return {"segments": segments,
            "chunks": [{"ids": ids, "weights": w, "embeddings": [list(f) for f in fixes]} for ids, w, fixes in chunks]}


def main():
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(TINY, torch_dtype=torch.float32, add_watermarker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    empty, _ = encode(pipe, "")
    all_embeddings = make_embeddings()
    cases = []
    for case in IMAGE_CASES:
        embs = {n: all_embeddings[n] for n in case.get("embeddings", [])}
        ctx, pooled = encode(pipe, case["prompt"], embs)
        rec = {"prompt_embeds": ctx, "pooled_prompt_embeds": pooled}
        kwargs = {}
        if case["guidance_scale"] > 1:
            if case["negative_prompt"] is None:
                nctx, npooled = torch.zeros_like(ctx), torch.zeros_like(pooled)
            else:
                nctx, npooled = encode(pipe, case["negative_prompt"], embs)
            k = max(ctx.shape[1], nctx.shape[1]) // 77
            ctx, nctx = pad_to(ctx, k, empty), pad_to(nctx, k, empty)
            rec.update(prompt_embeds=ctx, negative_prompt_embeds=nctx, negative_pooled_prompt_embeds=npooled)
            kwargs = dict(negative_prompt_embeds=nctx, negative_pooled_prompt_embeds=npooled)
        image = pipe(
            prompt_embeds=ctx, pooled_prompt_embeds=pooled, timesteps=[999, 749, 499, 249],
            guidance_scale=case["guidance_scale"], width=64, height=64,
            generator=torch.Generator().manual_seed(case["seed"]), output_type="pil", **kwargs,
        ).images[0]
        rec["image"] = torch.from_numpy(np.array(image))
        save_file({k: v.contiguous() for k, v in rec.items()}, str(OUT / f"{case['name']}.safetensors"))
        image.save(OUT / f"{case['name']}.png")
        cases.append(dict(case, model="tiny", timesteps=[999, 749, 499, 249], width=64, height=64,
                          chunks=ctx.shape[1] // 77))
        print(f"  {case['name']}: {ctx.shape[1] // 77} chunk(s)")
    tokens = []
    for t in TOKEN_CASES:
        t = t if isinstance(t, dict) else dict(prompt=t)
        embs = {n: all_embeddings[n] for n in t.get("embeddings", [])}
        tokens.append(dict(t, **tokens_json(pipe.tokenizer, t["prompt"], embs)))
    with open(OUT / "cases.json", "w") as f:
        json.dump({"images": cases, "tokens": tokens}, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(cases)} image cases, {len(tokens)} token cases")


if __name__ == "__main__":
    main()
