"""What keeps the training step fast on an accelerator: ``torch.compile`` with static shapes,
and per-step metrics that stay on the device until a log line reads them."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from hjepa_core.config import ConfigError
from hjepa_core.models.hjepa import HJEPA


def compile_modules(model: HJEPA, backend: str = "inductor") -> None:
    """``torch.compile`` of the context encoder, target encoder and predictor, with static shapes.

    Every tensor entering them has one shape per config and call site (fixed context, target and
    local keep counts), so ``dynamic=False`` builds one specialised graph per call site on the
    first step and never recompiles; the default automatic-dynamic mode would instead turn to
    slower symbolic-shape graphs because the encoder sees two shapes per step (global contexts
    and local crops).
    """
    try:
        torch._dynamo.lookup_backend(backend)
    except torch._dynamo.exc.InvalidBackend as exc:
        raise ConfigError(f"training.compile_backend={backend!r} is not a torch.compile backend "
                          "(e.g. inductor, aot_eager, cudagraphs)") from exc
    for module in (model.encoder, model.target_encoder, model.predictor):
        module.compile(backend=backend, dynamic=False)


class MetricWindow:
    """Per-step training metrics summed on the training device between two log lines.

    Adding launches a couple of tiny device ops and never waits for the device; :meth:`read`
    reads everything at once (one all-reduce under DDP), so the host syncs with the device only
    every ``training.log_every`` steps.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[tuple[str, ...], Tensor] = {}
        self.pending: list[tuple[int, dict[str, Tensor]]] = []  # (step, values) logged as they are
        self.steps = 0
        self.images = 0
        self.start = time.perf_counter()

    def add(self, values: dict[str, Tensor], weight: float) -> None:
        key = tuple(values)
        stacked = torch.stack([v.detach().float() for v in values.values()]) * weight
        self.sums[key] = self.sums[key] + stacked if key in self.sums else stacked

    def read(self, world_size: int) -> tuple[dict[str, float], list[tuple[int, dict[str, float]]]]:
        """Per-step means over the window and the pending ``(step, values)``, in one transfer
        (averaged over ranks with one all-reduce when ``world_size`` > 1)."""
        groups: list[tuple[int | None, tuple[str, ...], Tensor]] = [
            (None, key, sums) for key, sums in self.sums.items()]
        groups += [(step, tuple(values), torch.stack(list(values.values())).float())
                   for step, values in self.pending]
        if not groups:
            return {}, []
        flat = torch.cat([sums for _, _, sums in groups]).double()
        if world_size > 1:
            dist.all_reduce(flat)
            flat /= world_size
        numbers = iter(flat.tolist())
        means: dict[str, float] = {}
        pending: list[tuple[int, dict[str, float]]] = []
        for step, names, _ in groups:
            values = {name: next(numbers) for name in names}
            if step is None:
                means.update({name: value / max(self.steps, 1) for name, value in values.items()})
            else:
                pending.append((step, values))
        return means, pending
