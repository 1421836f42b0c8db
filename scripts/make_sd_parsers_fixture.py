"""What the real `sd-parsers` (PyPI) reads from a PNG dmd2 writes: run by hand, its output
committed, so tests/interop.rs checks dmd2's text against a parser it never runs in CI.

    cargo build --release
    cargo test --release --test single_file_map    # writes target/tmp/fixtures/tiny.safetensors
    pip install sd-parsers==0.6
    python scripts/make_sd_parsers_fixture.py target/release/dmd2 target/tmp/fixtures/tiny.safetensors

The model is the tiny fixture as one single-file checkpoint (tests/common's tiny_single_file(),
written the same way every time), named TINY_SINGLE_FILE in the committed arguments.

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
COMMON = ["--model", "TINY_SINGLE_FILE", "--width", "64", "--height", "64", "-q"]
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


def parse(binary, tiny, args):
    with tempfile.TemporaryDirectory() as d:
        png = Path(d) / "dmd2.png"
        run = [tiny if a == "TINY_SINGLE_FILE" else a for a in args]
        subprocess.run([binary, *run, "-o", str(png)], cwd=ROOT, check=True)
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
    binary, tiny = sys.argv[1], str(Path(sys.argv[2]).resolve())
    OUT.mkdir(parents=True, exist_ok=True)
    cases = {name: parse(binary, tiny, args) for name, args in CASES.items()}
    cases = {"sd_parsers_version": "0.6", "cases": cases}
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
