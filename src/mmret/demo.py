"""``mmret demo``: index public-domain photographs that ship with scikit-image and search them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmret.engine import Retriever, SearchResult
from mmret.ingest.sources import read_items
from mmret.items import Query

#: scikit-image sample name -> file name in the demo collection
PHOTOS = {
    "astronaut": "astronaut",
    "camera": "cameraman",
    "chelsea": "cat",
    "clock": "clock",
    "coffee": "coffee",
    "coins": "coins",
    "hubble_deep_field": "hubble-deep-field",
    "immunohistochemistry": "tissue-stain",
    "moon": "moon",
    "page": "book-page",
    "retina": "retina",
    "rocket": "rocket",
    "horse": "horse-silhouette",
    "brick": "brick-wall",
    "grass": "grass",
    "gravel": "gravel",
    "colorwheel": "colour-wheel",
}
#: Queries within what the starter model learnt from Flickr8k (people, animals, everyday
#: scenes); concepts it never saw, like rockets or galaxies, it does not find (see its card).
TEXT_QUERIES = (
    "a cat",
    "a person riding a motorcycle",
    "a man taking a picture",
    "a brick wall",
    "green grass",
    "a page of text",
)


@dataclass(frozen=True)
class DemoRun:
    folder: Path
    queries: list[tuple[str, list[SearchResult]]]


def write_photos(folder: Path) -> Path:
    """Save the sample photographs (RGB, grayscale and binary ones alike) as PNG files."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    for sample, name in PHOTOS.items():
        pixels = np.asarray(getattr(skimage.data, sample)())
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        Image.fromarray(pixels).save(folder / f"{name}.png")
    motorcycle = skimage.data.stereo_motorcycle()[0]
    Image.fromarray(motorcycle).save(folder / "motorcycle.png")
    return folder


def run_demo(workdir: Path, *, k: int = 3, show_progress: bool = False) -> DemoRun:
    """Index the photos into ``workdir/index`` and run text, image and image+text queries."""
    photos = write_photos(workdir / "photos")
    index_dir = workdir / "index"
    retriever = Retriever.open(index_dir) if (index_dir / "manifest.json").exists() else None
    if retriever is None:
        retriever = Retriever.create(index_dir)
        retriever.add(read_items(photos), show_progress=show_progress)
    with retriever:
        # A cropped, mirrored cat should still find the cat; adding text mixes in its match.
        cat = Image.open(photos / "cat.png").convert("RGB")
        crop = cat.crop((60, 0, 380, 300)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        labelled: list[tuple[str, Query]] = [(text, Query(text=text)) for text in TEXT_QUERIES]
        labelled.append(("[image] a cropped, mirrored photo of the cat", Query(image=crop)))
        labelled.append(
            (
                "[image+text] the cat photo + 'a person riding a motorcycle'",
                Query(image=crop, text="a person riding a motorcycle"),
            )
        )
        results = retriever.search([query for _, query in labelled], k=k)
    return DemoRun(
        index_dir, [(label, hits) for (label, _), hits in zip(labelled, results, strict=True)]
    )
