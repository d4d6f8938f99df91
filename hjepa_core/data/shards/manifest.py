"""The shard manifest (``manifest.json``) and resolving a shard spec into one split's URLs."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hjepa_core.data.shards.spec import (
    MANIFEST_NAME,
    SHARD_PREFIXES,
    join_url,
    local_path,
    open_url,
    parent_url,
)
from hjepa_core.utils import atomic_write_text

MANIFEST_FORMAT = "hjepa-webdataset-shards"
MANIFEST_VERSION = 1


def read_manifest(location: str | os.PathLike) -> dict:
    """Reads ``manifest.json`` from a shard directory, a manifest path or a manifest URL."""
    text = str(location)
    local = local_path(text)
    if local is not None and local.is_dir():
        text = str(local / MANIFEST_NAME)
    try:
        with open_url(text) as stream:
            manifest = json.load(stream)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{text}: no shard manifest (write one with `hjepa shard --out DIR`)"
        ) from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{text}: not an hjepa shard manifest (format={manifest.get('format')!r})")
    return manifest



@dataclass
class ShardList:
    """Resolved shard URLs of one split, with the manifest when one was found."""

    urls: list[str]
    split: str
    manifest: dict | None = None

    @property
    def split_info(self) -> dict | None:
        if self.manifest is None:
            return None
        return self.manifest.get("splits", {}).get(self.split)

    @property
    def classes(self) -> list[str]:
        info = self.split_info
        if info is not None:
            return list(info.get("classes", []))
        return list((self.manifest or {}).get("classes", []))

    def shard_info(self, url: str) -> dict | None:
        """The manifest's record of a shard (by file name, in this split first), or None."""
        if self.manifest is None:
            return None
        name = url.rsplit("/", 1)[-1]
        splits = self.manifest.get("splits", {})
        for info in sorted(splits.values(), key=lambda i: i is not self.split_info):
            found = next((s for s in info["shards"] if s["name"] == name), None)
            if found is not None:
                return found
        return None

    def shard_counts(self) -> list[int] | None:
        """Samples per shard in ``urls`` order, or None when the manifest does not say."""
        counts = [self.shard_info(u) for u in self.urls]
        if any(c is None for c in counts):
            return None
        return [int(c["num_samples"]) for c in counts]  # type: ignore[index]

    @property
    def num_samples(self) -> int | None:
        counts = self.shard_counts()
        return sum(counts) if counts is not None else None


def _urls_from_manifest(manifest: dict, base: str, split: str, where: str) -> list[str]:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ValueError(
            f"{where}: split {split!r} is not in the manifest (has {sorted(splits) or 'none'}); "
            f"an interrupted `hjepa shard --split {split}` leaves it out: re-run it"
        )
    return [join_url(base, s["name"]) for s in splits[split]["shards"]]


def resolve_shards(
    spec: str | os.PathLike | Sequence[str] | ShardList,
    split: str = "train",
    manifest: str | os.PathLike | dict | None = None,
) -> ShardList:
    """Expands a shard spec into URLs and finds its manifest.

    Args:
        spec: a directory with ``manifest.json``, a manifest path/URL, a path, brace pattern,
            ``::``-joined list or URL of ``.tar`` shards, or a list of those; an optional
            ``shards:`` prefix is stripped.
        split: the split to read from a manifest.
        manifest: a manifest (dict, path or URL) for URLs whose manifest cannot be found next to
            them (remote shards); local shards look for ``manifest.json`` in their folder.

    Raises:
        FileNotFoundError: a local shard or directory that does not exist.
        ValueError: an empty spec or a split missing from the manifest.
    """
    from webdataset.shardlists import expand_urls

    if isinstance(spec, ShardList):
        return spec
    loaded = read_manifest(manifest) if isinstance(manifest, (str, os.PathLike)) else manifest
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        prefix, sep, rest = text.partition(":")
        if sep and prefix.lower() in SHARD_PREFIXES and not rest.startswith("//"):
            text = rest
        local = local_path(text)
        if local is not None and local.is_dir():
            if (local / MANIFEST_NAME).is_file():
                loaded = read_manifest(local)
                urls = _urls_from_manifest(loaded, str(local), split, text)
            else:
                urls = sorted(str(p) for p in local.glob(f"{split}-*.tar"))
                if not urls:
                    raise FileNotFoundError(f"{text}: no {MANIFEST_NAME} and no {split}-*.tar shards")
        elif text.endswith(MANIFEST_NAME):
            loaded = read_manifest(text)
            urls = _urls_from_manifest(loaded, parent_url(text), split, text)
        else:
            urls = expand_urls(text)
    else:
        urls = [str(u) for u in spec]
    if not urls:
        raise ValueError(f"{spec!r}: no shards")
    for url in urls:
        local = local_path(url)
        if local is not None and not local.is_file():
            raise FileNotFoundError(f"shard {url} does not exist")
    first = local_path(urls[0])
    if loaded is None and first is not None and (first.parent / MANIFEST_NAME).is_file():
        loaded = read_manifest(first.parent)
    return ShardList(urls, split, loaded)


def load_manifest_or_new(out_dir: Path) -> dict:
    """The manifest in ``out_dir`` (a writer adds to it), or a new empty one."""
    path = out_dir / MANIFEST_NAME
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") == MANIFEST_FORMAT:
                return manifest
        except (OSError, ValueError):
            pass
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "classes": [], "splits": {}}


def save_manifest(out_dir: Path, manifest: dict) -> None:
    """Writes ``manifest.json`` atomically (fsynced temp file + rename)."""
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
