"""Write a mixed-modality memory manifest from Flickr8k train: a third of the images keep their
captions (image+text documents), a third lose them (image-only), a third lose the image
(text-only documents), in file order. It is what makes the retrieval policy's modality knob
matter in the captioning table (an all-pairs memory has nothing to prefer).

    python benchmarks/mixed_memory.py mixed.jsonl
    mmret index mixed.jsonl --out f8k-train-mixed.mmret
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import FLICKR

KINDS = ("image+text", "image", "text")


def mixed_rows(manifest: Path) -> list[dict[str, object]]:
    rows = []
    for number, line in enumerate(manifest.read_text().splitlines()):
        record = json.loads(line)
        kind = KINDS[number % len(KINDS)]
        row: dict[str, object] = {"id": record["id"], "kind": kind}
        if kind != "text":
            row["image"] = str((manifest.parent / record["image"]).resolve())
        if kind != "image":
            row["captions"] = record["captions"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="Where to write the mixed manifest (JSONL).")
    parser.add_argument("--train", type=Path, default=FLICKR / "train.jsonl")
    args = parser.parse_args()
    if not args.train.is_file():
        raise SystemExit(f"{args.train}: Flickr8k train is not there (see ../shared/data)")
    rows = mixed_rows(args.train)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} documents to {args.out}")


if __name__ == "__main__":
    main()
