"""Nearest-neighbour consensus captioning: no training, only a memory of captioned images.

Devlin et al. ("Exploring Nearest Neighbor Approaches for Image Captioning", 2015): gather the
captions of the image's nearest neighbours in the memory and return the one that agrees best
with the others, i.e. the consensus caption, which tends to name what the neighbours share.
Agreement here is the mean embedding similarity to the other candidate captions (the index's
own text tower), which costs one batch of text encodings per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmret._progress import progress
from mmret.engine import Retriever
from mmret.generation.context import Context, retrieve_context
from mmret.generation.policy import ContextPolicy, normalised_similarity
from mmret.items import ImageInput, Query

#: Neighbours read per image, chosen on Flickr8k dev (the captioning table, docs/generation.md).
CONSENSUS_POLICY = ContextPolicy(k=10, candidates=50, modality="require", diversity=0.0)


@dataclass(frozen=True)
class Caption:
    """A caption and the context it was made from."""

    text: str
    context: Context


def candidate_captions(context: Context) -> list[str]:
    """Every caption of the context's documents (one per line of a document's text), once."""
    seen: dict[str, None] = {}
    for document in context.documents:
        for line in (document.text or "").split("\n"):
            if line.strip():
                seen.setdefault(line.strip(), None)
    return list(seen)


def consensus(captions: Sequence[str], vectors: np.ndarray, token_dim: int | None) -> str:
    """The caption of ``captions`` (with their ``(N, dim)`` embeddings) most similar on
    average to the others."""
    if len(captions) == 1:
        return captions[0]
    agreement = normalised_similarity(vectors, vectors, token_dim)
    np.fill_diagonal(agreement, 0.0)
    return captions[int(np.argmax(agreement.sum(axis=1)))]


def consensus_captions(
    memory: Retriever,
    images: Sequence[ImageInput],
    policy: ContextPolicy = CONSENSUS_POLICY,
    *,
    show_progress: bool = False,
) -> list[Caption]:
    """A consensus caption for each image from ``memory`` (an index of captioned images);
    an image that is itself in the memory never captions itself."""
    captions = []
    encoder = memory.encoder
    embedded: dict[str, np.ndarray] = {}  # neighbours recur: each caption is embedded once
    for image in progress(
        images, total=len(images), description="Captioning", enabled=show_progress
    ):
        context = retrieve_context(memory, Query(image=image), policy)
        texts = candidate_captions(context)
        if not texts:
            captions.append(Caption("", context))
            continue
        new = [text for text in texts if text not in embedded]
        if new:
            embedded.update(zip(new, encoder.encode_texts(new), strict=True))
        vectors = np.stack([embedded[text] for text in texts])
        captions.append(Caption(consensus(texts, vectors, encoder.token_dim), context))
    return captions
