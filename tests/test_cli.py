"""The ``hjepa`` command line: the parser answers without importing the heavy libraries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
HEAVY = ("torch", "torchvision", "mlflow", "kfp", "matplotlib", "webdataset")

_PROBE = f"""
import sys
import hjepa_core.cli as cli
cli.build_parser()
try:
    cli.main(["--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print(",".join(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))))
"""


def test_parser_and_help_import_no_heavy_library() -> None:
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *help_lines, imported = proc.stdout.splitlines()
    assert any("shard" in line for line in help_lines) and "pipeline" in "\n".join(help_lines)
    assert imported == "", f"building the parser imported {imported} (defer it into the sub-command)"


def test_hjepa_help_in_a_subprocess() -> None:
    script = Path(sys.executable).with_name("hjepa")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "hjepa_core.cli"]
    proc = subprocess.run([*command, "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for command_name in ("train", "shard", "evaluate", "compare", "data", "pipeline"):
        assert command_name in proc.stdout


def test_flags_take_the_underscore_and_the_hyphen_spelling() -> None:
    from hjepa_core.cli import build_parser

    parser = build_parser()
    common = ["--source", "fashion_mnist", "--out", "x"]
    under = parser.parse_args(["shard", *common, "--data_path", "d", "--max_samples", "5", "--no_progress"])
    hyphen = parser.parse_args(["shard", *common, "--data-path", "d", "--max-samples", "5", "--no-progress"])
    assert vars(under) == vars(hyphen) and (under.data_path, under.max_samples, under.no_progress) == ("d", 5, True)
    train = parser.parse_args(["train", "--batch-size", "8", "--output_dir", "o"])
    assert (train.batch_size, train.output_dir) == (8, "o")
    usage = parser._subparsers._group_actions[0].choices["shard"].format_usage()
    assert "--data_path" in usage and "--data-path" not in usage
    tracking = {flag: parser.parse_args(["evaluate", "--checkpoint", "c", flag]).tracking
                for flag in ("--tracking", "--no_tracking", "--no-tracking")}
    assert tracking == {"--tracking": True, "--no_tracking": False, "--no-tracking": False}


def test_overrides_stand_anywhere_and_resume_never_takes_one() -> None:
    from hjepa_core.cli import parse_args

    args = parse_args(["train", "a.b=1", "--lr", "1e-3", "c.d=2", "--epochs", "2", "a.b=3"])
    assert (args.lr, args.epochs, args.overrides) == (1e-3, 2, ["a.b=1", "c.d=2", "a.b=3"])
    args = parse_args(["train", "--resume", "training.lr=1", "--no-progress", "x.y=2"])
    assert (args.resume, args.overrides) == ("auto", ["training.lr=1", "x.y=2"])
    args = parse_args(["train", "--resume", "runs/lr=1/checkpoints", "x.y=2"])
    assert (args.resume, args.overrides) == ("runs/lr=1/checkpoints", ["x.y=2"])
    assert parse_args(["train", "--resume"]).resume == "auto"
    assert parse_args(["train", "--resume", "auto", "x=1"]).resume == "auto"
    args = parse_args(["pipeline", "run-local", "--epochs", "1", "training.lr=1"])
    assert args.overrides == ["training.lr=1"]


def test_stray_arguments_are_still_errors(capsys) -> None:
    from hjepa_core.cli import parse_args

    for argv in (["train", "--lr", "1", "a=1", "--bogus"], ["shard", "--source", "s", "--out", "o", "a=1"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def _error_line(capsys, command: str) -> str:
    """The stderr of a failed command: exactly one line, ``hjepa COMMAND: error: ...``."""
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hjepa {command}: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A two-step tiny run with a checkpoint per step."""
    from hjepa_core.cli import main
    from tests.tiny import tiny_overrides

    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--config", "configs/fashion_mnist.yaml", "--no-progress",
                 *tiny_overrides(out, "training.max_steps=2", "training.checkpoint_every_steps=1")]) == 0
    return out


def _train(out: Path, *extra: str) -> int:
    from hjepa_core.cli import main
    from tests.tiny import tiny_overrides

    return main(["train", "--config", "configs/fashion_mnist.yaml", "--no-progress", *tiny_overrides(out, *extra)])


@pytest.mark.parametrize(("case", "message"), [
    ("zero-byte", "checkpoint-00000002.pt: not a readable hjepa checkpoint"),
    ("truncated", "checkpoint-00000002.pt: not a readable hjepa checkpoint"),
    ("foreign", "encoder.pt is not an hjepa training checkpoint (no model, optimizer"),
    ("other size", "checkpoint-00000002.pt was written for another model"),
])
def test_bad_resume_checkpoints_are_one_line(trained, tmp_path, capsys, case, message) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    path = copy / ("encoder.pt" if case == "foreign" else "checkpoints/checkpoint-00000002.pt")
    if case in ("zero-byte", "truncated"):
        path.write_bytes(path.read_bytes()[:200] if case == "truncated" else b"")
    extra = ["model.embed_dim=64"] if case == "other size" else []
    assert _train(tmp_path / "new", "training.max_steps=3", *extra, f"--resume={path}") == 2
    assert message in _error_line(capsys, "train")


def test_resume_alone_skips_unloadable_checkpoints_and_stale_temps(trained, tmp_path, capsys) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    (copy / "checkpoints" / "checkpoint-00000002.pt").write_bytes(b"")
    stale = copy / "checkpoints" / ".checkpoint-00000003.pt.99-abcd.tmp"
    stale.write_bytes(b"partial")
    with pytest.warns(UserWarning, match=r"skipped unloadable checkpoint\(s\) checkpoint-00000002.pt; "
                                         r"resuming from .*checkpoint-00000001.pt"):
        assert _train(copy, "training.max_steps=3", "--resume") == 0
    assert "trained 3 steps" in capsys.readouterr().out and not stale.exists()


def test_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch) -> None:
    import errno

    import torch

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    assert _train(tmp_path, "training.max_steps=1") == 2
    line = _error_line(capsys, "train")
    assert f"no space left on device writing {tmp_path / 'checkpoints' / 'checkpoint-00000001.pt'}" in line


@pytest.mark.parametrize(("override", "message"), [
    ("training.device=cuda", "training.device=cuda but CUDA is not available on this machine; use training.device"),
    ("data.dataset=imagenet", "data.dataset='imagenet' is not a known dataset"),
    ("data.multicrop.global_crop_scale=[1.0,0.3]", "data.multicrop.global_crop_scale=[1.0, 0.3] must be"),
    ("data.data_path=/nonexistent", "data.data_path=/nonexistent does not exist"),
    ("masking.min_context_patches=1000", "masking: "),
])
def test_setting_errors_are_one_line(tmp_path, capsys, monkeypatch, override, message) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _train(tmp_path, override) == 2
    assert message in _error_line(capsys, "train")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["zero-byte", "truncated", "foreign"])
def test_evaluate_bad_checkpoints_are_one_line(tmp_path, capsys, case) -> None:
    import torch

    from hjepa_core.cli import main

    path = tmp_path / "encoder.pt"
    torch.save({"weights": torch.zeros(64)}, path)
    if case != "foreign":
        path.write_bytes(path.read_bytes()[:100] if case == "truncated" else b"")
    assert main(["evaluate", "--checkpoint", str(path), "--no-progress", "--no-tracking"]) == 2
    assert str(path) in _error_line(capsys, "evaluate")


def test_second_run_on_one_output_dir_fails_at_once(tmp_path, capsys) -> None:
    from tests.test_utils import hold_lock

    child = hold_lock(tmp_path)
    try:
        assert _train(tmp_path, "training.max_steps=1") == 2
        assert f"is in use by another run (PID {child.pid}" in _error_line(capsys, "train")
        assert not (tmp_path / "config.yaml").exists()
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def test_epochs_flag_means_an_epoch_schedule(tmp_path) -> None:
    """The default config trains for a time budget; ``--epochs N`` trains N epochs instead (an
    explicit ``training.time_budget_s`` still wins)."""
    import yaml

    from hjepa_core.cli import main
    from hjepa_core.config import load_config
    from tests.tiny import TINY_OVERRIDES

    assert load_config("configs/fashion_mnist.yaml").training.time_budget_s is not None
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("training.time_budget_s")]
    args = ["train", "--config", "configs/fashion_mnist.yaml", "--no-progress", "data.max_samples=32", *tiny]
    assert main([*args, "--epochs", "2", f"--output_dir={tmp_path / 'epochs'}"]) == 0
    saved = yaml.safe_load((tmp_path / "epochs" / "config.yaml").read_text())["training"]
    assert saved["time_budget_s"] is None and saved["epochs"] == 2
    assert main([*args, "--epochs", "2", "training.time_budget_s=1", "training.max_steps=1",
                 f"--output_dir={tmp_path / 'budget'}"]) == 0
    assert yaml.safe_load((tmp_path / "budget" / "config.yaml").read_text())["training"]["time_budget_s"] == 1
