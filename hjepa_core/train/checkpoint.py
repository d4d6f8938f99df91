"""Training checkpoints: atomic writes, keep-last-N, safe loading (``weights_only=True``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from hjepa_core.utils import atomic_torch_save

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temp files never match)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep_last: int) -> Path:
    """Writes ``state`` atomically and prunes all but the newest ``keep_last`` checkpoints."""
    path = atomic_torch_save(state, checkpoint_path(directory, step))
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def resolve_resume(resume: str | Path, output_dir: str | Path) -> Path | None:
    """``auto``: the newest checkpoint in the output dir, or None; else the given file or dir."""
    if str(resume) == "auto":
        found = list_checkpoints(Path(output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        if not found:
            raise FileNotFoundError(f"--resume {path}: no checkpoint-*.pt in it")
        return found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint file")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint on the CPU with ``weights_only=True`` (no arbitrary unpickling)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable hjepa checkpoint ({type(exc).__name__}: {exc})") from exc
