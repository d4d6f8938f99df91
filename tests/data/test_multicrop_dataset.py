"""Multi-crop datasets, collate, the seeded loader, bad-image skipping and adaptive workers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from hjepa_core.data import (
    AdaptiveMultiCropTransform,
    BadImageError,
    DatasetNotFoundError,
    MultiCropBatch,
    MultiCropCollator,
    MultiCropDataset,
    MultiCropTransform,
    SeededBatchSampler,
    auto_num_workers,
    build_multicrop_dataloader,
    build_multicrop_dataset,
)
from hjepa_core.data.sources import ArrayImageDataset, ImageFolderSource
from hjepa_core.masks import MultiCropMaskGenerator


def _small_transform(num_local_crops: int = 2) -> MultiCropTransform:
    return MultiCropTransform(num_local_crops=num_local_crops, global_crop_size=64,
                              local_crop_size=32)


def _small_masks(num_local_crops: int = 2, strategy: str = "cross_crop_prediction"
                 ) -> MultiCropMaskGenerator:
    return MultiCropMaskGenerator(global_crop_size=64, local_crop_size=32, patch_size=8, num_hierarchies=2,
                                  num_local_crops=num_local_crops, masking_strategy=strategy)


def test_seed_basic_usage_runs(fashion_mnist_train: ArrayImageDataset) -> None:
    """The spec's "Basic Usage" block, on Fashion-MNIST with a small batch."""
    from hjepa_core.data import build_multicrop_dataloader, build_multicrop_dataset
    from hjepa_core.masks import MultiCropMaskGenerator

    dataset = build_multicrop_dataset(
        dataset_name="fashion_mnist",
        data_path=None,
        split="train",
        num_global_crops=2,
        num_local_crops=6,
        global_crop_size=224,
        local_crop_size=96,
    )
    dataloader = build_multicrop_dataloader(dataset, batch_size=4, num_workers=0)
    mask_gen = MultiCropMaskGenerator(
        global_crop_size=224,
        local_crop_size=96,
        num_global_crops=2,
        num_local_crops=6,
        masking_strategy="global_only",
    )
    for crops, labels in dataloader:  # noqa: B007 (the spec's loop, as written)
        # crops is a list of tensors: [global_0, global_1, local_0, ..., local_5]
        masks = mask_gen(batch_size=crops[0].shape[0])
        break
    assert [tuple(c.shape) for c in crops] == [(4, 3, 224, 224)] * 2 + [(4, 3, 96, 96)] * 6
    assert labels.shape == (4,) and labels.dtype == torch.long
    assert len(masks.global_masks) == 2 and masks.local_roles == ("unmasked",) * 6
    assert masks.global_masks[0].context.shape[0] == 4


def test_dataset_items_and_keyed_determinism(tiny_source: ArrayImageDataset) -> None:
    dataset = MultiCropDataset(tiny_source, _small_transform())
    assert len(dataset) == 24 and dataset.classes == ["a", "b", "c"]
    sample = dataset[3]
    crops, label = sample
    assert label == 0 and sample.index == 3 and sample.seed is None
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 2
    a, b, c = dataset[(5, 11)], dataset[(5, 11)], dataset[(5, 12)]
    assert all(torch.equal(x, y) for x, y in zip(a.crops, b.crops, strict=True))
    assert a.geometry == b.geometry and a.geometry != c.geometry


def test_collated_batch_for_the_seed_parameters(tiny_source: ArrayImageDataset) -> None:
    dataset = MultiCropDataset(tiny_source)  # defaults: 2 x 224 + 6 x 96
    collate = MultiCropCollator(dataset.transform.photometric, MultiCropMaskGenerator())
    batch = collate([dataset[(i, 100 + i)] for i in range(3)])
    assert isinstance(batch, MultiCropBatch)
    assert batch.batch_size == 3 and batch.num_global_crops == 2 and batch.num_local_crops == 6
    assert [tuple(c.shape) for c in batch.crops] == [(3, 3, 224, 224)] * 2 + [(3, 3, 96, 96)] * 6
    assert all(c.dtype == torch.float32 for c in batch.crops) and batch.normalized
    assert batch.boxes.shape == (8, 3, 4) and batch.flips.shape == (8, 3)
    assert ((batch.boxes >= 0) & (batch.boxes <= 1)).all()
    assert (batch.boxes[..., 2:] > batch.boxes[..., :2]).all()
    assert batch.indices.tolist() == [0, 1, 2] and batch.labels.tolist() == [0, 1, 2]
    assert batch.masks is not None and len(batch.masks.global_masks) == 2
    assert batch.masks.num_local_crops == 6 and batch.num_skipped == 0
    crops, labels = batch
    assert crops is batch.crops and labels is batch.labels
    moved = batch.to("cpu")
    assert moved.masks is not None and moved.crops[0].shape == batch.crops[0].shape


def test_deferred_photometric_keeps_uint8(tiny_source: ArrayImageDataset) -> None:
    dataset = MultiCropDataset(tiny_source, _small_transform())
    loader = build_multicrop_dataloader(dataset, batch_size=4, num_workers=0,
                                        defer_photometric=True)
    batch = next(iter(loader))
    assert not batch.normalized and all(c.dtype == torch.uint8 for c in batch.crops)
    augmented = dataset.transform.photometric(batch.crops, batch.num_global_crops,
                                              torch.Generator().manual_seed(0))
    assert [c.shape for c in augmented] == [c.shape for c in batch.crops]
    assert all(c.dtype == torch.float32 for c in augmented)


BAD_FILES = {
    "cat/zero.jpg": b"",
    "cat/notes.jpg": b"plain text with a .jpg name\n",
    "dog/truncated.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
    "dog/bomb.png": bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200002710000027100802000000352cf570"
        "0000000049454e44ae426082"),  # a 10000 x 10000 header, no pixels
}


def test_bad_images_are_skipped_and_counted(image_folder) -> None:
    root = image_folder(per_class=3, bad=BAD_FILES)
    source = ImageFolderSource(root)
    assert len(source) == 6 + len(BAD_FILES)
    dataset = MultiCropDataset(source, _small_transform(), skip_bad_images=True)
    loader = build_multicrop_dataloader(dataset, batch_size=5, num_workers=0, shuffle=False,
                                        drop_last=False, mask_generator=_small_masks())
    batches = list(loader)
    assert sum(b.num_skipped for b in batches) == len(BAD_FILES)
    assert sum(b.batch_size for b in batches) == 6
    for b in batches:
        assert b.masks is not None and b.masks.global_masks[0].context.shape[0] == b.batch_size
        assert all(c.shape[0] == b.batch_size for c in b.crops)


def test_bad_image_not_skipped_names_the_file(image_folder) -> None:
    root = image_folder(per_class=1, bad={"dog/notes.jpg": b"not an image"})
    dataset = MultiCropDataset(ImageFolderSource(root), _small_transform(),
                               skip_bad_images=False)
    loader = build_multicrop_dataloader(dataset, batch_size=3, num_workers=0, shuffle=False,
                                        drop_last=False)
    with pytest.raises(BadImageError, match=r"notes\.jpg"):
        list(loader)


def test_a_batch_of_only_bad_images_is_an_error() -> None:
    with pytest.raises(BadImageError, match="every sample of a batch of 2"):
        MultiCropCollator(None)([None, None])


def test_unknown_dataset_and_missing_paths() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist3d'"):
        build_multicrop_dataset("mnist3d")
    with pytest.raises(DatasetNotFoundError, match="imagefolder"):
        build_multicrop_dataset("imagefolder", data_path="/nonexistent/images")
    with pytest.raises(DatasetNotFoundError, match="cifar10"):
        build_multicrop_dataset("cifar10", data_path="/nonexistent/cifar")


def _batches(loader) -> list[MultiCropBatch]:
    return list(loader)


def _assert_same_batches(a: list[MultiCropBatch], b: list[MultiCropBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.indices, y.indices)
        assert all(torch.equal(p, q) for p, q in zip(x.crops, y.crops, strict=True))
        assert torch.equal(x.boxes, y.boxes) and torch.equal(x.flips, y.flips)
        for m, n in zip(x.masks.global_masks, y.masks.global_masks, strict=True):
            assert torch.equal(m.context, n.context)
            assert all(torch.equal(s, t) for s, t in zip(m.targets, n.targets, strict=True))


def test_same_batches_whatever_the_number_of_workers(tiny_source: ArrayImageDataset) -> None:
    dataset = MultiCropDataset(tiny_source, _small_transform())

    def loader(workers: int):
        return build_multicrop_dataloader(dataset, batch_size=6, num_workers=workers, seed=3,
                                          mask_generator=_small_masks())

    _assert_same_batches(_batches(loader(0)), _batches(loader(2)))
    other_seed = build_multicrop_dataloader(dataset, batch_size=6, num_workers=0, seed=4,
                                            mask_generator=_small_masks())
    assert not torch.equal(next(iter(other_seed)).indices, _batches(loader(0))[0].indices)


def test_skip_batches_resumes_exactly(tiny_source: ArrayImageDataset) -> None:
    dataset = MultiCropDataset(tiny_source, _small_transform())
    loader = build_multicrop_dataloader(dataset, batch_size=4, num_workers=0, seed=1,
                                        mask_generator=_small_masks())
    loader.batch_sampler.set_epoch(2)
    full = _batches(loader)
    loader.batch_sampler.skip_batches(3)
    resumed = _batches(loader)
    _assert_same_batches(resumed, full[3:])
    _assert_same_batches(_batches(loader), full)  # the skip applies to one pass only


def test_sampler_rank_splits_are_disjoint_and_equal() -> None:
    for drop_last in (True, False):
        per_rank = [list(SeededBatchSampler(50, 4, drop_last=drop_last, seed=9, rank=r,
                                            world_size=3)) for r in range(3)]
        lengths = {len(batches) for batches in per_rank}
        assert len(lengths) == 1
        indices = [[i for batch in batches for i, _ in batch] for batches in per_rank]
        flat = [i for rank in indices for i in rank]
        assert len(flat) == len(set(flat))  # disjoint across ranks
        if drop_last:
            assert {len(rank) for rank in indices} == {16}
        assert len(SeededBatchSampler(50, 4, drop_last=drop_last, rank=0, world_size=3)) == len(
            per_rank[0])


def test_sampler_epochs_and_keys() -> None:
    sampler = SeededBatchSampler(20, 5, seed=2)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    assert sorted(i for b in second for i, _ in b) == list(range(20))
    seeds = [s for b in first for _, s in b]
    assert len(set(seeds)) == len(seeds)
    ordered = list(SeededBatchSampler(20, 5, shuffle=False))
    assert [i for b in ordered for i, _ in b] == list(range(20))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"dataset_size": 10, "batch_size": 0}, "batch_size"),
     ({"dataset_size": 10, "batch_size": 2, "rank": 2, "world_size": 2}, "rank 2"),
     ({"dataset_size": 5, "batch_size": 4, "world_size": 2}, "cannot fill one batch")],
)
def test_sampler_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SeededBatchSampler(**kwargs)


def test_loader_takes_rank_and_world_size(tiny_source: ArrayImageDataset) -> None:
    dataset = MultiCropDataset(tiny_source, _small_transform())
    loaders = [build_multicrop_dataloader(dataset, batch_size=4, num_workers=0, rank=r,
                                          world_size=2) for r in range(2)]
    assert [len(loader) for loader in loaders] == [3, 3]
    seen = [set(next(iter(loader)).indices.tolist()) for loader in loaders]
    assert not seen[0] & seen[1]


class _Constant(Dataset):
    """``n`` identical small images (label = index)."""

    def __init__(self, source: ArrayImageDataset, n: int) -> None:
        self.image = source[0][0]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.image, index


@pytest.mark.parametrize("persistent", [True, False])
def test_adaptive_set_epoch_reaches_loader_workers(tiny_source: ArrayImageDataset,
                                                   persistent: bool) -> None:
    transform = AdaptiveMultiCropTransform(min_local_crops=1, max_local_crops=3, warmup_epochs=2,
                                           global_crop_size=64, local_crop_size=32)
    dataset = MultiCropDataset(_Constant(tiny_source, 8), transform)
    loader = build_multicrop_dataloader(dataset, batch_size=2, num_workers=2,
                                        persistent_workers=persistent,
                                        mask_generator=_small_masks(3, "global_with_local_context"))
    counts = []
    for epoch in range(3):
        transform.set_epoch(epoch)
        loader.batch_sampler.set_epoch(epoch)
        batches = _batches(loader)
        counts.append({b.num_local_crops for b in batches})
        for b in batches:  # collatable, masks agree with the crops
            assert len(b.crops) == 2 + b.num_local_crops
            assert b.masks.num_local_crops == b.num_local_crops
            assert all(c.shape == (2, 3, 32, 32) for c in b.crops[2:])
    assert counts == [{1}, {2}, {3}]


@pytest.mark.parametrize(("device", "cores", "local_ranks", "expected"),
                         [("cpu", 16, 1, 0), ("cuda", 16, 1, 8), ("cuda", 16, 4, 3), ("cuda", 2, 1, 1),
                          ("cuda", 2, 2, 1)])
def test_auto_num_workers_leaves_cpu_cores_to_the_step_and_shares_them_between_gpus(
        monkeypatch: pytest.MonkeyPatch, device: str, cores: int, local_ranks: int, expected: int) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert auto_num_workers(device) == expected
