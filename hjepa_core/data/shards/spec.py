"""Shard specs and URLs: what names shards, and how a shard or manifest is opened.

A spec is a directory holding ``manifest.json``, a manifest path/URL, a ``.tar`` path, a brace
pattern (``dir/train-{000000..000011}.tar``), a ``::``-joined list or any URL: ``pipe:``,
``http(s)`` and local paths open through WebDataset's ``gopen``, every other scheme (``s3://``,
``gs://``, ``memory://``, ...) through fsspec. Standard library only (no torch).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

MANIFEST_NAME = "manifest.json"
SHARD_PREFIXES = ("shards", "webdataset", "wds")

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_BRACE_RE = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def local_path(url: str) -> Path | None:
    """The local path of ``url`` (plain path or ``file://``), or None for remote URLs."""
    if url.startswith("pipe:"):
        return None
    scheme = _SCHEME_RE.match(url)
    if scheme is None:
        return Path(url)
    if scheme.group(1) == "file":
        return Path(urlparse(url).path)
    return None


def is_shard_spec(spec: str | os.PathLike | None) -> bool:
    """Whether ``spec`` names WebDataset shards rather than a raw dataset.

    True for ``pipe:`` commands and ``scheme://`` URLs, ``.tar``/``.tgz`` paths, brace patterns,
    ``::``-joined lists, ``manifest.json`` paths and directories holding ``manifest.json``.
    """
    if spec is None:
        return False
    text = str(spec)
    if not text:
        return False
    if "::" in text:
        return any(is_shard_spec(part) for part in text.split("::"))
    if text.startswith("pipe:") or _SCHEME_RE.match(text):
        return True
    if text.endswith((".tar", ".tar.gz", ".tgz", MANIFEST_NAME)) or _BRACE_RE.search(text):
        return True
    local = Path(text)
    return local.is_dir() and (local / MANIFEST_NAME).is_file()


def shard_spec_from(dataset_name: str | None, data_path: str | os.PathLike | None = None) -> str | None:
    """The shard spec a ``(dataset_name, data_path)`` pair refers to, or None for raw datasets.

    ``shards:SPEC`` / ``webdataset:SPEC`` (or ``dataset_name="shards"`` with ``data_path``), a
    ``dataset_name`` that is itself a shard spec, or a ``data_path`` that is one.
    """
    name = dataset_name or ""
    prefix, sep, rest = name.partition(":")
    if prefix.lower() in SHARD_PREFIXES and not rest.startswith("//"):
        spec = rest if sep and rest else (str(data_path) if data_path else "")
        if not spec:
            raise ValueError(f"{name!r}: say where the shards are ({prefix}:DIR or data_path=DIR)")
        return spec
    if is_shard_spec(name):
        return name
    if data_path is not None and is_shard_spec(data_path):
        return str(data_path)
    return None


def open_url(url: str) -> BinaryIO:
    """Opens a shard or manifest for reading.

    Local paths, ``file://``, ``pipe:`` and the other schemes WebDataset's ``gopen`` knows
    (http, https, sftp, ...) go through ``gopen``; every other scheme (s3, gs, az, memory, ...)
    through fsspec, which needs that filesystem's package (``s3fs``, ``gcsfs``, ...).
    """
    from webdataset.gopen import gopen, gopen_schemes

    if url.startswith("pipe:") or local_path(url) is not None:
        return gopen(url, "rb")
    scheme = _SCHEME_RE.match(url).group(1)  # type: ignore[union-attr]
    if scheme in gopen_schemes and scheme != "gs":
        return gopen(url, "rb")
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except ImportError as exc:
        raise ImportError(f"{url}: fsspec needs a package for {scheme}:// ({exc})") from exc


def join_url(base: str, name: str) -> str:
    local = local_path(base)
    if local is not None and not base.startswith("file://"):
        return str(local / name)
    return base.rstrip("/") + "/" + name


def parent_url(url: str) -> str:
    local = local_path(url)
    if local is not None and not url.startswith("file://"):
        return str(local.parent)
    return url.rsplit("/", 1)[0]
