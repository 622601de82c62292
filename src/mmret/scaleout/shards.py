"""A source cut into shards of items, each encoded into a Parquet file: the unit of work of
distributed encoding (:mod:`mmret.scaleout.ray_encode`), and of resuming it.

A staging folder holds:

``plan.json``
    What the shards are: the source, the encoder spec, the shard size, one fingerprint per
    shard (a hash of its items) and what reading the source skipped. Written once, last, so a
    plan on disk is whole; a restarted run reuses it rather than reading the source again.
``inputs.jsonl``
    Line ``i``: shard ``i``'s items as a JSON list of ``{"id", "text", "image", "metadata"}``.
``shard-00000.parquet``, ...
    One per encoded shard: the columns ``id``, ``text``, ``image``, ``metadata`` (JSON) and
    ``vector`` (``dim`` float32: the embedding, or for a multi-vector model its tokens
    flattened, as the index stores them), plus in the file's metadata the shard's number, its
    fingerprint and what encoding skipped (images that do not decode). Written aside and renamed
    into place, so a shard file is finished or absent; a restarted run skips the finished ones.

Shards hold a multiple of 256 items, the chunk :meth:`Retriever.add <mmret.Retriever.add>`
encodes at a time, so each chunk reaches the encoder exactly as in one process and the vectors
are bit for bit those of ``add``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmret._files import write_atomic
from mmret.adding import ADD_CHUNK, encode_items
from mmret.encoders.base import Encoder, batched
from mmret.errors import IndexFormatError, InputError
from mmret.index.store import StoredItem
from mmret.ingest.report import SkipReport
from mmret.ingest.sources import read_records
from mmret.items import Item

PLAN_FILE = "plan.json"
INPUTS_FILE = "inputs.jsonl"
DEFAULT_SHARD_SIZE = 16 * ADD_CHUNK  # 4,096 items
_KEY = b"mmret.shard"  # the Parquet key-value metadata of a shard file


@dataclass(frozen=True)
class ShardPlan:
    """What a staging folder's shards are (see the module docstring)."""

    source: str
    model: str
    shard_size: int
    fingerprints: tuple[str, ...]
    skipped: int = 0
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardPlan:
        return cls(
            source=str(data["source"]),
            model=str(data["model"]),
            shard_size=int(data["shard_size"]),
            fingerprints=tuple(str(f) for f in data["fingerprints"]),
            skipped=int(data.get("skipped", 0)),
            reasons=tuple(str(r) for r in data.get("reasons", ())),
        )

    def report(self) -> SkipReport:
        """What reading the source skipped."""
        return SkipReport(self.skipped, list(self.reasons))


def check_shard_size(size: int) -> None:
    if size < ADD_CHUNK or size % ADD_CHUNK:
        raise InputError(f"shard size must be a positive multiple of {ADD_CHUNK}, got {size}")


def plan_shards(
    staging: Path,
    source: str | Path,
    model: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    present: Callable[[list[str]], set[str]] | None = None,
) -> ShardPlan:
    """The plan in ``staging``, made from ``source`` unless a plan is already there.

    ``present`` (ids -> those already indexed) leaves those items out of a new plan, recorded
    as skipped the way :meth:`Retriever.add <mmret.Retriever.add>` records them. A plan found
    for another source, model or shard size is refused: its shards are not this run's.
    """
    check_shard_size(shard_size)
    source = str(Path(source).absolute())
    found = read_plan(staging)
    if found is not None:
        theirs = (found.source, found.model, found.shard_size)
        if theirs != (source, model, shard_size):
            raise InputError(
                f"{staging} holds the shards of another run (source {found.source}, model "
                f"{found.model}, shard size {found.shard_size}); delete it or stage elsewhere"
            )
        return found
    report = SkipReport()
    staging.mkdir(parents=True, exist_ok=True)
    lines, fingerprints = [], []
    for shard in batched(list(read_records(source, report)), shard_size):
        items = [record.to_item() for record in shard]
        if present is not None:
            there = present([item.id for item in items])
            for item in items:
                if item.id in there:
                    report.skip(f"{item.id}: already in the index")
            items = [item for item in items if item.id not in there]
        if items:
            line = json.dumps([_item_dict(item) for item in items], ensure_ascii=False)
            lines.append(line)
            fingerprints.append(_fingerprint(line))
    write_atomic(staging / INPUTS_FILE, "".join(f"{line}\n" for line in lines).encode())
    plan = ShardPlan(
        source, model, shard_size, tuple(fingerprints), report.skipped, tuple(report.reasons)
    )
    write_atomic(staging / PLAN_FILE, json.dumps(plan.to_dict(), indent=1).encode())
    return plan


def read_plan(staging: Path) -> ShardPlan | None:
    path = staging / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return ShardPlan.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise IndexFormatError(f"{path}: unreadable shard plan ({error})") from None


def shard_inputs(staging: Path) -> Iterator[tuple[int, str]]:
    """Each shard's number and its items as JSON (``inputs.jsonl``'s lines)."""
    with (staging / INPUTS_FILE).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            yield number, line.rstrip("\n")


def shard_path(staging: Path, number: int) -> Path:
    return staging / f"shard-{number:05d}.parquet"


def finished_shards(staging: Path, plan: ShardPlan) -> set[int]:
    """The shards whose file is there and was written for this plan's items."""
    import pyarrow.parquet as pq

    done = set()
    for number, fingerprint in enumerate(plan.fingerprints):
        path = shard_path(staging, number)
        if not path.is_file():
            continue
        try:
            written = json.loads(pq.read_schema(path).metadata[_KEY])
        except Exception:  # a foreign or damaged file (pyarrow raises several types): redo it
            continue
        if written.get("fingerprint") == fingerprint:
            done.add(number)
    return done


def encode_shard(encoder: Encoder, number: int, items_json: str, pool: ThreadPoolExecutor) -> bytes:
    """Shard ``number``'s items (JSON, a line of ``inputs.jsonl``) encoded into the bytes of
    its Parquet file, a chunk of 256 at a time as :meth:`Retriever.add` encodes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    report = SkipReport()
    items = [Item(**row) for row in json.loads(items_json)]
    kept: list[StoredItem] = []
    parts = []
    for chunk in batched(items, ADD_CHUNK):
        _, stored, vectors = encode_items(encoder, list(chunk), report, pool)
        kept += stored
        parts.append(vectors)
    vectors = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)
    table = pa.table(
        {
            "id": pa.array([item.id for item in kept], pa.string()),
            "text": pa.array([item.text for item in kept], pa.string()),
            "image": pa.array([item.image for item in kept], pa.string()),
            "metadata": pa.array([json.dumps(item.metadata) for item in kept], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), encoder.dim
            ),
        }
    )
    written = {
        "shard": number,
        "fingerprint": _fingerprint(items_json),
        "model": encoder.spec,
        "skipped": report.skipped,
        "reasons": report.reasons,
    }
    table = table.replace_schema_metadata({_KEY: json.dumps(written).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def read_shard(path: Path, dim: int) -> tuple[list[Item], np.ndarray, SkipReport]:
    """A shard file's items, their ``(N, dim)`` vectors and what encoding them skipped."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        written = json.loads(table.schema.metadata[_KEY])
        flat = table.column("vector").combine_chunks().flatten().to_numpy()
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise IndexFormatError(f"{path}: cannot be read as an encoded shard ({error})") from None
    vectors = np.asarray(flat, dtype=np.float32).reshape(-1, dim)
    items = [
        Item(id=row["id"], text=row["text"], image=row["image"], metadata=json.loads(meta))
        for row, meta in zip(
            table.select(["id", "text", "image"]).to_pylist(),
            table.column("metadata").to_pylist(),
            strict=True,
        )
    ]
    return items, vectors, SkipReport(int(written["skipped"]), list(written["reasons"]))


def _item_dict(item: Item) -> dict[str, Any]:
    return {
        "id": item.id,
        "text": item.text,
        "image": item.image_path,
        "metadata": dict(item.metadata),
    }


def _fingerprint(items_json: str) -> str:
    return hashlib.sha256(items_json.encode()).hexdigest()[:32]
