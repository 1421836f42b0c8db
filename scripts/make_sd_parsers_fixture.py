"""What the real `sd-parsers` (PyPI) reads from a PNG dmd2 writes: run by hand, its output
committed, so tests/interop.rs checks dmd2's text against a parser it never runs in CI.

    cargo build --release
    pip install sd-parsers==0.6
    python scripts/make_sd_parsers_fixture.py target/release/dmd2

Writes tests/fixtures/sd_parsers/cases.json: per case dmd2's arguments, the `parameters` text
it wrote and what sd-parsers read from it. The test makes the same images with those
arguments and requires the same texts (their Version aside).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from sd_parsers import ParserManager

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "sd_parsers"

# Paths relative to the repository root; the test runs from there.
COMMON = ["--model", "tests/fixtures/tiny.safetensors", "--width", "64", "--height", "64", "-q"]
CASES = {
    # A LoRA (a tag in the prompt, its AutoV3 in `Lora hashes`), a negative prompt, CFG.
    "lora_negative": [
        "gen", *COMMON,
        "--lora", "tests/fixtures/lora/kohya_ldm.safetensors:0.7",
        "a cat, sitting",
        "--negative-prompt", "blurry",
        "--seed", "5", "--steps", "4", "--cfg", "1.5",
    ],
    # No negative prompt: the empty `Negative prompt:` line reads as none.
    "no_negative": ["gen", *COMMON, "a cat", "--seed", "7", "--steps", "1"],
}


def parse(binary, args):
    with tempfile.TemporaryDirectory() as d:
        png = Path(d) / "dmd2.png"
        subprocess.run([binary, *args, "-o", str(png)], cwd=ROOT, check=True)
        info = ParserManager().parse(str(png))
    if info is None:
        sys.exit("sd-parsers found no generation data")
    s = info.samplers[0]
    return {
        "args": args,
        "parameters": info.raw_parameters["parameters"],
        "generator": info.generator.value,
        "sampler": s.name,
        "sampler_parameters": s.parameters,
        "model": {"name": s.model.name, "hash": s.model.hash} if s.model else None,
        "prompts": [p.value for p in s.prompts],
        "negative_prompts": [p.value for p in s.negative_prompts],
        "metadata": info.metadata,
    }


def main():
    binary = sys.argv[1]
    OUT.mkdir(parents=True, exist_ok=True)
    cases = {name: parse(binary, args) for name, args in CASES.items()}
    cases = {"sd_parsers_version": "0.6", "cases": cases}
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
