"""What a user waits for: one whole `dmd2 gen` process against diffusers' SDXL pipeline with
DMD2's sampler (LCMScheduler at timesteps 999, 749, 499, 249), same model, size, steps, dtype
and threads, run back to back, each in a fresh process. Prints wall clock, time before the
first UNet step, the steps (first and later), the VAE decode and peak RSS of each, with the
ratios.

    python examples/bench_image.py prepare DIR      # full-size SDXL base shapes, random weights,
                                                    # fp16 diffusers folder (~6.9 GB), no download
    python examples/bench_image.py compare DIR --size 512 --dtype f32 --runs 3 [--isa avx2]
    python examples/bench_image.py prepare-taesd TAESD_DIR  # TAESDXL's shapes, random (~5 MB in fp16)
    python examples/bench_image.py compare DIR --vae TAESD_DIR ...  # both decode with it

`--isa avx2` runs both sides as an AVX2-only CPU would, on a CPU that has more: dmd2 with
DMD2_CPU=avx2, PyTorch with ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2 and
ONEDNN_MAX_CPU_ISA=AVX2. The model files are read once first so both start from a warm page
cache. Needs torch, diffusers and transformers (pip install torch diffusers transformers) and
a release build of dmd2 (cargo build --release); never run by CI.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a red fox in the snow, golden hour"
TIMESTEPS = [999, 749, 499, 249]


# ---------------------------------------------------------------------------------------------
# prepare: a full-size random SDXL folder
# ---------------------------------------------------------------------------------------------

def prepare(out: Path):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_diffusers import UNET, VAE

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    fixture = REPO / "tests" / "fixtures" / "tiny"
    for name in ("tokenizer", "tokenizer_2", "model_index.json"):
        src = fixture / name
        if src.is_dir():
            shutil.copytree(src, out / name, dirs_exist_ok=True)
        else:
            shutil.copy(src, out / name)
    EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading",
    ).save_pretrained(out / "scheduler")
    clip_l = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768,
    )
    clip_g = CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
        projection_dim=1280, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    for name, make in (
        ("text_encoder", lambda: CLIPTextModel(clip_l)),
        ("text_encoder_2", lambda: CLIPTextModelWithProjection(clip_g)),
        ("vae", lambda: AutoencoderKL(**VAE)),
        ("unet", lambda: UNet2DConditionModel(**UNET)),
    ):
        t = time.perf_counter()
        m = make().half()
        m.save_pretrained(out / name, safe_serialization=True)
        del m
        print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)


def prepare_taesd(out: Path):
    """A random AutoencoderTiny with madebyollin/taesdxl's config (diffusers' defaults)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny().half().save_pretrained(out, safe_serialization=True)
    print(f"wrote {out}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# child: diffusers' pipeline, timed by phase (runs in its own process)
# ---------------------------------------------------------------------------------------------

def diffusers_child(a):
    t_start = time.perf_counter()
    import torch
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    pipe = StableDiffusionXLPipeline.from_pretrained(a.model, torch_dtype=dtype)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if a.vae:
        from diffusers import AutoencoderTiny

        # The tiny VAE in f32 too, as dmd2 runs every VAE on the CPU.
        pipe.vae = AutoencoderTiny.from_pretrained(a.vae, torch_dtype=torch.float32)
    # The SDXL VAE runs in f32 (force_upcast), as dmd2 runs it.
    pipe.vae.to(torch.float32)
    pipe.vae.config.force_upcast = False
    pipe.set_progress_bar_config(disable=True)
    t_loaded = time.perf_counter()
    marks = {"encode": [], "steps": [], "decode": []}

    def timed(obj, attr, key):
        inner = getattr(obj, attr)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            r = inner(*args, **kwargs)
            marks[key].append((t, time.perf_counter()))
            return r

        setattr(obj, attr, wrapper)

    # The pipeline hands bf16 latents to the f32 VAE as they are (it casts only for its f16
    # upcast), so they are cast here, as dmd2 casts them.
    vae_decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *args, **kwargs: vae_decode(z.float(), *args, **kwargs)
    timed(pipe, "encode_prompt", "encode")
    timed(pipe.unet, "forward", "steps")
    timed(pipe.vae, "decode", "decode")
    with torch.inference_mode():
        image = pipe(
            PROMPT, width=a.size, height=a.size, num_inference_steps=len(TIMESTEPS),
            timesteps=TIMESTEPS, guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
    image.save(a.out)
    span = lambda k: sum(e - s for s, e in marks[k])
    json.dump({
        "load": t_loaded - t_start,
        "before_first_step": marks["steps"][0][0] - t_start,
        "encode": span("encode"),
        "steps": [e - s for s, e in marks["steps"]],
        "decode": span("decode"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }, sys.stdout)


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------

def run_measured(cmd, env):
    """Runs cmd in a fresh process; returns wall seconds, peak RSS (GiB), stdout."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Read both pipes on threads, then reap with wait4 for this child's own rusage.
    bufs = {}

    def drain(name, f):
        bufs[name] = f.read()

    threads = [threading.Thread(target=drain, args=(n, f)) for n, f in (("out", p.stdout), ("err", p.stderr))]
    for th in threads:
        th.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    for th in threads:
        th.join()
    if status != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed (status {status}):\n"
                 f"{bufs['err'].decode(errors='replace')[-3000:]}")
    return wall, ru.ru_maxrss / 2**20, bufs["out"].decode()


def warm_page_cache(model: Path):
    for f in model.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def compare(a):
    model = Path(a.model)
    dmd2 = Path(a.dmd2)
    if not dmd2.exists():
        sys.exit(f"{dmd2}: not found (cargo build --release)")
    env_dmd2 = dict(os.environ)
    env_torch = dict(os.environ)
    if a.isa == "avx2":
        env_dmd2["DMD2_CPU"] = "avx2"
        env_torch.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2",
                         ONEDNN_MAX_CPU_ISA="AVX2")
    warm_page_cache(model)
    tmp = Path(tempfile.mkdtemp(prefix="bench_image."))
    rows = {"dmd2": [], "diffusers": []}
    for r in range(a.runs):
        for side in ("dmd2", "diffusers") if r % 2 == 0 else ("diffusers", "dmd2"):
            png = tmp / f"{side}-{r}.png"
            if side == "dmd2":
                cmd = [str(dmd2), "gen", "--model", str(model), "--prompt", PROMPT,
                       "--steps", str(len(TIMESTEPS)), "--cfg", "1", "--width", str(a.size),
                       "--height", str(a.size), "--dtype", a.dtype, "--device", "cpu",
                       "--seed", "0", "--json", "-o", str(png)]
                if a.vae:
                    cmd += ["--vae", a.vae]
                wall, rss, out = run_measured(cmd, env_dmd2)
                s = json.loads(out.strip().splitlines()[-1])["seconds"]
                m = {"load": s["load"], "before_first_step": s["load"] + s["encode"],
                     "encode": s["encode"], "steps": s["steps"], "decode": s["decode"]}
            else:
                cmd = [sys.executable, __file__, "diffusers-child", "--model", str(model),
                       "--size", str(a.size), "--dtype", a.dtype, "--out", str(png)]
                if a.vae:
                    cmd += ["--vae", a.vae]
                wall, rss, out = run_measured(cmd, env_torch)
                m = json.loads(out)
            m.update(wall=wall, rss=rss)
            rows[side].append(m)
            steps = m["steps"]
            print(f"run {r} {side:9}: wall {wall:6.1f} s, before first step "
                  f"{m['before_first_step']:5.1f} s, steps {' '.join(f'{x:.1f}' for x in steps)} s, "
                  f"decode {m['decode']:5.1f} s, peak {rss:5.2f} GiB", file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)

    def med(side, f):
        return statistics.median(f(m) for m in rows[side])

    metrics = [
        ("whole process (wall)", "s", lambda m: m["wall"]),
        ("before the first step", "s", lambda m: m["before_first_step"]),
        ("first UNet step", "s", lambda m: m["steps"][0]),
        ("later UNet steps (mean)", "s", lambda m: statistics.mean(m["steps"][1:]) if len(m["steps"]) > 1 else m["steps"][0]),
        ("all UNet steps", "s", lambda m: sum(m["steps"])),
        ("VAE decode", "s", lambda m: m["decode"]),
        ("peak RSS", "GiB", lambda m: m["rss"]),
    ]
    info = rows["diffusers"][0]
    vae = f", VAE {Path(a.vae).name}" if a.vae else ""
    print(f"\n{a.size}², {len(TIMESTEPS)} steps, CFG 1, {a.dtype}{vae}, isa {a.isa or 'native'}, "
          f"medians of {a.runs} (torch {info['torch']}, {info['threads']} threads)\n")
    print("| | dmd2 | diffusers | dmd2 / diffusers |")
    print("|---|---|---|---|")
    for name, unit, f in metrics:
        d, p = med("dmd2", f), med("diffusers", f)
        print(f"| {name} | {d:.2f} {unit} | {p:.2f} {unit} | {d / p:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir")
    t = sub.add_parser("prepare-taesd")
    t.add_argument("dir")
    c = sub.add_parser("compare")
    c.add_argument("model")
    c.add_argument("--size", type=int, default=512)
    c.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    c.add_argument("--runs", type=int, default=3)
    c.add_argument("--isa", choices=["avx2"], default=None)
    c.add_argument("--dmd2", default=str(REPO / "target" / "release" / "dmd2"))
    c.add_argument("--vae", default=None, help="a VAE folder both sides decode with")
    d = sub.add_parser("diffusers-child")
    d.add_argument("--model", required=True)
    d.add_argument("--size", type=int, required=True)
    d.add_argument("--dtype", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--vae", default=None)
    a = ap.parse_args()
    if a.what == "prepare":
        prepare(Path(a.dir))
    elif a.what == "prepare-taesd":
        prepare_taesd(Path(a.dir))
    elif a.what == "compare":
        compare(a)
    else:
        diffusers_child(a)


if __name__ == "__main__":
    main()
