from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmret.cache.tower_features import PairFeatures
from mmret.encoders.towers import IMAGE_DIM, TEXT_DIM
from mmret.heads.alignment import AlignmentHead
from mmret.training.align import AlignTrainingConfig, embed_pairs, train_alignment
from mmret.training.losses import symmetric_info_nce


def synthetic_pairs(n_images: int, seed: int) -> PairFeatures:
    """Tower-shaped features where captions and images share a hidden 16-d 'meaning'."""
    rng = np.random.default_rng(seed)
    to_image = np.random.default_rng(100).standard_normal((16, IMAGE_DIM))
    to_text = np.random.default_rng(101).standard_normal((16, TEXT_DIM))
    meaning = rng.standard_normal((n_images, 16))
    image = meaning @ to_image + 0.2 * rng.standard_normal((n_images, IMAGE_DIM))
    owner = np.repeat(np.arange(n_images), 3)
    text = meaning[owner] @ to_text + 0.2 * rng.standard_normal((len(owner), TEXT_DIM))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return PairFeatures(
        [str(i) for i in range(n_images)], image.astype(np.float32), text.astype(np.float32), owner
    )


FAST = AlignTrainingConfig(embed_dim=32, epochs=4, batch_size=256, learning_rate=3e-3)


def test_training_learns_the_alignment() -> None:
    train, dev = synthetic_pairs(2000, seed=0), synthetic_pairs(100, seed=1)
    untrained = AlignmentHead(train_alignment(train, None, FAST)[0].config)
    before = embed_pairs(untrained, dev)
    head, logs = train_alignment(train, dev, FAST)
    assert logs[-1].loss < logs[0].loss
    best = max(log.dev.rsum for log in logs if log.dev is not None)
    from mmret.evaluation.retrieval import retrieval_metrics

    after = retrieval_metrics(*embed_pairs(head, dev), dev.text_image)
    assert after.rsum == pytest.approx(best)  # the best dev epoch is the one kept
    chance = retrieval_metrics(*before, dev.text_image)
    assert after.text_to_image["R@1"] > 30 > chance.text_to_image["R@1"]


def test_training_is_reproducible() -> None:
    train = synthetic_pairs(128, seed=0)
    config = AlignTrainingConfig(embed_dim=16, epochs=2, batch_size=32)
    first, _ = train_alignment(train, None, config)
    second, _ = train_alignment(train, None, config)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_head_round_trip(tmp_path: Path) -> None:
    head, _ = train_alignment(
        synthetic_pairs(64, 0), None, AlignTrainingConfig(embed_dim=8, epochs=1, batch_size=32)
    )
    head.save(tmp_path / "head")
    loaded = AlignmentHead.load(tmp_path / "head")
    assert loaded.config == head.config
    features = torch.randn(3, IMAGE_DIM)
    torch.testing.assert_close(loaded.image(features), head.eval().image(features))
    assert (tmp_path / "head" / "config.json").is_file()


def test_same_image_captions_are_not_negatives() -> None:
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    text = image.clone()
    text[1] = image[0]  # rows 0 and 1 share an image: identical embeddings
    image[1] = image[0]
    groups = torch.tensor([0, 0, 1, 2])
    masked = symmetric_info_nce(image, text, groups, torch.tensor(100.0))
    unmasked = symmetric_info_nce(image, text, torch.arange(4), torch.tensor(100.0))
    assert masked < 1e-3 < unmasked  # without the mask, the twin counts as a hard negative
