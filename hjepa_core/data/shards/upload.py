"""Publishing a finished shard folder to an object store (``s3://``, ``gs://``, ... via fsspec).

The writer needs a local folder (it renames and fsyncs), so a remote destination is written to a
local folder first and uploaded here: the shards the manifest lists, then ``manifest.json`` last,
so a manifest at the destination only ever vouches for shards already there.
"""

from __future__ import annotations

import os
from pathlib import Path

from hjepa_core.data.shards.manifest import read_manifest
from hjepa_core.data.shards.spec import MANIFEST_NAME


def upload_shards(local_dir: str | os.PathLike, url: str) -> str:
    """Copies the shards of ``local_dir`` (those its manifest lists) and the manifest to ``url``.

    Returns:
        ``url`` without a trailing slash: the shard spec readers take.
    Raises:
        ImportError: no fsspec filesystem package for the URL's scheme (``s3fs``, ``gcsfs``, ...).
    """
    import fsspec

    local = Path(local_dir)
    names = [shard["name"] for info in read_manifest(local)["splits"].values() for shard in info["shards"]]
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    for name in [*names, MANIFEST_NAME]:
        fs.put_file(str(local / name), f"{root}/{name}")
    return url.rstrip("/")
