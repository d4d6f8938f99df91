"""WebDataset shards: writing (content, manifest, bad files, crashes) and reading (ranks, workers)."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import struct
import subprocess
import sys
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hjepa_core.cli import main as hjepa_main
from hjepa_core.cli import parse_byte_size
from hjepa_core.data import build_multicrop_dataloader, build_multicrop_dataset, build_source
from hjepa_core.data.images import MAX_IMAGE_PIXELS, to_rgb
from hjepa_core.data.shards import (
    ShardIntegrityError,
    ShardMultiCropDataset,
    ShardSource,
    is_shard_spec,
    read_manifest,
    shard_spec_from,
    shuffled_order,
    write_shards,
)
from hjepa_core.data.sources import ArrayImageDataset
from tests.conftest import smooth_image
from tests.damage import KINDS, damage_shard

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
N = 300  # Fashion-MNIST images used by most tests
_TORCHRUN_BIN = Path(sys.executable).with_name("torchrun")
TORCHRUN = [str(_TORCHRUN_BIN)] if _TORCHRUN_BIN.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def fm_small(fashion_mnist_train) -> ArrayImageDataset:
    return ArrayImageDataset(fashion_mnist_train.images[:N], fashion_mnist_train.labels[:N],
                             fashion_mnist_train.classes)


@pytest.fixture(scope="module")
def fm_shards(fm_small, tmp_path_factory) -> Path:
    """``train``: 300 images in shards of 128, 128, 44; ``test``: the first 100 in shards of 40."""
    out = tmp_path_factory.mktemp("fm_shards")
    write_shards(fm_small, out, "train", samples_per_shard=128, progress=False, source_name="fm")
    first = ArrayImageDataset(fm_small.images[:100], fm_small.labels[:100], fm_small.classes)
    write_shards(first, out, "test", samples_per_shard=40, progress=False, source_name="fm")
    return out


def _shas(manifest: dict, split: str) -> list[str]:
    return [s["sha256"] for s in manifest["splits"][split]["shards"]]


def _tars(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.tar"))


def _indices(source: ShardSource) -> list[int]:
    return [index for _image, _label, index in source.iter_with_index()]


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------


def test_round_trip_content_and_manifest(fm_small, fm_shards):
    manifest = read_manifest(fm_shards)
    info = manifest["splits"]["train"]
    assert [s["num_samples"] for s in info["shards"]] == [128, 128, 44]
    assert info["pattern"] == "train-{000000..000002}.tar"
    assert (info["num_inputs"], info["num_samples"], info["num_skipped"]) == (N, N, 0)
    assert info["classes"] == manifest["classes"] == list(fm_small.classes)
    expected = np.bincount(fm_small.labels, minlength=10)
    assert info["class_counts"] == {fm_small.classes[c]: int(n) for c, n in enumerate(expected) if n}
    assert info["params"]["samples_per_shard"] == 128 and info["source"] == "fm"
    for shard in info["shards"]:
        data = (fm_shards / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    # Standard tar: four members per sample, named <key>.<ext>, in the seeded shuffled order.
    names = []
    for shard in info["shards"]:
        with tarfile.open(fm_shards / shard["name"]) as tar:
            names += tar.getnames()
            if shard["name"] == "train-000002.tar":
                first = tar.getnames()[0].split(".")[0]
                record = json.loads(tar.extractfile(f"{first}.json").read())
    order = shuffled_order(N, 0)
    assert names == [f"train_{i:09d}.{ext}" for i in order for ext in ("cls", "json", "png", "sha256")]
    assert order != sorted(order) and sorted(order) == list(range(N))
    index = order[256]
    assert record["source_id"] == f"fm:train:{index}" and record["original_size"] == [28, 28]
    assert record["label"] == int(fm_small.labels[index]) and record["stored"] == "reencoded"

    source = build_source(f"shards:{fm_shards}", split="train")
    assert isinstance(source, ShardSource) and len(source) == N and source.classes == manifest["classes"]
    seen = 0
    for image, label, index in source.iter_with_index():
        pixels = np.asarray(image)
        assert image.mode == "RGB" and label == fm_small.labels[index]
        assert np.array_equal(pixels[..., 0], fm_small.images[index])  # lossless, bit-exact
        assert np.array_equal(pixels[..., 0], pixels[..., 2])
        seen += 1
    assert seen == N


def test_output_is_deterministic_idempotent_and_drops_stale_shards(fm_small, fm_shards, tmp_path):
    reference = _shas(read_manifest(fm_shards), "train")
    parallel = write_shards(fm_small, tmp_path, "train", samples_per_shard=128, workers=2,
                            progress=False, source_name="fm")
    assert _shas(parallel, "train") == reference  # workers never change a byte
    write_shards(fm_small, tmp_path, "train", samples_per_shard=50, progress=False)
    assert len(_tars(tmp_path)) == 6
    again = write_shards(fm_small, tmp_path, "train", samples_per_shard=128, progress=False,
                         source_name="fm")
    assert _shas(again, "train") == reference and _tars(tmp_path) == _tars(fm_shards)[-3:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_max_shard_bytes_bounds_every_file(fm_small, tmp_path):
    limit = 120_000
    manifest = write_shards(fm_small, tmp_path, "train", max_shard_bytes=limit, progress=False)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 2 and sum(s["num_samples"] for s in shards) == N
    for shard in shards:
        assert shard["bytes"] == (tmp_path / shard["name"]).stat().st_size <= limit
    assert len(list(ShardSource(tmp_path, "train"))) == N


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width x height`` pixels."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


@pytest.fixture
def bad_corpus(tmp_path) -> tuple[Path, dict[str, Image.Image]]:
    """An image folder with 3 kept, 1 re-encoded, 3 converted and 5 unusable files."""
    root = tmp_path / "corpus"
    rgb = smooth_image(40, 30, seed=1)
    palette = smooth_image(24, 20, seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    sixteen = Image.fromarray((np.arange(32 * 24).reshape(24, 32) * 80).astype(np.uint16))
    png = _encoded(rgb, "PNG")
    jpeg = _encoded(rgb, "JPEG", quality=90)
    files = {
        "cat/rgb.png": png,
        "cat/gray.png": _encoded(smooth_image(30, 30, seed=2, mode="L"), "PNG"),
        "cat/photo.jpg": jpeg,
        "cat/cmyk.jpg": _encoded(smooth_image(30, 20, seed=3).convert("CMYK"), "JPEG", quality=95),
        "dog/rgb2.png": _encoded(smooth_image(20, 20, seed=5), "PNG"),
        "dog/palette.png": _encoded(palette, "PNG", transparency=0),
        "dog/depth16.png": _encoded(sixteen, "PNG"),
        "dog/empty.png": b"",
        "dog/truncated.png": png[: len(png) // 2],
        "dog/truncated.jpg": jpeg[: len(jpeg) // 2],
        "dog/notes.jpg": b"these are not the pixels you are looking for\n" * 20,
        "dog/bomb.png": _png_bomb(10_000, 10_000),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    originals = {n: Image.open(io.BytesIO(d)) for n, d in files.items()
                 if n in ("cat/cmyk.jpg", "dog/palette.png", "dog/depth16.png")}
    return root, originals


def test_bad_files_are_skipped_counted_and_listed(bad_corpus, tmp_path):
    root, originals = bad_corpus
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "hjepa_core.cli", "shard", "--source",
                           f"imagefolder:{root}", "--out", str(out), "--samples-per-shard", "4",
                           "--workers", "2", "--no-progress"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "12 inputs = 7 written in 2 shard(s) + 5 skipped" in proc.stdout
    info = read_manifest(out)["splits"]["train"]
    assert (info["num_inputs"], info["num_samples"], info["num_skipped"]) == (12, 7, 5)
    assert (info["num_converted"], info["num_reencoded"]) == (3, 4)
    assert info["skipped_by_reason"] == {"corrupt": 2, "empty": 1, "not_an_image": 1, "too_large": 1}
    assert {s["source_id"]: s["reason"] for s in info["skipped"]} == {
        "dog/empty.png": "empty", "dog/truncated.png": "corrupt", "dog/truncated.jpg": "corrupt",
        "dog/notes.jpg": "not_an_image", "dog/bomb.png": "too_large"}
    assert info["class_counts"] == {"cat": 4, "dog": 3}
    assert f"{MAX_IMAGE_PIXELS}" in next(s["detail"] for s in info["skipped"] if s["reason"] == "too_large")

    by_id = {}
    for shard in info["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                record = json.loads(data)
                by_id[record["source_id"]] = (record, members[name[:-4] + "png"])
    assert sorted(by_id) == ["cat/cmyk.jpg", "cat/gray.png", "cat/photo.jpg", "cat/rgb.png",
                             "dog/depth16.png", "dog/palette.png", "dog/rgb2.png"]
    for kept in ("cat/rgb.png", "cat/gray.png", "dog/rgb2.png"):  # stored byte for byte
        assert by_id[kept][0]["stored"] == "original"
        assert by_id[kept][1] == (root / kept).read_bytes()
    assert by_id["cat/photo.jpg"][0]["stored"] == "reencoded"
    for name, original in originals.items():  # converted in meaning, then stored losslessly
        record, data = by_id[name]
        assert record["converted"] and record["original_mode"] == original.mode
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(to_rgb(original)))
    white = np.asarray(Image.open(io.BytesIO(by_id["dog/palette.png"][1])))
    assert (white == 255).all(axis=-1).any()  # transparent pixels composited on white
    assert len(list(ShardSource(out, "train"))) == 7


class _FailingSource(Dataset):
    """Fashion-MNIST images; raises (or hangs) at ``index`` like a crashing input pipeline."""

    def __init__(self, base: ArrayImageDataset, index: int, hang: bool = False) -> None:
        self.base, self.index, self.hang = base, index, hang
        self.classes = base.classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if i == self.index:
            if self.hang:
                time.sleep(120)
            raise RuntimeError("storage went away")
        return self.base[i]


def _assert_only_complete_shards(folder: Path, split: str, per_shard: int) -> None:
    for name in _tars(folder):
        if name.startswith(split):
            with tarfile.open(folder / name) as tar:
                assert len(tar.getnames()) == 4 * per_shard, name


def test_interrupted_write_leaves_no_complete_looking_shard(fm_small, fm_shards, tmp_path):
    reference = read_manifest(fm_shards)
    write_shards(fm_small, tmp_path, "test", samples_per_shard=64, progress=False)
    write_shards(fm_small, tmp_path, "train", samples_per_shard=128, progress=False, source_name="fm")
    with pytest.raises(RuntimeError, match="storage went away"):
        write_shards(_FailingSource(fm_small, 200), tmp_path, "train", samples_per_shard=64,
                     shuffle=False, progress=False)
    assert [n for n in _tars(tmp_path) if n.startswith("train")] == ["train-000000.tar", "train-000001.tar"]
    _assert_only_complete_shards(tmp_path, "train", 64)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    manifest = read_manifest(tmp_path)
    assert "train" not in manifest["splits"] and "test" in manifest["splits"]
    with pytest.raises(ValueError, match="split 'train' is not in the manifest"):
        ShardSource(tmp_path, "train")

    # A hard kill (no cleanup at all) while shard 2 is open under its temporary name (source
    # order: samples 0-191 come in 64-sample chunks, the chunk holding 200 never does).
    context = multiprocessing.get_context("fork")
    kwargs = dict(samples_per_shard=64, shuffle=False, progress=False)
    child = context.Process(target=write_shards, args=(_FailingSource(fm_small, 200, hang=True),
                                                       tmp_path, "train"), kwargs=kwargs)
    child.start()
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".train-000002.tar.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    temps = list(tmp_path.glob(".train-000002.tar.*.tmp"))
    assert temps and not (tmp_path / "train-000002.tar").exists()
    _assert_only_complete_shards(tmp_path, "train", 64)
    assert "train" not in read_manifest(tmp_path)["splits"]

    again = write_shards(fm_small, tmp_path, "train", samples_per_shard=128, progress=False,
                         source_name="fm")
    assert _shas(again, "train") == _shas(reference, "train")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(list(ShardSource(tmp_path, "train"))) == N


def main(argv: list[str]) -> int:
    """``hjepa shard ARGV``."""
    return hjepa_main(["shard", *argv])


def test_cli_arguments(fm_small, tmp_path, capsys):
    assert parse_byte_size("64MB") == 64_000_000 and parse_byte_size("1GiB") == 2**30
    code = main(["--source", "fashion_mnist", "--out", str(tmp_path), "--split", "test",
                 "--max-samples", "50", "--samples-per-shard", "20", "--image-format", "jpeg",
                 "--quality", "90", "--no-progress"])
    assert code == 0 and "50 inputs = 50 written in 3 shard(s)" in capsys.readouterr().out
    info = read_manifest(tmp_path)["splits"]["test"]
    assert info["params"]["image_format"] == "jpeg" and info["params"]["max_samples"] == 50
    assert main(["--source", "fashion_mnist", "--out", str(tmp_path), "--split", "test",
                 "--max-samples", "50", "--no-shuffle", "--no-progress"]) == 0
    assert _indices(ShardSource(tmp_path, "test")) == sorted(_indices(ShardSource(tmp_path, "test")))
    assert main(["--source", "imagefolder:/nonexistent", "--out", str(tmp_path)]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--source", "fashion_mnist", "--out", str(tmp_path), "--samples-per-shard", "5",
              "--max-shard-bytes", "1MB"])


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------


def test_shard_specs_and_dataset_entry_points(fm_shards):
    assert is_shard_spec(fm_shards) and is_shard_spec("data/train-{000000..000009}.tar")
    assert is_shard_spec("pipe:curl -s http://host/a.tar") and is_shard_spec("s3://bucket/x.tar")
    assert is_shard_spec(fm_shards / "manifest.json") and is_shard_spec("a.tar::b.tar")
    assert not is_shard_spec("fashion_mnist") and not is_shard_spec("imagefolder:/data/images")
    assert shard_spec_from("shards:/x") == "/x" and shard_spec_from("shards", "/y") == "/y"
    assert shard_spec_from("fashion_mnist", str(fm_shards)) == str(fm_shards)
    assert shard_spec_from("cifar10", "/data/cifar") is None

    kwargs = dict(num_global_crops=2, num_local_crops=2, global_crop_size=16, local_crop_size=8)
    train = build_multicrop_dataset(f"shards:{fm_shards}", split="train", epoch_samples=40, **kwargs)
    assert isinstance(train, ShardMultiCropDataset) and train.resampled and len(train) == 40
    test = build_multicrop_dataset("fashion_mnist", data_path=str(fm_shards), split="test", **kwargs)
    assert not test.resampled and len(test) == 100 and test.classes == train.classes
    capped = build_multicrop_dataset(str(fm_shards), split="train", max_samples=64, **kwargs)
    assert len(capped) == 64
    test.set_epoch(0)
    batches = list(build_multicrop_dataloader(test, batch_size=32, num_workers=0, drop_last=False))
    assert [b.batch_size for b in batches] == [32, 32, 32, 4]
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(100))
    batch = batches[0]
    assert batch.normalized and len(batch.crops) == 4 and batch.crops[2].shape == (32, 3, 8, 8)
    assert batch.boxes.shape == (4, 32, 4)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_simulated_ranks_read_every_sample_once(fm_shards, monkeypatch, world):
    """Env-var ranks over 3 uneven shards (128/128/44): shard-level and sample-level splits."""
    per_rank = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        source = ShardSource(fm_shards, "train")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _indices(source)
        fallback = [w for w in caught if "3 shard(s) < 4 ranks" in str(w.message)]
        assert len(fallback) == (world == 4 and rank == 0)  # sample-level split, said once
        assert len(got) == len(source)
        per_rank.append(got)
    flat = [i for part in per_rank for i in part]
    assert sorted(flat) == list(range(N))


def test_ranks_times_workers_each_sample_once(fm_shards, monkeypatch):
    """2 ranks x 2 workers = 4 slots over 3 shards: rank 1 has one shard for two workers."""

    class Indices(torch.utils.data.IterableDataset):
        def __init__(self, source):
            self.source = source

        def __iter__(self):
            return (index for _i, _l, index in self.source.iter_with_index())

    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = DataLoader(Indices(ShardSource(fm_shards, "train")), batch_size=None, num_workers=2)
        seen.extend(int(i) for i in loader)
    assert sorted(seen) == list(range(N))


def test_training_ranks_get_equal_batches_from_uneven_shards(fm_shards, monkeypatch):
    kwargs = dict(num_global_crops=1, num_local_crops=1, global_crop_size=12, local_crop_size=8)
    counts = []
    for rank in range(3):  # 3 shards of 128/128/44 over 3 ranks: a shard split would be uneven
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        dataset = build_multicrop_dataset(f"shards:{fm_shards}", split="train", **kwargs)
        dataset.set_epoch(0)
        loader = build_multicrop_dataloader(dataset, batch_size=16, num_workers=0)
        counts.append((len(dataset), sum(1 for _ in loader), len(loader)))
    assert counts == [(100, 6, 6)] * 3


def test_training_stream_is_keyed_and_resumes_exactly(fm_shards):
    dataset = ShardMultiCropDataset(fm_shards, "train", num_global_crops=1, num_local_crops=1,
                                    global_crop_size=12, local_crop_size=8, epoch_samples=90,
                                    shuffle_buffer=50, seed=3)
    loader = build_multicrop_dataloader(dataset, batch_size=10, num_workers=2)

    def run(epoch: int, skip: int = 0) -> list[tuple[list[int], int]]:
        dataset.set_epoch(epoch)
        if skip:
            dataset.skip_batches(skip, batch_size=10)
        return [(b.indices.tolist(), b.seed) for b in loader]

    first = run(1)
    assert len(first) == 8  # 45 samples per worker: 4 full batches each
    assert run(1) == first and run(2) != first
    assert run(1, skip=3) == first[3:] and run(1, skip=6) == first[6:]
    assert run(1) == first  # set_epoch clears the skip


def test_urls_pipe_and_fsspec(fm_shards):
    pattern = f"pipe:cat {fm_shards}/test-{{000000..000002}}.tar"
    assert sorted(_indices(ShardSource(pattern, "test"))) == list(range(100))

    import fsspec

    memory = fsspec.filesystem("memory")
    for path in fm_shards.iterdir():
        if path.name.startswith("test") or path.name == "manifest.json":
            memory.pipe(f"memory://hjepa-test/{path.name}", path.read_bytes())
    remote = ShardSource("memory://hjepa-test/manifest.json", "test")
    assert len(remote) == 100 and sorted(_indices(remote)) == list(range(100))
    assert remote.integrity.summary() == {"samples": 100, "lost_samples": 0, "fraction": 0.0,
                                          "corrupt_shards": []}
    with pytest.raises(ValueError, match="epoch_samples"):
        ShardMultiCropDataset("memory://hjepa-test/test-{000000..000002}.tar", "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardSource(str(fm_shards / "test-000009.tar"), "test")
    with pytest.raises(ValueError, match="max_samples"):
        build_source(f"shards:{fm_shards}", split="test", max_samples=10)


def test_torchrun_two_processes_split_shards(fm_shards, tmp_path):
    out = tmp_path / "ddp.json"
    proc = subprocess.run(
        [*TORCHRUN, "--nproc_per_node", "2",
         "--master_port", "29547", str(ROOT / "tests" / "data" / "shards_ddp_reader.py"),
         str(fm_shards), str(out)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (rank0, len0), (rank1, len1) = result["eval"]
    assert not set(rank0) & set(rank1) and sorted(rank0 + rank1) == list(range(100))
    assert (len(rank0), len(rank1)) == (len0, len1) == (60, 40)  # shards 0, 2 | 1 (40 each, last 20)
    assert result["train_batches"] == [18, 18] and result["loader_len"] == 18


def _damage(fm_shards: Path, folder: Path, kind: str) -> int:
    """The test split in ``folder`` with ``test-000001.tar`` (40 samples) damaged at sample 10;
    returns the samples lost."""
    folder.mkdir()
    for path in fm_shards.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return damage_shard(folder / "test-000001.tar", kind, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_shards_are_skipped_counted_and_named_in_one_line(fm_shards, tmp_path, kind):
    lost = _damage(fm_shards, tmp_path / "damaged", kind)
    source = ShardSource(tmp_path / "damaged", "test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = _indices(source)
    assert len(read) == len(set(read)) == 100 - lost
    summary = source.integrity.summary()
    shard = str(tmp_path / "damaged" / "test-000001.tar")
    assert summary["samples"] == 100 and summary["lost_samples"] == lost
    assert [s["shard"] for s in summary["corrupt_shards"]] == [shard]
    reason = {"flipped bytes": "samples fail their checksum", "broken tar header": "fewer samples than the manifest",
              "truncated": "tar read error (ReadError: unexpected end of data)",
              "zero-byte": "tar read error (ReadError: empty file)"}[kind]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith(f"{shard}: {reason}") and f"{lost} of 40 samples lost" in messages[0]
    # The policy: skip up to max_corrupt_fraction, else one line naming the shard and the fix.
    assert source.integrity.check("skip", 0.5, "test data") == summary
    with pytest.raises(ShardIntegrityError, match=rf"^test data: 1 corrupt shard\(s\) {re.escape(shard)} .*"
                                                  rf"{lost} of 100 samples .* lost, data.on_corrupt=fail;"):
        source.integrity.check("fail", 1.0, "test data")
    with pytest.raises(ShardIntegrityError, match=r"more than data.max_corrupt_fraction=0.005; re-run `hjepa shard`"):
        source.integrity.check("skip", 0.005, "test data")


def test_shards_without_sample_checksums_are_checked_by_their_sha256(fm_shards, tmp_path):
    """Shards from before sample checksums: the manifest's sha256, computed as the shard streams."""
    folder = tmp_path / "old"
    _damage(fm_shards, folder, "flipped bytes")
    manifest = json.loads((folder / "manifest.json").read_text())
    for record in manifest["splits"]["test"]["shards"]:
        record.pop("sample_checksums")
        path = folder / record["name"]
        with tarfile.open(path) as tar:
            kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.endswith(".sha256")]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in kept:
                tar.addfile(member, io.BytesIO(data))
        record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    data = bytearray((folder / "test-000002.tar").read_bytes())
    data[2000] ^= 0xFF  # damaged after its sha256 was recorded
    (folder / "test-000002.tar").write_bytes(bytes(data))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    source = ShardSource(folder, "test")
    with pytest.warns(UserWarning, match=r"test-000002\.tar: sha256 differs from the manifest"):
        _indices(source)
    summary = source.integrity.summary()
    assert [Path(s["shard"]).name for s in summary["corrupt_shards"]] == ["test-000002.tar"]
    assert summary["lost_samples"] == 20  # which of its samples are damaged cannot be told
