"""Where a shard set lives (a local folder, an ``http(s)://`` folder URL, or a ``pipe:`` command) and how its
files are fetched, verified and cached.

``data.shards`` may be:

- a local folder: files are read in place (checked against the manifest by
  :func:`irra_dist.data.shards.load_manifest`);
- ``http://host/path/set`` or ``https://...``: the folder's URL; ``NAME`` is fetched from ``<url>/NAME``;
- ``pipe:COMMAND``: a shell command that writes file ``{name}`` to stdout, e.g.
  ``pipe:aws s3 cp s3://bucket/set/{name} -`` (``{name}`` is replaced by the file name).

Remote shards are copied into a local cache (``data.cache_dir``) before the indexed reader opens them: each
is streamed to a temporary file while hashing, compared with the manifest's size and SHA-256, and renamed
into place only when both match (a name in the cache is the shard's hash, so a cached file is always a
verified one). A shard that fails is fetched once more; a second failure is a one-line :class:`ShardError`.
The cache keeps the most recently used shards under a size cap.

Transport is the standard library (``urllib`` with a timeout, ``subprocess`` for ``pipe:``) rather than
wids' downloader, which shells out to ``curl`` without ``-f`` (an HTTP 404 page is cached as a shard), writes
straight to the final name, and never checks a hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from irra_dist.fileio import atomic_write

REMOTE_PREFIXES = ("http://", "https://", "pipe:")
FETCH_TIMEOUT_S = 60.0
"""Seconds a connection or a read may stall before the fetch fails."""
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "irra_dist" / "shards"
_CHUNK = 1 << 20


class ShardError(ValueError):
    """A shard set that cannot be used or written; one line naming the file and the fix."""


class SourceError(OSError):
    """A remote file cannot be fetched (unreachable host, HTTP error, failed command, cut-short transfer)."""


def is_remote(location: str | os.PathLike) -> bool:
    """True for an ``http(s)://`` URL or a ``pipe:`` command, False for a local path."""
    return str(location).startswith(REMOTE_PREFIXES)


class _CheckedPipe:
    """stdout of a ``pipe:`` command; reading past its end raises if the command failed."""

    def __init__(self, command: str) -> None:
        self.command = command
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._stderr)
        assert self.proc.stdout is not None
        self._out = self.proc.stdout

    def read(self, size: int = -1) -> bytes:
        data = self._out.read(size)
        if not data and size != 0:
            self._check()
        return data

    def _check(self) -> None:
        status = self.proc.wait()
        if status != 0:
            self._stderr.seek(0)
            lines = self._stderr.read().decode(errors="replace").strip().splitlines()
            detail = f": {lines[-1].strip()}" if lines else ""
            raise SourceError(f"command {self.command!r} exited with status {status}{detail}")

    def close(self) -> None:
        self._out.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._stderr.close()


class ShardStore:
    """Reads the files of one shard set from its location; remote shards go through a verified local cache.

    Args:
        location: a folder, an ``http(s)://`` URL of a folder, or a ``pipe:`` command with ``{name}``.
        cache_dir: cache folder for remote shards (default ``~/.cache/irra_dist/shards``); each location
            gets a sub-folder named by a hash of the location.
        cache_max_bytes: size cap of the whole cache folder; the least recently used shards are deleted to
            stay under it (None: no cap).
    """

    def __init__(self, location: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 cache_max_bytes: int | None = None) -> None:
        self.location = str(location)
        self.remote = is_remote(self.location)
        if self.location.startswith("pipe:") and "{name}" not in self.location:
            raise ShardError(f"the pipe: command {self.location!r} has no {{name}}: write where the file "
                             "name goes, e.g. pipe:aws s3 cp s3://bucket/set/{name} -")
        self.cache_root = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
        key = hashlib.sha256(self.location.encode()).hexdigest()[:16]
        self.cache_dir = self.cache_root / key
        self.cache_max_bytes = cache_max_bytes

    def __repr__(self) -> str:
        return f"ShardStore({self.location!r})"

    # ----------------------------------------------------------------------------------------------
    # Naming

    def url(self, name: str) -> str:
        """Where file `name` of the set is read from: a path, a URL or a ``pipe:`` command."""
        if self.location.startswith("pipe:"):
            return self.location.replace("{name}", name)
        if self.remote:
            return f"{self.location.rstrip('/')}/{urllib.parse.quote(name)}"
        return str(Path(self.location) / name)

    def local_path(self, name: str) -> Path:
        """The path of a local set's file (not for remote sets)."""
        return Path(self.location) / name

    # ----------------------------------------------------------------------------------------------
    # Reading

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        """A readable binary stream of file `name`: the local file, the HTTP response, or a command's stdout.

        Raises:
            FileNotFoundError: a local file is missing.
            SourceError: the host cannot be reached, HTTP answers an error (404, ...), or the command fails
                (raised on open, or when the stream ends).
        """
        if not self.remote:
            with open(self.local_path(name), "rb") as f:
                yield f
            return
        url = self.url(name)
        if url.startswith("pipe:"):
            pipe = _CheckedPipe(url[len("pipe:"):])
            try:
                yield pipe  # type: ignore[misc]
            finally:
                pipe.close()
            return
        try:
            response = urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S)  # noqa: S310 -- http(s) only
        except urllib.error.HTTPError as err:
            raise SourceError(f"{url} answered HTTP {err.code} ({err.reason})") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise SourceError(f"cannot reach {url} ({reason})") from None
        with response:
            yield _CheckedHTTP(response, url)

    def read_bytes(self, name: str) -> bytes:
        """The whole content of a small file (manifest, index), fetched without caching."""
        with self.open(name) as f:
            try:
                return f.read()
            except (TimeoutError, OSError) as err:
                if isinstance(err, SourceError):
                    raise
                raise SourceError(f"reading {self.url(name)} failed ({err})") from None

    # ----------------------------------------------------------------------------------------------
    # Cached, verified shards

    def cached_path(self, name: str, sha256: str) -> Path:
        return self.cache_dir / f"{sha256[:16]}-{name}"

    def shard_path(self, name: str, size: int, sha256: str) -> Path:
        """A local path of shard `name` with the given size and hash: in place for a local set, else cached.

        Raises:
            ShardError: the shard cannot be fetched, or fails verification twice.
        """
        if not self.remote:
            return self.local_path(name)
        path = self.cached_path(name, sha256)
        if path.is_file():
            with contextlib.suppress(OSError):
                os.utime(path)  # most recently used
            return path
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if self.cache_max_bytes is not None:
            if size > self.cache_max_bytes:
                raise ShardError(f"shard {name} ({size / 2**20:.1f} MiB) is larger than the cache cap "
                                 f"({self.cache_max_bytes / 2**20:.1f} MiB): raise data.cache_max_gb")
            self._make_room(size)
        problem = ""
        for _attempt in range(2):
            try:
                self._fetch_verified(name, size, sha256, path)
                return path
            except SourceError as err:
                problem = str(err)
                if " answered HTTP 4" in problem:
                    break  # not found / forbidden: asking again gives the same answer
        raise ShardError(f"shard {name}: {problem}: check data.shards ({self.location}) and that the set "
                         "there is complete, or rebuild and re-upload it")

    def _fetch_verified(self, name: str, size: int, sha256: str, path: Path) -> None:
        """Stream `name` to a temporary file beside `path` while hashing; it becomes `path` if it matches."""

        def download(tmp: str) -> None:
            digest = hashlib.sha256()
            received = 0
            with open(tmp, "wb") as out, self.open(name) as src:
                try:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                except SourceError:
                    raise
                except (TimeoutError, OSError) as err:
                    raise SourceError(f"reading {self.url(name)} failed after {received} bytes ({err})",
                                      ) from None
            if received != size:
                raise SourceError(f"{self.url(name)} gave {received} bytes but the manifest records {size} "
                                  "(truncated or replaced)")
            if digest.hexdigest() != sha256:
                raise SourceError(f"{self.url(name)} does not match the SHA-256 in the manifest "
                                  "(corrupted or replaced)")

        atomic_write(path, download)

    def _make_room(self, size: int) -> None:
        """Delete the least recently used cached shards until `size` more bytes fit under the cap."""
        files = []
        for path in self.cache_root.rglob("*"):
            if path.is_file() and not path.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    files.append((st.st_mtime_ns, st.st_size, path))
        total = sum(f[1] for f in files)
        # Deleting a shard another worker has open is safe: its mapping stays valid until closed.
        for _, file_size, path in sorted(files):
            if total + size <= self.cache_max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= file_size


class _CheckedHTTP:
    """An HTTP response body that turns stalls and resets into :class:`SourceError`."""

    def __init__(self, response, url: str) -> None:
        self._response, self.url = response, url

    def read(self, size: int = -1) -> bytes:
        try:
            return self._response.read(size)
        except (TimeoutError, OSError, http.client.HTTPException) as err:
            raise SourceError(f"reading {self.url} failed ({err})") from None
