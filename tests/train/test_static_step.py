"""The training step is GPU-ready: static shapes under ``torch.compile`` and no host-device sync
outside logging (checked on CPU with the real engine)."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from hjepa_core.config import ConfigError, load_config
from hjepa_core.masks import MASKING_STRATEGIES
from hjepa_core.train import engine, train
from tests.tiny import tiny_overrides

STEPS = 20
_compiles: list[int] = []  # optimizer steps done when each graph was compiled
_steps_done = [0]


@torch._dynamo.register_backend
def hjepa_test_counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    """A torch.compile backend that records when dynamo hands it a (re)compiled graph."""
    _compiles.append(_steps_done[0])
    return gm.forward


@pytest.mark.parametrize("strategy", MASKING_STRATEGIES)
def test_compiled_training_does_not_recompile_after_the_first_step(tmp_path, strategy):
    """Context, target-block and local keep counts are fixed per config, so the compiled encoder,
    target encoder and predictor keep the graphs of step 1 for all later batches."""
    cfg = load_config("configs/fashion_mnist.yaml", tiny_overrides(
        tmp_path, f"training.max_steps={STEPS}", "training.epochs=2", "training.compile=true",
        f"masking.strategy={strategy}",
        "training.compile_backend=hjepa_test_counting_backend", "data.multicrop.num_local_crops=2"))
    _compiles.clear()
    _steps_done[0] = 0
    torch._dynamo.reset()
    hook = register_optimizer_step_post_hook(
        lambda *_: _steps_done.__setitem__(0, _steps_done[0] + 1))
    try:
        result = train(cfg, progress=False)
    finally:
        hook.remove()
        torch._dynamo.reset()
    assert result.steps == STEPS and _steps_done[0] == STEPS
    assert _compiles, "nothing was compiled"
    late = [step for step in _compiles if step > 0]
    assert not late, f"{len(late)} recompiles after step 1 (at optimizer steps {late})"


def test_unknown_compile_backend_is_a_config_error(tmp_path):
    cfg = load_config("configs/fashion_mnist.yaml", tiny_overrides(
        tmp_path, "training.compile=true", "training.compile_backend=inductr", "training.max_steps=1"))
    with pytest.raises(ConfigError, match=r"training\.compile_backend='inductr'"):
        train(cfg, progress=False)


_SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


class _SyncGuard:
    """Makes reading a tensor on the host an error in this process while armed, except inside
    the methods that log (the only place the training loop may wait for the device)."""

    def __init__(self) -> None:
        self.armed = False
        self.pid = os.getpid()  # loader workers (forked) build masks on the host: allowed
        self.calls: list[str] = []

    def forbid(self, name: str, original):
        @functools.wraps(original)
        def guarded(tensor, *args, **kwargs):
            if self.armed and os.getpid() == self.pid:
                self.calls.append(name)
                raise AssertionError(f"Tensor.{name}() in the training step outside logging")
            return original(tensor, *args, **kwargs)
        return guarded

    def arm(self, method, armed: bool):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            before, self.armed = self.armed, armed
            try:
                return method(*args, **kwargs)
            finally:
                self.armed = before
        return wrapper


def test_training_step_reads_nothing_from_the_device_outside_logging(tmp_path, monkeypatch):
    guard = _SyncGuard()
    for name in _SYNCS:
        monkeypatch.setattr(torch.Tensor, name, guard.forbid(name, getattr(torch.Tensor, name)))
    trainer_cls = engine.Trainer
    monkeypatch.setattr(trainer_cls, "run", guard.arm(trainer_cls.run, True))
    for allowed in ("_flush_window", "save_checkpoint", "_run_monitor", "_finish"):
        monkeypatch.setattr(trainer_cls, allowed, guard.arm(getattr(trainer_cls, allowed), False))
    # The loader works on the host (its iterator draws a base seed), never on the device.
    loader_iter = torch.utils.data.dataloader._BaseDataLoaderIter
    for cls, name in ((torch.utils.data.DataLoader, "__iter__"), (loader_iter, "__next__")):
        monkeypatch.setattr(cls, name, guard.arm(getattr(cls, name), False))
    cfg = load_config("configs/fashion_mnist.yaml", tiny_overrides(
        tmp_path, "training.max_steps=12", "training.epochs=2", "training.log_every=5", "loss.collapse_every=3",
        "data.num_workers=1", "training.accumulation_steps=2"))
    result = train(cfg, progress=False)
    assert result.steps == 12 and not guard.calls
    history = result.metrics["history"]
    logged = [h["step"] for h in history if "loss" in h]
    assert logged == [5, 10, 12]
    assert [h["step"] for h in history if "collapse/std" in h] == [1, 3, 6, 9, 12]
    assert all("grad_norm" in h and "images_per_s" in h for h in history if "loss" in h)
