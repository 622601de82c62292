"""The one training loop of every head: seeded, resumable from atomic per-epoch checkpoints,
a learning-rate schedule of the step, dev-selected, with a progress bar.

A trainer builds its model and optimiser, then says what differs: the losses of an epoch (a
generator that draws its own random order from ``generator`` and yields one loss a step) and
how an epoch is judged on dev. :func:`fit` does the rest the same way for every head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import torch

from mmret._progress import progress
from mmret.evaluation.retrieval import RetrievalReport
from mmret.training.checkpoint import (
    TrainingState,
    descend,
    has_checkpoint,
    one_cycle,
    resume_checkpoint,
    save_checkpoint,
    warmup_cosine,
)

Log = TypeVar("Log")


@dataclass(frozen=True)
class EpochLog:
    """An epoch of a run judged by dev retrieval: its mean training loss and dev report."""

    epoch: int
    loss: float
    dev: RetrievalReport | None

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loss": self.loss, "dev": self.dev and self.dev.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochLog:
        dev = data["dev"] and RetrievalReport.from_dict(data["dev"])
        return cls(data["epoch"], data["loss"], dev)


@dataclass(frozen=True)
class Judged(Generic[Log]):
    """An epoch's log, its record in the run's history, and its dev score (higher is better;
    None: no dev, so the latest epoch is kept)."""

    log: Log
    record: dict[str, Any]
    score: float | None

    @classmethod
    def by_rsum(cls, log: Log, record: dict[str, Any], dev: RetrievalReport | None) -> Judged[Log]:
        """An epoch judged by its dev retrieval RSUM (None without dev)."""
        return cls(log, record, None if dev is None else dev.rsum)


class Settings(Protocol):
    """What every trainer's config holds (and identifies its run by, in checkpoints)."""

    @property
    def epochs(self) -> int: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def seed(self) -> int: ...

    def to_dict(self) -> dict[str, Any]: ...


def seeded(settings: Settings) -> torch.Generator:
    """Seed torch's global generator (model initialisation, dropout) with ``settings.seed``
    and return a new generator of that seed, for the run's own draws (orders, batches)."""
    torch.manual_seed(settings.seed)
    return torch.Generator().manual_seed(settings.seed)


@dataclass(frozen=True)
class Run(Generic[Log]):
    """What one training run trains and how: what differs between heads."""

    model: torch.nn.Module
    optimiser: torch.optim.Optimizer
    generator: torch.Generator
    settings: Settings
    #: The epoch's losses (1-based epoch), one a step.
    losses: Callable[[int], Iterator[torch.Tensor]]
    #: Judge the epoch from its mean training loss.
    judge: Callable[[int, float], Judged[Log]]
    #: Steps in every epoch, or in each (1-based) epoch: for the schedule and the progress bar.
    steps: int | Callable[[int], int]
    #: The progress bar's label of an epoch, or a format string of ``epoch``.
    label: str | Callable[[int], str]
    #: Epochs in all (None: ``settings.epochs``).
    epochs: int | None = None
    #: Each parameter group's rate from the schedule's (None: all take it).
    group_rates: Callable[[int, float], Sequence[float]] | None = None
    #: Clip gradients to this norm (None: no clipping).
    clip: float | None = None
    #: The learning-rate schedule: a linear warm-up and cosine decay (:func:`warmup_cosine`),
    #: or PyTorch's one-cycle policy (:func:`one_cycle`, which also cycles Adam's beta1).
    schedule: Literal["warmup-cosine", "one-cycle"] = "warmup-cosine"

    def steps_in(self, epoch: int) -> int:
        return self.steps if isinstance(self.steps, int) else self.steps(epoch)


def fit(
    run: Run[Log],
    *,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[Log], None] | None = None,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """Train ``run.model`` for its epochs, leave it holding the best epoch's weights (by
    dev score; without one, the last) in eval mode, and return every epoch's record.

    With ``checkpoint_dir``, each finished epoch is saved there (replaced as a whole) and a
    later call with the same config resumes after it, ending with the same weights as an
    uninterrupted run; a checkpoint of another config is refused.
    """
    model, optimiser, generator = run.model, run.optimiser, run.generator
    config, base_rate = run.settings.to_dict(), run.settings.learning_rate
    epochs = run.settings.epochs if run.epochs is None else run.epochs
    done_before = [0]
    for epoch in range(1, epochs + 1):
        done_before.append(done_before[-1] + run.steps_in(epoch))
    state = TrainingState(copy.deepcopy(model.state_dict()), -1.0, 0, [])
    if checkpoint_dir is not None and has_checkpoint(checkpoint_dir):
        state = resume_checkpoint(checkpoint_dir, config, model, optimiser, generator)
    clip = None if run.clip is None else (model, run.clip)
    for epoch in range(state.epoch + 1, epochs + 1):
        steps = run.steps_in(epoch)
        label = run.label.format(epoch=epoch) if isinstance(run.label, str) else run.label(epoch)
        losses = progress(run.losses(epoch), total=steps, description=label, enabled=show_progress)
        model.train()
        total = 0.0
        for step, loss in enumerate(losses):
            at = done_before[epoch - 1] + step
            beta1 = None
            if run.schedule == "one-cycle":
                rate, beta1 = one_cycle(base_rate, at, done_before[-1])
            else:
                rate = warmup_cosine(base_rate, at, done_before[-1])
            rates = rate if run.group_rates is None else run.group_rates(epoch, rate)
            total += descend(optimiser, loss, rates, clip, beta1)
        judged = run.judge(epoch, total / steps)
        state.logs.append(judged.record)
        if judged.score is None or judged.score > state.best_score:
            state.best_score = -1.0 if judged.score is None else judged.score
            state.best = copy.deepcopy(model.state_dict())
        state.epoch = epoch
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, config, model, optimiser, generator, state)
        if on_epoch is not None:
            on_epoch(judged.log)
    model.load_state_dict(state.best)
    model.eval()
    return state.logs
