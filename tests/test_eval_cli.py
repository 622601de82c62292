"""``mmret eval retrieval | zeroshot | ir`` end to end on photos the tests write themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as samples
from typer.testing import CliRunner

from mmret.cli.main import app
from mmret.encoders import DEFAULT_MODEL

runner = CliRunner()

#: scikit-image photo -> captions
PHOTOS = {
    "chelsea": ["a cat", "a ginger cat with whiskers"],
    "astronaut": ["a woman astronaut", "a person in a space suit smiling"],
    "coffee": ["a cup of coffee", "coffee on a saucer"],
    "rocket": ["a rocket on the launch pad"],
    "camera": ["a man with a camera", "a photographer with a tripod"],
    "horse": ["the silhouette of a horse"],
}
RETRIEVAL_KEYS = {
    "text_to_image",
    "image_to_text",
    "rsum",
    "n_images",
    "n_texts",
    "model",
    "seconds",
}


def run(*args: str | Path, code: int = 0) -> str:
    result = runner.invoke(app, ["eval", *(str(a) for a in args)])
    assert result.exit_code == code, result.output
    return result.output


def report_files(folder: Path, stem: str) -> tuple[Path, Path, Path]:
    """Where a test asks for the JSON, Markdown and PNG reports."""
    return folder / f"{stem}.json", folder / f"{stem}.md", folder / f"{stem}.png"


def report_options(cache: Path, out: Path, markdown: Path, plot: Path) -> list[str | Path]:
    return ["--cache-dir", cache, "--json", out, "--markdown", markdown, "--plot", plot]


def photo(name: str, size: int = 96) -> Image.Image:
    pixels = getattr(samples, name)()
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    return Image.fromarray(pixels).convert("RGB").resize((size, size))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        photo(name).save(folder / f"{name}.jpg")
    return folder


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def manifest(photos: Path, tmp_path: Path) -> Path:
    path = tmp_path / "test.jsonl"
    rows = [
        {"id": name, "image": str(photos / f"{name}.jpg"), "captions": captions}
        for name, captions in PHOTOS.items()
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_retrieval_json_markdown_plot_and_cache(
    manifest: Path, tmp_path: Path, cache: Path
) -> None:
    out, markdown, plot = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    args = ["retrieval", manifest, "--model", "hash:32", "--cache-dir", cache, "--json", out]
    output = run(*args, "--markdown", markdown, "--plot", plot)
    assert "text→image" in output and "RSUM" in output and "median rank" in output
    first = json.loads(out.read_text())
    assert set(first) == RETRIEVAL_KEYS
    for direction in ("text_to_image", "image_to_text"):
        assert set(first[direction]) == {"R@1", "R@5", "R@10"}
        assert all(0 <= v <= 100 for v in first[direction].values())
    assert first["n_images"] == 6 and first["n_texts"] == 10 and first["model"] == "hash:32"
    assert first["rsum"] == pytest.approx(
        sum(first["text_to_image"].values()) + sum(first["image_to_text"].values()), abs=1e-3
    )
    assert markdown.read_text().startswith("## Image-text retrieval")
    assert "| text→image |" in markdown.read_text()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((cache / "embeddings").iterdir())) == 1
    run(*args)  # served from the cache: same numbers
    second = json.loads(out.read_text())
    assert {k: v for k, v in second.items() if k != "seconds"} == {
        k: v for k, v in first.items() if k != "seconds"
    }


def test_retrieval_karpathy_and_coco_files(photos: Path, tmp_path: Path, cache: Path) -> None:
    karpathy = tmp_path / "dataset_flickr30k.json"
    images = [
        {
            "filename": f"{name}.jpg",
            "imgid": i,
            "split": "test" if i < 4 else "train",
            "sentences": [{"raw": c, "tokens": c.split()} for c in captions],
        }
        for i, (name, captions) in enumerate(PHOTOS.items())
    ]
    karpathy.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    out = tmp_path / "k.json"
    common = ("--model", "hash:32", "--cache-dir", cache, "--json", out)
    run("retrieval", karpathy, "--images", photos, *common)
    assert json.loads(out.read_text())["n_images"] == 4
    run("retrieval", karpathy, "--images", photos, "--split", "train", *common)
    assert json.loads(out.read_text())["n_texts"] == 3
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": f"{n}.jpg"} for i, n in enumerate(PHOTOS)],
                "annotations": [
                    {"id": 10 * i + j, "image_id": i, "caption": c}
                    for i, captions in enumerate(PHOTOS.values())
                    for j, c in enumerate(captions)
                ],
            }
        )
    )
    assert "give its image folder with --images" in run("retrieval", coco, code=1)
    run("retrieval", coco, "--images", photos, *common)
    assert json.loads(out.read_text())["n_texts"] == 10


def test_retrieval_argument_errors(manifest: Path, tmp_path: Path) -> None:
    head_error = run("retrieval", manifest, "--model", "hash:32", "--head", tmp_path, code=1)
    assert "--head is an alignment head for the starter model" in head_error
    assert "no such folder" in run("retrieval", manifest, "--head", tmp_path / "nope", code=1)
    assert "give a .png" in run("retrieval", manifest, "--plot", tmp_path / "x.pdf", code=1)
    assert "--split and --images apply" in run("retrieval", manifest, "--split", "val", code=1)
    assert "Traceback" not in run("retrieval", tmp_path / "missing.jsonl", code=1)


def test_retrieval_with_trained_head_equals_model_spec(
    manifest: Path, tmp_path: Path, cache: Path
) -> None:
    from mmret.encoders.starter import SHIPPED_HEAD

    out = tmp_path / "h.json"
    run("retrieval", manifest, "--head", SHIPPED_HEAD, "--cache-dir", cache, "--json", out)
    result = json.loads(out.read_text())
    assert result["model"] == f"starter:{SHIPPED_HEAD}"
    # the real model finds these everyday photos from their captions far above chance
    assert result["text_to_image"]["R@1"] >= 60 and result["rsum"] >= 400


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    """Four classes, five views each (crops and flips of one photo per class)."""
    root = tmp_path / "classes"
    for folder, name in {
        "tabby_cat": "chelsea",
        "man": "camera",
        "horse": "horse",
        "rocket": "rocket",
    }.items():
        (root / folder).mkdir(parents=True)
        image = photo(name, 160)
        views = [
            image,
            image.crop((0, 0, 128, 128)),
            image.crop((32, 32, 160, 160)),
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            image.crop((16, 0, 144, 160)),
        ]
        for number, view in enumerate(views):
            view.resize((64, 64)).save(root / folder / f"{number}.png")
    (root / "stray.png").write_bytes(b"not inside a class folder")
    return root


def test_zeroshot_with_starter(class_folders: Path, tmp_path: Path, cache: Path) -> None:
    out, markdown, plot = report_files(tmp_path, "z")
    output = run("zeroshot", class_folders, *report_options(cache, out, markdown, plot))
    result = json.loads(out.read_text())
    assert set(result) == {"top1", "top5", "n", "classes", "model"}
    assert result["n"] == 20 and result["classes"] == 4 and result["model"] == DEFAULT_MODEL
    assert result["top1"] >= 75 and result["top5"] == 100  # 4 classes: top-5 is everything
    assert "tabby cat" in output and "not inside a class folder" in output
    assert "Per class" in markdown.read_text() and plot.stat().st_size > 1000


def test_zeroshot_templates_option(class_folders: Path, tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "z.json"
    common = ("--model", "hash:32", "--cache-dir", cache, "--json", out)
    output = run("zeroshot", class_folders, "-t", "a photo of a {}.", "-t", "a {}", *common)
    assert "2 template(s): a photo of a {}. | a {}" in output
    assert json.loads(out.read_text())["n"] == 20
    assert "exactly one '{}'" in run("zeroshot", class_folders, "-t", "no slot", *common, code=1)
    single = class_folders / "rocket"
    assert "at least two class sub-folders" in run("zeroshot", single, *common, code=1)


def test_ir_end_to_end(photos: Path, tmp_path: Path, cache: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    docs = [
        {"id": f"doc-{name}", "image": str(photos / f"{name}.jpg"), "text": captions[0]}
        for name, captions in PHOTOS.items()
    ]
    docs.append({"id": "doc-text-only", "text": "a plain text document about trains"})
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    # each query is a copy of one document (image+text, image only, text only): a perfect run
    queries = tmp_path / "queries.jsonl"
    rows = [
        {"id": "q1", "image": docs[0]["image"], "text": docs[0]["text"]},
        {"id": "q2", "image": docs[1]["image"], "text": docs[1]["text"]},
        {"id": "q3", "text": docs[-1]["text"]},
    ]
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("q1 0 doc-chelsea 2\nq2 0 doc-astronaut 1\nq3 0 doc-text-only 1\nq9 0 x 1\n")
    out, markdown, plot = report_files(tmp_path, "ir")
    output = run(
        "ir",
        queries,
        corpus,
        qrels,
        "--model",
        "hash:32",
        *report_options(cache, out, markdown, plot),
    )
    result = json.loads(out.read_text())
    assert set(result) == {
        "R@1",
        "R@5",
        "R@10",
        "MRR@10",
        "nDCG@10",
        "n_queries",
        "n_docs",
        "model",
        "seconds",
    }
    assert result["n_queries"] == 3 and result["n_docs"] == 7
    assert result["R@1"] == result["MRR@10"] == result["nDCG@10"] == 100.0
    assert "nDCG@10" in output and "1 judged query id(s) not among the queries" in output
    assert "| queries |" in markdown.read_text() and plot.is_file()
