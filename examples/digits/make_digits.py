"""Write scikit-learn's handwritten digits as PNG files plus a LLaVA-format conversation
dataset, for `raybench data import` (issue 30, item 5: a real-image example).

The data: `sklearn.datasets.load_digits()`, 1797 real 8x8 handwritten digits (0-9) from the
UCI "Optical Recognition of Handwritten Digits" data set (Alpaydin & Kaynak), licensed
CC BY 4.0; it ships inside scikit-learn, so nothing is downloaded.

Each digit becomes `OUT/images/NNNN.png` (NNNN its index in `load_digits()`): 32x32 pixels,
8x8 upscaled by nearest neighbour, greyscale ("L" mode) with dark ink on a light background
(grey = 255 - value * 255 / 16, for the 0..16 values of the source). `OUT/digits.json` holds
one LLaVA record per image, a three-turn conversation:

    user: "<image>\\nWhich digit is this?"    assistant: "seven"
    user: "Is it odd?"                        assistant: "yes"
    user: "Is it greater than four?"          assistant: "yes"

No `split` and no `qtype` fields: the importer's hash of the image bytes makes the 80/20
train/val split by image with `--val-fraction 0.2`. The output is deterministic.

Usage:

    python examples/digits/make_digits.py --out runs/digits-src
    raybench data import --format llava runs/digits-src/digits.json --out runs/digits-data --val-fraction 0.2

(`--limit N` writes only the first N digits.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE = 32


def digit_png(pixels: np.ndarray, path: Path) -> None:
    """An 8x8 array of 0..16 ink values as a SIZE x SIZE dark-on-light greyscale PNG."""
    grey = (255 - np.rint(pixels.astype(np.float64) * 255 / 16)).clip(0, 255).astype(np.uint8)
    scale = SIZE // grey.shape[0]
    Image.fromarray(np.kron(grey, np.ones((scale, scale), np.uint8)), mode="L").save(path, format="PNG")


def conversation(digit: int) -> list[dict[str, str]]:
    yes_no = ("no", "yes")
    return [{"from": "human", "value": "<image>\nWhich digit is this?"},
            {"from": "gpt", "value": WORDS[digit]},
            {"from": "human", "value": "Is it odd?"},
            {"from": "gpt", "value": yes_no[digit % 2]},
            {"from": "human", "value": "Is it greater than four?"},
            {"from": "gpt", "value": yes_no[digit > 4]}]


def make_digits(out: str | Path, limit: int | None = None) -> Path:
    """Write the PNGs and `digits.json` under `out`; returns the JSON's path."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target) if limit is None else min(limit, len(digits.target))
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = f"images/{i:04d}.png"
        digit_png(digits.images[i], out / name)
        records.append({"id": f"digits-{i:04d}", "image": name,
                        "conversations": conversation(int(digits.target[i]))})
    path = out / "digits.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (images/ and digits.json)")
    parser.add_argument("--limit", type=int, help="only the first N digits")
    args = parser.parse_args(argv)
    path = make_digits(args.out, args.limit)
    print(f"wrote {path} and {path.parent / 'images'}/; next: raybench data import --format llava "
          f"{path} --out <DIR> --val-fraction 0.2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
