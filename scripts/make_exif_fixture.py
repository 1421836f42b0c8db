#!/usr/bin/env python3
"""The EXIF block AUTOMATIC1111 writes into JPEG and WebP images, made by piexif exactly as
A1111's `modules/images.py` makes it:

    piexif.dump({"Exif": {piexif.ExifIFD.UserComment:
                          piexif.helper.UserComment.dump(parameters, encoding="unicode")}})

Writes tests/fixtures/exif/user_comment.txt (the parameters, UTF-8) and
tests/fixtures/exif/user_comment.exif (piexif's bytes, with their `Exif\\0\\0` header).
Run by hand (pip install piexif); never in CI.
"""

from pathlib import Path

import piexif
import piexif.helper

OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/exif"
TEXT = (
    "a lighthouse at dusk, (ünïcode:1.2), 灯台 <lora:dmd2_lora:0.7>\n"
    "Negative prompt: blurry\n"
    "Steps: 4, Sampler: LCM, Schedule type: Simple, CFG scale: 1, Seed: 42, Size: 1024x1024, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, RNG: CPU, Version: dmd2 0.1.0"
)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    exif = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(TEXT, encoding="unicode")}})
    (OUT / "user_comment.txt").write_text(TEXT, encoding="utf-8")
    (OUT / "user_comment.exif").write_bytes(exif)
    print(f"wrote {OUT}: {len(exif)} bytes of EXIF")


if __name__ == "__main__":
    main()
