"""mmret: a multimodal retrieval engine. Index images, texts and image+text items; search them
with text, image or image+text queries; train the heads that make retrieval better.

>>> import mmret
>>> sorted(mmret.__all__)[:3]
['AddReport', 'Encoder', 'ImageLoadError']
"""

from mmret._version import __version__
from mmret.encoders import Encoder, load_encoder
from mmret.engine import AddReport, Retriever, SearchResult
from mmret.errors import (
    ImageLoadError,
    IndexFormatError,
    InputError,
    MmretError,
    UnknownItemError,
)
from mmret.index.filters import parse_filter
from mmret.ingest.images import load_image
from mmret.ingest.report import SkipReport
from mmret.ingest.sources import ItemSource, read_items
from mmret.items import Item, Query
from mmret.scaleout.ray_encode import add_with_ray

__all__ = [
    "AddReport",
    "Encoder",
    "ImageLoadError",
    "IndexFormatError",
    "InputError",
    "Item",
    "ItemSource",
    "MmretError",
    "Query",
    "Retriever",
    "SearchResult",
    "SkipReport",
    "UnknownItemError",
    "__version__",
    "add_with_ray",
    "load_encoder",
    "load_image",
    "parse_filter",
    "read_items",
]
