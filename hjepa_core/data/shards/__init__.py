"""WebDataset shards: writing any image source to ``.tar`` shards, and streaming them back.

- :mod:`.spec`: what names shards (paths, URLs, brace patterns, ``shards:`` prefixes) and
  opening a shard or manifest (WebDataset's ``gopen`` or fsspec);
- :mod:`.manifest`: ``manifest.json`` (counts, classes, per-shard sha256) and resolving a spec
  into one split's URLs (:func:`resolve_shards`);
- :mod:`.writer`: :func:`write_shards` (``hjepa shard``): seeded order, byte-stable tar
  members, bad inputs skipped and listed, crash-safe renames;
- :mod:`.integrity`: sample checksums, counts against the manifest and the shared table of
  corrupt shards and lost samples that a run reports and applies its policy to;
- :mod:`.upload`: ``upload_shards``, a written folder to an object store (manifest last; the
  pipeline's shard stage imports it, ``hjepa shard`` does not);
- :mod:`.reader`: :class:`ShardMultiCropDataset` (pretraining, resampled per DDP rank) and
  :class:`ShardSource` (evaluation, each sample exactly once across ranks x workers).
"""

from hjepa_core.data.shards.integrity import ShardIntegrity, ShardIntegrityError
from hjepa_core.data.shards.manifest import ShardList, read_manifest, resolve_shards
from hjepa_core.data.shards.reader import (
    ShardMultiCropDataset,
    ShardSource,
    build_shard_multicrop_dataset,
    shard_source,
)
from hjepa_core.data.shards.spec import MANIFEST_NAME, is_shard_spec, open_url, shard_spec_from
from hjepa_core.data.shards.writer import shuffled_order, write_shards

__all__ = [
    "MANIFEST_NAME",
    "ShardIntegrity",
    "ShardIntegrityError",
    "ShardList",
    "ShardMultiCropDataset",
    "ShardSource",
    "build_shard_multicrop_dataset",
    "is_shard_spec",
    "open_url",
    "read_manifest",
    "resolve_shards",
    "shard_source",
    "shard_spec_from",
    "shuffled_order",
    "write_shards",
]
