"""Per-epoch checkpoints that let a training run resume exactly (safetensors + JSON, no pickle).

A checkpoint folder holds the module's weights, the best epoch's weights so far, the AdamW
moments, the random states and the history. It is replaced as a whole after every epoch, so a
crash mid-write leaves the previous epoch's. A run resumed from it with the same config ends
with the same weights as an uninterrupted run; a different config is refused rather than mixed
in. The learning rate is a function of the step (:func:`warmup_cosine`), so a resumed run needs
no scheduler state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmret._files import replace_folder
from mmret.errors import InputError

STATE_FILE = "state.json"
TENSORS_FILE = "state.safetensors"


@dataclass
class TrainingState:
    """The best weights (by the run's dev score), that score, the last finished epoch and
    the per-epoch history."""

    best: dict[str, torch.Tensor]
    best_score: float
    epoch: int
    logs: list[dict[str, Any]]


def warmup_cosine(base_rate: float, step: int, total: int) -> float:
    """Linear warm-up over the first 10 % of ``total`` steps, then cosine decay to 0.

    >>> [round(warmup_cosine(1.0, s, 20), 2) for s in (0, 1, 2, 11, 19)]
    [0.5, 1.0, 1.0, 0.5, 0.01]
    """
    warm = max(1, total // 10)
    if step < warm:
        return base_rate * (step + 1) / warm
    done = (step - warm) / max(1, total - warm)
    return base_rate * 0.5 * (1.0 + math.cos(math.pi * done))


def one_cycle(base_rate: float, step: int, total: int) -> tuple[float, float]:
    """The learning rate and Adam's beta1 at ``step`` of ``total`` under PyTorch's
    ``OneCycleLR`` with its defaults and ``pct_start=0.1``: the rate rises from
    ``base_rate / 25`` to ``base_rate`` over the first 10 % of steps along a cosine, then falls
    to ``base_rate / 250,000``, while beta1 falls from 0.95 to 0.85 and rises back.

    >>> [round(one_cycle(1.0, s, 20)[0], 3) for s in (0, 1, 10, 19)]
    [0.04, 1.0, 0.5, 0.0]
    """
    initial, peak = base_rate / 25.0, base_rate
    phases = (
        (float(0.1 * total) - 1, (initial, peak), (0.95, 0.85)),
        (total - 1, (peak, initial / 1e4), (0.85, 0.95)),
    )
    start = 0.0
    for number, (end, rates, betas) in enumerate(phases):
        if step <= end or number == len(phases) - 1:
            done = (step - start) / (end - start)
            return _cosine(*rates, done), _cosine(*betas, done)
        start = end
    raise AssertionError("unreachable: the last phase takes every step")


def _cosine(start: float, end: float, done: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * done) + 1)


def descend(
    optimiser: torch.optim.Optimizer,
    loss: torch.Tensor,
    rate: float | Sequence[float],
    clip: tuple[torch.nn.Module, float] | None = None,
    beta1: float | None = None,
) -> float:
    """One step of ``optimiser`` on ``loss`` with every group's learning rate set to ``rate``
    (or each group's to its own of ``rate``) and, if given, Adam's ``beta1``; gradients are
    first clipped to norm ``clip[1]`` over ``clip[0]``'s parameters. Returns the loss."""
    rates = [rate] * len(optimiser.param_groups) if isinstance(rate, float | int) else rate
    for group, group_rate in zip(optimiser.param_groups, rates, strict=True):
        group["lr"] = group_rate
        if beta1 is not None:
            group["betas"] = (beta1, *group["betas"][1:])
    optimiser.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip[0].parameters(), clip[1])
    optimiser.step()
    return float(loss.detach())


def has_checkpoint(folder: Path | None) -> bool:
    return folder is not None and (folder / STATE_FILE).is_file()


def save_checkpoint(
    folder: Path,
    config: dict[str, Any],
    module: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    generator: torch.Generator,
    state: TrainingState,
) -> None:
    tensors = {f"head.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    tensors |= {f"best.{k}": v.detach().clone() for k, v in state.best.items()}
    for index, moments in optimiser.state_dict()["state"].items():
        tensors |= {f"optim.{index}.{k}": torch.as_tensor(v).clone() for k, v in moments.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator.get_state()
    document = {
        "config": config,
        "epoch": state.epoch,
        "best_rsum": state.best_score,
        "history": state.logs,
    }
    with replace_folder(folder) as scratch:
        save_file(tensors, str(scratch / TENSORS_FILE))
        (scratch / STATE_FILE).write_text(json.dumps(document, indent=2) + "\n")


def resume_checkpoint(
    folder: Path,
    config: dict[str, Any],
    module: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    generator: torch.Generator,
) -> TrainingState:
    """Load a checkpoint into ``module``, ``optimiser`` and the random states."""
    document = json.loads((folder / STATE_FILE).read_text())
    # Compare as JSON holds them (tuples come back as lists).
    if document["config"] != json.loads(json.dumps(config)):
        raise InputError(
            f"{folder} holds a checkpoint of a run with another config "
            f"({document['config']}); use another --out folder or delete the checkpoint"
        )
    tensors = load_file(str(folder / TENSORS_FILE))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    module.load_state_dict(part("head."))
    saved = optimiser.state_dict()
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in part("optim.").items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    saved["state"] = moments
    optimiser.load_state_dict(saved)
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    return TrainingState(
        part("best."), document["best_rsum"], document["epoch"], document["history"]
    )
