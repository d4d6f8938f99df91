"""Small shared helpers: atomic file writes and seed mixing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_replace(path: str | Path, write: Any) -> Path:
    """Writes through ``write(tmp_path)`` into a temp file beside ``path``, then renames it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes ``text`` so readers see the old file or the whole new one, never a part."""
    return _atomic_replace(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic_replace(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temp file and rename (a crash never leaves half a checkpoint)."""
    return _atomic_replace(path, lambda tmp: torch.save(obj, tmp))


SEED_MODULUS = 2**63 - 1  # seeds stay non-negative 63-bit integers (torch.Generator takes them)


def mix_seeds(*values: int, salt: int = 0) -> int:
    """A deterministic 63-bit seed from integers (``salt`` is added to every value, so two
    callers that mix the same values with different salts get unrelated streams)."""
    mixed = 0
    for v in values:
        mixed = (mixed * 1_000_003 + int(v) + salt) % SEED_MODULUS
    return mixed
