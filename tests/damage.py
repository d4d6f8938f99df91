"""Damaging hjepa shards the ways disks and copies do (tests of the integrity checks)."""

from __future__ import annotations

import tarfile
from pathlib import Path

KINDS = ("flipped bytes", "broken tar header", "truncated", "zero-byte")


def damage_shard(shard: Path, kind: str, at: int) -> int:
    """Damages ``shard`` (4 members per sample: cls, json, png, sha256) at sample ``at``;
    returns how many of its samples the damage costs.

    - ``flipped bytes``: one byte inside sample ``at``'s PNG;
    - ``broken tar header``: a byte of the header of sample ``at``'s first member (a tar stream
      then ends there without an error);
    - ``truncated``: the file cut inside sample ``at``'s PNG;
    - ``zero-byte``: an empty file.
    """
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    count = len(members) // 4
    if kind == "flipped bytes":
        data[members[4 * at + 2].offset_data + 100] ^= 0xFF
        lost = 1
    elif kind == "broken tar header":
        data[members[4 * at].offset + 10] ^= 0xFF
        lost = count - at
    elif kind == "truncated":
        data = data[:members[4 * at + 2].offset_data + 100]
        lost = count - at
    elif kind == "zero-byte":
        data, lost = bytearray(), count
    else:
        raise ValueError(f"unknown damage {kind!r}; one of {KINDS}")
    shard.write_bytes(bytes(data))
    return lost
