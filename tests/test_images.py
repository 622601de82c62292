from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmret import ImageLoadError, load_image
from mmret.ingest.images import decode_batch
from mmret.ingest.report import SkipReport


def _save(image: Image.Image, path: Path, **options: object) -> Path:
    image.save(path, **options)
    return path


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "RGBA", "LA", "I;16", "I", "F", "RGB"])
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    source = Image.new("RGB", (20, 10), (200, 100, 50)).convert(mode)
    suffix = ".tiff" if mode in {"CMYK", "I;16", "I", "F"} else ".png"
    image = load_image(_save(source, tmp_path / f"x{suffix}"))
    assert image.mode == "RGB"
    assert image.size == (20, 10)


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    source = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(_save(source, tmp_path / "clear.png")).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert load_image(_save(palette, tmp_path / "p.png", transparency=0)).getpixel((1, 1)) == (
        255,
        255,
        255,
    )


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    source = Image.new("RGB", (30, 10), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = load_image(_save(source, tmp_path / "rotated.jpg", exif=exif))
    assert image.size == (10, 30)


def test_sixteen_bit_grayscale_keeps_contrast(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    image = load_image(_save(Image.fromarray(ramp), tmp_path / "deep.png"))
    values = np.asarray(image)[..., 0]
    assert values.min() == 0 and values.max() == 255


def test_bytes_and_pil_inputs(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("L", (5, 5), 7).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).mode == "RGB"
    assert load_image(Image.new("RGBA", (3, 3))).mode == "RGB"


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"nope\.jpg: file not found"):
        load_image(tmp_path / "nope.jpg")


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "fake.jpg"
    path.write_bytes(b"definitely not an image" * 10)
    with pytest.raises(ImageLoadError, match=r"fake\.jpg: not a recognised image format"):
        load_image(path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg: corrupt or truncated"):
        load_image(path)


def test_decompression_bomb_refused_before_decoding(tmp_path: Path) -> None:
    # 12000 x 12000 one-bit pixels: a 144-megapixel image in a few hundred kB of PNG.
    path = _save(Image.new("1", (12000, 12000)), tmp_path / "bomb.png")
    with pytest.raises(ImageLoadError, match=r"bomb\.png: .*decompression bomb"):
        load_image(path)


def test_pixel_limit_is_configurable(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (20, 20)), tmp_path / "small.png")
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(path, max_pixels=100)


def test_draft_decodes_large_jpegs_smaller(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (2000, 1000), (1, 2, 3)), tmp_path / "big.jpg")
    image = load_image(path, draft_size=448)
    assert 448 <= min(image.size) < 1000


def test_decode_batch_skips_and_reports(tmp_path: Path) -> None:
    good = _save(Image.new("RGB", (4, 4)), tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    report = SkipReport()
    images, positions = decode_batch([bad, good, tmp_path / "missing.png"], report)
    assert positions == [1] and len(images) == 1
    assert report.skipped == 2
    assert "bad.png" in report.reasons[0] and "missing.png" in report.reasons[1]
