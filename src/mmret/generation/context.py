"""Context for a generator in one call: retrieve, select (:mod:`~mmret.generation.policy`) and
write the chosen documents as JSON, Markdown or OpenAI-compatible chat messages.

Every format reads back (:meth:`Context.from_dict`, :func:`from_markdown`, :func:`from_chat`)
into the same documents, so a context can be stored, inspected and sent without loss (chat
messages carry images as data URLs, so those come back as the image's bytes, not its path).
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmret.engine import Retriever, SearchResult
from mmret.errors import ImageLoadError, InputError
from mmret.generation.policy import ContextPolicy, select
from mmret.index.filters import Filter
from mmret.ingest.images import load_image
from mmret.items import Query
from mmret.search_steps import query_modality

#: The instruction the chat format opens with (``system`` message).
SYSTEM_PROMPT = (
    "Answer using the numbered context documents (images with their texts) where they help; "
    "say so when they do not contain the answer."
)


@dataclass(frozen=True)
class Document:
    """One selected document: what the index stores of it and its relevance score."""

    id: str
    score: float
    text: str | None = None
    image: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, hit: SearchResult) -> Document:
        return cls(hit.id, hit.score, hit.text, hit.image, dict(hit.metadata))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "score": self.score,
            "text": self.text,
            "image": self.image,
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class Context:
    """The query and the documents chosen for it, in the order a generator should read them."""

    query_text: str | None
    query_image: str | None
    documents: tuple[Document, ...]

    @property
    def ids(self) -> list[str]:
        return [document.id for document in self.documents]

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": {"text": self.query_text, "image": self.query_image},
            "documents": [document.to_dict() for document in self.documents],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Context:
        try:
            query = data["query"]
            documents = tuple(
                Document(d["id"], float(d["score"]), d["text"], d["image"], d["metadata"])
                for d in data["documents"]
            )
            return cls(query["text"], query["image"], documents)
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"not an mmret context ({error!r} is missing or wrong)") from None


def retrieve_context(
    retriever: Retriever,
    query: Query,
    policy: ContextPolicy | None = None,
    *,
    filter: Filter | None = None,
    vector: np.ndarray | None = None,
) -> Context:
    """Select documents for ``query`` from ``retriever``'s index (RA-CM3's retrieval policy);
    ``vector`` is the query's embedding by :meth:`~mmret.Retriever.encode_queries` if already
    computed. The candidates are :meth:`~mmret.Retriever.search`'s hits for the query.

    A document holding the query's own image file is never selected, whatever its score.
    """
    return retrieve_with_vectors(retriever, query, policy, filter=filter, vector=vector)[0]


def retrieve_with_vectors(
    retriever: Retriever,
    query: Query,
    policy: ContextPolicy | None = None,
    *,
    filter: Filter | None = None,
    vector: np.ndarray | None = None,
) -> tuple[Context, dict[str, np.ndarray]]:
    """:func:`retrieve_context` and the stored vector of each selected document (read once,
    for the selection, rather than again by a generator that reads them)."""
    policy = policy or ContextPolicy()
    if vector is None:
        vector = retriever.encode_queries([query])[0]
    hits = retriever.search_vectors(
        vector[None, :], k=policy.candidates, filter=filter, modality=query_modality(query)
    )[0]
    hits = [hit for hit in hits if not _same_image(hit.image, query.image)]
    stored = retriever.stored_vectors([hit.id for hit in hits])
    hits = [hit for hit in hits if hit.id in stored]  # removed since the search: skipped
    vectors = [stored[hit.id] for hit in hits]
    chosen = select(
        vector,
        hits,
        _stack(vectors, retriever.manifest.dim),
        policy,
        retriever.encoder.token_dim,
    )
    image = str(query.image) if isinstance(query.image, str | Path) else None
    context = Context(query.text, image, tuple(Document.of(hit) for hit in chosen))
    return context, {hit.id: stored[hit.id] for hit in chosen}


def _stack(vectors: list[np.ndarray], dim: int) -> np.ndarray:
    return np.stack(vectors) if vectors else np.empty((0, dim), dtype=np.float32)


def _same_image(stored: str | None, query_image: object) -> bool:
    if stored is None or not isinstance(query_image, str | Path):
        return False
    ours, theirs = Path(stored), Path(query_image)
    try:
        if ours.resolve() == theirs.resolve():
            return True
        return ours.stat().st_size == theirs.stat().st_size and (
            ours.read_bytes() == theirs.read_bytes()
        )
    except OSError:
        return False


# -- Markdown ----------------------------------------------------------------------------------

_HEADING = re.compile(r"^### (\d+)\. (\".*\") · score (-?[0-9.]+(?:e-?\d+)?)$")
_IMAGE = re.compile(r"^!\[image\]\(<(.*)>\)$")
_METADATA = re.compile(r"^metadata: `(.*)`$")


def to_markdown(context: Context) -> str:
    """The context as Markdown: one section per document (its image as an image link, its
    text as a quote), readable as it is and parsed back by :func:`from_markdown`."""
    lines = ["## Query", ""]
    if context.query_image is not None:
        lines += [f"![image](<{context.query_image}>)", ""]
    if context.query_text is not None:
        lines += [*_quoted(context.query_text), ""]
    lines += ["## Context", ""]
    for number, document in enumerate(context.documents, start=1):
        lines += [f"### {number}. {json.dumps(document.id)} · score {document.score:.6g}", ""]
        if document.image is not None:
            lines += [f"![image](<{document.image}>)", ""]
        if document.text is not None:
            lines += [*_quoted(document.text), ""]
        if document.metadata:
            lines += [f"metadata: `{json.dumps(document.metadata, ensure_ascii=False)}`", ""]
    return "\n".join(lines)


def _quoted(text: str) -> list[str]:
    return [f"> {line}" if line else ">" for line in text.split("\n")]


def from_markdown(markdown: str) -> Context:
    """Read back what :func:`to_markdown` wrote."""
    query: dict[str, Any] = {"text": None, "image": None, "metadata": {}}
    documents: list[dict[str, Any]] = []
    current = query
    quote: list[str] | None = None
    for line in markdown.split("\n"):
        if line.startswith(">"):
            quote = [] if quote is None else quote
            quote.append(line[2:] if line.startswith("> ") else "")
            current["text"] = "\n".join(quote)
            continue
        quote = None
        if heading := _HEADING.match(line):
            current = {"id": json.loads(heading[2]), "score": float(heading[3])}
            current.update(text=None, image=None, metadata={})
            documents.append(current)
        elif image := _IMAGE.match(line):
            current["image"] = image[1]
        elif metadata := _METADATA.match(line):
            current["metadata"] = json.loads(metadata[1])
    return Context.from_dict(
        {"query": {"text": query["text"], "image": query["image"]}, "documents": documents}
    )


# -- chat messages -----------------------------------------------------------------------------

_DOCUMENT_LABEL = re.compile(r"^Context document (\d+) \(id (\".*\"), score (-?[0-9.e-]+)\)")


def to_chat(
    context: Context, question: str | None = None, *, image_side: int = 512
) -> list[dict[str, Any]]:
    """OpenAI-compatible chat messages: a system instruction, then one user message holding
    each document (a text part, then its image as a JPEG data URL at most ``image_side``
    pixels on a side; 0 sends the file as it is), then the question and the query's image."""
    parts: list[dict[str, Any]] = []
    for number, document in enumerate(context.documents, start=1):
        label = (
            f"Context document {number} (id {json.dumps(document.id)}, score {document.score:.6g})"
        )
        parts.append({"type": "text", "text": f"{label}:\n{document.text or ''}"})
        if document.image is not None:
            parts.append(_image_part(document.image, image_side))
    question = question if question is not None else context.query_text
    parts.append({"type": "text", "text": f"Question: {question or 'Describe the image.'}"})
    if context.query_image is not None:
        parts.append(_image_part(context.query_image, image_side))
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": parts},
    ]


def _image_part(path: str, side: int) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": image_data_url(path, side)}}


def image_data_url(path: str, side: int = 512) -> str:
    """A ``data:`` URL of the image file at ``path``, re-encoded as JPEG no larger than
    ``side`` pixels on a side (0: the file's own bytes and type)."""
    source = Path(path)
    try:
        if side == 0:
            raw = source.read_bytes()
            kind = "png" if raw.startswith(b"\x89PNG") else "jpeg"
            return f"data:image/{kind};base64,{base64.b64encode(raw).decode()}"
        image = load_image(source, draft_size=side)
    except (OSError, ImageLoadError) as error:
        raise InputError(f"{path}: cannot read the image for the context ({error})") from None
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return f"data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def from_chat(messages: list[dict[str, Any]]) -> Context:
    """Read back what :func:`to_chat` wrote: each document's id, score and text, its image as
    the data URL sent, and the query's image likewise (its text becomes the question)."""
    try:
        parts = next(m for m in messages if m["role"] == "user")["content"]
    except (StopIteration, KeyError, TypeError):
        raise InputError("chat messages hold no user message with content parts") from None
    documents: list[dict[str, Any]] = []
    query: dict[str, Any] = {"text": None, "image": None}
    current: dict[str, Any] | None = None
    for part in parts:
        if part.get("type") == "image_url":
            target = current if current is not None else query
            target["image"] = part["image_url"]["url"]
            continue
        text = part.get("text", "")
        if label := _DOCUMENT_LABEL.match(text):
            body = text[label.end() + 2 :]  # after ":\n"
            current = {"id": json.loads(label[2]), "score": float(label[3]), "metadata": {}}
            current.update(text=body or None, image=None)
            documents.append(current)
        elif text.startswith("Question: "):
            current = None
            query["text"] = text.removeprefix("Question: ")
    return Context.from_dict({"query": query, "documents": documents})
