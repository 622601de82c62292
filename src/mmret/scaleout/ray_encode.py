"""Distributed encoding on Ray Data: ``mmret index SRC --out DIR --ray [ADDRESS]``.

The source is read on the driver with mmret's own readers and cut into shards
(:mod:`mmret.scaleout.shards`). Ray Data runs the unfinished shards through a pool of actors,
each holding one instance of the index's encoder (loaded once per worker, not per shard); a
worker returns its shard's Parquet bytes and the driver writes them into the staging folder,
aside and renamed into place. Only then are the shards loaded into the index, in order, through
the same path :meth:`Retriever.add <mmret.Retriever.add>` stores with (ids already indexed
skipped, one transaction per chunk), so SQLite metadata, backends, ``check`` and ``repair`` see
an index like any other. A run stopped at any point (an error, Ctrl-C, ``kill -9``) and
started again with the same arguments skips the finished shards.

Workers open the images by the paths the driver read, so on a cluster of several machines the
source must be where every machine sees it at the same path (a shared file system).
mmret's encoders run on CPU: each worker takes one CPU of the cluster.
"""

from __future__ import annotations

import logging
import shutil
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmret._files import write_atomic
from mmret._progress import progress
from mmret.adding import ADD_CHUNK, AddReport
from mmret.encoders import load_encoder
from mmret.errors import InputError
from mmret.scaleout.shards import (
    DEFAULT_SHARD_SIZE,
    encode_shard,
    finished_shards,
    plan_shards,
    read_shard,
    shard_inputs,
    shard_path,
)

if TYPE_CHECKING:
    from mmret.engine import Retriever


@dataclass
class RayReport(AddReport):
    """An :class:`~mmret.AddReport` of a distributed run, with which shards it encoded and
    which it found finished by an earlier run."""

    shards: int = 0
    encoded: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    workers: int = 0


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError(
            "--ray needs Ray Data, which is not installed: pip install 'mmret[ray]'"
        ) from None
    return ray


class ShardEncoder:
    """A Ray Data actor: one encoder, loaded once, turning shards into Parquet bytes.

    Called on batches of ``{"shard": (B,) ints, "items": (B,) JSON texts}``; returns
    ``{"shard": (B,), "data": (B,) bytes}``.
    """

    def __init__(self, model: str) -> None:
        self.encoder = load_encoder(model)
        self.pool = ThreadPoolExecutor(max_workers=2)  # decodes images beside the encoding

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        numbers = [int(n) for n in batch["shard"]]
        data = [
            encode_shard(self.encoder, number, str(items), self.pool)
            for number, items in zip(numbers, batch["items"], strict=True)
        ]
        return {"shard": numbers, "data": data}


@contextmanager
def _cluster(address: str | None) -> Iterator[Any]:
    """Ray, connected: to ``address`` (``"auto"``: the cluster this machine belongs to), to
    the cluster this process already joined, or to a local one started for this run."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        if address and address != "auto":
            check_reachable(address)
        try:
            ray.init(
                address=address or None,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        except ConnectionError as error:
            raise InputError(f"cannot reach a Ray cluster at {address!r} ({error})") from None
        started = True
    context = ray.data.DataContext.get_current()
    was = context.enable_progress_bars
    context.enable_progress_bars = False  # mmret draws its own bar, one step per shard
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # not 'progress bars disabled'
    try:
        yield ray
    finally:
        context.enable_progress_bars = was
        data_logger.setLevel(level)
        if started:
            ray.shutdown()


def check_reachable(address: str) -> None:
    """Fail at once when nothing answers at a ``HOST:PORT`` or ``ray://HOST:PORT`` address
    (Ray itself retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # not a form checked here: Ray reads it
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise InputError(f"no Ray cluster answers at {address} ({error})") from None


def encode_shards(
    staging: Path,
    model: str,
    *,
    source: str | Path,
    address: str | None = None,
    workers: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    present: Callable[[list[str]], set[str]] | None = None,
    on_shard: Callable[[int], None] | None = None,
    show_progress: bool = False,
) -> RayReport:
    """Encode ``source`` into Parquet shards in ``staging`` on a Ray cluster, skipping the
    shards an earlier run finished. ``workers`` actors (default: one per CPU of the cluster)
    each load ``model`` once; ``on_shard`` is called with each shard's number once its file is
    written. See :func:`mmret.scaleout.shards.plan_shards` for ``present``."""
    if workers is not None and workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    with _cluster(address) as ray:
        plan = plan_shards(staging, source, model, shard_size, present)
        done = finished_shards(staging, plan)
        report = RayReport(
            skipped=plan.report(), shards=len(plan.fingerprints), reused=sorted(done)
        )
        todo = [{"shard": n, "items": items} for n, items in shard_inputs(staging) if n not in done]
        if not todo:
            return report
        size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        report.workers = min(size, len(todo))
        dataset = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            ShardEncoder,
            fn_constructor_kwargs={"model": model},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=report.workers),
            num_cpus=1,
        )
        batches = dataset.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0)
        for batch in progress(
            batches, total=len(todo), description="Encoding shards", enabled=show_progress
        ):
            for number, data in zip(batch["shard"], batch["data"], strict=True):
                write_atomic(shard_path(staging, int(number)), bytes(data))
                report.encoded.append(int(number))
                if on_shard is not None:
                    on_shard(int(number))
    return report


def add_with_ray(
    retriever: Retriever,
    source: str | Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    staging: str | Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    keep_shards: bool = False,
    on_shard: Callable[[int], None] | None = None,
    show_progress: bool = False,
) -> RayReport:
    """Add a folder or manifest to ``retriever`` with its items encoded on a Ray cluster.

    The shards are staged in ``staging`` (default: ``<index folder>.ray-shards`` beside the
    index), loaded into the index once all are encoded, and deleted then unless
    ``keep_shards``. Run again with the same arguments after an interruption, it encodes only
    the shards not yet finished. Results are those of ``retriever.add(read_items(source))``:
    the same items and skips, bit for bit the same vectors.

    >>> import mmret                                                  # doctest: +SKIP
    >>> with mmret.Retriever.create("photos.mmret") as retriever:
    ...     mmret.add_with_ray(retriever, "photos/", address="ray://head:10001")
    """
    if retriever.readonly:
        raise InputError(f"{retriever.folder}: opened read-only")
    if retriever.refiner is not None or retriever.token_spec is not None:
        raise InputError(
            f"{retriever.folder}: --ray does not encode with a memory or store token features "
            "for reranking; index this one without --ray"
        )
    folder = Path(staging) if staging is not None else _default_staging(retriever.folder)
    model = retriever.manifest.encoder
    report = encode_shards(
        folder,
        model,
        source=source,
        address=address,
        workers=workers,
        shard_size=shard_size,
        present=retriever.existing_ids,
        on_shard=on_shard,
        show_progress=show_progress,
    )
    numbers = range(report.shards)
    for number in progress(
        numbers, total=len(numbers), description="Loading shards", enabled=show_progress
    ):
        items, vectors, skipped = read_shard(shard_path(folder, number), retriever.manifest.dim)
        report.skipped.merge(skipped)
        for start in range(0, len(items), ADD_CHUNK):
            report.added += retriever.add(
                items[start : start + ADD_CHUNK],
                vectors=vectors[start : start + ADD_CHUNK],
                report=report.skipped,
            ).added
    if not keep_shards:
        shutil.rmtree(folder, ignore_errors=True)
    return report


def _default_staging(index_folder: Path) -> Path:
    return index_folder.with_name(f"{index_folder.name}.ray-shards")
