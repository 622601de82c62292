"""Re-clustering a ``plaid`` index (``mmret recluster``): new centroids and codec from the items.

A plaid index clusters its tokens once, when it first holds ``train_from`` documents (or when
it is built from the item store on open); tokens added later take the nearest existing
centroid. When the collection has drifted (it grew from a small start, or its content
changed), re-clustering trains centroids and the residual codec anew on every stored vector.

It builds the new structure aside, from one snapshot of ``items.sqlite`` (the truth), and
swaps it in by saving it as the cache, which replaces the old one atomically
(:class:`~mmret.index.cache.CacheFiles`). Readers never wait: those already open keep
searching what they loaded, those opening afterwards load the new structure. It holds the
writer lock while it runs, so no writer saves a cache with the old centroids over it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmret.errors import InputError
from mmret.index.base import new_backend
from mmret.index.lock import WriterLock
from mmret.index.manifest import ITEMS_FILE, read_manifest
from mmret.index.plaid import PlaidIndex
from mmret.index.store import ItemStore


@dataclass(frozen=True)
class ReclusterReport:
    """What :func:`recluster_index` built: documents, centroids, and how long it took."""

    folder: str
    documents: int
    centroids: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recluster_index(folder: str | Path, *, wait: float = 10.0) -> ReclusterReport:
    """Re-cluster the plaid index in ``folder`` from its stored vectors (see the module
    docstring); waits up to ``wait`` seconds for a running writer to close."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    start = time.perf_counter()
    lock = WriterLock(folder)
    lock.acquire(wait)
    try:
        store = ItemStore(folder / ITEMS_FILE, manifest.dim, readonly=True)
        try:
            with store.snapshot():
                generation, epoch = store.generation, store.epoch
                backend = new_backend(
                    manifest.backend,
                    manifest.backend_options,
                    manifest.dim,
                    store.recorded_count,
                    manifest.token_dim,
                )
                if not isinstance(backend, PlaidIndex):
                    raise InputError(
                        f"{folder}: its {backend.name!r} backend has no centroids to re-cluster "
                        "(only plaid indexes have)"
                    )
                keys, vectors = store.vectors()
        finally:
            store.close()
        backend.add(keys, vectors)  # an empty backend clusters what it is given
        backend.save(folder, epoch, generation)
    finally:
        lock.release()
    return ReclusterReport(
        str(folder), len(backend), backend.centroid_count, time.perf_counter() - start
    )
