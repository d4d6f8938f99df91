"""Shared test fixtures: small synthetic images and datasets (all in memory or in tmp_path)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hjepa_core.data.sources import ArrayImageDataset, find_fashion_mnist, load_fashion_mnist

_SINGLE_THREAD_DIRS = ("data", "masks")


@pytest.fixture(autouse=True)
def _one_intra_op_thread(request: pytest.FixtureRequest):
    """Data and mask tests run many tiny tensor ops; with one intra-op thread they do not
    stall on OpenMP barriers when the machine's few cores are busy (DataLoader workers run
    single-threaded too)."""
    tests_root = Path(__file__).parent
    relative = Path(request.node.path).relative_to(tests_root)
    if relative.parts[0] not in _SINGLE_THREAD_DIRS and relative.name != "test_examples.py":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def smooth_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A natural-ish picture: upsampled low-frequency colour field plus a little noise."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((4, 5, 3)) * 255).astype(np.uint8))
    field = np.asarray(low.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    field = field + rng.normal(0.0, 4.0, field.shape)
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8), "RGB")
    return image if mode == "RGB" else image.convert(mode)


@pytest.fixture
def make_image() -> Callable[..., Image.Image]:
    """Factory: ``make_image(width, height, seed=0, mode="RGB")``."""
    return smooth_image


@pytest.fixture(scope="session")
def tiny_source() -> ArrayImageDataset:
    """24 RGB images of 40x32 pixels with labels 0..2."""
    images = np.stack([np.asarray(smooth_image(40, 32, seed=i)) for i in range(24)])
    return ArrayImageDataset(images, np.arange(24) % 3, ["a", "b", "c"])


@pytest.fixture(scope="session")
def fashion_mnist_train() -> ArrayImageDataset:
    """The embedded Fashion-MNIST training split (skipped where it is not installed)."""
    if find_fashion_mnist(None) is None:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    return load_fashion_mnist(None, "train", download=False)


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: writes ``root/<class>/<i>.png`` images and returns root.

    ``image_folder(per_class=3, classes=("cat", "dog"), bad={"dog/bad.jpg": b"..."})``
    adds the given raw files as well (for unreadable-image tests).
    """

    def build(
        per_class: int = 3,
        classes: tuple[str, ...] = ("cat", "dog"),
        bad: dict[str, bytes] | None = None,
    ) -> Path:
        root = tmp_path / "images"
        for c, name in enumerate(classes):
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                smooth_image(36, 30, seed=10 * c + i).save(folder / f"{i}.png")
        for relative, data in (bad or {}).items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(data)
        return root

    return build


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path) -> tuple[str, subprocess.Popen]:
    """Starts a real MLflow tracking server on 127.0.0.1 (sqlite backend, proxied artifacts under
    ``root``) in its own process group; returns its URI and process once it answers /health."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return uri, proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_mlflow_server(proc)
            raise RuntimeError(f"MLflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def stop_mlflow_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stops a server from :func:`start_mlflow_server` (its whole process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow tracking server on 127.0.0.1 (see :func:`start_mlflow_server`), one for the
    session: cold start takes ~12 s. Yields its URI; stopped at the end of the session."""
    if shutil.which("mlflow", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mlflow is not installed (pip install -e '.[tracking]')")
    uri, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield uri
    finally:
        stop_mlflow_server(proc)
