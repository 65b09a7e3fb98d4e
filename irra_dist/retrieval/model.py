"""The model that search, indexing and export use, loaded through :func:`irra_dist.model.weights.load_model`,
with what search needs to know beside it (the file that identifies the weights, the input size, where the run
keeps its cache and its gallery).

A query text goes through the text tower; the gallery images through the image tower, once: their features
are cached on disk (:mod:`irra_dist.retrieval.cache`), so the next query against the same gallery only
encodes the text. The gallery is one split of a shard set, pids known, or a plain folder of images
(:mod:`irra_dist.retrieval.gallery`); the ranking is the cosine of the global features, as in evaluation
(:mod:`irra_dist.retrieval.ranking`, IRRA_SPEC 5). The ``irra-search`` command line is
:mod:`irra_dist.engine.search_cli`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from irra_dist.data.shards import MANIFEST_NAME
from irra_dist.fileio import atomic_write_bytes, file_sha256
from irra_dist.model import IRRA
from irra_dist.model.weights import CONFIG_FILE, WEIGHTS_CHOICES, WEIGHTS_FILE, load_model
from irra_dist.retrieval.errors import SearchError
from irra_dist.retrieval.index import model_fingerprint
from irra_dist.run_config import load_run_config

logger = logging.getLogger(__name__)


@dataclass
class SearchModel:
    """A model ready for search and what was learned while loading it."""

    model: IRRA
    weights_path: Path
    """The file whose SHA-256 identifies the weights (gallery cache and index keys)."""
    image_size: tuple[int, int]
    home: Path
    """The run folder, or the checkpoint's folder: default place for the PNG and the feature cache."""
    default_gallery: Path | None
    """The run's shard folder (``data.shards``) when it exists."""
    default_split: str


def load_search_model(run: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
                      *, weights: str = "best", image_size: tuple[int, int] | None = None,
                      stride_size: int | None = None) -> SearchModel:
    """Load IRRA from a run folder or from one weights file (:func:`irra_dist.model.weights.load_model`).

    Args:
        run: a run folder written by the trainer (config.yaml plus best.safetensors / model.safetensors, or
            its checkpoints), or a checkpoint folder.
        checkpoint: a weights file: a safetensors export (ours), an official IRRA ``best.pth``, an OpenAI
            CLIP file.
        weights: for a run folder, "best" (best.safetensors when it exists, else model.safetensors) or
            "last" (model.safetensors), as ``irra-eval --weights``.
        image_size: (height, width) override; by default the size the weights record (official files: the
            official 384x128).
        stride_size: patch stride override, found the same way (default 16).

    Returns:
        The fp32 model on the CPU, in eval mode.

    Raises:
        SearchError: neither or both sources, a missing folder or file.
        CheckpointError, ConfigError: unreadable weights or config.
    """
    if (run is None) == (checkpoint is None):
        raise SearchError("pass exactly one of --run RUN_DIR or --checkpoint FILE")
    if weights not in WEIGHTS_CHOICES:
        raise SearchError(f"weights must be 'best' or 'last', got {weights!r}")
    target = Path(run if run is not None else checkpoint)
    if run is not None and not target.is_dir():
        raise SearchError(f"run folder not found: {target} (pass --run with a folder holding {CONFIG_FILE} "
                          f"and {WEIGHTS_FILE})")
    if checkpoint is not None and not target.exists():
        raise SearchError(f"checkpoint not found: {target} (pass a .safetensors export or an official IRRA "
                          "best.pth)")
    loaded = load_model(target, weights=weights, image_size=image_size, stride_size=stride_size)
    run_dir = loaded.source.run_dir
    home = run_dir or (target if target.is_dir() else target.parent)
    default_gallery = None
    if run_dir is not None:
        shards = Path(load_run_config(run_dir).eval_shards())
        default_gallery = shards if (shards / MANIFEST_NAME).is_file() else None
    model = loaded.model.eval()
    size = model.base_model.visual.image_size
    # The test split is the evaluation gallery; val (where runs now select) is often a small carve-out.
    return SearchModel(model, loaded.source.digest_file, (int(size[0]), int(size[1])), home, default_gallery,
                       "test")


def file_digest(path: Path, memo_dir: Path | None = None) -> str:
    """SHA-256 of a file; with `memo_dir`, remembered there per (path, size, mtime) so big files hash once.

    Args:
        path: the file.
        memo_dir: folder for the remembered digests; None hashes every time.

    Returns:
        The hex digest.
    """
    st = path.stat()
    memo = None
    if memo_dir is not None:
        stat_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        memo = memo_dir / f"weights_{hashlib.sha256(stat_key.encode()).hexdigest()[:20]}.sha256"
        if memo.is_file():
            text = memo.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{64}", text):
                return text
    hexdigest = file_sha256(path)
    if memo is not None:
        atomic_write_bytes(memo, hexdigest.encode() + b"\n")
    return hexdigest


def weights_sha256(loaded: SearchModel) -> str:
    """SHA-256 of the model's weights file, remembered in ``<run or checkpoint folder>/cache`` if writable."""
    try:
        return file_digest(loaded.weights_path, loaded.home / "cache")
    except OSError:
        return file_digest(loaded.weights_path)


def model_section(loaded: SearchModel, source: Path, weights: str) -> dict:
    """What an index or an ONNX export records of the model that made it: its fingerprint (weights and input
    size, :func:`irra_dist.retrieval.index.model_fingerprint`), where it came from and its embedding size."""
    sha = weights_sha256(loaded)
    return {"fingerprint": model_fingerprint(sha, loaded.image_size), "weights_sha256": sha,
            "image_size": list(loaded.image_size), "source": str(source.resolve()),
            "source_kind": "run" if source.is_dir() else "checkpoint", "weights": weights,
            "embed_dim": int(loaded.model.embed_dim)}
