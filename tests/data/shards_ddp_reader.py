"""Run under torchrun (gloo, CPU): reads shards on every rank and checks the split.

Evaluation: every sample exactly once across ranks x DataLoader workers. Training: the same
number of batches on every rank (each batch is all-reduced, so a rank with fewer would hang
until the gloo timeout). Rank 0 writes the result as JSON to argv[2].
"""

from __future__ import annotations

import datetime
import json
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from hjepa_core.data import build_multicrop_dataloader, build_multicrop_dataset, build_source


class _Indices(IterableDataset):
    """The source indices an evaluation ShardSource yields in this worker."""

    def __init__(self, source) -> None:
        self.source = source

    def __iter__(self):
        for _image, _label, index in self.source.iter_with_index():
            yield index


def main() -> None:
    shard_dir, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()

    source = build_source(f"shards:{shard_dir}", split="test")
    loader = DataLoader(_Indices(source), batch_size=None, num_workers=2)
    mine = [int(i) for i in loader]
    gathered: list[tuple[list[int], int] | None] = [None] * world
    dist.all_gather_object(gathered, (mine, len(source)))

    dataset = build_multicrop_dataset(f"shards:{shard_dir}", split="train", num_global_crops=1,
                                      num_local_crops=1, global_crop_size=12, local_crop_size=8,
                                      seed=1)
    dataset.set_epoch(0)
    train_loader = build_multicrop_dataloader(dataset, batch_size=8, num_workers=2)
    batches = 0
    for batch in train_loader:
        total = torch.tensor([batch.batch_size], dtype=torch.float32)
        dist.all_reduce(total)  # would block forever on a rank that ran out of batches
        batches += 1
    counts: list[int | None] = [None] * world
    dist.all_gather_object(counts, batches)
    if rank == 0:
        result = {"world_size": world, "eval": gathered,
                  "train_batches": counts, "loader_len": len(train_loader)}
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
