"""Token sets for the multi-vector benchmark, drawn like real ones.

Real: the starter image tower's last-layer token features (7 x 7 = 49 tokens of 1,280 dims per
Flickr8k image), read from mmret's layer feature store (``~/.cache/mmret/layers``, filled by
``mmret train hat`` or :func:`mmret.cache.layer_features.layer_feature_set`), centred,
projected to ``token_dim`` by a fixed random Gaussian matrix and made unit. Synthetic (when no
store is there): ``sources`` sets of 49 tokens, each token near one of 4,096 random unit
directions, so tokens cluster the way real features do.

Sources are grouped into topics (k-means on their mean tokens, about 20 sources a topic). A
document is ``tokens`` tokens drawn from the tokens of 3 sources of one topic, each with a
little noise: so documents are all different (no near-copies of one image), yet neighbours
share tokens the way related images or passages do. A query is drawn the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmret.late_interaction import normalise_tokens

_SOURCE_TOKENS = 49
_SOURCES_PER_TOPIC = 20
_SOURCES_PER_DOCUMENT = 3
_SYNTHETIC_DIRECTIONS = 4096
#: Noise added to each picked token before it is made unit (per dimension, relative to 1).
_NOISE = 0.35


@dataclass(frozen=True)
class TokenSources:
    """``(S, 49, token_dim)`` unit tokens, one set per source, and where they came from."""

    tokens: np.ndarray
    origin: str


def store_layers(layer: int = 8) -> list[Path]:
    """Folders of stored image layers ``layer`` in the layer feature store, largest first."""
    from mmret.cache.layer_features import default_store_dir

    found = []
    for folder in default_store_dir().glob(f"*/image-{layer}"):
        try:
            tokens = np.load(folder / "tokens.npy", mmap_mode="r")
            offsets = np.load(folder / "offsets.npy")
        except (OSError, ValueError):
            continue  # being written by another process, or damaged
        if len(offsets) > 1 and offsets[-1] == len(tokens):
            found.append((len(offsets) - 1, folder))
    return [folder for _, folder in sorted(found, reverse=True)]


def _layer(folder: Path) -> np.ndarray:
    """``(S, 49, D)`` float32 token features of one stored image layer."""
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    counts = np.diff(np.load(folder / "offsets.npy"))
    if not (counts == _SOURCE_TOKENS).all():
        raise ValueError(f"{folder}: expected {_SOURCE_TOKENS} tokens per image")
    return np.asarray(tokens, dtype=np.float32).reshape(len(counts), _SOURCE_TOKENS, -1)


def _projector(
    features: np.ndarray, token_dim: int, seed: int
) -> Callable[[np.ndarray], np.ndarray]:
    """Centres by ``features``' mean token and projects to ``token_dim`` unit tokens."""
    mean = features.reshape(-1, features.shape[-1]).mean(axis=0)
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((features.shape[-1], token_dim)).astype(np.float32)

    def project(tokens: np.ndarray) -> np.ndarray:
        flat = (tokens.reshape(-1, tokens.shape[-1]) - mean) @ projection
        return normalise_tokens(flat, None).reshape(*tokens.shape[:-1], token_dim)

    return project


def real_sources(folder: Path, token_dim: int, seed: int = 0) -> TokenSources:
    """Every image's tokens in one stored layer folder, projected to ``token_dim``."""
    features = _layer(folder)
    projected = _projector(features, token_dim, seed)(features)
    return TokenSources(
        projected, f"real: {folder.parent.name}/{folder.name} ({len(features)} images)"
    )


def flickr_collection(token_dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The largest stored image set as ``(S, 49 * token_dim)`` documents and a disjoint
    stored image set (Flickr8k dev beside train) as queries, projected alike; ``None`` when
    the store does not hold two such sets."""
    import json

    folders = store_layers()
    if len(folders) < 2:
        return None

    def image_ids(folder: Path) -> set[str]:
        pairs = json.loads((folder.parent / "pairs.json").read_text())
        return set(pairs["image_ids"])

    documents_folder = folders[0]
    taken = image_ids(documents_folder)
    others = [f for f in folders[1:] if not image_ids(f) & taken]
    if not others:
        return None
    features = _layer(documents_folder)
    project = _projector(features, token_dim, seed)
    documents = project(features).reshape(len(features), -1)
    query_features = _layer(others[0])
    queries = project(query_features).reshape(len(query_features), -1)
    origin = (
        f"{len(documents)} images of {documents_folder.parent.name} searched with "
        f"{len(queries)} images of {others[0].parent.name}"
    )
    return documents, queries, origin


def synthetic_sources(sources: int, token_dim: int, seed: int = 0) -> TokenSources:
    rng = np.random.default_rng(seed)
    directions = normalise_tokens(
        rng.standard_normal((_SYNTHETIC_DIRECTIONS, token_dim)).astype(np.float32), None
    )
    picked = directions[rng.integers(0, _SYNTHETIC_DIRECTIONS, (sources, _SOURCE_TOKENS))]
    noisy = picked + 0.5 * rng.standard_normal(picked.shape).astype(np.float32) / np.sqrt(token_dim)
    tokens = normalise_tokens(noisy.reshape(sources, -1), token_dim)
    return TokenSources(
        tokens.reshape(sources, _SOURCE_TOKENS, token_dim),
        f"synthetic: {sources} sets around {_SYNTHETIC_DIRECTIONS} directions",
    )


def sources(token_dim: int, synthetic: bool = False) -> TokenSources:
    """Real sources when the layer store has them (and ``synthetic`` is not asked for)."""
    folders = [] if synthetic else store_layers()
    if folders:
        return real_sources(folders[0], token_dim)
    return synthetic_sources(6000, token_dim)


def topics(pool: TokenSources, seed: int = 0) -> list[np.ndarray]:
    """Source indices grouped by topic: k-means on each source's mean token."""
    import faiss

    means = normalise_tokens(pool.tokens.mean(axis=1), None)
    count = max(1, len(means) // _SOURCES_PER_TOPIC)
    kmeans = faiss.Kmeans(
        means.shape[1], count, niter=20, seed=seed + 1, spherical=True, min_points_per_centroid=1
    )
    kmeans.train(np.ascontiguousarray(means))
    _, assigned = kmeans.index.search(np.ascontiguousarray(means), 1)
    groups = [np.flatnonzero(assigned[:, 0] == topic) for topic in range(count)]
    return [group for group in groups if len(group)]


def draw(
    pool: TokenSources, groups: list[np.ndarray], count: int, tokens: int, seed: int
) -> np.ndarray:
    """``(count, tokens * token_dim)`` flattened unit token sets (see the module docstring),
    made in chunks so the float scratch stays small."""
    _, per_source, token_dim = pool.tokens.shape
    flat = pool.tokens.reshape(-1, token_dim)
    rng = np.random.default_rng(seed)
    out = np.empty((count, tokens * token_dim), dtype=np.float32)
    for start in range(0, count, 8192):
        size = min(8192, count - start)
        topic = rng.integers(0, len(groups), size)
        sources = np.stack(
            [groups[t][rng.integers(0, len(groups[t]), _SOURCES_PER_DOCUMENT)] for t in topic]
        )  # (size, 3)
        which = rng.integers(0, _SOURCES_PER_DOCUMENT, (size, tokens))
        token = rng.integers(0, per_source, (size, tokens))
        chosen = flat[np.take_along_axis(sources, which, axis=1) * per_source + token]
        noise = rng.standard_normal(chosen.shape, dtype=np.float32)
        chosen += (_NOISE / np.sqrt(token_dim)) * noise
        out[start : start + size] = normalise_tokens(chosen.reshape(size, -1), token_dim)
    return out
