"""The HTTP API in-process (starlette's TestClient): search, items, writes, limits, security."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

import mmret
from mmret.server import ServerConfig, create_app
from tests.conftest import COLOURS, solid

pytest.importorskip("fastapi")
from starlette.testclient import TestClient

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png(colour: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> bytes:
    out = io.BytesIO()
    solid(colour, size).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def index(tmp_path: Path, manifest: Path) -> Path:
    folder = tmp_path / "index.mmret"
    with mmret.Retriever.create(folder, model="hash:32") as retriever:
        assert retriever.add(mmret.read_items(manifest)).added == 4
        retriever.add_vectors(  # an item with a text and no image, id with a slash
            [mmret.Item("notes/plain", text="a note about squares")],
            retriever.encoder.encode_texts(["a note about squares"]),
        )
    return folder


def client_for(config: ServerConfig) -> TestClient:
    return TestClient(create_app(config), base_url="http://127.0.0.1")


@pytest.fixture
def client(index: Path) -> Iterator[TestClient]:
    with client_for(ServerConfig(index=str(index), token=TOKEN, max_k=20)) as client:
        yield client


def ids(response: object) -> list[str]:
    assert getattr(response, "status_code", None) == 200, getattr(response, "text", response)
    return [hit["id"] for hit in response.json()["results"]]  # type: ignore[attr-defined]


def test_health_schema_and_page(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health == {
        "status": "ok",
        "items": 5,
        "encoder": "hash:32",
        "backend": "exact",
        "readonly": False,
        "max_k": 20,
        "version": mmret.__version__,
    }
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/search/upload", "/items", "/items/{item_id}", "/health"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and 'id="query-text"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from another origin
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "fetch(" in script.text
    assert client.get("/docs").status_code == 404  # its scripts would come from a CDN


def test_search_by_text_image_both_and_filter(client: TestClient) -> None:
    assert ids(client.post("/search", json={"text": "a red square", "k": 2}))[0] == "red"
    blue = base64.b64encode(png(COLOURS["blue"])).decode()
    assert ids(client.post("/search", json={"image": blue, "k": 1})) == ["blue"]
    data_url = f"data:image/png;base64,{blue}"
    assert ids(client.post("/search", json={"image": data_url, "k": 1})) == ["blue"]
    upload = {"image": ("q.png", png(COLOURS["blue"]), "image/png")}
    assert ids(client.post("/search/upload", files=upload, data={"k": "1"})) == ["blue"]
    both = client.post("/search", json={"text": "yellow", "image": blue, "k": 5})
    assert set(ids(both)) == {"red", "green", "blue", "yellow", "notes/plain"}
    hits = client.post(
        "/search", json={"text": "square", "k": 10, "filter": {"year": {"gte": 2002}}}
    )
    assert set(ids(hits)) == {"blue", "yellow"}
    as_cli = client.post("/search", json={"text": "square", "filter": ["year>=2002", "warm=true"]})
    assert ids(as_cli) == ["yellow"]
    # a bare number matches it stored as a number or as a string; quotes force a string
    assert ids(client.post("/search", json={"text": "square", "filter": ["year=2001"]})) == [
        "green"
    ]
    assert ids(client.post("/search", json={"text": "x", "filter": ['year="2001"']})) == []
    form = {"text": "square", "filter": '["year<2001"]'}
    assert ids(client.post("/search/upload", data=form)) == ["red"]
    hit = client.post("/search", json={"text": "a red square", "k": 1}).json()["results"][0]
    assert hit["metadata"] == {"year": 2000, "warm": True, "kind": "colour"}
    assert hit["text"] == "a red square\nsomething red" and hit["thumbnail"] == "/thumbnails/red"
    assert "image" not in hit  # server-side file paths are not handed out


def test_more_like_this_and_items(client: TestClient) -> None:
    like = ids(client.post("/search", json={"like": "red", "k": 3}))
    assert len(like) == 3 and "red" not in like
    missing = client.post("/search", json={"like": "nope"})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    both = client.post("/search", json={"like": "red", "text": "x"})
    assert both.status_code == 400 and "either" in both.json()["error"]
    item = client.get("/items/notes/plain").json()
    assert item == {
        "id": "notes/plain",
        "text": "a note about squares",
        "metadata": {},
        "thumbnail": None,
    }
    assert client.get("/items/nope").status_code == 404
    thumb = client.get("/thumbnails/red", params={"size": 16})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 16
    assert client.get("/thumbnails/notes%2Fplain").status_code == 404  # no image
    assert client.get("/thumbnails/red", params={"size": 5000}).status_code == 422


def test_writes_need_the_token(client: TestClient, index: Path) -> None:
    item = {"id": "purple", "text": "a purple square"}
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}):
        refused = client.post("/items", data=item, headers=headers)
        assert refused.status_code == 401 and "token" in refused.json()["error"]
        assert client.delete("/items/red", headers=headers).status_code == 401
    assert client.get("/health").json()["items"] == 5
    image = {"image": ("../../../etc/evil.png", png((128, 0, 128)), "image/png")}
    added = client.post(
        "/items", data={**item, "metadata": '{"year": 2024}'}, files=image, headers=AUTH
    )
    assert added.status_code == 201 and added.json() == {"added": 1, "ids": ["purple"]}
    assert ids(client.post("/search", json={"text": "a purple square", "k": 1})) == ["purple"]
    assert client.get("/items/purple").json()["metadata"] == {"year": 2024}
    assert client.get("/thumbnails/purple").status_code == 200
    kept = list((index / "uploads").iterdir())  # named by content, never by the request
    assert len(kept) == 1 and len(kept[0].stem) == 32 and kept[0].suffix == ".png"
    assert not (index.parent / "etc").exists()
    again = client.post("/items", data=item, headers=AUTH)
    assert again.status_code == 409 and "already in the index" in again.json()["error"]
    assert client.delete("/items/purple", headers=AUTH).json() == {"removed": 1}
    assert client.delete("/items/purple", headers=AUTH).status_code == 404
    assert client.get("/items/purple").status_code == 404


def test_add_several_items_in_one_transaction(client: TestClient) -> None:
    files = [("files", ("a.png", png((10, 10, 10)), "image/png"))]
    items = [
        {"id": "dark", "text": "a dark square", "image": 0, "metadata": {"kind": "new"}},
        {"id": "words", "text": "only words"},
    ]
    added = client.post("/items", data={"items": json.dumps(items)}, files=files, headers=AUTH)
    assert added.status_code == 201 and added.json()["ids"] == ["dark", "words"]
    assert set(ids(client.post("/search", json={"text": "x", "filter": {"kind": "new"}}))) == {
        "dark"
    }
    bad = [{"id": "fine", "text": "fine"}, {"id": "red", "text": "taken"}]
    refused = client.post("/items", data={"items": json.dumps(bad)}, headers=AUTH)
    assert refused.status_code == 409
    assert client.get("/items/fine").status_code == 404  # all or nothing
    for wrong, message in [
        ('[{"id": "x", "image": 3}]', "position in files"),
        ('{"id": "x"}', "JSON list"),
        ('[{"id": "x", "text": "t", "path": "/etc/passwd"}]', "unknown keys"),
        ('[{"id": "x", "text": "t"}, {"id": "x", "text": "u"}]', "given twice"),
        ("[nope", "not valid JSON"),
    ]:
        response = client.post("/items", data={"items": wrong}, headers=AUTH)
        assert response.status_code == 400 and message in response.json()["error"], wrong
    assert client.get("/health").json()["items"] == 7


def test_hostile_uploads_get_4xx_and_the_server_keeps_serving(index: Path) -> None:
    config = ServerConfig(
        index=str(index),
        token=TOKEN,
        max_image_bytes=20_000,
        max_request_bytes=60_000,
        max_pixels=200_000,
    )
    bomb = io.BytesIO()
    Image.new("L", (1000, 1000)).save(bomb, format="PNG")  # 1 megapixel in a few KB
    truncated = png(COLOURS["red"], (200, 200))[:300]
    noise = png(COLOURS["red"], (200, 150))  # random noise: over 20 KB as PNG
    assert len(noise) > 20_000
    with client_for(config) as client:
        cases = [
            (bomb.getvalue(), 400, "decompression bomb"),
            (truncated, 400, "image"),
            (b"GIF89a not really", 400, "image"),
            (b"", 400, "empty"),
            (noise, 413, "limit"),
        ]
        for data, status, message in cases:
            for response in (
                client.post("/search/upload", files={"image": ("q.png", data, "image/png")}),
                client.post("/search", json={"image": base64.b64encode(data).decode()}),
                client.post(
                    "/items", data={"id": "x"}, files={"image": ("x.png", data)}, headers=AUTH
                ),
            ):
                assert response.status_code == status, (message, response.text)
                assert message in response.json()["error"]
        huge = client.post(
            "/search", content=b"x" * 70_000, headers={"content-type": "application/json"}
        )
        assert huge.status_code == 413 and "limit" in huge.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while it streams in
            for _ in range(10):
                yield b"y" * 10_000

        streamed = client.post(
            "/search", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        assert client.post("/search", json={"text": "a red square", "k": 1}).status_code == 200
        assert client.get("/health").json()["items"] == 5
        assert not (index / "uploads").exists()


def test_bad_requests_are_json_with_a_message(client: TestClient) -> None:
    cases = [
        ({"text": "x", "k": 1000}, 400, "limit of 20"),
        ({"text": "x", "k": 0}, 422, "k:"),
        ({"k": 3}, 400, "needs a text"),
        ({"text": "  "}, 400, "needs a text"),
        ({"text": "x", "filter": {"year": {"about": 3}}}, 400, "range takes"),
        ({"text": "x", "filter": ["year>>3"]}, 400, "year"),
        ({"text": "x", "unknown": 1}, 422, "unknown"),
        ({"image": "not base64!"}, 400, "base64"),
    ]
    for body, status, message in cases:
        response = client.post("/search", json=body)
        assert response.status_code == status, body
        assert message in response.json()["error"], (body, response.json())
    broken = client.post("/search", content=b"{bad", headers={"content-type": "application/json"})
    assert broken.status_code == 422 and "error" in broken.json()
    assert client.get("/no/such/route").json() == {"error": "Not Found"}


def test_readonly_server_refuses_writes(index: Path) -> None:
    app = create_app(ServerConfig(index=str(index), readonly=True))
    assert app.state.token is None
    with TestClient(app, base_url="http://127.0.0.1") as client:
        refused = client.post("/items", data={"id": "x", "text": "y"}, headers=AUTH)
        assert refused.status_code == 403 and "read-only" in refused.json()["error"]
        assert client.delete("/items/red", headers=AUTH).status_code == 403
        assert ids(client.post("/search", json={"text": "a red square", "k": 1})) == ["red"]
        with mmret.Retriever.open(index, wait=0) as writer:  # no writer lock held
            assert len(writer) == 5


def test_generated_token_cors_and_hosts(index: Path) -> None:
    app = create_app(ServerConfig(index=str(index)))
    token = app.state.token
    assert isinstance(token, str) and len(token) >= 24
    with TestClient(app, base_url="http://127.0.0.1") as client:
        headers = {"Authorization": f"Bearer {token}"}
        assert (
            client.post("/items", data={"id": "t", "text": "t"}, headers=headers).status_code == 201
        )
        origin = {"Origin": "http://elsewhere.example"}
        answer = client.post("/search", json={"text": "x"}, headers=origin)
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
        rebound = client.get("/health", headers={"Host": "attacker.example"})
        assert rebound.status_code == 400 and "attacker.example" in rebound.json()["error"]
        for host in ("localhost:8000", "[::1]:8000", "127.0.0.1", "LOCALHOST"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("127.0.0.1.attacker.example", "[::2]:80", ""):
            assert client.get("/health", headers={"Host": host}).status_code == 400, host
    config = ServerConfig(index=str(index), token=TOKEN, cors_origins=("http://app.example",))
    with client_for(config) as client:
        answer = client.post(
            "/search", json={"text": "x"}, headers={"Origin": "http://app.example"}
        )
        assert answer.headers["access-control-allow-origin"] == "http://app.example"
    assert create_app(ServerConfig(index=str(index))).state.token != token


def test_metrics(client: TestClient) -> None:
    client.post("/search", json={"text": "a red square"})
    client.post("/search", json={"k": 0})
    text = client.get("/metrics").text
    assert 'mmret_http_requests_total{method="POST",route="/search",status="200"} 1.0' in text
    assert 'mmret_http_requests_total{method="POST",route="/search",status="422"} 1.0' in text
    assert "mmret_index_items 5.0" in text
    assert 'mmret_encoder_batch_size_count{kind="query"}' in text


def test_config_round_trip_and_checks(index: Path) -> None:
    config = ServerConfig(index=str(index), token=TOKEN, cors_origins=("http://a",))
    assert ServerConfig.from_dict(config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict()))["cors_origins"] == ["http://a"]
    with pytest.raises(mmret.InputError, match="unknown server settings"):
        ServerConfig.from_dict({"index": "x", "tokn": "y"})
    with pytest.raises(mmret.InputError, match="max_k"):
        ServerConfig(index="x", max_k=0)
    with pytest.raises(mmret.InputError, match="8 characters"):
        ServerConfig(index="x", token="short")


def test_searches_during_writes_see_whole_writes(client: TestClient) -> None:
    """Each add request is one transaction: a search sees all of its items or none."""
    batches, size = 4, 5  # k=20, the limit of this client, holds them all
    seen: list[dict[int, int]] = []
    stop = threading.Event()

    def search() -> None:
        while not stop.is_set():
            body = {"text": "batch item", "k": 20, "filter": {"kind": "batch"}}
            answer = client.post("/search", json=body).json()
            assert "results" in answer, answer
            hits = answer["results"]
            counts = Counter(hit["metadata"]["batch"] for hit in hits)
            seen.append(dict(counts))

    searchers = [threading.Thread(target=search) for _ in range(3)]
    for searcher in searchers:
        searcher.start()
    try:
        for batch in range(batches):
            items = [
                {
                    "id": f"b{batch}-{n}",
                    "text": f"batch item {n}",
                    "metadata": {"kind": "batch", "batch": batch},
                }
                for n in range(size)
            ]
            added = client.post("/items", data={"items": json.dumps(items)}, headers=AUTH)
            assert added.status_code == 201
    finally:
        stop.set()
        for searcher in searchers:
            searcher.join()
    assert len(seen) > batches
    assert all(count == size for counts in seen for count in counts.values())
    assert seen[-1] == dict.fromkeys(range(batches), size)
