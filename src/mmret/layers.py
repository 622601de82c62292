"""Token features of chosen layers of either tower, one shape for every encoder family.

Layers are numbered as Hugging Face numbers ``hidden_states``: 0 is the embedding (a
transformer's token embeddings, a CNN's stem), 1..n the layers after it, and negative numbers
count from the end (-1 is the last). For an EfficientNet a "layer" is a stage (the blocks that
share a resolution and width) and layer n is the head convolution whose pooled map the
starter model uses; its tokens are the stage's spatial map read row by row (T = H * W).
For a transformer a layer's tokens are its hidden states: the patch tokens for images (a CLS
token is dropped, so every token is a place in the picture), every token for texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmret.errors import InputError


@dataclass(frozen=True)
class LayerFeatures:
    """Features of ``B`` inputs at the layers ``layers`` of one tower.

    ``tokens[i]`` is ``(B, T_i, D_i)`` float32 for layer ``layers[i]`` and ``masks[i]`` its
    ``(B, T_i)`` bool mask, True for real tokens and False for padding. Widths and token
    counts differ from layer to layer, so the layers are a tuple rather than one tensor.
    """

    layers: tuple[int, ...]
    tokens: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor, ...]

    def pooled(self) -> tuple[torch.Tensor, ...]:
        """``(B, D_i)`` per layer: the mean of each input's real tokens."""
        return tuple(masked_mean(t, m) for t, m in zip(self.tokens, self.masks, strict=True))


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` mean over the True positions of ``(B, T)`` ``mask`` of ``(B, T, D)`` tokens.

    >>> tokens = torch.tensor([[[1.0], [3.0]], [[2.0], [9.0]]])
    >>> masked_mean(tokens, torch.tensor([[True, True], [True, False]])).tolist()
    [[2.0], [2.0]]
    """
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def resolve_layers(layers: Sequence[int], count: int, tower: str) -> tuple[int, ...]:
    """Layer numbers made non-negative; ``count`` layers follow the embedding (0..count).

    >>> resolve_layers([-1, 2], 6, "text")
    (6, 2)
    """
    if not layers:
        raise InputError(f"choose at least one {tower} layer")
    resolved = []
    for layer in layers:
        number = layer + count + 1 if layer < 0 else layer
        if not 0 <= number <= count:
            raise InputError(
                f"{tower} layer {layer} does not exist: this tower has layers 0..{count} "
                f"(or -{count + 1}..-1 from the end)"
            )
        resolved.append(number)
    return tuple(resolved)


def grid_tokens(feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H*W, C)`` tokens and their all-True mask from a ``(B, C, H, W)`` feature map."""
    tokens = feature_map.flatten(2).transpose(1, 2).float().contiguous()
    return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)


def hidden_state_features(
    hidden_states: Sequence[torch.Tensor],
    layers: tuple[int, ...],
    mask: torch.Tensor | None = None,
    keep_last: int | None = None,
) -> LayerFeatures:
    """Pick ``layers`` from a transformer's ``hidden_states`` (embeddings first, ``(B, T, D)``).

    ``mask`` ``(B, T)`` marks real tokens (None: all real); ``keep_last`` keeps only the last
    that many tokens, which drops a vision transformer's leading CLS token.
    """
    tokens, masks = [], []
    for layer in layers:
        states = hidden_states[layer]
        layer_mask = torch.ones(states.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        if keep_last is not None:
            states, layer_mask = states[:, -keep_last:], layer_mask[:, -keep_last:]
        tokens.append(states.float().contiguous())
        masks.append(layer_mask.contiguous())
    return LayerFeatures(layers, tuple(tokens), tuple(masks))


def efficientnet_stage_ends(model: Any) -> list[int]:
    """Index of the last block of each stage of an ``efficientnet_lite_pytorch`` network.

    A stage's first block changes the width; its repeats keep it (that is how the library
    builds them), so a block whose input and output widths differ starts a new stage.
    """
    blocks = list(model._blocks)
    starts = [
        i
        for i, block in enumerate(blocks)
        if i > 0 and block._block_args.input_filters != block._block_args.output_filters
    ]
    return [start - 1 for start in starts] + [len(blocks) - 1]


def efficientnet_layer_count(model: Any) -> int:
    """Stages plus the head convolution (layer 0, the stem, is not counted)."""
    return len(efficientnet_stage_ends(model)) + 1


def efficientnet_features(
    model: Any, pixels: torch.Tensor, layers: tuple[int, ...]
) -> LayerFeatures:
    """The stem (0), stage outputs (1..S) and head map (S+1) of an EfficientNet-Lite.

    Runs the network the way its ``extract_features`` does (inference: no drop-connect) and
    keeps only the asked-for maps. ``pixels`` is the ``(B, 3, H, W)`` input the network expects.
    """
    ends = efficientnet_stage_ends(model)
    wanted = set(layers)
    maps: dict[int, torch.Tensor] = {}
    x = model._swish(model._bn0(model._conv_stem(pixels)))
    if 0 in wanted:
        maps[0] = x
    stage_ending_at = {end: stage for stage, end in enumerate(ends, start=1)}
    for index, block in enumerate(model._blocks):
        x = block(x)
        stage = stage_ending_at.get(index)
        if stage is not None:
            if stage in wanted:
                maps[stage] = x
            if stage >= max(layers):
                break  # the deeper stages are not needed
    if len(ends) + 1 in wanted:
        maps[len(ends) + 1] = model._swish(model._bn1(model._conv_head(x)))
    grids = [grid_tokens(maps[layer]) for layer in layers]
    return LayerFeatures(
        layers, tuple(tokens for tokens, _ in grids), tuple(mask for _, mask in grids)
    )
