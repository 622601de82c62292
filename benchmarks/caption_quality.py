"""Retrieval-augmented captioning on Flickr8k dev: which of relevance, modality and diversity
help, against the same decoder without retrieval and the consensus captioner.

    python benchmarks/caption_quality.py --memory f8k-train.mmret \
        [--mixed-memory f8k-train-mixed.mmret] [--decoder DIR --alpha A] \
        [--compare DIR --compare-alpha B] [--baseline DIR] [--limit N] [--jobs 2]

Every row is one ``mmret eval caption`` run (BLEU-4 and CIDEr with the COCO caption evaluation
code, no METEOR) over the dev images, whose embeddings mmret caches. ``--memory`` is an index
of Flickr8k train (``mmret index ../shared/data/flickr8k/train.jsonl``); ``--mixed-memory`` one
of the manifest ``benchmarks/mixed_memory.py`` writes (a third of the documents image+text, a
third image-only, a third text-only), where the policy's modality knob has something to
choose. ``--decoder`` defaults to the shipped decoder (its rows labelled with ``--alpha``);
``--compare`` is the same recipe trained with another alpha (one row: relevance only, image+text
documents) and ``--baseline`` the decoder trained without retrieval (``--documents 0``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import FLICKR, RESULTS, report, require_flickr


def evaluate(memory: Path, options: list[str], limit: int | None) -> dict[str, float]:
    """BLEU-4 and CIDEr of one ``mmret eval caption`` run on Flickr8k dev."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "caption.json"
        command = [
            str(Path(sys.executable).parent / "mmret"), "eval", "caption",
            str(FLICKR / "dev.jsonl"),
            "--memory", str(memory), "--no-meteor", "--json", str(out), *options,
            *(["--limit", str(limit)] if limit else []),
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        record = json.loads(out.read_text())
    return {"BLEU-4": record["BLEU-4"], "CIDEr": record["CIDEr"]}


def decoder_rows(
    alpha: str, decoder: str, memory: Path, mixed: Path | None, diversity: float
) -> list[tuple[str, str, Path, list[str]]]:
    """The ablation rows of one decoder: what it reads of each document, beam width, diversity
    and, on the mixed memory, the policy's modality."""
    relevance = ["--model", decoder, "--modality", "any", "--diversity", "0"]
    rows = [
        (label, alpha, memory, options)
        for label, options in (
            ("relevance only, documents' captions only", [*relevance, "--read", "text"]),
            ("relevance only, documents' embeddings only", [*relevance, "--read", "vector"]),
            ("relevance only, image+text documents", relevance),
            ("the same, greedy decoding (beam 1)", [*relevance, "--beam", "1"]),
            (f"+ diversity {diversity}", [*relevance[:-1], str(diversity)]),
        )
    ]
    if mixed is not None:
        for modality in ("any", "prefer", "require"):
            options = ["--model", decoder, "--modality", modality, "--diversity", "0"]
            rows.append((f"mixed memory, modality {modality}", alpha, mixed, options))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=Path, required=True)
    parser.add_argument("--mixed-memory", type=Path)
    parser.add_argument("--decoder", default="decoder", help="A decoder folder (default: shipped).")
    parser.add_argument("--alpha", default="chosen", help="--decoder's alpha, for the table.")
    parser.add_argument("--compare", help="The decoder trained with another alpha.")
    parser.add_argument("--compare-alpha", default="other", help="--compare's alpha.")
    parser.add_argument("--baseline", help="The decoder trained without retrieval.")
    parser.add_argument("--diversity", type=float, default=0.3)
    parser.add_argument("--limit", type=int, help="Only the first N dev images.")
    parser.add_argument("--jobs", type=int, default=1, help="Rows evaluated at once.")
    parser.add_argument(
        "--consensus", action=argparse.BooleanOptionalAction, default=True, help="Its row too."
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "caption_quality.json")
    args = parser.parse_args()
    require_flickr()
    rows: list[tuple[str, str, Path, list[str]]] = []
    if args.baseline:
        rows.append(("decoder without retrieval", "-", args.memory, ["--model", args.baseline]))
    rows += decoder_rows(args.alpha, args.decoder, args.memory, args.mixed_memory, args.diversity)
    if args.compare:
        relevance = ["--model", args.compare, "--modality", "any", "--diversity", "0"]
        label = "relevance only, image+text documents"
        rows.append((label, args.compare_alpha, args.memory, relevance))
    if args.consensus:
        rows.append(("consensus of 10 neighbours", "-", args.memory, ["--model", "consensus"]))
    with ThreadPoolExecutor(args.jobs) as pool:
        scores = list(pool.map(lambda row: evaluate(row[2], row[3], args.limit), rows))
    results = [
        [label, alpha, round(s["BLEU-4"], 2), round(s["CIDEr"], 2)]
        for (label, alpha, _, _), s in zip(rows, scores, strict=True)
    ]
    report(
        "Retrieval-augmented captioning, Flickr8k dev",
        ["captioner", "alpha", "BLEU-4", "CIDEr"],
        results,
        args.out,
        {"memory": str(args.memory), "mixed_memory": str(args.mixed_memory), "limit": args.limit},
    )


if __name__ == "__main__":
    main()
