"""Shared helpers: atomic writes report a full disk with the file's path."""

import errno

import pytest
import torch

from hjepa_core.utils import AtomicFile, DiskFullError, atomic_torch_save, atomic_write_text


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch):
    monkeypatch.setattr(AtomicFile, "write", _no_space)
    with pytest.raises(DiskFullError, match=f"^no space left on device writing {tmp_path / 'a.txt'};"):
        atomic_write_text(tmp_path / "a.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_torch_short_write_is_a_full_disk(tmp_path, monkeypatch):
    def short_write(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed") from RuntimeError("unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(DiskFullError, match=r"checkpoint\.pt"):
        atomic_torch_save({}, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(torch, "save", _no_space)
    with pytest.raises(DiskFullError):
        atomic_torch_save({}, tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(ZeroDivisionError), AtomicFile(tmp_path / "b") as out:
        out.write(b"x")
        raise ZeroDivisionError
    assert list(tmp_path.iterdir()) == []
