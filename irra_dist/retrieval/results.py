"""Search results: the top-k of each query, printed as a table and drawn as one PNG grid.

Shared by ``irra-search`` over a gallery (:mod:`irra_dist.retrieval.ranking`) and over a faiss index
(:mod:`irra_dist.retrieval.query`). Free of torch, so that the ONNX query path stays light.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from irra_dist.visualize import Hit, QueryRow, render_retrieval_grid


class ImageSource(Protocol):
    """Anything that loads gallery images by index (a gallery, an index's gallery)."""

    def load_images(self, indices: Sequence[int]) -> list[Image.Image]: ...


@dataclass
class QueryResult:
    """The top-k of one query."""

    text: str
    pid: int | None
    scores: list[float]
    indices: list[int]
    """Gallery indices, best first."""
    names: list[str]
    pids: list[int] | None
    """The hits' pids (shard galleries)."""
    correct: list[bool] | None
    """Hit pid == query pid, when both are known."""


def format_results(results: Sequence[QueryResult]) -> str:
    """The results as a plain-text table per query."""
    lines = []
    for q, res in enumerate(results, start=1):
        pid = f" (pid {res.pid})" if res.pid is not None else ""
        lines.append(f"query {q}{pid}: {res.text}")
        header = f"  {'rank':>4}  {'score':>7}"
        if res.pids is not None:
            header += f"  {'pid':>6}"
        if res.correct is not None:
            header += f"  {'match':<9}"
        lines.append(header + "  image")
        for r, (score, name) in enumerate(zip(res.scores, res.names)):
            row = f"  {r + 1:>4}  {score:>7.4f}"
            if res.pids is not None:
                row += f"  {res.pids[r]:>6}"
            if res.correct is not None:
                row += f"  {'correct' if res.correct[r] else 'wrong':<9}"
            lines.append(f"{row}  {name}")
    return "\n".join(lines)


def render_results(results: Sequence[QueryResult], gallery: ImageSource, out_path: str | os.PathLike, *,
                   thumb_size: tuple[int, int] = (128, 48)) -> Path:
    """Draw all queries as one PNG, a row each (see :func:`irra_dist.visualize.render_retrieval_grid`)."""
    wanted = sorted({i for res in results for i in res.indices})
    images = dict(zip(wanted, gallery.load_images(wanted)))
    rows = []
    for res in results:
        labels = ([f"pid {p}" for p in res.pids] if res.pids is not None
                  else [Path(name).stem for name in res.names])
        correct = res.correct or [None] * len(res.indices)
        hits = [Hit(images[i], s, c, lab) for i, s, c, lab in zip(res.indices, res.scores, correct, labels)]
        prefix = f"[pid {res.pid}] " if res.pid is not None else ""
        rows.append(QueryRow(prefix + res.text, hits))
    return render_retrieval_grid(rows, out_path, thumb_size=thumb_size)


def slugify(text: str, max_len: int = 40) -> str:
    """A file-name-safe lower-case slug of `text` ("query" when nothing is left)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")
    return slug or "query"


def default_out_path(home: Path, texts: Sequence[str]) -> Path:
    """``<home>/search_<slug of the first query>[_and_<n>_more].png``."""
    more = f"_and_{len(texts) - 1}_more" if len(texts) > 1 else ""
    return home / f"search_{slugify(texts[0])}{more}.png"
