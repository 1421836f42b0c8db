"""A PNG as AUTOMATIC1111 saves one, for tests/interop.rs: `parameters` written the way
`modules/images.py` does (PIL's PngInfo.add_text; tEXt when Latin-1, else iTXt), with a
text laid out as `processing.create_infotext` lays out a hires txt2img with a LoRA, a VAE, an
embedding and clip skip (A1111 1.10 key order).

    pip install pillow
    python scripts/make_a1111_png_fixture.py

Writes tests/fixtures/a1111_png/hires_lora.png (8×8).
"""

from pathlib import Path

from PIL import Image, PngImagePlugin

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "a1111_png"

TEXT = (
    "masterpiece, a (red:1.2) fox in snow, 雪, <lora:detail_tweaker:0.8> [blurry]\n"
    "Negative prompt: easynegative, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890123, "
    "Size: 832x1216, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, VAE hash: 235745af8d, "
    "VAE: sdxl_vae.safetensors, Denoising strength: 0.4, Clip skip: 2, Hires upscale: 1.5, "
    "Hires steps: 10, Hires upscaler: R-ESRGAN 4x+, "
    'Lora hashes: "detail_tweaker: 1a2b3c4d5e6f", TI hashes: "easynegative: c74b4e810b03", '
    "Emphasis: No norm, Version: v1.10.1"
)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", TEXT)
    Image.new("RGB", (8, 8), (200, 80, 40)).save(OUT / "hires_lora.png", pnginfo=info)


if __name__ == "__main__":
    main()
