"""File helpers: atomic writes (every output appears complete under its final name or not at all) and the
SHA-256 of a file."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> str:
    """An empty temporary file in `path`'s folder (created if needed), named ``.<name>.<random>.tmp``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _publish(tmp: str, path: Path) -> None:
    # the usual permissions (0666 minus the umask), not mkstemp's 0600
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside `path`, then rename it over `path`.

    A crash or an exception leaves the previous file (if any) untouched and no temporary behind. The file
    gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        write(tmp)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class AtomicFile:
    """A binary file written in pieces under a temporary name; :meth:`commit` renames it over `path`.

    For writers that hand the file to a callback API (a tar writer); :func:`atomic_write` otherwise. A
    process killed before :meth:`commit` leaves only the ``.<name>.<random>.tmp`` file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tmp = _temp_beside(self.path)
        self.file = open(self.tmp, "wb")  # noqa: SIM115 -- closed in commit()/abort()

    def commit(self) -> Path:
        self.file.close()
        _publish(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file; `path` keeps its previous content (if any)."""
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (constant memory for multi-GB weights and shards)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
