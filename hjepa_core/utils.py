"""Small shared helpers: atomic file writes, file hashes, seed mixing, rank/world discovery."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch


def fsync_dir(folder: str | Path) -> None:
    """Makes a rename in ``folder`` durable (best effort: some filesystems refuse it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DiskFullError(OSError):
    """A file could not be written because its disk is full; the message names the file."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(f"no space left on device writing {path}; free space there or write elsewhere")
        self.path = Path(path)


def _disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` or what led to it is ENOSPC (or ``torch.save``'s "unexpected pos", the
    form a short write takes in its zip writer)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if isinstance(error, RuntimeError) and "unexpected pos" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


FILE_MODE = 0o644  # outputs are read by the next stage, often another user (a KFP pod, a shared PVC)
DIR_MODE = 0o755


def make_dirs(path: str | Path) -> Path:
    """Creates ``path`` and its missing parents with :data:`DIR_MODE`, whatever the umask (a
    restrictive one would otherwise hide the outputs from the next stage's user); existing folders
    keep their mode."""
    path = Path(path)
    missing = []
    parent = path
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    path.mkdir(parents=True, exist_ok=True)
    for folder in reversed(missing):
        with contextlib.suppress(OSError):  # created concurrently by another user
            os.chmod(folder, DIR_MODE)
    return path


class AtomicFile:
    """A file written under a hidden temporary name beside ``path`` (``.NAME.PID-RANDOM.tmp``).

    :meth:`commit` flushes, fsyncs and renames it over ``path``; :meth:`abort` deletes it. As a
    context manager it commits on success and aborts on an exception, so readers see the old
    file or the whole new one, never a part, and a crash leaves at most a hidden temporary. A full
    disk is a :class:`DiskFullError` naming ``path``. The file gets :data:`FILE_MODE` (0644) whatever
    the umask, and missing folders :data:`DIR_MODE`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        make_dirs(self.path.parent)
        self.temp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        self.file: IO[bytes] = open(self.temp, "xb")  # noqa: SIM115 -- closed by commit() or abort()
        os.fchmod(self.file.fileno(), FILE_MODE)

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def commit(self) -> Path:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.temp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is not None:
            self.abort()
            if _disk_full(error):
                raise DiskFullError(self.path) from error
            return
        try:
            self.commit()
        except OSError as exc:
            if _disk_full(exc):
                raise DiskFullError(self.path) from exc
            raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` so readers see the old file or the whole new one, never a part."""
    with AtomicFile(path) as out:
        out.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Writes ``text`` (UTF-8) so readers see the old file or the whole new one, never a part."""
    return atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temp file and rename (a crash never leaves half a checkpoint)."""
    with AtomicFile(path) as out:
        torch.save(obj, out.file)
    return Path(path)


RUN_LOCK_NAME = ".hjepa-run.lock"


class RunLockedError(RuntimeError):
    """Another process holds a directory's run lock; the message names its PID."""


@contextlib.contextmanager
def run_lock(directory: str | Path) -> Iterator[Path]:
    """Holds an exclusive ``flock`` on ``DIRECTORY/.hjepa-run.lock`` (this PID written in it) for
    the block, so one run at a time writes to ``directory``; the kernel frees it if we die.

    Raises:
        RunLockedError: another process holds it (at once, without waiting).
    """
    import fcntl

    directory = make_dirs(directory)
    path = directory / RUN_LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    with contextlib.suppress(OSError):  # another user's lock file keeps its mode
        os.fchmod(fd, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(f"{directory} is in use by another run (PID {holder}, lock {path}); wait "
                                 "for it to finish, stop it, or use another output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the lock


REDACTED = "***"
_SECRET_QUERY_KEY = re.compile(r"token|secret|passw|pwd|key|sig|credential|auth|session", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` without its credentials: the user-info part (``https://user:pass@host``) and the
    values of secret-looking query parameters (``?token=``, ``X-Amz-Signature=`` ...) become
    ``***``. Anything that is not a ``scheme://`` URL comes back unchanged."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    if "://" not in url:
        return url
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = [k for k, _ in pairs if _SECRET_QUERY_KEY.search(k)]
    if "@" not in parts.netloc and not secret:
        return url
    netloc = parts.netloc if "@" not in parts.netloc else f"{REDACTED}@{parts.netloc.rsplit('@', 1)[1]}"
    query = urlencode([(k, REDACTED if k in secret else v) for k, v in pairs], safe="*") if secret else parts.query
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (read in ``chunk``-byte blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world size)`` of this process: the explicit values, else ``torch.distributed``
    when initialised, else torchrun's ``RANK``/``WORLD_SIZE`` environment variables (else 0, 1).

    Raises:
        ValueError: a rank outside ``[0, world_size)``.
    """
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank = int(os.environ.get("RANK", 0))
            world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return rank, world_size


SEED_MODULUS = 2**63 - 1  # seeds stay non-negative 63-bit integers (torch.Generator takes them)


def mix_seeds(*values: int, salt: int = 0) -> int:
    """A deterministic 63-bit seed from integers (``salt`` is added to every value, so two
    callers that mix the same values with different salts get unrelated streams)."""
    mixed = 0
    for v in values:
        mixed = (mixed * 1_000_003 + int(v) + salt) % SEED_MODULUS
    return mixed


def as_pair(values: Sequence[float]) -> tuple[float, float]:
    """``[low, high]`` (a list from YAML, or a tuple) as a ``(low, high)`` tuple; other lengths raise."""
    low, high = values
    return low, high


def split_overrides(text: str) -> list[str]:
    """``"a.b=1,c=[0.2,0.6]"`` -> ``["a.b=1", "c=[0.2,0.6]"]``: splits a comma-joined list of
    ``key=value`` overrides only before the next key, so commas inside values are kept."""
    return [part for part in re.split(r",(?=[A-Za-z_][\w.]*=)", text) if part]
