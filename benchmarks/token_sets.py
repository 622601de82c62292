"""Token sets for the multi-vector benchmark, drawn like real ones.

Real: the starter image tower's last-layer token features (7 x 7 = 49 tokens of 1,280 dims per
Flickr8k image), read from mmret's layer feature store (``~/.cache/mmret/layers``, filled by
``mmret train hat`` or :func:`mmret.training.feature_store.layer_feature_set`), centred,
projected to ``token_dim`` by a fixed random Gaussian matrix and made unit. Synthetic (when no
store is there): ``sources`` sets of 49 tokens, each token near one of 4,096 random unit
directions, so tokens cluster the way real features do.

Sources are grouped into topics (k-means on their mean tokens, about 20 sources a topic). A
document is ``tokens`` tokens drawn from the tokens of 3 sources of one topic, each with a
little noise: so documents are all different (no near-copies of one image), yet neighbours
share tokens the way related images or passages do. A query is drawn the same way.
"""

from __future__ import annotations

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
    from mmret.training.feature_store import default_store_dir

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


def real_sources(folder: Path, token_dim: int, seed: int = 0) -> TokenSources:
    """Every image's tokens in one stored layer folder, projected to ``token_dim``."""
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    offsets = np.load(folder / "offsets.npy")
    counts = np.diff(offsets)
    if not (counts == _SOURCE_TOKENS).all():
        raise ValueError(f"{folder}: expected {_SOURCE_TOKENS} tokens per image")
    features = np.asarray(tokens, dtype=np.float32)
    features -= features.mean(axis=0)
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((features.shape[1], token_dim)).astype(np.float32)
    projected = normalise_tokens(features @ projection, None)
    return TokenSources(
        projected.reshape(len(counts), _SOURCE_TOKENS, token_dim),
        f"real: {folder.parent.name}/{folder.name} ({len(counts)} images)",
    )


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
    kmeans = faiss.Kmeans(means.shape[1], count, niter=20, seed=seed + 1, spherical=True)
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
