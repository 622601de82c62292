"""Captioning with the retrieval-augmented decoder (:mod:`mmret.heads.captioner`).

:class:`RetrievalCaptioner` embeds the image with the memory's encoder, selects documents from
the memory with the decoder's retrieval policy (:mod:`mmret.generation.policy`) and writes a
caption by greedy decoding from the image and the documents (each document's embedding, as the
index stores it, and its first caption line). A decoder trained without retrieval needs no
memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mmret._progress import progress
from mmret.engine import Retriever
from mmret.errors import InputError
from mmret.generation.consensus import Caption
from mmret.generation.context import Context, retrieve_with_vectors
from mmret.generation.policy import ContextPolicy
from mmret.generation.vocabulary import BOS, EOS, SEP, UNK, Vocabulary
from mmret.heads.captioner import (
    CAPTION,
    DOC_TEXT,
    DOC_VECTOR,
    PAD,
    QUERY,
    CaptionDecoder,
    DecoderInput,
)
from mmret.items import ImageInput, Query

#: What the decoder reads of each document: its embedding, its caption, or both.
DocumentView = Literal["both", "text", "vector"]
DOCUMENT_VIEWS: tuple[DocumentView, ...] = ("both", "text", "vector")
SHIPPED_DECODER = Path(__file__).resolve().parent.parent / "weights" / "caption"
_BATCH = 64
#: Beams searched when writing a caption (chosen on Flickr8k dev; 1 is greedy decoding).
BEAM = 3


@dataclass(frozen=True)
class Sample:
    """One sequence to assemble: the ``(D,)`` query embedding, the documents (each an embedding
    and word ids, either may be ``None``), and the caption's word ids (``None`` to generate)."""

    query: np.ndarray
    documents: Sequence[tuple[np.ndarray | None, Sequence[int] | None]]
    caption: Sequence[int] | None = None


def assemble(samples: Sequence[Sample], prefix: int, *, left_pad: bool) -> DecoderInput:
    """One padded :class:`DecoderInput` for ``samples``: per sample the documents, ``prefix``
    query slots, then ``<bos>`` and the caption with ``<eos>`` (only ``<bos>`` when it has no
    caption yet). ``left_pad`` ends every row at its last token (for generation)."""
    rows: list[list[tuple[int, int, int]]] = []  # per sample: (kind, token, vector row)
    vectors: list[np.ndarray] = []
    for sample in samples:
        row: list[tuple[int, int, int]] = []
        for vector, words in sample.documents:
            if vector is not None:
                row.append((DOC_VECTOR, 0, len(vectors)))
                vectors.append(vector)
            if words is not None:
                row += [(DOC_TEXT, word, -1) for word in [*words, SEP]]
        row += [(QUERY, slot, len(vectors)) for slot in range(prefix)]
        vectors.append(sample.query)
        caption = [] if sample.caption is None else [*sample.caption, EOS]
        row += [(CAPTION, word, -1) for word in [BOS, *caption]]
        rows.append(row)
    length = max(len(row) for row in rows)
    table = torch.zeros((len(rows), length, 3), dtype=torch.long)
    table[..., 0], table[..., 2] = PAD, -1
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left_pad else slice(0, len(row))
        table[i, span] = torch.tensor(row)
    kinds_t, tokens_t, rows_t = table.unbind(dim=-1)
    stacked = torch.from_numpy(np.stack(vectors).astype(np.float32))
    return DecoderInput(kinds_t, tokens_t, rows_t, stacked)


def repeated_trigrams(written: torch.Tensor) -> list[tuple[int, int]]:
    """``(row, word)`` pairs such that writing ``word`` next in row ``row`` of ``written``
    (``(R, T)`` word ids so far) would repeat a trigram already in that row."""
    banned = []
    for row, words in enumerate(written.tolist()):
        last = tuple(words[-2:])
        for i in range(len(words) - 2):
            if tuple(words[i : i + 2]) == last:
                banned.append((row, words[i + 2]))
    return banned


def generate(model: CaptionDecoder, samples: Sequence[Sample], beam: int = 1) -> list[list[int]]:
    """Captions (word ids, without ``<bos>``/``<eos>``) for ``samples`` by beam search
    (``beam=1``: greedy); a finished beam is ranked by its mean word log-probability.
    ``<unk>``, the word just written and a word that would repeat a trigram are never
    written (small decoders otherwise loop: "a blue shirt and a blue shirt and ...")."""
    if not samples:
        return []
    count, vocab = len(samples), model.config.vocab_size
    batch = assemble(samples, model.config.prefix, left_pad=True)
    with torch.inference_mode():
        hidden, cache = model.prefill(batch)
        rows = torch.arange(count).repeat_interleave(beam)
        last, cache = hidden[rows, -1], cache.select(rows)
        scores = torch.zeros(count, beam)
        scores[:, 1:] = -torch.inf  # the beams start as copies of one: keep the first
        written = torch.full((count * beam, 1), BOS, dtype=torch.long)
        done = torch.zeros(count * beam, dtype=torch.bool)
        for _ in range(model.config.max_words + 1):
            logp = torch.log_softmax(model.logits(last).float(), dim=-1)
            logp[:, UNK] = -torch.inf
            logp[torch.arange(len(logp)), written[:, -1]] = -torch.inf
            for row, word in repeated_trigrams(written):
                logp[row, word] = -torch.inf
            if written.shape[1] == 1:
                logp[:, EOS] = -torch.inf  # no empty captions
            logp[done] = torch.where(torch.arange(vocab) == EOS, 0.0, -torch.inf)
            best = (scores.reshape(-1, 1) + logp).reshape(count, beam * vocab).topk(beam)
            scores = best.values
            rows = (torch.arange(count)[:, None] * beam + best.indices // vocab).reshape(-1)
            words = (best.indices % vocab).reshape(-1)
            written = torch.cat([written[rows], words[:, None]], dim=1)
            done = done[rows] | (words == EOS)
            if done.all():
                break
            last, cache = model.step(cache.select(rows), words)
    lengths = ((written != EOS) & (written != BOS)).sum(dim=1) + 1  # the words and <eos>
    mean = (scores.reshape(-1) / lengths).reshape(count, beam)
    chosen = torch.arange(count) * beam + mean.argmax(dim=1)
    return [
        [w for w in row[1:] if w != EOS][: model.config.max_words]
        for row in written[chosen].tolist()
    ]


class RetrievalCaptioner:
    """A trained caption decoder with its vocabulary and retrieval policy."""

    def __init__(self, model: CaptionDecoder, vocabulary: Vocabulary, policy: ContextPolicy):
        self.model = model
        self.vocabulary = vocabulary
        self.policy = policy

    @classmethod
    def load(cls, folder: str | Path | None = None) -> RetrievalCaptioner:
        """The decoder saved in ``folder`` (the one shipped with mmret by default)."""
        model, extra = CaptionDecoder.load(Path(folder) if folder else SHIPPED_DECODER)
        policy = ContextPolicy(**extra["policy"]) if model.config.documents else ContextPolicy()
        return cls(model, Vocabulary.from_dict(extra["vocabulary"]), policy)

    @property
    def uses_retrieval(self) -> bool:
        return self.model.config.documents > 0

    def check_memory(self, memory: Retriever | None) -> None:
        if not self.uses_retrieval:
            return
        if memory is None:
            raise InputError("this caption decoder reads retrieved documents: give it a --memory")
        if memory.manifest.encoder != self.model.config.encoder:
            raise InputError(
                f"the caption decoder reads {self.model.config.encoder!r} embeddings, but the "
                f"memory {memory.folder} was built with {memory.manifest.encoder!r}; index the "
                f"memory with --model {self.model.config.encoder}"
            )

    def sample(
        self,
        query: np.ndarray,
        context: Context,
        vectors: dict[str, np.ndarray],
        view: DocumentView = "both",
    ) -> Sample:
        """The decoder's input for a query embedding and its selected documents."""
        documents = []
        for document in context.documents:
            line = next((x for x in (document.text or "").split("\n") if x.strip()), None)
            words = self.vocabulary.encode(line, self.model.config.max_words) if line else None
            vector = vectors.get(document.id)
            documents.append(
                (
                    vector if view != "text" else None,
                    words if view != "vector" else None,
                )
            )
        return Sample(query, documents)

    def caption(
        self,
        images: Sequence[ImageInput],
        memory: Retriever | None,
        *,
        policy: ContextPolicy | None = None,
        view: DocumentView = "both",
        query_vectors: np.ndarray | None = None,
        beam: int = BEAM,
        show_progress: bool = False,
    ) -> list[Caption]:
        """A caption for each image, written from what ``memory`` holds (an index of captioned
        images built with the decoder's encoder). ``query_vectors`` are the images' embeddings
        if already computed; an image in the memory never reads itself."""
        self.check_memory(memory)
        policy = replace(policy or self.policy, k=self.model.config.documents or 1)
        if query_vectors is None:
            if memory is None:
                raise InputError("without a memory, give the images' embeddings")
            query_vectors = memory.encoder.encode_images(images, show_progress=show_progress)
        made: list[Caption] = []
        # Retrieval reads the images' query-side vectors: the same as the document side's
        # unless the memory's model has separate sides (ReT), whose are encoded per image.
        same_sides = memory is None or memory.query_encoder is memory.encoder
        spans = range(0, len(images), _BATCH)
        for start in progress(
            spans, total=len(spans), description="Captioning", enabled=show_progress
        ):
            samples, contexts = [], []
            for image, vector in zip(
                images[start : start + _BATCH], query_vectors[start : start + _BATCH], strict=True
            ):
                context = Context(None, None, ())
                stored: dict[str, np.ndarray] = {}
                if memory is not None and self.uses_retrieval:
                    context, stored = retrieve_with_vectors(
                        memory, Query(image=image), policy, vector=vector if same_sides else None
                    )
                samples.append(self.sample(vector, context, stored, view))
                contexts.append(context)
            written = generate(self.model, samples, beam)
            for ids, context in zip(written, contexts, strict=True):
                made.append(Caption(self.vocabulary.decode(ids), context))
        return made
