"""Multi-vector (late-interaction) models end to end: the manifest records ``token_dim``,
``auto`` picks a MaxSim backend, and create/add/search/filters/reopen/check/repair work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmret import InputError, Item, Retriever, read_items
from mmret.encoders import load_encoder
from mmret.encoders.hashing import HashEncoder, TokenHashEncoder
from mmret.index.base import AUTO_PLAID_FROM, new_backend
from mmret.index.manifest import MANIFEST_FILE, IndexManifest, manifest_text, parse_manifest
from mmret.index.maxsim import MaxSimIndex
from mmret.late_interaction import as_tokens, maxsim
from mmret.maintenance.integrity import check_index, repair_index

TOKENS, TOKEN_DIM = 4, 16


@pytest.fixture
def token_encoder() -> TokenHashEncoder:
    return TokenHashEncoder(TOKENS, TOKEN_DIM)


@pytest.fixture
def retriever(tmp_path: Path, manifest: Path, token_encoder: TokenHashEncoder) -> Retriever:
    retriever = Retriever.create(tmp_path / "index", encoder=token_encoder)
    assert retriever.add(read_items(manifest)).added == 4
    return retriever


def test_the_token_encoder_gives_unit_tokens(token_encoder: TokenHashEncoder) -> None:
    vectors = token_encoder.encode_texts(["a red square", "a blue circle"])
    assert vectors.shape == (2, TOKENS * TOKEN_DIM) and token_encoder.token_dim == TOKEN_DIM
    np.testing.assert_allclose(np.linalg.norm(as_tokens(vectors, TOKEN_DIM), axis=2), 1, 1e-5)
    assert load_encoder("hash-tokens:4x16").spec == token_encoder.spec == "hash-tokens:4x16"
    with pytest.raises(InputError, match="TOKENSxDIM"):
        load_encoder("hash-tokens:4by16")


def test_create_records_token_dim_and_auto_picks_maxsim(retriever: Retriever) -> None:
    assert retriever.manifest.token_dim == TOKEN_DIM
    assert retriever.backend_name == "maxsim"
    saved = json.loads((retriever.folder / MANIFEST_FILE).read_text())
    assert saved["token_dim"] == TOKEN_DIM and retriever.info()["token_dim"] == TOKEN_DIM


def test_single_vector_manifests_stay_as_they_were(tmp_path: Path) -> None:
    """A manifest without ``token_dim`` (every one written before) reads as single-vector, and
    a single-vector manifest is still written without the field."""
    text = manifest_text(IndexManifest(encoder="hash:8", dim=8))
    assert "token_dim" not in text
    assert parse_manifest(text.encode(), tmp_path / MANIFEST_FILE).token_dim is None


def test_search_scores_are_maxsim(retriever: Retriever, token_encoder: TokenHashEncoder) -> None:
    query = token_encoder.encode_texts(["a red square"])
    hits = retriever.search_vectors(query, k=4)[0]
    assert hits[0].id == "red"
    _keys, stored = retriever.index.store.vectors()  # what was indexed, straight from SQLite
    expected = np.sort(maxsim(query, stored, TOKEN_DIM)[0])[::-1]
    np.testing.assert_allclose([hit.score for hit in hits], expected, rtol=1e-5)


def test_filters_remove_reopen_and_check(retriever: Retriever) -> None:
    def ids(**options: object) -> set[str]:
        return {hit.id for hit in retriever.search(["square"], k=10, **options)[0]}  # type: ignore[arg-type]

    assert ids(filter={"warm": True}) == {"red", "yellow"}
    assert retriever.remove(["red"]) == 1
    assert ids() == {"green", "blue", "yellow"}
    retriever.add([Item("note", text="a purple square", metadata={"warm": True})])
    retriever.close()
    assert check_index(retriever.folder).ok
    with Retriever.open(retriever.folder, readonly=True) as reopened:
        assert reopened.backend_name == "maxsim" and len(reopened) == 4
        hits = reopened.search(["purple"], k=1)[0]  # the encoder is rebuilt from its spec
        assert hits[0].id == "note"
        assert {h.id for h in reopened.search(["square"], k=9, filter={"warm": True})[0]} == {
            "yellow",
            "note",
        }
    for cache in MaxSimIndex(TOKENS * TOKEN_DIM).cache_files(retriever.folder):
        cache.write_bytes(b"garbage")
    assert repair_index(retriever.folder).items == 4
    assert check_index(retriever.folder).ok


def test_add_vectors_normalises_each_token(tmp_path: Path, token_encoder: TokenHashEncoder) -> None:
    with Retriever.create(tmp_path / "index", encoder=token_encoder) as retriever:
        raw = np.random.default_rng(0).standard_normal((3, TOKENS * TOKEN_DIM)) * 5
        retriever.add_vectors([Item(f"v{i}", text="x") for i in range(3)], raw)
        hits = retriever.search_vectors(raw[1:2], k=1)[0]
        assert hits[0].id == "v1" and hits[0].score == pytest.approx(TOKENS, rel=1e-5)


def test_backends_must_fit_the_model_kind(tmp_path: Path) -> None:
    assert new_backend("auto", {}, 64, AUTO_PLAID_FROM - 1, token_dim=16).name == "maxsim"
    assert new_backend("auto", {}, 64, AUTO_PLAID_FROM, token_dim=16).name == "plaid"
    assert new_backend("auto", {}, 64, 10).name == "exact"
    with pytest.raises(InputError, match="gives token sets"):
        new_backend("faiss", {}, 64, 0, token_dim=16)
    with pytest.raises(InputError, match="one vector per item"):
        new_backend("maxsim", {}, 64, 0)
    with pytest.raises(InputError, match="gives token sets"):
        Retriever.create(tmp_path / "a", encoder=TokenHashEncoder(), backend="exact")
    with pytest.raises(InputError, match="one vector per item"):
        Retriever.create(tmp_path / "b", encoder=HashEncoder(8), backend="maxsim")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(InputError, match="does not divide"):
        MaxSimIndex(64, token_dim=10)


@pytest.mark.parametrize("backend", ["auto", "milvus"])
def test_the_cli_indexes_and_searches_a_multi_vector_model(
    tmp_path: Path, photo_folder: Path, backend: str
) -> None:
    from typer.testing import CliRunner

    from mmret.cli.main import app

    if backend == "milvus":
        pytest.importorskip("pymilvus")
    out = tmp_path / "index"
    runner = CliRunner()
    command = ["index", str(photo_folder), "--out", str(out), "--model", "hash-tokens:4x16"]
    made = runner.invoke(app, [*command, "--backend", backend])
    assert made.exit_code == 0, made.output
    found = runner.invoke(app, ["search", str(out), "a blue square", "--json"])
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)["results"][0]["id"] == "blue"
    info = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    in_use = {"auto": "maxsim", "milvus": "milvus-maxsim"}[backend]
    assert info["backend_in_use"] == in_use and info["token_dim"] == 16
    assert runner.invoke(app, ["check", str(out)]).exit_code == 0
