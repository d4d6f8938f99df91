"""Shard integrity as shards are read: sample checksums, counts against the manifest, and a
shared table of what was lost.

The writer gives every sample a ``sha256`` member, the digest of its other members
(:func:`sample_digest`). The reader (:func:`read_shard`) checks it when it reads the sample:
the bytes are in memory anyway, so the check costs one hash and no extra read. It also counts
the samples a shard yields against the manifest, because a broken tar header ends a stream
silently, and it records a read error (a truncated or zero-byte shard) as one line naming the
shard. Shards written without sample checksums are checked against the manifest's sha256,
computed while they stream.

Every finding goes into a :class:`ShardIntegrity` table in shared memory. DataLoader workers
fill it, and the training or evaluation process reads it: to report the loss (log,
``metrics.json``, ``eval.json``, MLflow) and to apply the policy (``data.on_corrupt=skip|fail``
and ``data.max_corrupt_fraction``, see :meth:`ShardIntegrity.check`).
"""

from __future__ import annotations

import hashlib
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import BinaryIO

import torch

CHECKSUM_KEY = "sha256"
ON_CORRUPT = ("skip", "fail")

BAD_SAMPLE = 1  # a sample failed its checksum
READ_ERROR = 2  # the tar stream raised (truncated, zero-byte, a broken member)
SHORT = 4  # fewer samples than the manifest lists (a broken header ends a tar without an error)
SHA256 = 8  # the shard's bytes differ from the manifest's sha256 (shards without sample checksums)
REASONS = {BAD_SAMPLE: "samples fail their checksum", READ_ERROR: "tar read error",
           SHORT: "fewer samples than the manifest lists", SHA256: "sha256 differs from the manifest"}
_FLAGS, _OK, _BAD, _LOST = range(4)


class ShardIntegrityError(ValueError):
    """Shards lost more data than the policy allows; the message names them and the settings."""


def sample_digest(members: Mapping[str, bytes]) -> str:
    """Hex sha256 over a sample's members (by extension, lengths included), its own
    ``sha256`` member and WebDataset's ``__key__``/``__url__`` left out."""
    digest = hashlib.sha256()
    for ext in sorted(members):
        if ext != CHECKSUM_KEY and not ext.startswith("__"):
            digest.update(f"{ext}:{len(members[ext])}:".encode())
            digest.update(members[ext])
    return digest.hexdigest()


class _HashingReader:
    """A read-only stream that hashes what passes through it (a shard's sha256 at no extra read)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> str:
        """Reads the rest (the tar's end blocks) and returns the hex digest of everything."""
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()


class ShardIntegrity:
    """Per-shard findings in shared memory: flags, samples read intact, corrupt and lost.

    Rows are set, not added to (each read of a shard finds the same), so resampled training,
    which reads a shard many times, and worker races still count every loss once.

    Args:
        names: the shards' URLs, in the reader's order.
        expected: samples per shard from the manifest (None when it does not say).
    """

    def __init__(self, names: list[str], expected: list[int] | None) -> None:
        self.names = names
        self.expected = expected
        self.table = torch.zeros((len(names), 4), dtype=torch.int64).share_memory_()

    def record(self, index: int, flags: int, ok: int, bad: int, lost: int) -> None:
        row = self.table[index]
        row[_FLAGS] = int(row[_FLAGS]) | flags
        row[_OK] = max(int(row[_OK]), ok)
        row[_BAD] = max(int(row[_BAD]), bad)
        row[_LOST] = max(int(row[_LOST]), lost)

    def merge_ranks(self) -> None:
        """Under DDP, makes every rank's table the union of all ranks' findings (a collective:
        every rank calls it), so rank 0 reports the shards any rank found corrupt."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        bits = torch.arange(len(REASONS))
        flags = (self.table[:, _FLAGS, None] >> bits) & 1  # one 0/1 column per reason: MAX is OR
        merged = torch.cat([flags, self.table[:, _OK:]], dim=1)
        if dist.get_backend() == "nccl":
            merged = merged.cuda()
        dist.all_reduce(merged, op=dist.ReduceOp.MAX)
        merged = merged.cpu()
        self.table[:, _FLAGS] = (merged[:, :len(REASONS)] << bits).sum(dim=1)
        self.table[:, _OK:] = merged[:, len(REASONS):]

    def summary(self) -> dict:
        """``{"samples", "lost_samples", "fraction", "corrupt_shards": [{"shard", "reason",
        "lost"}]}``. A shard that fails its whole-shard sha256 counts all its samples: which of
        them are damaged cannot be told."""
        rows = self.table.tolist()
        counts = self.expected or [ok + bad for _, ok, bad, _ in rows]
        shards = []
        for name, (flags, _ok, bad, lost), count in zip(self.names, rows, counts, strict=True):
            if flags:
                reason = "; ".join(text for bit, text in REASONS.items() if flags & bit)
                shards.append({"shard": name, "reason": reason, "lost": count if flags & SHA256 else bad + lost})
        total = sum(counts)
        lost = sum(s["lost"] for s in shards)
        return {"samples": total, "lost_samples": lost, "fraction": lost / total if total else 0.0,
                "corrupt_shards": shards}

    def check(self, on_corrupt: str, max_fraction: float, what: str) -> dict:
        """The summary; raises when ``on_corrupt="fail"`` and anything was lost, or when more
        than ``max_fraction`` of the samples were.

        Raises:
            ShardIntegrityError: one line naming the shards, the loss and the settings.
        """
        summary = self.summary()
        if not summary["corrupt_shards"]:
            return summary
        if on_corrupt == "fail" or summary["fraction"] > max_fraction:
            rule = ("data.on_corrupt=fail" if on_corrupt == "fail"
                    else f"more than data.max_corrupt_fraction={max_fraction}")
            raise ShardIntegrityError(f"{what}: {describe(summary)}, {rule}; re-run `hjepa shard` for "
                                      "these shards, or raise data.max_corrupt_fraction to train on the rest")
        return summary


def describe(summary: dict) -> str:
    """One line: which shards are corrupt, why, and how much was lost."""
    shards = summary["corrupt_shards"]
    named = ", ".join(f"{s['shard']} ({s['reason']})" for s in shards[:3])
    more = f" and {len(shards) - 3} more" if len(shards) > 3 else ""
    return (f"{len(shards)} corrupt shard(s) {named}{more}: {summary['lost_samples']} of {summary['samples']} "
            f"samples ({100 * summary['fraction']:.1f}%) lost")


def _split_name(name: str) -> tuple[str, str] | None:
    """``dir/key.ext.more`` -> ``("dir/key", "ext.more")`` (WebDataset's grouping rule)."""
    folder, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key, ext) if dot and key else None


def _members(stream: BinaryIO | _HashingReader) -> Iterator[tuple[str, str, bytes]]:
    # typeshed's tarfile wants write/seek/tell even of a read-only stream ("r|*"), which it never calls
    with tarfile.open(fileobj=stream, mode="r|*") as tar:  # type: ignore[call-overload]
        for info in tar:
            split = _split_name(info.name) if info.isreg() else None
            if split is not None:
                yield split[0], split[1], tar.extractfile(info).read()


def _samples(stream: BinaryIO | _HashingReader, url: str) -> Iterator[dict]:
    """Members grouped into WebDataset sample dicts (consecutive members with one key)."""
    sample: dict = {}
    for key, ext, data in _members(stream):
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        if not sample:
            sample = {"__key__": key, "__url__": url}
        sample[ext] = data
    if sample:
        yield sample


def read_shard(url: str, opener: Callable[[], BinaryIO], index: int, integrity: ShardIntegrity,
               info: Mapping | None = None) -> Iterator[dict]:
    """The intact samples of shard ``index`` (opened by ``opener``), with what is wrong recorded
    in ``integrity`` and warned in one line naming the shard.

    Samples are checked one by one against their ``sha256`` member: every sample must have one
    when the manifest's record of the shard (``info``) says ``sample_checksums``, or once one
    sample had one. A shard without them is checked against the record's ``sha256`` as it
    streams."""
    expected = integrity.expected[index] if integrity.expected is not None else None
    checked = bool(info and info.get("sample_checksums"))
    sha256 = None if checked or not info else info.get("sha256")
    ok = bad = flags = 0
    error = ""
    try:
        with opener() as stream:
            hashing = _HashingReader(stream) if sha256 else None
            for sample in _samples(hashing or stream, url):
                if checked or CHECKSUM_KEY in sample:
                    checked = True  # from here on, the samples vouch for themselves
                    if sample.get(CHECKSUM_KEY, b"").decode(errors="replace").strip() != sample_digest(sample):
                        bad += 1
                        continue
                ok += 1
                yield sample
            if hashing is not None and not checked and hashing.drain() != sha256:
                flags |= SHA256
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        flags |= READ_ERROR
        error = f"{type(exc).__name__}: {exc}"
    except GeneratorExit:  # the epoch ended mid-shard: what was read so far is all we know
        integrity.record(index, BAD_SAMPLE if bad else 0, ok, bad, 0)
        raise
    flags |= BAD_SAMPLE if bad else 0
    lost = max(expected - ok - bad, 0) if expected is not None else 0
    if lost and not flags & READ_ERROR:
        flags |= SHORT
    integrity.record(index, flags, ok, bad, lost)
    if flags:
        detail = "; ".join(text for bit, text in REASONS.items() if flags & bit)
        count = f" of {expected}" if expected is not None else ""
        warnings.warn(f"{url}: {detail}{f' ({error})' if error else ''}; {bad + lost}{count} samples lost, "
                      "skipped", stacklevel=2)
