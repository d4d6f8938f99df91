"""Shared helpers: atomic writes report a full disk with the file's path and give outputs
deliberate permissions; URLs lose their credentials before they are shown or stored."""

import errno
import os

import pytest
import torch

from hjepa_core.utils import (
    RUN_LOCK_NAME,
    AtomicFile,
    DiskFullError,
    atomic_torch_save,
    atomic_write_text,
    make_dirs,
    redact_url,
    run_lock,
    split_overrides,
)


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


def hold_lock(directory):
    """A child process that holds ``directory``'s run lock until its stdin closes."""
    import subprocess
    import sys

    code = ("import sys\nfrom hjepa_core.utils import run_lock\n"
            f"with run_lock({str(directory)!r}):\n    print('held', flush=True)\n    sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_run_lock_is_one_holder_at_a_time(tmp_path):
    from hjepa_core.utils import RunLockedError, run_lock

    child = hold_lock(tmp_path / "out")
    try:
        with (pytest.raises(RunLockedError, match=rf"out is in use by another run \(PID {child.pid}, lock "),
              run_lock(tmp_path / "out")):
            pass
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    with run_lock(tmp_path / "out") as path:  # free again once the holder has gone
        assert path.read_text() == f"{os.getpid()}\n"


@pytest.fixture
def strict_umask():
    """A umask of 077 (as some containers and services set), restored afterwards."""
    previous = os.umask(0o077)
    yield
    os.umask(previous)


def test_outputs_are_0644_and_folders_0755_whatever_the_umask(tmp_path, strict_umask):
    atomic_write_text(tmp_path / "new" / "deeper" / "a.txt", "x")
    atomic_torch_save({}, tmp_path / "new" / "b.pt")
    with run_lock(tmp_path / "run"):
        pass
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes == {"new": 0o755, "new/deeper": 0o755, "new/deeper/a.txt": 0o644, "new/b.pt": 0o644,
                     "run": 0o755, f"run/{RUN_LOCK_NAME}": 0o644}
    existing = make_dirs(tmp_path / "mine")
    existing.chmod(0o700)
    make_dirs(existing / "sub")
    assert existing.stat().st_mode & 0o777 == 0o700  # a folder that existed keeps its mode


@pytest.mark.parametrize(("url", "shown"), [
    ("https://alice:s3cret@mlflow.example.com:5000/path", "https://***@mlflow.example.com:5000/path"),
    ("https://ghp_token@mlflow.example.com", "https://***@mlflow.example.com"),
    ("https://mlflow.example.com/?token=s3cret&workspace=1", "https://mlflow.example.com/?token=***&workspace=1"),
    ("https://b.s3.amazonaws.com/x?X-Amz-Credential=s3cret&X-Amz-Signature=s3cret",
     "https://b.s3.amazonaws.com/x?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:///outputs/mlflow.db", "sqlite:///outputs/mlflow.db"),
    ("outputs/mlruns", "outputs/mlruns"),
])
def test_urls_lose_their_credentials(url, shown):
    assert redact_url(url) == shown


def test_split_overrides_keeps_commas_inside_values() -> None:
    text = "masking.context_scale=[0.45,0.6],data.use_multicrop=false,loss.hierarchy_weights=[1.0, 0.5]"
    assert split_overrides(text) == [
        "masking.context_scale=[0.45,0.6]", "data.use_multicrop=false", "loss.hierarchy_weights=[1.0, 0.5]"]
    assert split_overrides("") == []
