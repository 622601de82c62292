"""Encoding throughput of starter encoders, each next to a plain loop over the same model.

    python benchmarks/encode_throughput.py [--models starter starter-v3 starter-v4 starter:DIR]
        [--images 256] [--texts 2048] [--quick]

The reference decodes each image with PIL and calls the towers and the alignment head
directly, batch by batch, with none of mmret's machinery; mmret's number is
``Encoder.encode_images`` / ``encode_texts`` on the same inputs (both take image paths, so
both include JPEG decoding). All runs of one input kind are timed in turns, medians over
``--repeats``, so the models' numbers are comparable even on a busy machine. ``--models``
takes any starter spec (``starter:DIR`` for a trained head, whose towers it names) or an
ensemble of them (``starter-v4``, ``ensemble:DIR``). Images are Flickr8k dev photos when
``../shared/data`` is present, else scikit-image's sample photos repeated.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import FLICKR, RESULTS, interleaved_medians, report
from mmret.demo import write_photos
from mmret.encoders import DEFAULT_MODEL, Encoder, load_encoder
from mmret.encoders.ensemble import EnsembleEncoder
from mmret.encoders.starter import StarterEncoder

FLICKR_DEV = FLICKR / "dev.jsonl"


def inputs(n_images: int, n_texts: int, scratch: Path) -> tuple[list[Path], list[str], str]:
    if FLICKR_DEV.is_file():
        rows = [json.loads(line) for line in FLICKR_DEV.read_text().splitlines()]
        images = [FLICKR_DEV.parent / row["image"] for row in rows]
        texts = [caption for row in rows for caption in row["captions"]]
        source = "Flickr8k dev"
    else:
        images = sorted(write_photos(scratch).glob("*.png"))
        texts = [f"a photo of {p.stem.replace('-', ' ')} number {i}" for i, p in enumerate(images)]
        source = "scikit-image samples"
    repeat = lambda values, n: [values[i % len(values)] for i in range(n)]  # noqa: E731
    return repeat(images, n_images), repeat(texts, n_texts), source


Embed = Callable[[list], torch.Tensor]


def plain_embedders(encoder: Encoder) -> tuple[Embed, Embed]:
    """Image and text embedding by calling the towers and heads directly: a starter model's
    towers and head, or each member of an ensemble (starter-v4) in turn, side by side."""
    if isinstance(encoder, EnsembleEncoder):
        parts = [plain_embedders(member) for member in encoder.members]

        def joined(side: int, batch: list) -> torch.Tensor:
            return torch.cat(
                [torch.nn.functional.normalize(part[side](batch), dim=-1) * w**0.5
                 for part, w in zip(parts, encoder.weights, strict=True)], dim=-1
            )  # fmt: skip

        return (lambda batch: joined(0, batch)), (lambda batch: joined(1, batch))
    assert isinstance(encoder, StarterEncoder), f"{encoder.spec} is not a starter model"
    towers, head = encoder.towers, encoder.head
    return (
        lambda batch: head.image(towers.image_features(batch)),
        lambda batch: head.text(towers.text_features(batch)),
    )


def timed_runs(
    spec: str, images: list[Path], texts: list[str]
) -> dict[str, dict[str, Callable[[], object]]]:
    """``{"images"|"texts": {"SPEC reference"|"SPEC mmret": run}}`` for one starter encoder
    (or an ensemble of them)."""
    encoder = load_encoder(spec)
    embed_image, embed_text = plain_embedders(encoder)

    def reference_images() -> None:
        with torch.inference_mode():
            for start in range(0, len(images), encoder.batch_size):
                batch = [
                    Image.open(p).convert("RGB") for p in images[start : start + encoder.batch_size]
                ]
                embed_image(batch)

    def reference_texts() -> None:
        with torch.inference_mode():
            for start in range(0, len(texts), encoder.batch_size):
                embed_text(texts[start : start + encoder.batch_size])

    check = encoder.encode_texts(texts[:4])
    assert np.allclose(np.linalg.norm(check, axis=1), 1, atol=1e-5)
    return {
        "images": {
            f"{spec} reference": reference_images,
            f"{spec} mmret": lambda: encoder.encode_images(images),
        },
        "texts": {
            f"{spec} reference": reference_texts,
            f"{spec} mmret": lambda: encoder.encode_texts(texts),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["starter", "starter-v3", DEFAULT_MODEL])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "encode_throughput.json")
    args = parser.parse_args()
    if args.quick:
        args.images, args.texts, args.repeats = 32, 128, 1
    with tempfile.TemporaryDirectory() as scratch:
        images, texts, source = inputs(args.images, args.texts, Path(scratch))
        runs = [timed_runs(spec, images, texts) for spec in args.models]
        rows = []
        for kind, n in (("images", len(images)), ("texts", len(texts))):
            medians = interleaved_medians(
                {name: run for model in runs for name, run in model[kind].items()}, args.repeats
            )
            for spec in args.models:
                reference_s, ours_s = medians[f"{spec} reference"], medians[f"{spec} mmret"]
                rows.append([spec, kind, n, n / reference_s, n / ours_s, reference_s / ours_s])
    report(
        f"Encoding throughput, starter models ({source}, batch {StarterEncoder.batch_size})",
        ["model", "inputs", "n", "reference per s", "mmret per s", "mmret / reference"],
        rows,
        args.out,
        {"source": source, "args": {k: str(v) for k, v in vars(args).items()}},
    )


if __name__ == "__main__":
    main()
