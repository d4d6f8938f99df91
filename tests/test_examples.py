"""The runnable examples (examples/multicrop_training_example.py), on Fashion-MNIST."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from hjepa_core.data import MultiCropBatch, MultiCropDataset
from hjepa_core.data.sources import find_fashion_mnist

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "multicrop_training_example.py"

pytestmark = pytest.mark.skipif(find_fashion_mnist(None) is None,
                                reason="Fashion-MNIST is not installed")


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("multicrop_training_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_1_basic_transform(example: ModuleType, capsys: pytest.CaptureFixture) -> None:
    crops = example.example_1_basic_multicrop_transform()
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    out = capsys.readouterr().out
    assert "8 crops" in out and "epoch 30: 10" in out and "box=" in out


def test_example_2_dataset(example: ModuleType, capsys: pytest.CaptureFixture) -> None:
    dataset = example.example_2_multicrop_dataset()
    assert isinstance(dataset, MultiCropDataset) and len(dataset) == 60_000
    assert "Ankle boot" in capsys.readouterr().out


def test_example_3_dataloader(example: ModuleType) -> None:
    batch = example.example_3_multicrop_dataloader(num_workers=2, batch_size=4)
    assert isinstance(batch, MultiCropBatch)
    assert [tuple(c.shape) for c in batch.crops] == [(4, 3, 224, 224)] * 2 + [(4, 3, 96, 96)] * 6
    assert batch.crops[0].dtype == torch.float32


def test_example_4_masking_strategies(example: ModuleType, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    pictures = example.example_4_masking_strategies(output_dir=tmp_path, batch_size=2)
    assert [p.name for p in pictures] == [
        "masks_global_only.png", "masks_global_with_local_context.png",
        "masks_cross_crop_prediction.png"]
    for path in pictures:
        with Image.open(path) as image:
            assert image.format == "PNG"
    out = capsys.readouterr().out
    assert "['target', 'target', 'target', 'context', 'context', 'context']" in out


def test_main_runs_the_examples_in_order(example: ModuleType, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    for name in ("example_1_basic_multicrop_transform", "example_2_multicrop_dataset",
                 "example_3_multicrop_dataloader", "example_4_masking_strategies"):
        monkeypatch.setattr(example, name,
                            lambda *a, _name=name, **k: calls.append((_name, a, k)))
    example.main(["--output-dir", str(tmp_path), "--num-workers", "0"])
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert calls[2][2] == {"num_workers": 0} and calls[3][2] == {"output_dir": tmp_path}


def test_example_5_trains_all_crops(example: ModuleType) -> None:
    losses = example.example_5_training_step(steps=4)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
