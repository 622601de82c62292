"""One query path: every caller that searches an index gets the hits `Retriever.search` gives.

A query reaches an index four ways: the Python API (`Retriever.search`), the server
(`POST /search`, `POST /search/upload`), retrieval for generation (`retrieve_context`) and the
evaluation command (`mmret eval retrieval`, which ranks by the same scores). They once encoded
queries three different ways: the server and generation with the document encoder (a ReT index's
document side) and generation without the query bank. These tests hold them to one answer for
the shipped default model with its bank, the shipped ReT model and a memory-refined index.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import mmret
from mmret.cli.main import app
from mmret.demo import write_photos
from mmret.generation import ContextPolicy, retrieve_context
from mmret.memory import build_memory, load_refiner

pytest.importorskip("fastapi")
from starlette.testclient import TestClient

from mmret.server import ServerConfig, create_app

#: photo (a file of :func:`mmret.demo.write_photos`) -> its caption
CAPTIONS = {
    "cat": "a cat lying on a sofa",
    "cameraman": "a man taking a picture",
    "brick-wall": "a brick wall",
    "grass": "green grass",
    "book-page": "a page of text",
    "motorcycle": "a person riding a motorcycle",
    "coffee": "a cup of coffee on a table",
    "astronaut": "a woman in a white suit with a flag",
}
TEXTS = ["a plate of food on a table", "a cat", "a man with a camera"]
K = 5


@dataclass(frozen=True)
class Case:
    """An index of the photos (images only, so `eval retrieval`'s text-to-image ranking is a
    search of it) and what it was made with."""

    index: Path
    model: str
    memory: Path | None
    manifest: Path
    query_image: Path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The captioned photos' folder (images only), their manifest and a query image: a
    cropped, mirrored copy of the cat, kept elsewhere (a query never retrieves its own file)."""
    root = tmp_path_factory.mktemp("photos")
    every = write_photos(root / "all")
    folder = root / "photos"
    folder.mkdir()
    lines = []
    for name, caption in CAPTIONS.items():
        image = Image.open(every / f"{name}.png").convert("RGB")
        image.thumbnail((256, 256))
        image.save(folder / f"{name}.jpg")
        lines.append(json.dumps({"id": name, "image": f"photos/{name}.jpg", "text": caption}))
    manifest = root / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    cat = Image.open(folder / "cat.jpg")
    query = cat.crop((20, 0, 230, 190)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    query.save(root / "query.jpg")
    return folder, manifest, root / "query.jpg"


@pytest.fixture(
    scope="module", params=["starter-v4", "ret", "starter-v4+memory"], ids=lambda p: str(p)
)
def case(request: pytest.FixtureRequest, photos: tuple[Path, Path, Path]) -> Iterator[Case]:
    folder, manifest, query_image = photos
    model, _, refined = str(request.param).partition("+")
    root = manifest.parent / str(request.param)
    memory = None
    refiner = None
    if refined:
        memory = root / "memory"
        build_memory(manifest, memory, model=model)
        refiner = load_refiner(memory)
    index = root / "index.mmret"
    with mmret.Retriever.create(index, model=model, refiner=refiner) as retriever:
        retriever.add(mmret.read_items(folder))
    if refiner is not None:
        refiner.close()
    yield Case(index, model, memory, manifest, query_image)


def listing(hits: list[mmret.SearchResult]) -> list[tuple[str, float]]:
    return [(hit.id, hit.score) for hit in hits]


def assert_same(
    found: list[list[tuple[str, float]]], searched: list[list[tuple[str, float]]]
) -> None:
    """The same ids in the same order, and the same scores up to float32 rounding (a query
    encoded alone or in a batch can differ in the last bits)."""
    assert [[id_ for id_, _ in row] for row in found] == [
        [id_ for id_, _ in row] for row in searched
    ]
    for row, expected in zip(found, searched, strict=True):
        assert [score for _, score in row] == pytest.approx(
            [score for _, score in expected], rel=1e-5, abs=1e-6
        )


def queries(case: Case) -> list[mmret.Query]:
    return [mmret.Query(text=text) for text in TEXTS] + [mmret.Query(image=case.query_image)]


def test_search_server_and_generation_agree(case: Case) -> None:
    with mmret.Retriever.open(case.index, readonly=True) as retriever:
        searched = [listing(hits) for hits in retriever.search(queries(case), k=K)]
        policy = ContextPolicy(k=K, candidates=K, modality="any", duplicate_threshold=1.0)
        generated = [
            [(doc.id, doc.score) for doc in retrieve_context(retriever, q, policy).documents]
            for q in queries(case)
        ]
    assert_same(generated, searched)
    config = ServerConfig(index=str(case.index), readonly=True)
    with TestClient(create_app(config), base_url="http://127.0.0.1") as client:
        served = []
        for text in TEXTS:
            response = client.post("/search", json={"text": text, "k": K})
            assert response.status_code == 200, response.text
            served.append([(hit["id"], hit["score"]) for hit in response.json()["results"]])
        upload = client.post(
            "/search/upload",
            files={"image": ("query.jpg", case.query_image.read_bytes(), "image/jpeg")},
            data={"k": str(K)},
        )
        assert upload.status_code == 200, upload.text
        served.append([(hit["id"], hit["score"]) for hit in upload.json()["results"]])
    assert_same(served, searched)


def test_evaluation_ranks_as_search_does(case: Case, tmp_path: Path) -> None:
    """`mmret eval retrieval`'s text-to-image ranks are those of searching the photos."""
    captions = list(CAPTIONS.values())
    with mmret.Retriever.open(case.index, readonly=True) as retriever:
        hits = retriever.search(captions, k=len(CAPTIONS))
    ranks = np.array(
        [[hit.id for hit in row].index(own) + 1 for own, row in zip(CAPTIONS, hits, strict=True)]
    )
    record = tmp_path / "eval.json"
    memory = ["--memory", str(case.memory)] if case.memory else []
    evaluated = CliRunner().invoke(
        app,
        ["eval", "retrieval", str(case.manifest), "--model", case.model, "--json", str(record),
         "--cache-dir", str(tmp_path / "cache"), *memory],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    text_to_image = json.loads(record.read_text())["text_to_image"]
    for k in (1, 5):
        assert text_to_image[f"R@{k}"] == pytest.approx(100 * np.mean(ranks <= k), abs=1e-3)
