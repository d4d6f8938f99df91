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
