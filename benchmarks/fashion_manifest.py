"""Write a captioned image manifest from Fashion-MNIST, for a second RECO memory from other data.

    python benchmarks/fashion_manifest.py runs/fashion      # then:
    mmret memory build runs/fashion/train.jsonl --out fashion-mnist.memory --max-captions 1

Fashion-MNIST installs with Debian's ``dataset-fashion-mnist`` (MIT) under
``/usr/share/datasets/fashion-mnist``. The first ``--per-class`` training images of each class
are written as PNGs (inverted to dark on white, like product photos) with captions built from
their labels ("a photo of a {class}.", "a {class} on a white background.").
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip


def _read(path: Path) -> bytes:
    with gzip.open(path) as handle:
        return handle.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args()
    images = np.frombuffer(_read(SOURCE / "train-images-idx3-ubyte.gz"), np.uint8, offset=16)
    images = images.reshape(-1, 28, 28)
    labels = np.frombuffer(_read(SOURCE / "train-labels-idx1-ubyte.gz"), np.uint8, offset=8)
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for label, name in enumerate(CLASSES):
        for i in np.flatnonzero(labels == label)[: args.per_class]:
            item = f"fmnist-{i}"
            Image.fromarray(255 - images[i]).convert("RGB").save(
                args.out / "images" / f"{item}.png"
            )
            captions = [f"a photo of a {name}.", f"a {name} on a white background."]
            rows.append({"id": item, "image": f"images/{item}.png", "captions": captions})
    (args.out / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} entries to {args.out / 'train.jsonl'}")


if __name__ == "__main__":
    main()
