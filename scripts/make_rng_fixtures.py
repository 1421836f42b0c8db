#!/usr/bin/env python3
"""Write tests/fixtures/rng.safetensors: reference `torch.randn` outputs for
`dmd2::rng::TorchRng` (see tests/rng.rs).

Run from the repository root with a CPU build of torch (not needed by CI):

    /work/pyenv/bin/python scripts/make_rng_fixtures.py

Every case is a fresh `torch.Generator('cpu').manual_seed(seed)` followed by one
or more successive `torch.randn(n, generator=g, dtype=torch.float32)` draws on
that same generator. Draw k of case i is stored as tensor `case{i}_draw{k}`
(float32, 1-D). A draw with `stride` > 1 stores only every stride-th value
(keeps the file small for SDXL-sized latents). The JSON index is kept in the
safetensors metadata under the key "index":

    [{"seed": <u64>, "draws": [{"numel": n, "stride": s}, ...]}, ...]

On x86-64 torch computes float32 randn with numel >= 16 in the AVX2 kernel
(the AVX-512 build dispatches normal_ to AVX2 too); the reference values are
only meaningful for that code path, so the script records the CPU capability.
"""

import argparse
import json
import os
import random

import torch
from safetensors.torch import save_file

SEEDS = [0, 1, 42, 2**32 + 5, 2**64 - 1]
SIZES = [1, 3, 15, 16, 17, 31, 64, 4 * 8 * 8, 4 * 12 * 8, 1000]

# Successive draws on one generator: state carry-over, the cached double
# normal of the small-size path surviving (untouched) across large draws, and
# partial trailing blocks.
SEQUENCES = [
    (42, [256, 5, 256, 1, 1, 256]),
    (7, [1, 16, 1, 3, 17, 2, 1000, 1]),
    (123, [15, 15, 33, 5, 4096]),
]

# SDXL 1024x1024 latent: 4 x 128 x 128, stored with a stride.
LARGE = [(0, 4 * 128 * 128, 61), (2024, 4 * 128 * 128 + 7, 61)]


def stress_cases(count: int) -> list:
    """Random seeds and draw sequences, every value stored (large file: for a
    one-off check through DMD2_RNG_FIXTURE, not for the repository)."""
    r = random.Random(1234)
    cases = []
    for _ in range(count):
        seed = r.choice([r.getrandbits(32), r.getrandbits(64)])
        sizes = [r.choice([r.randint(1, 15), r.randint(16, 300), r.randint(300, 70000)])
                 for _ in range(r.randint(1, 4))]
        cases.append((seed, [(n, 1) for n in sizes]))
    return cases


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "rng.safetensors"))
    parser.add_argument("--stress", type=int, default=0, metavar="N",
                        help="write N random cases with all values instead of the test fixture")
    args = parser.parse_args()
    out = args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    cases = []
    if args.stress:
        cases = stress_cases(args.stress)
    else:
        for seed in SEEDS:
            for n in SIZES:
                cases.append((seed, [(n, 1)]))
        for seed, draws in SEQUENCES:
            cases.append((seed, [(n, 1) for n in draws]))
        for seed, n, stride in LARGE:
            cases.append((seed, [(n, stride)]))

    tensors = {}
    index = []
    for i, (seed, draws) in enumerate(cases):
        g = torch.Generator("cpu").manual_seed(seed)
        entry = {"seed": seed, "draws": []}
        for k, (n, stride) in enumerate(draws):
            x = torch.randn(n, generator=g, dtype=torch.float32)
            tensors[f"case{i}_draw{k}"] = x[::stride].contiguous()
            entry["draws"].append({"numel": n, "stride": stride})
        index.append(entry)

    meta = {
        "index": json.dumps(index),
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    save_file(tensors, out, metadata=meta)
    total = sum(t.numel() for t in tensors.values())
    print(f"wrote {out}: {len(cases)} cases, {len(tensors)} tensors, {total} values, "
          f"{os.path.getsize(out)} bytes, torch {torch.__version__}, "
          f"cpu capability {meta['cpu_capability']}")


if __name__ == "__main__":
    main()
