"""Cross-fitted training data: what a head on top of a frozen model sees in training, as it
will see it in use (RECO's fusion, ReT's global path).

A RECO fusion refines an embedding with the memory's knowledge. When the frozen model's own
alignment was trained on the very pairs the fusion trains on (mmret's starter models and a
Flickr8k memory), those pairs are embedded far better than any unseen one: the model ranks
its training pairs nearly perfectly, so a fusion trained on them learns that the memory has
nothing to add, and does no better than the frozen model on new data.

Cross-fitting (as in stacking) removes that gap. The training pairs are cut into ``K`` folds;
for each fold an alignment is retrained with the model's own recipe on the other folds; that
fold's pairs, which it never saw, are embedded by it and search a memory of the other folds'
pairs, which it did see. That is the situation of a new query against the real memory (built by
the model from its own training set), so the fusion learns from neighbours as they really come.
Only the training data changes: the trained fusion refines the real model's embeddings with the
real memory, and is chosen on dev that way.

The same gap stops ReT's latent tokens from learning on top of the starter head they copy
(:func:`out_of_fold_embeddings` gives the head's vectors of each training row from an
alignment that never saw it; :mod:`mmret.training.ret`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from mmret._progress import progress
from mmret.cache.embeddings import PairEmbeddings
from mmret.cache.tower_features import PairFeatures, pair_features
from mmret.encoders.base import Encoder
from mmret.encoders.ensemble import EnsembleEncoder
from mmret.encoders.starter import StarterEncoder
from mmret.encoders.towers import StarterTowers
from mmret.errors import InputError
from mmret.ingest.pairs import PairSet
from mmret.items import Item
from mmret.memory.store import Memory, Modality, write_memory
from mmret.training.align import AlignTrainingConfig, embed_pairs, train_alignment
from mmret.training.knowledge import ClassKnowledge, imagenet_knowledge
from mmret.training.reco import RecoFold, RecoTrainingConfig, reco_data
from mmret.training.record import TRAINING_RECORD


def retrainable(encoder: Encoder) -> bool:
    """Whether cross-fitting can retrain ``encoder``'s alignment: a model trained by
    ``mmret train align`` whose folder records its recipe."""
    if not isinstance(encoder, StarterEncoder) or encoder.folder is None:
        return False
    return (encoder.folder / TRAINING_RECORD).is_file()


def alignment_recipe(encoder: Encoder) -> AlignTrainingConfig:
    """The recipe ``encoder``'s alignment was trained with (its folder's training record)."""
    if not isinstance(encoder, StarterEncoder):
        raise InputError(
            f"cross-fitting retrains the model's alignment, so it needs a model trained by "
            f"`mmret train align` (starter, starter-v3, starter:DIR) or an ensemble of such "
            f"models (starter-v4); {encoder.spec!r} is not one"
        )
    folder = encoder.folder
    if folder is None or not (folder / TRAINING_RECORD).is_file():
        where = "it was not loaded from a folder" if folder is None else f"{folder} has none"
        raise InputError(
            f"cross-fitting needs the recipe {encoder.spec!r} was trained with "
            f"({TRAINING_RECORD}), and {where}"
        )
    record = folder / TRAINING_RECORD
    recorded = json.loads(record.read_text())["config"]
    known = {f.name for f in fields(AlignTrainingConfig)}
    return AlignTrainingConfig(**{k: v for k, v in recorded.items() if k in known})


@dataclass(frozen=True)
class _Member:
    """One alignment model to retrain per fold: its training features, recipe, ImageNet
    knowledge (when its recipe distils it) and its weight in the encoder (1 alone)."""

    features: PairFeatures
    recipe: AlignTrainingConfig
    knowledge: ClassKnowledge | None
    weight: float

    @classmethod
    def of(
        cls,
        recipe: AlignTrainingConfig,
        towers: StarterTowers,
        features: PairFeatures,
        weight: float,
        *,
        cache_dir: Path | None,
        show_progress: bool,
    ) -> _Member:
        """An alignment to retrain with ``recipe`` on ``features`` of ``towers``, with the
        ImageNet knowledge the recipe distils."""
        knowledge = None
        if recipe.imagenet_weight > 0:
            knowledge = imagenet_knowledge(
                towers, features, cache_dir=cache_dir, show_progress=show_progress
            )
        return cls(features, recipe, knowledge, weight)

    def fold_embeddings(self, rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every training image's and caption's embedding by an alignment trained on the
        images ``rest`` only, scaled as the encoder scales this member."""
        knowledge = None
        if self.knowledge is not None:
            logits = np.asarray(self.knowledge.image_logits)[rest]
            knowledge = ClassKnowledge(self.knowledge.class_text, logits)
        head, _ = train_alignment(
            _subset(self.features, rest), None, self.recipe, knowledge=knowledge
        )
        image, text = embed_pairs(head, self.features)
        scale = np.float32(np.sqrt(self.weight))
        return image * scale, text * scale


def fold_splits(count: int, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint sorted arrays of rows that together cover ``range(count)``, drawn
    at random (seeded); raises :class:`InputError` unless ``2 <= folds <= count``."""
    if not 2 <= folds <= count:
        raise InputError(
            f"cross-fitting needs 2 to {count} folds (one per training image at most), got {folds}"
        )
    order = np.random.default_rng(seed).permutation(count)
    return [np.sort(held) for held in np.array_split(order, folds)]


def out_of_fold_embeddings(
    encoder: Encoder,
    features: PairFeatures,
    folds: int,
    seed: int,
    *,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Unit ``(N, E)`` image and ``(T, E)`` caption embeddings of ``features``, each made by
    ``encoder``'s alignment retrained with its own recipe on the ``folds - 1`` folds that leave
    that image (and its captions) out: how the real alignment embeds data it never saw."""
    recipe = alignment_recipe(encoder)
    assert isinstance(encoder, StarterEncoder)
    member = _Member.of(
        recipe, encoder.towers, features, 1.0, cache_dir=cache_dir, show_progress=show_progress
    )
    owner = np.asarray(features.text_image)
    image = np.zeros((len(features.image_ids), recipe.embed_dim), dtype=np.float32)
    text = np.zeros((len(owner), recipe.embed_dim), dtype=np.float32)
    splits = fold_splits(len(features.image_ids), folds, seed)
    for held in progress(
        splits,
        total=folds,
        description="Cross-fitting (an alignment per fold)",
        enabled=show_progress,
    ):
        fold_image, fold_text = member.fold_embeddings(np.setdiff1d(np.arange(len(image)), held))
        captions = np.isin(owner, held)
        image[held], text[captions] = fold_image[held], fold_text[captions]
    return image, text


def _members(
    encoder: Encoder, pairs: PairSet, cache_dir: Path | None, show_progress: bool
) -> list[_Member]:
    """``encoder``'s retrainable alignments: itself, or an ensemble's members."""
    parts: list[tuple[Encoder, float]] = [(encoder, 1.0)]
    if isinstance(encoder, EnsembleEncoder):
        parts = list(zip(encoder.members, encoder.weights, strict=True))
    members = []
    for part, weight in parts:
        recipe = alignment_recipe(part)
        assert isinstance(part, StarterEncoder)
        features = pair_features(
            pairs, towers=part.towers, cache_dir=cache_dir, show_progress=show_progress
        )
        if len(features.image_ids) != len(pairs.image_ids):
            raise InputError("cross-fitting needs every training image to decode")
        members.append(
            _Member.of(
                recipe,
                part.towers,
                features,
                weight,
                cache_dir=cache_dir,
                show_progress=show_progress,
            )
        )
    return members


@dataclass(frozen=True)
class _MemoryPairs:
    """The real memory's pairs as training rows: ``images (M,)`` and, per memory row, the
    caption rows its text vector averages; ``items`` as stored."""

    images: np.ndarray
    captions: list[np.ndarray]
    items: list[Item]


def _memory_pairs(memory: Memory, pairs: PairSet) -> _MemoryPairs:
    """Where each pair of ``memory`` lies among the training ``pairs``."""
    image_row = {id_: row for row, id_ in enumerate(pairs.image_ids)}
    missing = [id_ for id_ in memory.ids if id_ not in image_row]
    if missing:
        raise InputError(
            f"cross-fitting needs a memory of the training manifest's own pairs, and "
            f"{len(missing)} of the {len(memory)} pairs of {memory.folder} are not in it "
            f"(first: {missing[0]!r}); build the memory from the same manifest"
        )
    caption_rows: dict[tuple[int, str], int] = {}
    for row, (owner, text) in enumerate(zip(pairs.text_image.tolist(), pairs.texts, strict=True)):
        caption_rows.setdefault((owner, text), row)
    stored = memory.indexes["text"].get(memory.ids)
    images = np.asarray([image_row[id_] for id_ in memory.ids], dtype=np.int64)
    captions, items = [], []
    for id_, image in zip(memory.ids, images.tolist(), strict=True):
        text = stored[id_].text or ""
        lines = text.split("\n")
        unknown = [line for line in lines if (image, line) not in caption_rows]
        if unknown:
            raise InputError(
                f"cross-fitting needs a memory of the training manifest's own pairs, and the "
                f"memory's pair {id_!r} has the caption {unknown[0]!r}, which the manifest does "
                "not give that image; build the memory from the same manifest"
            )
        captions.append(np.asarray([caption_rows[(image, line)] for line in lines]))
        items.append(Item(id=id_, text=text, image=stored[id_].image))
    return _MemoryPairs(images, captions, items)


def _subset(features: PairFeatures, images: np.ndarray) -> PairFeatures:
    """The features of training ``images`` (sorted rows) and of their captions."""
    position = np.full(len(features.image_ids), -1, dtype=np.int64)
    position[images] = np.arange(len(images))
    owner = np.asarray(features.text_image)
    keep = position[owner] >= 0
    return PairFeatures(
        [features.image_ids[i] for i in images.tolist()],
        np.asarray(features.image)[images],
        np.asarray(features.text)[keep],
        position[owner[keep]],
    )


@contextmanager
def cross_fitted_folds(
    encoder: Encoder,
    pairs: PairSet,
    query_captions: np.ndarray,
    memory: Memory,
    config: RecoTrainingConfig,
    *,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> Iterator[list[RecoFold]]:
    """``config.cross_fit`` cross-fitted training folds of ``pairs`` (the manifest ``encoder`` and
    ``memory`` were built from); each fold's memory lives in a scratch folder until exit.

    ``query_captions``: the caption rows of ``pairs`` used as training queries (all, or the
    first few per image); the alignments always train on every caption, as the model did. An
    ensemble's members are each retrained per fold and combined as the ensemble combines them.
    """
    folds = config.cross_fit
    splits = fold_splits(len(pairs.image_ids), folds, config.seed)
    members = _members(encoder, pairs, cache_dir, show_progress)
    in_memory = _memory_pairs(memory, pairs)
    owner = np.asarray(pairs.text_image)
    out: list[RecoFold] = []
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmret-crossfit-")))
        for fold, held in progress(
            enumerate(splits, start=1),
            total=folds,
            description="Cross-fitting (an alignment per fold)",
            enabled=show_progress,
        ):
            rest = np.setdiff1d(np.arange(len(pairs.image_ids)), held)
            parts = [member.fold_embeddings(rest) for member in members]
            image = np.concatenate([part[0] for part in parts], axis=1)
            text = np.concatenate([part[1] for part in parts], axis=1)
            kept = np.flatnonzero(~np.isin(in_memory.images, held)).tolist()
            fold_memory = stack.enter_context(
                _fold_memory(
                    scratch / f"fold-{fold}",
                    encoder,
                    [in_memory.items[row] for row in kept],
                    {
                        "image": image[in_memory.images[kept]],
                        "text": np.stack([text[in_memory.captions[row]].mean(0) for row in kept]),
                    },
                    source=str(memory.folder),
                )
            )
            queries = query_captions[np.isin(owner[query_captions], held)]
            position = np.full(len(pairs.image_ids), -1, dtype=np.int64)
            position[held] = np.arange(len(held))
            embeddings = PairEmbeddings(image[held], text[queries], position[owner[queries]])
            out.append(RecoFold(reco_data(embeddings, fold_memory, config), fold_memory))
        yield out


@contextmanager
def _fold_memory(
    folder: Path,
    encoder: Encoder,
    items: list[Item],
    vectors: dict[Modality, np.ndarray],
    *,
    source: str,
) -> Iterator[Memory]:
    """A memory of ``items`` with a fold model's vectors, on exact indexes, opened."""
    write_memory(folder, encoder, items, vectors, source=source, backend="exact")
    with Memory.open(folder) as opened:
        yield opened
