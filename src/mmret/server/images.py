"""Images that reach the server: uploads checked before anything decodes them, uploads kept
for thumbnails, and thumbnails of stored items.

Every image goes through :func:`mmret.ingest.images.load_image`, the same checks as
``mmret index`` (corrupt and truncated data, decompression bombs refused from the header).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from mmret._files import write_atomic
from mmret.errors import ImageLoadError, InputError
from mmret.ingest.images import load_image

#: Uploaded images of added items are kept here, inside the index folder, named by content.
UPLOADS_FOLDER = "uploads"


class UploadTooLargeError(InputError):
    """A request or an uploaded file is over the server's size limit (HTTP 413)."""


def check_size(what: str, size: int, limit: int) -> None:
    if size > limit:
        raise UploadTooLargeError(
            f"{what}: {size:,} bytes is over the limit of {limit:,} bytes per image"
        )


def decode_base64(what: str, text: str, limit: int) -> bytes:
    """The bytes of a base64 image (a ``data:image/...;base64,`` prefix is allowed)."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    check_size(what, len(text) * 3 // 4, limit)  # refuse before decoding a huge string
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InputError(f"{what}: not valid base64 ({error})") from None
    check_size(what, len(data), limit)
    return data


def decode_image(what: str, data: bytes, *, limit: int, max_pixels: int, side: int) -> Image.Image:
    """Decode uploaded bytes safely, at no more detail than ``side`` pixels need."""
    check_size(what, len(data), limit)
    if not data:
        raise ImageLoadError(f"{what}: empty file")
    try:
        return load_image(data, max_pixels=max_pixels, draft_size=side)
    except ImageLoadError as error:
        raise ImageLoadError(f"{what}: {error}") from None


def keep_upload(folder: Path, data: bytes) -> Path:
    """Store an uploaded (already validated) image under a name made from its content, never
    from the request; the same image uploaded twice is stored once."""
    with Image.open(io.BytesIO(data)) as image:  # reads the header only
        suffix = (image.format or "img").lower()
    path = folder / UPLOADS_FOLDER / f"{hashlib.sha256(data).hexdigest()[:32]}.{suffix}"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, data)
    return path


class Thumbnails:
    """JPEG thumbnails of stored images, the most recent ``capacity`` kept in memory."""

    def __init__(self, *, max_pixels: int, capacity: int = 512) -> None:
        self._max_pixels = max_pixels
        self._capacity = capacity
        self._cache: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, size: int) -> bytes:
        """A JPEG of the image at ``path`` fitted in ``size`` x ``size`` pixels."""
        try:
            modified = Path(path).stat().st_mtime_ns
        except OSError:
            raise ImageLoadError(f"{path}: image file not found") from None
        key = (path, modified, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        image = load_image(path, max_pixels=self._max_pixels, draft_size=size)
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        data = out.getvalue()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return data
