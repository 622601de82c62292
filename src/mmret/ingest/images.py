"""Safe image decoding: every input becomes an RGB ``PIL.Image`` or a clear ``ImageLoadError``.

Guards against what real collections contain: missing files, corrupt or truncated data,
decompression bombs (checked from the header, before any pixel is decoded), EXIF rotation, and
every PIL mode (grayscale, 16-bit, palette, CMYK, alpha).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmret.errors import ImageLoadError
from mmret.ingest.report import SkipReport
from mmret.items import ImageInput

#: Images above this many pixels are refused before decoding (about a 9000 x 9000 photo).
DEFAULT_MAX_PIXELS = 80_000_000

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def describe(source: ImageInput) -> str:
    """A short name for an image input, for error messages."""
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.size[0]}x{source.size[1]}>"
    return str(source)


def load_image(
    source: ImageInput,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode ``source`` into an upright RGB image.

    ``draft_size`` lets JPEG decoding skip detail the caller will throw away (an encoder that
    works at 224 px does not need a 4000 px decode); the result is still at least that big.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source))
    name = describe(source)
    try:
        # No warnings.catch_warnings() here: it swaps process-wide state and images decode in
        # threads. PIL warns above ~89 megapixels, where the size check below refuses anyway.
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
    except FileNotFoundError:
        raise ImageLoadError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{name}: is a directory, not an image") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageLoadError(f"{name}: too many pixels (possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not a recognised image format") from None
    except OSError as error:
        raise ImageLoadError(f"{name}: cannot be read ({error})") from None
    except Exception as error:  # hostile files reach many decoder paths; none may crash a run
        raise ImageLoadError(
            f"{name}: not a valid image ({type(error).__name__}: {error})"
        ) from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageLoadError(f"{name}: empty image ({width}x{height})")
        if width * height > max_pixels:
            raise ImageLoadError(
                f"{name}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the "
                f"limit of {max_pixels / 1e6:.0f} (possible decompression bomb)"
            )
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _to_rgb(upright)
        except Exception as error:  # decoders raise OSError, ValueError, SyntaxError, ...
            raise ImageLoadError(f"{name}: corrupt or truncated image data ({error})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent areas become white, 16-bit data is rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}:
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(np.nanmin(pixels)), float(np.nanmax(pixels))
        scale = 255.0 / (high - low) if high > low else 0.0
        gray = np.nan_to_num((pixels - low) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def decode_batch(
    sources: Sequence[ImageInput], report: SkipReport, *, draft_size: int | None = None
) -> tuple[list[Image.Image], list[int]]:
    """Decode what can be decoded; failures go to ``report``. Returns images and their positions."""
    images, positions = [], []
    for position, source in enumerate(sources):
        try:
            images.append(load_image(source, draft_size=draft_size))
            positions.append(position)
        except ImageLoadError as error:
            report.skip(str(error))
    return images, positions
