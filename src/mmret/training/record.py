"""``training.json``: what a training run was given and how each epoch went, written beside
the model it made, for its model card and for whoever reproduces the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmret._files import write_atomic

TRAINING_RECORD = "training.json"


def write_training_record(
    out: Path,
    *,
    manifest: Path,
    dev: Path | None,
    config: dict[str, Any],
    history: list[dict[str, Any]],
    **given: Any,
) -> None:
    """Write ``out/training.json``: the training and dev manifests, anything else the run was
    ``given`` (a backbone, a memory), its config and the per-epoch ``history``."""
    document = {
        "manifest": str(manifest),
        **{key: str(value) if isinstance(value, Path) else value for key, value in given.items()},
        "dev": str(dev) if dev else None,
        "config": config,
        "history": history,
    }
    write_atomic(out / TRAINING_RECORD, (json.dumps(document, indent=2) + "\n").encode())
