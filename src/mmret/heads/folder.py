"""Saving and loading a head as a folder: ``config.json`` (type, version, config) + safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from safetensors.torch import load_file, save_file

from mmret._version import __version__
from mmret.errors import IndexFormatError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_head(
    module: torch.nn.Module,
    kind: str,
    config: dict[str, Any],
    folder: Path,
    *,
    dtype: torch.dtype | None = None,
) -> None:
    """Save the weights (optionally cast: float16 halves a shipped file) and the config.

    Loading casts back to the module's own dtype, so a half-precision file loads anywhere.
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().cpu().to(dtype or tensor.dtype).contiguous()
        for name, tensor in module.state_dict().items()
    }
    save_file(state, str(folder / WEIGHTS_FILE))
    document = {"type": kind, "mmret_version": __version__, "config": config}
    (folder / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")


def read_head_config(folder: Path, kind: str) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise IndexFormatError(f"{folder}: not a head folder (no {CONFIG_FILE})")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise IndexFormatError(f"{path}: invalid JSON ({error})") from None
    if document.get("type") != kind:
        raise IndexFormatError(f"{path}: holds a {document.get('type')!r} head, not {kind!r}")
    config: dict[str, Any] = document["config"]
    return config


def load_weights(module: torch.nn.Module, folder: Path) -> None:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise IndexFormatError(f"{folder}: missing {WEIGHTS_FILE}")
    module.load_state_dict(load_file(str(path)))


class FolderHead(torch.nn.Module):
    """A head saved as a folder: a subclass names its ``folder_kind`` and ``config_type`` (a
    :class:`~mmret._config.JsonConfig`), keeps its config in ``config`` and is built from it."""

    folder_kind: ClassVar[str]
    config_type: ClassVar[Any]
    config: Any

    def save(self, folder: Path, *, dtype: torch.dtype | None = None) -> None:
        """Save the weights (cast to ``dtype``, say float16) and the config into ``folder``."""
        save_head(self, self.folder_kind, self.config.to_dict(), folder, dtype=dtype)

    @classmethod
    def load(cls, folder: Path) -> Self:
        """The head saved in ``folder``, in eval mode."""
        head = cls(cls.config_type.from_dict(read_head_config(folder, cls.folder_kind)))
        load_weights(head, folder)
        return head.eval()
