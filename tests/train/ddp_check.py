"""Run under torchrun: trains a few steps with DDP (gloo) and the kNN monitor on, and checks every
rank holds the same online and EMA weights and took its share of the monitor. Rank 0 writes the
findings to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

from hjepa_core.config import load_config
from hjepa_core.eval import knn_monitor
from hjepa_core.train.engine import Trainer
from tests.tiny import tiny_overrides


class RecordingMonitor(knn_monitor.EpochKnnMonitor):
    """The engine's kNN monitor, remembering what each call returned and how many images this rank
    embedded for it."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.calls: list[tuple[dict[str, float], int]] = []

    def __call__(self, encoder, device):
        metrics = super().__call__(encoder, device)
        self.calls.append((metrics, self._monitor.embedded))
        return metrics


def main() -> None:
    out_path, work_dir = sys.argv[1], sys.argv[2]
    knn_monitor.DEFAULT_TRAIN_SAMPLES, knn_monitor.DEFAULT_TEST_SAMPLES = 300, 100
    config = load_config("configs/fashion_mnist.yaml",
                         tiny_overrides(work_dir, "training.max_steps=3", "data.knn_monitor_every=1"))
    monitor = RecordingMonitor(config)
    trainer = Trainer(config, progress=False, monitor=monitor)
    trainer.run()
    flat = {
        name: torch.cat([p.detach().flatten() for p in module.parameters()])
        for name, module in (("online", trainer.model.encoder), ("ema", trainer.model.target_encoder),
                             ("predictor", trainer.model.predictor))
    }
    result = {"world_size": dist.get_world_size(), "steps": trainer.step}
    for name, vector in flat.items():
        gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, vector)
        result[name] = all(torch.equal(gathered[0], g) for g in gathered[1:])
    result["ema_differs_from_online"] = not torch.equal(flat["online"], flat["ema"])
    calls = [None] * dist.get_world_size()
    dist.all_gather_object(calls, monitor.calls)  # the final monitor call, on every rank
    result["monitor_calls_per_rank"] = [len(c) for c in calls]
    result["monitor_same_on_every_rank"] = all(c[0][0] == calls[0][0][0] for c in calls)
    result["monitor_images_per_rank"] = [c[0][1] for c in calls]
    result["monitor_logged"] = [h["step"] for h in trainer.history if "knn_monitor/top1" in h]
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
