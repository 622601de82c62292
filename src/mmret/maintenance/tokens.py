"""Checking and rebuilding the token features kept beside an index (:mod:`.token_store`).

``mmret check`` verifies that every item has a ``tokens`` row and no row lacks an item, that
each row's ranges lie inside the files, and that the bytes there still hash to the row's
digest. ``mmret repair`` computes the features of the items that fail again, from their stored
image paths and texts, appends them (the files only grow, so a crash during repair leaves the
old rows in force) and records where they lie in one transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mmret.encoders import load_encoder
from mmret.encoders.base import Encoder, batched
from mmret.errors import ImageLoadError
from mmret.index.manifest import ITEMS_FILE, IndexManifest
from mmret.index.store import ItemStore
from mmret.index.token_store import TokenFiles, TokenRef, token_digest
from mmret.items import Query
from mmret.reranker import TokenFeatureSpec, token_features

if TYPE_CHECKING:
    from pathlib import Path

    from mmret.maintenance.report import CheckReport

_SHOWN = 5
_BATCH = 32


def _files(folder: Path, manifest: IndexManifest) -> TokenFiles:
    assert manifest.token_features is not None
    return TokenFiles(folder, TokenFeatureSpec.from_dict(manifest.token_features))


def damaged_tokens(
    store: ItemStore, files: TokenFiles, keys: np.ndarray
) -> tuple[list[int], list[str], int]:
    """Keys of items whose token features are missing or damaged, why (a few lines), and how
    many ``tokens`` rows belong to no item."""
    if not store.has_tokens:
        return [int(k) for k in keys], [f"{store.path}: has no tokens table"], 0
    refs = store.token_refs()
    bad, why = [], []
    for key in keys.tolist():
        ref = refs.get(key)
        if ref is None:
            bad.append(key)
            why.append(f"row {key}: no stored token features")
            continue
        try:
            image, text = files.item_bytes(ref)
        except IndexError as error:
            bad.append(key)
            why.append(f"row {key}: token features beyond the end of the file ({error})")
            continue
        if token_digest(image, text) != ref.digest:
            bad.append(key)
            why.append(f"row {key}: token features damaged (digest mismatch)")
    stray = len(set(refs) - set(keys.tolist()))
    return bad, why, stray


def check_tokens(
    store: ItemStore,
    manifest: IndexManifest,
    folder: Path,
    report: CheckReport,
    keys: np.ndarray,
) -> None:
    files = _files(folder, manifest)
    bad, why, stray = damaged_tokens(store, files, keys)
    for line in why[:_SHOWN]:
        report.problem("tokens", f"{files.folder}: {line}")
    if len(why) > _SHOWN:
        report.problem("tokens", f"{files.folder}: {len(bad)} items in all (repair rebuilds them)")
    if stray:
        report.problem("tokens", f"{store.path}: {stray} token rows belong to no item")


def repair_tokens(
    folder: Path, manifest: IndexManifest, actions: list[str], encoder: Encoder | None
) -> None:
    """Compute again the token features of items whose features are missing or damaged."""
    files = _files(folder, manifest)
    spec = files.spec
    store = ItemStore(folder / ITEMS_FILE, manifest.dim)
    try:
        if not store.has_tokens:
            store.create_tokens_table()
        keys = np.asarray([row[0] for row in store.scan()], dtype=np.int64)
        bad, _, stray = damaged_tokens(store, files, keys)
        if not bad and not stray:
            return
        backbone = encoder or load_encoder(spec.backbone)
        rows = store.rows(bad)
        rebuilt: dict[int, TokenRef] = {}
        lost = []
        for chunk in batched(bad, _BATCH):
            contents, chunk_keys = [], []
            for key in chunk:
                item = rows[key]
                try:
                    image = backbone.load(item.image) if item.image is not None else None
                except ImageLoadError:
                    lost.append(item.id)
                    continue
                contents.append(Query(text=item.text, image=image))
                chunk_keys.append(key)
            if contents:
                refs = files.append(token_features(backbone, spec, contents))
                rebuilt.update(zip(chunk_keys, refs, strict=True))
        store.set_token_refs(rebuilt)  # also drops rows that belong to no item
    finally:
        store.close()
    actions.append(f"computed the token features of {len(rebuilt)} items again")
    if stray:
        actions.append(f"removed {stray} token rows that belonged to no item")
    if lost:
        actions.append(
            f"{len(lost)} items have no token features (their images cannot be read, e.g. "
            f"{lost[:3]}): remove them or index them again"
        )
