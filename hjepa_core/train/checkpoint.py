"""Training checkpoints: atomic writes, keep-last-N, safe loading (``weights_only=True``)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from hjepa_core.utils import atomic_torch_save

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
TRAINING_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "next_batch")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or resumed from; the message names the file and the fix."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temp files never match)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Deletes the temporaries an interrupted checkpoint write left (``.checkpoint-*.tmp``)."""
    directory = Path(directory)
    stale = sorted(directory.glob(".checkpoint-*.tmp")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep_last: int) -> Path:
    """Writes ``state`` atomically and prunes all but the newest ``keep_last`` checkpoints."""
    path = atomic_torch_save(state, checkpoint_path(directory, step))
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint on the CPU with ``weights_only=True`` (no arbitrary unpickling)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split()).split(". ")[0]  # torch's first sentence says it all
        detail = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable hjepa checkpoint ({detail}); "
                              "it is truncated, empty or not a torch file") from exc


def load_training_state(path: str | Path) -> dict[str, Any]:
    """A training checkpoint's state, checked to hold everything a resume needs."""
    state = load_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if k not in state] if isinstance(state, dict) else list(TRAINING_KEYS)
    if missing:
        raise CheckpointError(f"{path} is not an hjepa training checkpoint (no {', '.join(missing)}); "
                              "resume from a checkpoints/checkpoint-*.pt that `hjepa train` wrote")
    return state


def load_resume(resume: str | Path, output_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``resume`` names and its state: a file as given; for ``auto`` (the output
    dir's ``checkpoints/``) or a directory, the newest one that loads, with a warning naming the
    ones skipped. None when ``auto`` finds no checkpoint (a fresh start).

    Raises:
        FileNotFoundError: the given file or directory has no checkpoint.
        CheckpointError: the given file, or every checkpoint in the directory, cannot be loaded.
    """
    if str(resume) == "auto":
        found = list_checkpoints(Path(output_dir) / "checkpoints")
        if not found:
            return None
    else:
        path = Path(resume)
        if path.is_file():
            return path, load_training_state(path)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint file or directory")
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        if not found:
            raise FileNotFoundError(f"--resume {path}: no checkpoint-*.pt in it")
    skipped: list[str] = []
    for candidate in reversed(found):
        try:
            state = load_training_state(candidate)
        except CheckpointError:
            skipped.append(candidate.name)
            continue
        if skipped:
            warnings.warn(f"skipped unloadable checkpoint(s) {', '.join(skipped)}; resuming from {candidate}",
                          stacklevel=2)
        return candidate, state
    raise CheckpointError(f"none of the checkpoints in {found[0].parent} loads ({', '.join(skipped)}); "
                          "move them away to start afresh")
