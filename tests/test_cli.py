"""The ``hjepa`` command line: the parser answers without importing the heavy libraries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
