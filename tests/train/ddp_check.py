"""Run under torchrun: trains a few steps with DDP (gloo) and checks every rank holds the same
online and EMA weights. Rank 0 writes {"identical": bool, ...} to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

from hjepa_core.config import load_config
from hjepa_core.train.engine import Trainer
from tests.tiny import tiny_overrides


def main() -> None:
    out_path, work_dir = sys.argv[1], sys.argv[2]
    config = load_config("configs/fashion_mnist.yaml", tiny_overrides(work_dir, "training.max_steps=3"))
    trainer = Trainer(config, progress=False)
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
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
