"""Retrieval for generation (RA-CM3): select relevant, multimodal, diverse context from an
index, write it for a generator, and generators that use it."""

from mmret.generation.captioner import RetrievalCaptioner
from mmret.generation.consensus import Caption, consensus_captions
from mmret.generation.context import (
    Context,
    Document,
    from_chat,
    from_markdown,
    retrieve_context,
    to_chat,
    to_markdown,
)
from mmret.generation.policy import ContextPolicy, select

__all__ = [
    "Caption",
    "Context",
    "ContextPolicy",
    "Document",
    "RetrievalCaptioner",
    "consensus_captions",
    "from_chat",
    "from_markdown",
    "retrieve_context",
    "select",
    "to_chat",
    "to_markdown",
]
