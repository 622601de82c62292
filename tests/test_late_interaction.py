import doctest

import numpy as np
import pytest

from mmret import late_interaction
from mmret.errors import InputError
from mmret.late_interaction import as_tokens, maxsim, similarity


def _unit_tokens(rng: np.random.Generator, n: int, tokens: int, dim: int) -> np.ndarray:
    values = rng.standard_normal((n, tokens, dim)).astype(np.float32)
    values /= np.linalg.norm(values, axis=2, keepdims=True)
    return values.reshape(n, tokens * dim)


def test_maxsim_matches_a_direct_loop() -> None:
    rng = np.random.default_rng(0)
    queries, docs = _unit_tokens(rng, 3, 4, 8), _unit_tokens(rng, 11, 6, 8)
    expected = np.zeros((3, 11), dtype=np.float32)
    for q, query in enumerate(as_tokens(queries, 8)):
        for n, doc in enumerate(as_tokens(docs, 8)):
            expected[q, n] = sum(max(float(t @ u) for u in doc) for t in query)
    np.testing.assert_allclose(maxsim(queries, docs, 8), expected, rtol=1e-5, atol=1e-5)


def test_maxsim_blocks_give_the_same_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    queries, docs = _unit_tokens(rng, 2, 3, 4), _unit_tokens(rng, 50, 5, 4)
    whole = maxsim(queries, docs, 4)
    monkeypatch.setattr("mmret.late_interaction._BLOCK_FLOATS", 30)  # one document a block
    np.testing.assert_allclose(maxsim(queries, docs, 4), whole, rtol=1e-6)


def test_similarity_is_the_inner_product_for_single_vectors() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((3, 6)), rng.standard_normal((4, 6))
    np.testing.assert_allclose(similarity(a, b, None), a @ b.T)
    np.testing.assert_allclose(similarity(a, b, 6), a @ b.T, rtol=1e-5)  # one token each


def test_rows_that_are_not_whole_tokens_are_refused() -> None:
    with pytest.raises(InputError, match="whole tokens of 4"):
        maxsim(np.zeros((1, 6)), np.zeros((2, 8)), 4)


def test_docstring_examples() -> None:
    result = doctest.testmod(late_interaction, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_the_differentiable_form_matches_maxsim() -> None:
    import torch

    rng = np.random.default_rng(3)
    queries, docs = _unit_tokens(rng, 3, 4, 8), _unit_tokens(rng, 7, 5, 8)
    tensors = late_interaction.maxsim_tensors(
        torch.from_numpy(as_tokens(queries, 8).copy()), torch.from_numpy(as_tokens(docs, 8).copy())
    )
    np.testing.assert_allclose(tensors.numpy(), maxsim(queries, docs, 8), rtol=1e-5, atol=1e-5)
