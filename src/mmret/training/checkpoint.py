"""Per-epoch checkpoints that let a training run resume after its last finished epoch.

A checkpoint folder holds ``state.safetensors`` (the model, the best epoch's weights, the
optimiser's moments and the random states) and ``state.json`` (the config, the epoch, the best
score and the history), no pickle. The folder is replaced whole, so a crash mid-write leaves
the previous epoch's. Resuming with another config is refused rather than mixed in.
"""

from __future__ import annotations

import json
import math
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
    """What a run carries from epoch to epoch: the best weights and score, the last finished
    epoch, and one history entry per epoch."""

    best: dict[str, torch.Tensor]
    best_score: float
    epoch: int
    logs: list[dict[str, Any]]


def has_checkpoint(folder: Path | None) -> bool:
    return folder is not None and (folder / STATE_FILE).is_file()


def save_checkpoint(
    folder: Path,
    config: dict[str, Any],
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    generator: torch.Generator,
    state: TrainingState,
) -> None:
    tensors = {f"head.{k}": v.detach().clone() for k, v in model.state_dict().items()}
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


def load_checkpoint(
    folder: Path,
    config: dict[str, Any],
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    generator: torch.Generator,
) -> TrainingState:
    """Restore ``model``, ``optimiser`` and the random states; refuses another ``config``."""
    document = json.loads((folder / STATE_FILE).read_text())
    if document["config"] != json.loads(json.dumps(config)):  # tuples are lists in JSON
        raise InputError(
            f"{folder} holds a checkpoint of a run with another config "
            f"({document['config']}); use another --out folder or delete the checkpoint"
        )
    tensors = load_file(str(folder / TENSORS_FILE))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(part("head."))
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


def warmup_cosine(peak: float, step: int, total: int) -> float:
    """Linear warm-up over the first 10 % of steps, then cosine decay (a function of the step,
    so a resumed run needs no scheduler state)."""
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    done = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * done))
