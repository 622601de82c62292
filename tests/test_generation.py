"""Retrieval for generation: the selection policy, context formats, consensus captions and the
chat client."""

from __future__ import annotations

import base64
import doctest
import importlib.util
import io
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from PIL import Image

from mmret import Retriever, read_items
from mmret.encoders.hashing import HashEncoder
from mmret.engine import SearchResult
from mmret.errors import InputError
from mmret.evaluation.captioning import caption_metrics
from mmret.generation import (
    Context,
    ContextPolicy,
    Document,
    fewshot,
    from_chat,
    from_markdown,
    retrieve_context,
    select,
    to_chat,
    to_markdown,
)
from mmret.generation.chat import ChatEndpoint, ChatError
from mmret.generation.consensus import consensus, consensus_captions
from mmret.generation.fewshot import (
    FewShotOptions,
    auto_weight,
    few_shot_probabilities,
    neighbour_votes,
    split_shots,
)
from mmret.items import Item, Query

from .cli import run
from .conftest import solid


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng: np.random.Generator, clusters: int, per: int, dim: int = 16) -> np.ndarray:
    """``clusters`` groups of ``per`` near-copies each, group by group."""
    centres = rng.standard_normal((clusters, dim))
    return _unit(
        np.repeat(centres, per, axis=0) + 0.05 * rng.standard_normal((clusters * per, dim))
    )


def _hits(vectors: np.ndarray, query: np.ndarray, both: bool = True) -> list[SearchResult]:
    scores = vectors @ query
    order = np.argsort(-scores)
    return [
        SearchResult(f"d{i}", float(scores[i]), "text", "img.png" if both else None) for i in order
    ]


def test_diversity_lowers_the_largest_similarity_within_the_set() -> None:
    rng = np.random.default_rng(0)
    vectors = _clustered(rng, clusters=6, per=5)
    query = _unit(vectors[:1] + vectors[5:6] + vectors[10:11])[0]
    hits = _hits(vectors, query)
    ranked = vectors[[int(hit.id[1:]) for hit in hits]]

    def largest_similarity(chosen: list[SearchResult]) -> float:
        picked = vectors[[int(hit.id[1:]) for hit in chosen]]
        between = picked @ picked.T
        np.fill_diagonal(between, -1)
        return float(between.max())

    relevant_only = select(
        query, hits, ranked, ContextPolicy(k=4, diversity=0.0, duplicate_threshold=1.0)
    )
    diverse = select(query, hits, ranked, ContextPolicy(k=4, diversity=0.5))
    assert [hit.id for hit in relevant_only] == [hit.id for hit in hits[:4]]
    assert largest_similarity(diverse) < largest_similarity(relevant_only)
    assert largest_similarity(diverse) < 0.9  # no two near-copies


def test_near_duplicates_of_the_query_and_of_each_other_are_dropped() -> None:
    rng = np.random.default_rng(1)
    vectors = _clustered(rng, clusters=3, per=4)
    query = vectors[0]  # one document is (almost) the query itself
    hits = _hits(vectors, query)
    ranked = vectors[[int(hit.id[1:]) for hit in hits]]
    chosen = select(query, hits, ranked, ContextPolicy(k=5, diversity=0.0, duplicate_threshold=0.9))
    picked = vectors[[int(hit.id[1:]) for hit in chosen]]
    assert (picked @ query < 0.9).all()
    between = picked @ picked.T
    np.fill_diagonal(between, 0)
    assert (between < 0.9).all()
    assert len(chosen) == 2  # one per cluster left: the query's own cluster is all duplicates


def test_modality_prefer_and_require() -> None:
    rng = np.random.default_rng(2)
    vectors = _unit(rng.standard_normal((6, 16)))
    query = vectors[0] * 0.5 + vectors[1] * 0.5
    hits = [
        SearchResult(hit.id, hit.score, hit.text, "img.png" if hit.id in {"d4", "d5"} else None)
        for hit in _hits(vectors, query)
    ]
    ranked = vectors[[int(hit.id[1:]) for hit in hits]]
    required = select(query, hits, ranked, ContextPolicy(k=3, modality="require", diversity=0))
    assert {hit.id for hit in required} == {"d4", "d5"}
    preferred = select(
        query, hits, ranked, ContextPolicy(k=1, modality="prefer", modality_bonus=10.0)
    )
    assert preferred[0].id in {"d4", "d5"}
    anything = select(query, hits, ranked, ContextPolicy(k=1, modality="any", diversity=0))
    assert anything[0].id == hits[0].id


def test_sampling_is_seeded() -> None:
    rng = np.random.default_rng(3)
    vectors = _unit(rng.standard_normal((40, 16)))
    hits = _hits(vectors, vectors[0])
    ranked = vectors[[int(hit.id[1:]) for hit in hits]]

    def draw(seed: int) -> list[str]:
        policy = ContextPolicy(k=5, temperature=0.5, seed=seed, duplicate_threshold=1.0)
        return [hit.id for hit in select(vectors[0], hits, ranked, policy)]

    assert draw(7) == draw(7)
    assert len({tuple(draw(seed)) for seed in range(6)}) > 1


@pytest.mark.parametrize(
    "options",
    [
        {"k": 0},
        {"k": 5, "candidates": 2},
        {"modality": "most"},
        {"diversity": 2.0},
        {"duplicate_threshold": 0.0},
        {"temperature": -1.0},
    ],
)
def test_bad_policies_are_named(options: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        ContextPolicy(**options)


@pytest.fixture
def memory(tmp_path: Path, manifest: Path) -> Path:
    folder = tmp_path / "memory"
    with Retriever.create(folder, encoder=HashEncoder(32)) as retriever:
        retriever.add(read_items(manifest))
    return folder


def test_a_query_image_never_comes_back_as_its_own_context(memory: Path, manifest: Path) -> None:
    own = manifest.parent / "images" / "red.png"
    with Retriever.open(memory, readonly=True) as retriever:
        chosen = retrieve_context(retriever, Query(image=own), ContextPolicy(k=3))
    assert chosen.documents and "red" not in chosen.ids
    assert all(document.image and document.text for document in chosen.documents)


def _sample_context(memory: Path) -> Context:
    with Retriever.open(memory, readonly=True) as retriever:
        return retrieve_context(retriever, Query(text="a blue square"), ContextPolicy(k=3))


def test_json_and_markdown_round_trip(memory: Path) -> None:
    context = _sample_context(memory)
    assert len(context.documents) == 3
    assert Context.from_dict(json.loads(json.dumps(context.to_dict()))) == context
    back = from_markdown(to_markdown(context))
    assert back.query_text == context.query_text and back.ids == context.ids
    for ours, theirs in zip(back.documents, context.documents, strict=True):
        assert (ours.text, ours.image, ours.metadata) == (
            theirs.text,
            theirs.image,
            theirs.metadata,
        )
        assert ours.score == pytest.approx(theirs.score, rel=1e-5)


def test_markdown_keeps_awkward_texts_and_ids() -> None:
    document = Document('id "with" quotes', 0.5, 'line one\n\n> not a quote\n### 2. "x"', None, {})
    context = Context("a\nquery", None, (document,))
    assert from_markdown(to_markdown(context)) == context


def test_chat_messages_carry_images_as_data_urls_and_round_trip(memory: Path) -> None:
    context = _sample_context(memory)
    messages = to_chat(context, "what colour?", image_side=16)
    assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
    back = from_chat(json.loads(json.dumps(messages)))
    assert back.ids == context.ids and back.query_text == "what colour?"
    for ours, theirs in zip(back.documents, context.documents, strict=True):
        assert ours.text == theirs.text
        assert ours.image is not None and ours.image.startswith("data:image/jpeg;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(ours.image.split(",", 1)[1])))
        assert max(decoded.size) <= 16


def test_context_cli_prints_every_format(memory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(memory.parent)  # relative paths, as a user types them
    as_json = json.loads(run("context", "memory", "a green square", "--k", "2", "--format", "json"))
    assert len(as_json["documents"]) == 2
    markdown = run("context", "memory", "a green square", "--k", "2")
    assert from_markdown(markdown).ids == [d["id"] for d in as_json["documents"]]
    chat = json.loads(run("context", "memory", "a green square", "-k", "2", "--format", "chat"))
    assert from_chat(chat).ids == [d["id"] for d in as_json["documents"]]
    assert "--format must be one of" in run("context", "memory", "x", "--format", "xml", code=1)
    assert "no such image file" in run("context", "memory", "--image", "nope.png", code=1)


def test_consensus_picks_the_caption_the_others_agree_with() -> None:
    captions = ["a dog runs on grass", "a brown dog runs", "a dog runs", "a red car"]
    encoder = HashEncoder(64)
    assert consensus(captions, encoder.encode_texts(captions), None) == "a dog runs"


def test_consensus_captions_come_from_other_images(memory: Path, manifest: Path) -> None:
    own = manifest.parent / "images" / "blue.png"
    with Retriever.open(memory, readonly=True) as retriever:
        (made,) = consensus_captions(retriever, [own])
    assert made.text and "blue" not in made.text and "blue" not in made.context.ids
    lines = run("caption", own, "--memory", memory, "--model", "consensus", "--json")
    assert json.loads(lines)[0]["caption"] == made.text


def test_caption_says_when_the_memory_has_no_other_captioned_image(
    tmp_path: Path, manifest: Path
) -> None:
    alone = tmp_path / "alone"
    with Retriever.create(alone, encoder=HashEncoder(32)) as retriever:
        retriever.add([Item("red", image=manifest.parent / "images" / "red.png", text="red")])
    red = manifest.parent / "images" / "red.png"
    printed = run("caption", red, "--memory", alone, "--model", "consensus")
    assert "no captioned neighbour in the memory" in printed


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, Any]]] = []
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.seen.append(
            {"path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
        )
        reply = {"choices": [{"message": {"role": "assistant", "content": "It is blue."}}]}
        payload = json.dumps(reply if self.status == 200 else {"error": "nope"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def chat_server() -> Iterator[str]:
    _Recorder.seen, _Recorder.status = [], 200
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_ask_sends_exactly_the_documented_request(memory: Path, chat_server: str) -> None:
    answer = run(
        "ask",
        memory,
        "what colour is the square?",
        "--base-url",
        chat_server,
        "--chat-model",
        "tiny",
        "--api-key",
        "secret",
        "--k",
        "2",
        "--image-side",
        "16",
    )
    assert answer.strip() == "It is blue."
    (request,) = _Recorder.seen
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer secret"
    assert request["headers"]["Content-Type"] == "application/json"
    body = request["body"]
    assert set(body) == {"model", "messages", "temperature"}
    assert body["model"] == "tiny" and body["temperature"] == 0.0
    with Retriever.open(memory, readonly=True) as retriever:
        expected = retrieve_context(
            retriever, Query(text="what colour is the square?"), ContextPolicy(k=2)
        )
    assert body["messages"] == to_chat(expected, "what colour is the square?", image_side=16)


def test_chat_errors_are_named(chat_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMRET_CHAT_MODEL", raising=False)
    with pytest.raises(InputError, match="chat model"):
        ChatEndpoint.from_options(chat_server, None, None)
    _Recorder.status = 500
    with pytest.raises(ChatError, match="HTTP 500"):
        ChatEndpoint(chat_server, "tiny").complete([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatError, match="cannot reach"):
        ChatEndpoint("http://127.0.0.1:9/v1", "tiny", timeout=2).complete([])


needs_caption_eval = pytest.mark.skipif(
    shutil.which("java") is None or importlib.util.find_spec("pycocoevalcap") is None,
    reason="caption evaluation needs pycocoevalcap and Java",
)


@needs_caption_eval
def test_caption_metrics_reward_the_right_captions() -> None:
    dog = ["a black dog runs across the green grass", "a dog running on grass"]
    children = ["two children play football on the beach", "kids play ball by the sea"]
    references = {"a": dog, "b": children, "c": dog, "d": children}
    about_dog, about_children = "a dog runs across the grass", "two children play on the beach"
    made = {"a": about_dog, "b": about_dog, "c": about_children, "d": about_children}
    scores = caption_metrics(references, made, meteor=False)
    per_image = scores["per_image_cider"]
    assert per_image["a"] > per_image["c"] and per_image["d"] > per_image["b"]
    assert scores["n_images"] == 4 and scores["METEOR"] is None and scores["BLEU-1"] > 0
    with pytest.raises(InputError, match="no reference captions"):
        caption_metrics(references, {"e": "a cat"}, meteor=False)


@needs_caption_eval
def test_eval_caption_cli(memory: Path, manifest: Path, tmp_path: Path) -> None:
    out, captions = tmp_path / "caption.json", tmp_path / "captions.jsonl"
    run(
        "eval",
        "caption",
        manifest,
        "--memory",
        memory,
        "--model",
        "consensus",
        "--k",
        "2",
        "--json",
        out,
        "--captions",
        captions,
        "--no-meteor",
    )
    record = json.loads(out.read_text())
    assert record["n_images"] == 4 and record["CIDEr"] >= 0 and record["METEOR"] is None
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["red", "green", "blue", "yellow"]
    assert all(row["id"] not in row["neighbours"] for row in rows)


@pytest.mark.slow
@needs_caption_eval
def test_meteor_runs_and_ends_its_java_process() -> None:
    references = {"a": ["a dog runs on the grass"], "b": ["two kids play"]}
    scores = caption_metrics(references, {"a": "a dog runs", "b": "kids playing"})
    assert 0 < scores["METEOR"] < 100 and "note" not in scores


def test_neighbour_votes_and_mixing() -> None:
    rng = np.random.default_rng(4)
    centres = _unit(rng.standard_normal((3, 16)))
    shots = _unit(np.repeat(centres, 4, axis=0) + 0.1 * rng.standard_normal((12, 16)))
    shot_labels = np.repeat(np.arange(3), 4)
    queries = _unit(centres + 0.1 * rng.standard_normal((3, 16)))
    votes = neighbour_votes(queries, shots, shot_labels, 3, FewShotOptions(k=4))
    np.testing.assert_allclose(votes.sum(axis=1), 1.0, rtol=1e-6)
    assert (votes.argmax(axis=1) == np.arange(3)).all()
    wrong_zero_shot = np.roll(np.eye(3), 1, axis=1)  # zero-shot says the next class
    for weight, expected in ((0.0, np.roll(np.arange(3), -1)), (1.0, np.arange(3))):
        mixed = few_shot_probabilities(
            wrong_zero_shot, queries, shots, shot_labels, FewShotOptions(k=4, weight=weight)
        )
        assert (mixed.argmax(axis=1) == expected).all()
    assert auto_weight(shot_labels) == pytest.approx(0.8)


def test_split_shots_is_seeded_and_disjoint() -> None:
    labels = np.repeat(np.arange(3), 5)
    picked, rest = split_shots(labels, 2, seed=0)
    assert len(picked) == 6 and np.bincount(labels[picked]).tolist() == [2, 2, 2]
    assert not set(picked) & set(rest) and len(picked) + len(rest) == 15
    assert (split_shots(labels, 2, seed=0)[0] == picked).all()
    with pytest.raises(InputError, match="too few"):
        split_shots(labels, 5, seed=0)


def test_eval_fewshot_cli(tmp_path: Path) -> None:
    classes = tmp_path / "classes"
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
        (classes / name).mkdir(parents=True)
        for view in range(4):
            solid(tuple(c + 5 * view for c in colour)).save(classes / name / f"{view}.png")
    out = tmp_path / "fewshot.json"
    run(
        "eval",
        "fewshot",
        classes,
        "--model",
        "hash:32",
        "--shots",
        "1",
        "--shots",
        "2",
        "--seeds",
        "2",
        "--json",
        out,
        "--cache-dir",
        tmp_path / "cache",
    )
    record = json.loads(out.read_text())
    assert [row["shots"] for row in record["rows"]] == [1, 2]
    assert all(0 <= row["mixed"] <= 100 for row in record["rows"])
    assert "too few" in run(
        "eval", "fewshot", classes, "--model", "hash:32", "--shots", "4", code=1
    )


def test_docstring_examples() -> None:
    result = doctest.testmod(fewshot, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
