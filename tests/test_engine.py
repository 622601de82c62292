from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmret import IndexFormatError, InputError, Item, Query, Retriever, UnknownItemError, read_items
from mmret.encoders.hashing import HashEncoder
from mmret.index.manifest import MANIFEST_FILE

from .conftest import COLOURS, solid


@pytest.fixture
def retriever(tmp_path: Path, manifest: Path, encoder: HashEncoder) -> Retriever:
    retriever = Retriever.create(tmp_path / "index", encoder=encoder)
    report = retriever.add(read_items(manifest))
    assert report.added == 4 and report.skipped.skipped == 0
    return retriever


def test_search_returns_ids_scores_and_stored_fields(retriever: Retriever) -> None:
    hits = retriever.search(["a red square"], k=2)[0]
    assert len(hits) == 2 and hits[0].id == "red"
    assert hits[0].score >= hits[1].score
    assert hits[0].text == "a red square\nsomething red"
    assert hits[0].image is not None and hits[0].image.endswith("red.png")
    assert hits[0].metadata == {"year": 2000, "warm": True, "kind": "colour"}
    assert set(hits[0].to_dict()) == {"id", "score", "image", "text", "metadata"}


def test_image_queries_as_path_bytes_or_pil(retriever: Retriever, manifest: Path) -> None:
    path = manifest.parent / "images" / "blue.png"
    queries = [Query(image=path), Query(image=path.read_bytes()), Query(image=Image.open(path))]
    for hits in retriever.search(queries, k=1):
        assert hits[0].id == "blue"


def test_image_plus_text_query(retriever: Retriever, manifest: Path) -> None:
    query = Query(text="something green", image=manifest.parent / "images" / "green.png")
    assert retriever.search([query], k=1)[0][0].id == "green"


def test_batched_queries_keep_order(retriever: Retriever) -> None:
    results = retriever.search([f"a {name} square" for name in COLOURS], k=1)
    assert [hits[0].id for hits in results] == list(COLOURS)


def test_filters_at_search_time(retriever: Retriever) -> None:
    def ids(filter_: dict[str, object]) -> set[str]:
        return {hit.id for hit in retriever.search(["square"], k=10, filter=filter_)[0]}

    assert ids({"warm": True}) == {"red", "yellow"}
    assert ids({"year": {"gte": 2002}}) == {"blue", "yellow"}
    assert ids({"year": [2000, 2003]}) == {"red", "yellow"}
    assert ids({"kind": "nothing"}) == set()


def test_reopen_without_reencoding(retriever: Retriever, tmp_path: Path) -> None:
    query = retriever.encoder.encode([Query(text="a blue square")])
    before = retriever.search_vectors(query, k=4)
    retriever.close()
    reopened = Retriever.open(tmp_path / "index", readonly=True)
    assert reopened._encoder is None  # nothing is encoded on open
    assert [h.id for h in reopened.search_vectors(query, k=4)[0]] == [h.id for h in before[0]]
    assert reopened._encoder is None
    assert len(reopened) == 4


def test_incremental_add_and_remove(retriever: Retriever, tmp_path: Path) -> None:
    retriever.add([Item("note", text="a purple square")])
    assert len(retriever) == 5
    assert retriever.search(["purple"], k=1)[0][0].id == "note"
    assert retriever.remove(["note", "red", "unknown"]) == 2
    assert len(retriever) == 3
    assert "red" not in {h.id for h in retriever.search(["a red square"], k=10)[0]}
    retriever.close()
    with Retriever.open(tmp_path / "index") as reopened:
        assert len(reopened) == 3


def test_bad_items_are_skipped_and_the_rest_is_kept(retriever: Retriever, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    fine = tmp_path / "fine.png"
    solid((10, 10, 10)).save(fine)
    report = retriever.add(
        [
            Item("red", text="duplicate of an indexed id"),
            Item("broken", image=str(broken)),
            Item("fine", image=str(fine)),
            Item("fine", text="duplicate within the batch"),
        ]
    )
    assert report.added == 1
    assert report.skipped.skipped == 3
    reasons = "\n".join(report.skipped.reasons)
    assert "red: already in the index" in reasons
    assert "broken: " in reasons and "broken.jpg: not a recognised image format" in reasons
    assert "fine: already in the index" in reasons
    assert len(retriever) == 5


def test_items_from_bytes_have_no_stored_path(retriever: Retriever) -> None:
    buffer = io.BytesIO()
    solid((1, 2, 3)).save(buffer, format="PNG")
    retriever.add([Item("raw", image=buffer.getvalue())])
    hit = retriever.search([Query(image=buffer.getvalue())], k=1)[0][0]
    assert hit.id == "raw" and hit.image is None


def test_faiss_backend_end_to_end(tmp_path: Path, manifest: Path, encoder: HashEncoder) -> None:
    with Retriever.create(tmp_path / "ann", encoder=encoder, backend="faiss") as retriever:
        retriever.add(read_items(manifest))
        assert retriever.backend_name == "faiss"
        assert retriever.search(["a yellow square"], k=1)[0][0].id == "yellow"
    assert (tmp_path / "ann" / "faiss-cache.npz").is_file()  # saved on close
    with Retriever.open(tmp_path / "ann", encoder=encoder) as reopened:
        assert reopened.search(["a yellow square"], k=1, filter={"warm": False})[0][0].id in {
            "green",
            "blue",
        }


def test_readonly_refuses_writes(retriever: Retriever, tmp_path: Path) -> None:
    retriever.close()
    with (
        Retriever.open(tmp_path / "index", readonly=True) as reopened,
        pytest.raises(IndexFormatError, match="read-only"),
    ):
        reopened.add([Item("x", text="y")])


def test_create_refuses_a_non_empty_folder(tmp_path: Path, encoder: HashEncoder) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(InputError, match="already exists and is not empty"):
        Retriever.create(tmp_path / "busy", encoder=encoder)


def test_unknown_backend(tmp_path: Path, encoder: HashEncoder) -> None:
    with pytest.raises(KeyError, match="unknown index backend 'annoy'"):
        Retriever.create(tmp_path / "x", encoder=encoder, backend="annoy")
    assert not (tmp_path / "x").exists()


def test_open_errors_name_the_problem(retriever: Retriever, tmp_path: Path) -> None:
    retriever.close()
    folder = tmp_path / "index"
    with pytest.raises(IndexFormatError, match="no such index folder"):
        Retriever.open(tmp_path / "missing")
    with pytest.raises(InputError, match="was built with encoder 'hash:32', not 'hash:8'"):
        Retriever.open(folder, encoder=HashEncoder(8))
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="format version 99 is newer"):
        Retriever.open(folder)
    (folder / MANIFEST_FILE).write_text("{broken")
    with pytest.raises(IndexFormatError, match=r"manifest\.json: corrupt manifest"):
        Retriever.open(folder)


def test_search_needs_a_list(retriever: Retriever) -> None:
    with pytest.raises(InputError, match="takes a list"):
        retriever.search("a red square")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="needs a text, an image, or both"):
        Query()


def test_info(retriever: Retriever) -> None:
    info = retriever.info()
    assert info["items"] == 4 and info["encoder"] == "hash:32" and info["backend_in_use"] == "exact"


def test_vectors_are_unit_norm_in_the_store(retriever: Retriever) -> None:
    _, vectors = retriever.index.store.vectors()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_add_vectors_brings_your_own_embeddings(tmp_path: Path, encoder: HashEncoder) -> None:
    vectors = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    items = [Item(f"v{i}", text=f"vector {i}", metadata={"i": i}) for i in range(3)]
    with Retriever.create(tmp_path / "byo", encoder=encoder) as retriever:
        retriever.add_vectors(items, vectors * 5)  # normalised on the way in
        hits = retriever.search_vectors(vectors[[2]], k=1)[0]
        assert hits[0].id == "v2" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(InputError, match="expected vectors of shape"):
            retriever.add_vectors(items[:1], vectors)
        with pytest.raises(InputError, match=r"already present or repeated: \['v0'\]"):
            retriever.add_vectors([Item("v0", text="again")], vectors[:1])
        assert len(retriever) == 3


def test_get_and_more_like_this(retriever: Retriever) -> None:
    found = retriever.get(["red", "nope", "blue"])
    assert set(found) == {"red", "blue"}
    assert (
        found["red"].text == "a red square\nsomething red" and found["red"].metadata["year"] == 2000
    )
    like = retriever.similar(["red", "blue"], k=2)
    assert [len(row) for row in like] == [2, 2]
    assert "red" not in [hit.id for hit in like[0]] and "blue" not in [hit.id for hit in like[1]]
    red = retriever.index.store.lookup(["red"])["red"][1]
    exact = retriever.search_vectors(red[None, :], k=4)[0]  # brute force via the stored vector
    assert [hit.id for hit in like[0]] == [hit.id for hit in exact if hit.id != "red"][:2]
    warm = retriever.similar(["red"], k=5, filter={"warm": True})[0]
    assert [hit.id for hit in warm] == ["yellow"]
    with pytest.raises(UnknownItemError, match="nope"):
        retriever.similar(["red", "nope"])
    with pytest.raises(InputError, match="list"):
        retriever.get("red")
    assert retriever.similar([]) == []
